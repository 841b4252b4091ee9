"""Five cohort filters written in Polars: requests and seconds with the filter pushed, and not.

Against the local service (5,000 image sets, 50 ms a request, 25 TPS with a burst of 50, the
service's quota), each filter runs twice in the same run, from empty statistics each time:

- pushed: ``scan_image_sets(ds).filter(expr).collect()``: the source translates the filter into
  the query, the planner picks the requests;
- not pushed: ``scan_image_sets(ds).collect().filter(expr)``: what a Polars source that ignores
  the predicate costs (every image set read, then filtered in Polars).

Both results are checked equal. Run: ``python -m bench polars_bench`` (``--no-write`` to print
only).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bench._report import machine, write_section

IMAGE_SETS = 5_000
LATENCY_MS = 50.0
TITLE = "Polars filters pushed into the planner"


def filters(everything: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """The five cohort filters, values taken from the data (as a user's would be)."""
    import polars as pl

    patients = everything["PatientID"].drop_nulls().unique().sort().to_list()
    accession = everything["AccessionNumber"].drop_nulls().sort()[10]
    stamps = everything["updatedAt"].sort()
    recent = stamps[int(len(stamps) * 0.98)]
    return [
        (
            "one patient's CT and MR: `PatientID == p & Modality.is_in([CT, MR])`",
            lambda lf: lf.filter(
                (pl.col("PatientID") == patients[7]) & pl.col("Modality").is_in(["CT", "MR"])
            ),
        ),
        (
            "20 patients, primary copies: `PatientID.is_in(20) & isPrimary`",
            lambda lf: lf.filter(
                pl.col("PatientID").is_in(patients[100:120]) & pl.col("isPrimary")
            ),
        ),
        (
            "studies of one month: `StudyDateTime.is_between(...)`",
            lambda lf: lf.filter(
                pl.col("StudyDateTime").is_between(
                    datetime(2021, 3, 1), datetime(2021, 3, 31, 23, 59, 59)
                )
            ),
        ),
        (
            "updated since a moment (the newest 2%): `updatedAt >= t`",
            lambda lf: lf.filter(pl.col("updatedAt") >= recent),
        ),
        (
            "an accession or a patient, per study (SQL's OR and GROUP BY)",
            lambda lf: pl.SQLContext(frames={"image_sets": lf}).execute(
                "SELECT StudyInstanceUID, count(*) AS n FROM image_sets "
                f"WHERE AccessionNumber = '{accession}' OR PatientID = '{patients[42]}' "
                "GROUP BY 1",
                eager=False,
            ),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    import polars as pl

    from healthimaging_df import Query
    from healthimaging_df.local import LocalService
    from healthimaging_df.polars import scan_image_sets

    lines = [
        f"Measured with `python -m bench polars_bench` on {machine()}: {IMAGE_SETS:,} image sets, "
        f"{LATENCY_MS:.0f} ms a request, 25 TPS / 50 burst on the service and `max_tps=25` on the "
        "client; each run from empty statistics.",
        "",
        "| filter | rows | pushed: requests | seconds | not pushed: requests | seconds | "
        "requests saved |",
        "|---|---|---|---|---|---|---|",
    ]
    with LocalService.seeded(image_sets=IMAGE_SETS, seed=42) as service:
        client = service.client()
        datastore = service.datastore_id
        assert datastore is not None
        everything = Query(datastore).to_polars(client=client, progress=False, max_tps=None)
        service.set_faults(latency_ms=LATENCY_MS, tps=25.0, burst=50)

        def timed(build: Callable[[], Any]) -> tuple[Any, int, float]:
            with tempfile.TemporaryDirectory() as cache:
                os.environ["HEALTHIMAGING_DF_CACHE"] = cache
                service.reset_stats()
                started = time.perf_counter()
                result = build()
                seconds = time.perf_counter() - started
                return result, sum(service.stats.by_operation.values()), seconds

        for name, apply in filters(everything):
            lf = scan_image_sets(datastore, client=client)
            pushed, n_pushed, s_pushed = timed(lambda: apply(lf).collect())  # noqa: B023
            polars_only, n_all, s_all = timed(
                lambda: apply(lf.collect().lazy()).collect()  # noqa: B023
            )
            key = pushed.columns[0]
            assert pushed.sort(key).equals(polars_only.sort(key)), name
            lines.append(
                f"| {name} | {pushed.height:,} | {n_pushed} | {s_pushed:.1f} | {n_all} | "
                f"{s_all:.1f} | {n_all / max(n_pushed, 1):.0f}x |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "Requests count every call the service answered (SearchImageSets, and QIDO-RS where the "
        "planner chose it). A one-sided `updatedAt >= t` becomes a range from t to two days ahead "
        "(the planner's own bound); a filter the source cannot translate costs what the "
        "not-pushed column shows, and is still exact.",
    ]
    if not args.no_write:
        write_section(TITLE, "\n".join(lines))
    del pl


if __name__ == "__main__":
    main()
