"""fetch_metadata at scale: calls/s and peak RSS at 50 TPS, old (row-wise, documents kept) vs new.

The local service runs in its own process and answers GetImageSetMetadata with series of 5 or 300
instances, 44 attributes each (20 the instances share, 24 their own, ``ImagePositionPatient`` a
list), paced server-side at the default quota (50 TPS, burst 100) with 20 ms latency. Each
measurement runs in a fresh child process (so peak RSS is its own) calling
``fetch_metadata(max_tps=50)`` on ``N_IMAGE_SETS`` image sets: "old" is ``metadata.py`` as of
``OLD_REF`` (every parsed document kept until the end, stdlib json, row dicts), "new" this tree.

Run: ``python -m bench metadata_scale_bench`` (about a minute); results go to docs/benchmarks.md.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import warnings
from functools import cache
from pathlib import Path
from typing import Any

N_IMAGE_SETS = 400
MAX_TPS = 50
LATENCY_MS = 20
SIZES = (5, 300)
ATTRIBUTES = 44
OLD_REF = "612dfb1"  # the last commit before the column-wise rewrite
TITLE = "fetch_metadata at scale (large series, old vs new)"
ROOT = Path(__file__).resolve().parents[1]


def big_document(datastore_id: str, image_set_id: str, instances: int) -> dict[str, Any]:
    """A series of *instances* instances with ``ATTRIBUTES`` attributes each."""
    series_uid = "1.2.826.0.1.3680043.8.498." + str(int(image_set_id[:8], 16))
    shared = {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "Rows": 512,
        "Columns": 512,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        "PhotometricInterpretation": "MONOCHROME2",
        "SamplesPerPixel": 1,
        "SliceThickness": 1.25,
        "PixelSpacing": [0.7, 0.7],
        "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "KVP": "120",
        "ConvolutionKernel": "STANDARD",
        "RescaleIntercept": "-1024",
        "RescaleSlope": "1",
        "Manufacturer": "ACME",
        "ManufacturerModelName": "Scanner 9000",
        "StationName": "CT01",
        "ProtocolName": "CHEST ROUTINE",
    }
    own = ATTRIBUTES - len(shared)
    members: dict[str, Any] = {}
    for number in range(1, instances + 1):
        dicom: dict[str, Any] = dict(shared)
        dicom["SOPInstanceUID"] = f"{series_uid}.{number}"
        dicom["InstanceNumber"] = number
        dicom["ImagePositionPatient"] = [-250.0, -250.0, -1.25 * number]
        dicom["SliceLocation"] = -1.25 * number
        for k in range(own - 4):
            dicom[f"PrivateAttribute{k:02d}"] = f"value-{number}-{k}"
        members[dicom["SOPInstanceUID"]] = {"DICOM": dicom, "ImageFrames": []}
    return {
        "SchemaVersion": "1.1",
        "DatastoreID": datastore_id,
        "ImageSetID": image_set_id,
        "Patient": {"DICOM": {"PatientID": "P" + image_set_id[:6]}},
        "Study": {
            "DICOM": {"StudyInstanceUID": series_uid + ".0"},
            "Series": {
                series_uid: {
                    "DICOM": {"Modality": "CT", "SeriesInstanceUID": series_uid},
                    "Instances": members,
                }
            },
        },
    }


def serve(instances: int, ready: Any) -> None:
    """The server process: a seeded service whose metadata documents are *instances* large."""
    from healthimaging_df.local import LocalService, wire
    from healthimaging_df.local.backend import Backend

    class BigBackend(Backend):
        def get_image_set_metadata(
            self, datastore_id: str, image_set_id: str, version: int | str | None = None
        ) -> dict[str, Any]:
            super().get_image_set_metadata(datastore_id, image_set_id, version)  # the access
            return {"ImageSetID": image_set_id, "DatastoreID": datastore_id}

    @cache
    def blob(datastore_id: str, image_set_id: str) -> bytes:
        document = big_document(datastore_id, image_set_id, instances)
        return gzip.compress(json.dumps(document).encode(), compresslevel=1, mtime=0)

    wire.gzip_document = lambda document: blob(document["DatastoreID"], document["ImageSetID"])  # type: ignore[attr-defined]
    seeded = LocalService.seeded(image_sets=N_IMAGE_SETS, seed=2)
    backend = BigBackend()
    backend.__dict__.update(seeded.backend.__dict__)
    service = LocalService(backend)
    service.datastore_id = seeded.datastore_id
    with service:
        ready.send((service.endpoint_url, service.datastore_id))
        while ready.recv() == "quota":  # until told to stop
            service.set_faults(latency_ms=LATENCY_MS, tps=MAX_TPS, burst=2 * MAX_TPS)
            ready.send("ok")


def child(implementation: str, instances: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from bench._report import measure
    from bench.page_bench import client_for
    from healthimaging_df import Query
    from healthimaging_df.metadata import ArchiveAccessWarning

    if implementation == "old":
        import importlib.util

        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{OLD_REF}:healthimaging_df/metadata.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = Path(tempfile.mkdtemp()) / "old_metadata.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("old_metadata", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_metadata"] = module
        spec.loader.exec_module(module)
        fetch = module.fetch_metadata
    else:
        from healthimaging_df.metadata import fetch_metadata as fetch

    parent, child_end = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(instances, child_end))
    server.start()
    try:
        endpoint, datastore = parent.recv()
        client = client_for(endpoint)
        frame = Query(datastore).to_dataframe(client=client, progress=False, max_tps=None)
        # Warm the server's document cache so it never limits the client.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ArchiveAccessWarning)
            fetch(frame, client=client, max_tps=None, max_concurrency=2, progress=False)

            def run() -> Any:
                return fetch(frame, client=client, max_tps=MAX_TPS, progress=False)

            parent.send("quota")  # the quota applies server-side from the timed run on
            parent.recv()
            cpu = time.process_time()
            seconds, peak, result = measure(run)
            cpu = time.process_time() - cpu
    finally:
        parent.send("stop")
        server.join(timeout=30)
    return {
        "calls": len(frame),
        "rows": len(result),
        "seconds": seconds,
        "cpu": cpu,
        "peak_mib": peak / 2**20,
        "columns": result.shape[1],
    }


def main() -> None:
    from bench._report import machine, write_section

    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    lines = [
        f"{N_IMAGE_SETS} image sets, one series each, {ATTRIBUTES} attributes per instance, "
        f"`fetch_metadata(max_tps={MAX_TPS})` (series level, 8 threads); server in its own "
        f"process, {LATENCY_MS} ms latency; each row a fresh process; {machine()}.",
        "",
        "| instances per series | implementation | calls/s | share of quota | client CPU s | peak RSS growth MiB |",
        "|---|---|---|---|---|---|",
    ]
    for instances in SIZES:
        for implementation in ("old", "new"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.metadata_scale_bench",
                    "--child",
                    implementation,
                    str(instances),
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rate = r["calls"] / r["seconds"]
            lines.append(
                f"| {instances} | {implementation} | {rate:.1f} | {rate / MAX_TPS:.0%} | "
                f"{r['cpu']:.1f} | {r['peak_mib']:.0f} |"
            )
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if "--no-write" not in sys.argv:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
