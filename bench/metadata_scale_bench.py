"""fetch_metadata at scale: calls/s, share of the quota, client CPU and peak RSS at 50 TPS.

The local service runs in its own process and answers GetImageSetMetadata with its realistic
series (``instances_per_series`` of 5, 300 or 500 instances, 44 attributes each; the gzipped
documents generated before the run so the server never limits the client), paced server-side
at the default quota (50 TPS, burst 100) with 20 ms latency. Each measurement runs in a fresh
child process (so peak RSS is its own) on ``N_IMAGE_SETS`` image sets:

- ``fetch_metadata``: this tree's ``fetch_metadata(max_tps=50)`` (8 threads, series level);
- ``before``: the same call with ``metadata.py`` and ``aws.RateLimiter`` as of ``OLD_REF``
  (the bucket refilled from wake-up times, the collector walking every parsed document);
- ``serial loop``: the obvious alternative, ``get_image_set_metadata`` + ``gzip`` +
  ``json.loads`` + a dict per series row, one call after another (on the first ``N_SERIAL``).

Run: ``python -m bench metadata_scale_bench`` (about 10 minutes); results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

N_IMAGE_SETS = 2000
N_SERIAL = 400
MAX_TPS = 50
LATENCY_MS = 20
SIZES = (5, 300, 500)
ATTRIBUTES = 44
OLD_REF = "3d7b73d"  # the last commit before the slot-schedule limiter and the collector pause
TITLE = "fetch_metadata at scale (large series, old vs new)"
ROOT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("before", "fetch_metadata", "serial loop")


def serve(instances: int, ready: Any) -> None:
    """The server process: realistic series of *instances*, every document generated first."""
    from healthimaging_df.local import LocalService, SeriesShape
    from healthimaging_df.local.backend import Backend
    from healthimaging_df.local.generate import generate_image_sets

    backend = Backend(
        series_shape=SeriesShape(instances, ATTRIBUTES), metadata_cache_size=N_IMAGE_SETS + 16
    )
    datastore_id = backend.create_datastore("seeded")
    backend.add_image_sets(datastore_id, generate_image_sets(N_IMAGE_SETS, 2))
    for record in backend.image_sets(datastore_id):
        backend.get_image_set_metadata_gzip(datastore_id, record["imageSetId"])
    service = LocalService(backend)
    service.datastore_id = datastore_id
    with service:
        ready.send((service.endpoint_url, datastore_id))
        while ready.recv() == "quota":  # until told to stop
            service.set_faults(latency_ms=LATENCY_MS, tps=MAX_TPS, burst=2 * MAX_TPS)
            service.reset_stats()
            ready.send("ok")
            ready.recv()  # "stats"
            ready.send(service.stats.throttled)


def _module_at(ref: str, path: str, name: str) -> types.ModuleType:
    import importlib.util

    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _serial(frame: Any, client: Any, datastore: str) -> Any:
    """The obvious loop: one call after another, stdlib json, a dict per series row."""
    import pandas as pd

    rows = []
    for image_set_id in frame["imageSetId"]:
        response = client.get_image_set_metadata(datastoreId=datastore, imageSetId=image_set_id)
        document = json.loads(gzip.decompress(response["imageSetMetadataBlob"].read()))
        for series_uid, series in document["Study"]["Series"].items():
            row = {"imageSetId": image_set_id, "SeriesInstanceUID": series_uid}
            row.update(series.get("DICOM", {}))
            dicoms = [i.get("DICOM", {}) for i in series.get("Instances", {}).values()]
            for keyword, value in (dicoms[0] if dicoms else {}).items():
                if keyword not in row and all(d.get(keyword) == value for d in dicoms):
                    row[keyword] = value
            rows.append(row)
    return pd.DataFrame(rows)


def child(implementation: str, instances: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from bench._report import measure
    from bench.page_bench import client_for
    from healthimaging_df import Query
    from healthimaging_df.metadata import ArchiveAccessWarning

    if implementation == "before":
        old_aws = _module_at(OLD_REF, "healthimaging_df/aws.py", "old_aws")
        old = _module_at(OLD_REF, "healthimaging_df/metadata.py", "old_metadata")
        old.RateLimiter = old_aws.RateLimiter  # type: ignore[attr-defined]
        old.aws = old_aws  # type: ignore[attr-defined]  # its own pacing hook for its own limiter
        fetch = old.fetch_metadata
    else:
        import functools

        from healthimaging_df.metadata import fetch_metadata

        # the bench reads every image set, archived ones too: the opt-in the default refuses
        fetch = functools.partial(fetch_metadata, allow_archive_access=True)

    parent, child_end = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(instances, child_end))
    server.start()
    try:
        endpoint, datastore = parent.recv()
        client = client_for(endpoint)
        frame = Query(datastore).to_dataframe(client=client, progress=False, max_tps=None)
        if implementation == "serial loop":
            frame = frame.head(N_SERIAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ArchiveAccessWarning)
            fetch(frame.head(16), client=client, max_tps=None, progress=False)  # warm the client

            def run() -> Any:
                if implementation == "serial loop":
                    return _serial(frame, client, datastore)
                return fetch(frame, client=client, max_tps=MAX_TPS, progress=False)

            parent.send("quota")  # the quota applies server-side from the timed run on
            parent.recv()
            cpu = time.process_time()
            seconds, peak, result = measure(run)
            cpu = time.process_time() - cpu
            parent.send("stats")
            throttled = parent.recv()
    finally:
        parent.send("stop")
        server.join(timeout=60)
    return {
        "calls": len(frame),
        "rows": len(result),
        "seconds": seconds,
        "cpu": cpu,
        "peak_mib": peak / 2**20,
        "throttled": throttled,
    }


def main() -> None:
    from bench._report import machine, write_section

    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or list(SIZES)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Measured {started}; command: `python -m bench metadata_scale_bench`. "
        f"{N_IMAGE_SETS:,} image sets, one series each, {ATTRIBUTES} attributes per instance "
        f"(the local service's realistic series), series level, 8 threads, "
        f"`max_tps={MAX_TPS}`; the serial loop on the first {N_SERIAL}. Server in its own "
        f"process (documents generated before the run), {LATENCY_MS} ms latency, "
        f"{MAX_TPS} TPS burst {2 * MAX_TPS} server-side; each row a fresh client process; "
        f"client CPU = `time.process_time()` of that process; {machine()}.",
        "",
        "| instances per series | implementation | calls/s | share of quota | client CPU ms/call "
        "| peak RSS growth MiB | throttled |",
        "|---|---|---|---|---|---|---|",
    ]
    rates: dict[tuple[int, str], float] = {}
    loads = [os.getloadavg()[0]]
    for instances in sizes:
        for implementation in IMPLEMENTATIONS:
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
            rates[instances, implementation] = rate
            lines.append(
                f"| {instances} | {implementation} | {rate:.1f} | {rate / MAX_TPS:.1%} | "
                f"{1000 * r['cpu'] / r['calls']:.1f} | {r['peak_mib']:.0f} | {r['throttled']} |"
            )
            print(lines[-1], flush=True)
            loads.append(os.getloadavg()[0])
    summary = "; ".join(
        f"{n} instances: {rates[n, 'fetch_metadata'] / MAX_TPS:.1%} of the quota, "
        f"{rates[n, 'fetch_metadata'] / rates[n, 'before']:.2f}x before, "
        f"{rates[n, 'fetch_metadata'] / rates[n, 'serial loop']:.1f}x the serial loop"
        for n in sizes
    )
    lines += [
        "",
        f"fetch_metadata: {summary}. Target: >= 95% of the quota (47.5 calls/s; the limiter "
        f"paces at HEADROOM x max_tps). Load average (1 min) during the run: "
        f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores (above 1-2 means other "
        "processes shared the machine and depressed the shares).",
    ]
    body = "\n".join(lines)
    print(body)
    if "--no-write" not in sys.argv:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
