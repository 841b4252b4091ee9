"""Refresh of a single-file snapshot after 1% changed, against a re-export, in one run.

The bundled local service holds ``--image-sets`` image sets (default 20,000) behind 100 ms of
latency and a 25 TPS token bucket (burst 50); the client paces at ``max_tps=25``. The whole
datastore is exported to one Parquet file with ``to_parquet``; then 1% of the image sets change
(60% a new version, 20% flip ``isPrimary``, 20% newly imported), and in the same run
``refresh_snapshot`` (a scan of what changed since the snapshot's watermark, then a rewrite of the
file) is set against ``to_parquet`` again to a second file (the obvious alternative). Requests are
counted at the service. Both files must hold the same rows (``lastAccessedAt`` and
``storageTier`` aside, which reads change).

Run: ``python -m bench refresh_bench``; the issue's bar: refresh stays at a handful of requests and
under a second where a re-export takes the full scan.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from bench._report import machine, write_section
from healthimaging_df import Query
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import read_snapshot

TITLE = "Snapshot refresh of a single file (after 1% changed) vs a re-export"
PACED: dict[str, Any] = {"progress": False, "max_tps": 25.0}


def _change(service: LocalService, seed: int) -> int:
    """Change 1% of the image sets (at least 5); return how many."""
    rng = random.Random(seed)
    datastore = str(service.datastore_id)
    current = list(service.backend.image_sets(datastore))
    changed = max(5, len(current) // 100)
    picked = rng.sample(current, int(changed * 0.8))
    updated, flipped = picked[: int(changed * 0.6)], picked[int(changed * 0.6) :]
    for item in updated:
        service.backend.update_image_set(
            datastore, item["imageSetId"], tags={"DICOMSeriesModality": "XA"}
        )
    for item in flipped:
        service.backend.update_image_set(
            datastore, item["imageSetId"], is_primary=not item["isPrimary"]
        )
    new = generate_image_sets(changed - len(picked), seed=seed + 10_000)
    now = datetime.now(timezone.utc)
    for item in new:  # imported now, as the service stamps a new import
        item.update(createdAt=now, updatedAt=now)
    service.backend.add_image_sets(datastore, new)
    return changed


def _timed(service: LocalService, fn: Any) -> tuple[float, int, int, Any]:
    service.reset_stats()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    stats = service.stats
    return seconds, stats.requests, stats.throttled, result


def run(image_sets: int, seed: int = 0) -> dict[str, Any]:
    with (
        LocalService.seeded(
            image_sets=image_sets, seed=seed, latency_ms=100, tps=25, burst=50
        ) as service,
        tempfile.TemporaryDirectory() as tmp,
    ):
        client = service.client()
        query = Query(str(service.datastore_id))
        snapshot, again = Path(tmp) / "snapshot.parquet", Path(tmp) / "again.parquet"
        export_s, export_n, _, exported = _timed(
            service, lambda: query.to_parquet(str(snapshot), client=client, **PACED)
        )
        time.sleep(1.1)  # the changes land after the snapshot's watermark, as in life
        changed = _change(service, seed)
        refresh_s, refresh_n, refresh_throttled, report = _timed(
            service, lambda: refresh_snapshot(snapshot, client=client, **PACED)
        )
        again_s, again_n, again_throttled, _ = _timed(
            service, lambda: query.to_parquet(str(again), client=client, **PACED)
        )
        frames = [read_snapshot(p) for p in (snapshot, again)]
        plain = []
        for df in frames:
            df = df.drop(columns=["lastAccessedAt", "storageTier"])
            df.attrs = {}
            plain.append(df.sort_values("imageSetId").reset_index(drop=True))
        try:
            pd.testing.assert_frame_equal(plain[0], plain[1])
            same = True
        except AssertionError as exc:
            print(str(exc)[:300])
            same = False
        return {
            "rows": exported.rows,
            "rows_after": len(frames[0]),
            "changed": changed,
            "export_s": export_s,
            "export_n": export_n,
            "refresh_s": refresh_s,
            "refresh_n": refresh_n,
            "refresh_throttled": refresh_throttled,
            "again_s": again_s,
            "again_n": again_n,
            "again_throttled": again_throttled,
            "report": str(report).split(" (")[0],
            "identical": same,
        }


def markdown(r: dict[str, Any], image_sets: int) -> str:
    return "\n".join(
        [
            f"Command: `python -m bench refresh_bench` ({image_sets:,} image sets in the bundled "
            "local service, 100 ms latency, 25 TPS token bucket with burst 50, client "
            f"`max_tps=25`; {machine()}). Snapshot: `Query(ds).to_parquet('snapshot.parquet')` "
            f"({r['rows']:,} rows, {r['export_n']:,} requests, {r['export_s']:.1f} s). Then "
            f"{r['changed']:,} image sets (1%) changed: 60% a new version, 20% `isPrimary` "
            "flipped, 20% new. Same run, one run each; requests counted at the service.",
            "",
            "| | seconds | requests | throttled | rows after |",
            "|---|---|---|---|---|",
            f"| `refresh_snapshot('snapshot.parquet')` ({r['report']}) | {r['refresh_s']:.2f} | "
            f"{r['refresh_n']:,} | {r['refresh_throttled']} | {r['rows_after']:,} |",
            f"| `to_parquet` again (a re-export) | {r['again_s']:.2f} | {r['again_n']:,} | "
            f"{r['again_throttled']} | {r['rows_after']:,} |",
            f"| **re-export / refresh** | **{r['again_s'] / r['refresh_s']:.0f}x the time** | "
            f"**{r['again_n'] / max(r['refresh_n'], 1):.0f}x the requests** | | |",
            "",
            "The refreshed file equals the re-export (`lastAccessedAt` and `storageTier` aside): "
            + ("yes." if r["identical"] else "**no**."),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-sets", type=int, default=20_000)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    section = markdown(run(args.image_sets), args.image_sets)
    print(section)
    if not args.no_docs:
        write_section(TITLE, section)


if __name__ == "__main__":
    main()
