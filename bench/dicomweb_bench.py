"""Series enrichment: QIDO-RS ``includefield`` against ``fetch_metadata`` (GetImageSetMetadata).

2,000 image sets on the local service, 20 ms latency per request, one server-side quota of
100 TPS (burst 200) for every operation, each client paced at 100 requests/s: twice
GetImageSetMetadata's documented default of 50, to keep the run under a minute (QIDO-RS's
quota is undocumented, so it gets the same). Calls do not depend on the quota; seconds scale
with it. Three ways to get
SeriesDescription and Manufacturer onto the frame, in one run: QIDO per study
(``/studies/{S}/series``), QIDO datastore-wide (``/series``, 1,000 series a page), and one
GetImageSetMetadata per image set. Archived image sets are counted before and after each.

Run: ``python -m bench dicomweb_bench`` (under a minute); results go to docs/benchmarks.md.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

N_IMAGE_SETS = 2_000
LATENCY_MS = 20
MAX_TPS = 100
FIELDS = ["SeriesDescription", "Manufacturer"]
TITLE = "Series enrichment (QIDO-RS includefield vs GetImageSetMetadata)"


def _archived(service: Any) -> int:
    records = service.backend.image_sets(service.datastore_id)
    return sum(r["storageTier"] == "ARCHIVE_INSTANT_ACCESS" for r in records)


def main() -> None:
    from bench._report import machine, write_section
    from healthimaging_df import Query
    from healthimaging_df.dicomweb import fetch_series_attributes
    from healthimaging_df.local import LocalService
    from healthimaging_df.metadata import ArchiveAccessWarning

    rows = []
    with LocalService.seeded(image_sets=N_IMAGE_SETS, seed=1) as service:
        assert service.datastore_id is not None
        client = service.client()
        frame = Query(service.datastore_id).to_dataframe(client=client, progress=False)
        studies = frame["StudyInstanceUID"].nunique()
        service.set_faults(latency_ms=LATENCY_MS, tps=MAX_TPS, burst=2 * MAX_TPS)
        runs: list[tuple[str, str, Any]] = [
            (
                "QIDO `/studies/{S}/series` per study",
                "SearchDICOMSeries",
                lambda: fetch_series_attributes(frame, FIELDS, client=client, max_tps=MAX_TPS),
            ),
            (
                "QIDO `/series` datastore-wide",
                "SearchDICOMSeries",
                lambda: fetch_series_attributes(
                    frame, FIELDS, client=client, max_tps=MAX_TPS, scope="datastore"
                ),
            ),
            (
                "`fetch_metadata` (one GetImageSetMetadata per image set)",
                "GetImageSetMetadata",
                lambda: frame.ahi.fetch_metadata(client=client, max_tps=MAX_TPS, progress=False),
            ),
        ]
        for label, operation, run in runs:
            archived_before = _archived(service)
            service.reset_stats()
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ArchiveAccessWarning)
                result = run()
            seconds = time.perf_counter() - started
            stats = service.stats
            filled = int(result[FIELDS[1]].notna().sum())
            rows.append(
                (label, stats.by_operation.get(operation, 0), seconds, stats.throttled, filled,
                 archived_before, _archived(service))
            )  # fmt: skip

    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; command: "
        "`python -m bench dicomweb_bench`.",
        "",
        f"{N_IMAGE_SETS:,} image sets ({studies} studies) on the local service, {LATENCY_MS} ms "
        f"latency per request, server-side quota {MAX_TPS} TPS / burst {2 * MAX_TPS}, clients "
        f"paced at {MAX_TPS}/s, 8 threads. Fields: {', '.join(FIELDS)}.",
        "",
        "| run | calls | seconds | throttled | rows with Manufacturer | archived before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for label, calls, seconds, throttled, filled, before, after in rows:
        lines.append(
            f"| {label} | {calls:,} | {seconds:.1f} | {throttled} | {filled:,} | "
            f"{before:,} -> {after:,} |"
        )
    per_study, wide, metadata = rows
    lines += [
        "",
        f"QIDO per study: {metadata[1] / max(per_study[1], 1):.1f}x fewer calls and "
        f"{metadata[2] / per_study[2]:.1f}x faster than fetch_metadata; datastore-wide: "
        f"{metadata[1] / max(wide[1], 1):.0f}x fewer calls, {metadata[2] / wide[2]:.0f}x faster. "
        "QIDO leaves archived image sets archived; every GetImageSetMetadata call is an access "
        "that moves one back to FREQUENT_ACCESS. QIDO fills rows of non-primary copies with "
        "their series' primary values; fetch_metadata reads each image set's own document.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section(TITLE, body)


if __name__ == "__main__":
    main()
