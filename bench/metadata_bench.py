"""Metadata enrichment benchmark: ``df.ahi.fetch_metadata`` against the rate limit and a serial loop.

2,000 image sets on the local service with 50 ms latency per request and the service's default
GetImageSetMetadata quota enforced server-side (50 TPS, burst 100). ``fetch_metadata(max_tps=50)``
should run within 20% of the limit (at least 40 calls/s) with no throttling; the baseline is the loop
a user would write by hand: one ``get_image_set_metadata`` after another, gunzip, ``json.loads``,
series rows into a DataFrame (timed on the first ``SERIAL_SAMPLE`` image sets: its rate is flat).

Run: ``python -m bench metadata_bench`` (about a minute); results go to docs/benchmarks.md.
"""

from __future__ import annotations

import gzip
import json
import time
import warnings
from typing import Any

N_IMAGE_SETS = 2_000
LATENCY_MS = 50
MAX_TPS = 50
SERIAL_SAMPLE = 500
TITLE = "Metadata enrichment (GetImageSetMetadata under the rate limit)"


def serial_loop(client: Any, datastore_id: str, image_set_ids: list[str]) -> Any:
    """What a user writes without the library."""
    import pandas as pd

    rows = []
    for image_set_id in image_set_ids:
        response = client.get_image_set_metadata(datastoreId=datastore_id, imageSetId=image_set_id)
        document = json.loads(gzip.decompress(response["imageSetMetadataBlob"].read()))
        for uid, series in document["Study"]["Series"].items():
            rows.append({"imageSetId": image_set_id, "SeriesInstanceUID": uid, **series["DICOM"]})
    return pd.DataFrame(rows)


def main() -> None:
    from bench._report import machine, write_section
    from healthimaging_df import Query
    from healthimaging_df.local import LocalService
    from healthimaging_df.metadata import ArchiveAccessWarning

    with LocalService.seeded(image_sets=N_IMAGE_SETS, seed=1) as service:
        assert service.datastore_id is not None
        client = service.client()
        frame = Query(service.datastore_id).to_dataframe(client=client, progress=False)
        service.set_faults(latency_ms=LATENCY_MS, tps=MAX_TPS, burst=2 * MAX_TPS)
        service.reset_stats()

        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ArchiveAccessWarning)
            ours = frame.ahi.fetch_metadata(
                client=client, max_tps=MAX_TPS, progress=False, allow_archive_access=True
            )
        ours_seconds = time.perf_counter() - started
        stats = service.stats
        calls = stats.by_operation.get("GetImageSetMetadata", 0)

        service.reset_stats()
        sample = frame["imageSetId"].head(SERIAL_SAMPLE).tolist()
        started = time.perf_counter()
        serial = serial_loop(client, service.datastore_id, sample)
        serial_seconds = time.perf_counter() - started
        serial_throttled = service.stats.throttled

    ours_rate = N_IMAGE_SETS / ours_seconds
    serial_rate = len(sample) / serial_seconds
    serial_total = N_IMAGE_SETS / serial_rate
    within = ours_rate / MAX_TPS
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; command: "
        "`python -m bench metadata_bench`.",
        "",
        f"{N_IMAGE_SETS:,} image sets on the local service, {LATENCY_MS} ms latency per request, "
        f"server-side quota {MAX_TPS} TPS / burst {2 * MAX_TPS} (the service default).",
        "",
        "| run | calls | seconds | calls/s | vs limit | throttled |",
        "|---|---|---|---|---|---|",
        f"| `df.ahi.fetch_metadata(max_tps={MAX_TPS})` (8 threads) | {calls:,} | "
        f"{ours_seconds:.1f} | {ours_rate:.1f} | {within:.0%} of {MAX_TPS}/s | "
        f"{stats.throttled} |",
        f"| serial `get_image_set_metadata` loop (first {len(sample)}) | {len(sample)} | "
        f"{serial_seconds:.1f} | {serial_rate:.1f} | {serial_rate / MAX_TPS:.0%} | "
        f"{serial_throttled} |",
        "",
        f"fetch_metadata: {len(ours):,} series rows x {ours.shape[1]} columns, peak "
        f"{stats.peak_concurrency} requests in flight. Target: within 20% of the limit "
        f"(>= {0.8 * MAX_TPS:.0f} calls/s): {'met' if within >= 0.8 else 'NOT met'}. "
        f"The serial loop ({len(serial):,} rows) is bound by latency: at {serial_rate:.1f} calls/s "
        f"all {N_IMAGE_SETS:,} would take {serial_total:.0f} s, {serial_total / ours_seconds:.1f}x "
        "longer.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section(TITLE, body)


if __name__ == "__main__":
    main()
