"""Refresh of a directory snapshot (Delta table): MERGE vs rewriting it, through the public API.

Run: ``.venv/bin/python -m bench delta_bench`` (``--rows``, ``--no-docs`` when run as
``python -c 'from bench.delta_bench import main; main([...])'``).

The bundled local service is seeded with ``--rows`` image sets; ``Query(ds).where(isPrimary=True)``
is exported with ``to_parquet(..., partition_cols=["Modality"])`` (a Delta table, rows in
``createdAt`` order, ``snapshot.TARGET_FILE_SIZE`` files). Then 1% of the image sets change in the
service: 60% get a new version (and a new Modality), 20% flip ``isPrimary`` (they leave the cohort)
and new image sets worth 20% are imported. Two placements of the changes: among recently created
image sets (what HealthImaging workloads do: new imports get edited and re-imported), and uniformly
at random (the worst case for copy-on-write MERGE: most files hold a changed row). In the same run,
``refresh_snapshot`` (fetch of the changes over HTTP plus one MERGE commit) is set against
``write_snapshot`` of the refreshed cohort to a second table (the rewrite, without any fetch; a
real re-export would also fetch every row again). Bytes are the data files each commit adds.
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

from bench._report import machine
from healthimaging_df import Query
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import (
    TARGET_FILE_SIZE,
    read_snapshot,
    snapshot_history,
    write_snapshot,
)

FAST: dict[str, Any] = {"progress": False, "max_tps": None}


def _data_bytes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in folder.rglob("*.parquet")}


def _change(service: LocalService, placement: str, seed: int) -> int:
    """Change 1% of the datastore's image sets; return how many changed."""
    rng = random.Random(seed)
    datastore = str(service.datastore_id)
    current = sorted(service.backend.image_sets(datastore), key=lambda s: s["createdAt"])
    changed = max(5, len(current) // 100)
    pool = current[-2 * changed :] if placement == "recent" else current
    picked = rng.sample(pool, int(changed * 0.8))
    updated, leavers = picked[: int(changed * 0.6)], picked[int(changed * 0.6) :]
    for item in updated:
        service.backend.update_image_set(
            datastore, item["imageSetId"], is_primary=True, tags={"DICOMSeriesModality": "XA"}
        )
    for item in leavers:
        service.backend.update_image_set(datastore, item["imageSetId"], is_primary=False)
    new = generate_image_sets(changed - len(picked), seed=seed + 10_000)
    now = datetime.now(timezone.utc)
    for item in new:  # imported now, as the service stamps a new import
        item.update(isPrimary=True, createdAt=now, updatedAt=now)
    service.backend.add_image_sets(datastore, new)
    return changed


def _one(rows: int, placement: str, seed: int) -> dict[str, Any]:
    with (
        LocalService.seeded(image_sets=rows, seed=seed) as service,
        tempfile.TemporaryDirectory() as tmp,
    ):
        client = service.client()
        query = Query(str(service.datastore_id)).where(isPrimary=True)
        merged, rewritten = Path(tmp) / "merged", Path(tmp) / "rewritten"
        exported = query.to_parquet(str(merged), client=client, partition_cols=["Modality"], **FAST)
        changed = _change(service, placement, seed)

        before = _data_bytes(merged)
        start = time.perf_counter()
        report = refresh_snapshot(merged, client=client, **FAST)
        merge_s = time.perf_counter() - start
        merge_bytes = sum(s for p, s in _data_bytes(merged).items() if p not in before)

        refreshed = read_snapshot(merged)
        start = time.perf_counter()
        rewrite = write_snapshot(refreshed, rewritten, partition_cols=["Modality"])
        rewrite_s = time.perf_counter() - start

        fresh = query.to_dataframe(client=client, **FAST)
        plain = [df.drop(columns=["lastAccessedAt", "storageTier"]) for df in (refreshed, fresh)]
        for df in plain:
            df.attrs = {}
        try:
            pd.testing.assert_frame_equal(
                plain[0].reset_index(drop=True), plain[1].reset_index(drop=True)
            )
            same = True
        except AssertionError as exc:
            print(str(exc)[:300])
            same = False
        merge = snapshot_history(merged).iloc[0]
        return {
            "rows": exported.rows,
            "changed": changed,
            "files": len(exported.files),
            "table_mb": exported.bytes / 1e6,
            "merge_s": merge_s,
            "merge_mb": merge_bytes / 1e6,
            "merge_op": str(merge["operation"]),
            "rewrite_s": rewrite_s,
            "rewrite_mb": float(rewrite.bytes_written or 0) / 1e6,
            "report": str(report).split(" (")[0],
            "identical": same,
        }


def run(rows: int) -> list[dict[str, Any]]:
    return [_one(rows, placement, seed) for seed, placement in enumerate(("recent", "uniform"))]


def markdown(results: list[dict[str, Any]], rows: int, command: str) -> str:
    lines = [
        f"Command: `{command}` ({rows:,} image sets in the bundled local service, cohort "
        f"`isPrimary=True` partitioned by Modality; 1% of the image sets changed: 60% new versions, "
        f"20% leavers, 20% new; {machine()}). Tables written by `to_parquet` in `createdAt` order, "
        f"{TARGET_FILE_SIZE // 1024} KiB target files. MERGE: `refresh_snapshot` (the change fetch "
        "over loopback HTTP included); rewrite: `write_snapshot` of the refreshed cohort (no fetch). "
        "One run each.",
        "",
        "| changes among | table (rows, files, MB) | refresh | MERGE (s) | MERGE writes (MB) | "
        "rewrite (s) | rewrite writes (MB) | bytes: rewrite / MERGE | time: rewrite / MERGE | "
        "equals a fresh query |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = "the newest 2% of image sets" if r["placement"] == "recent" else "all, at random"
        lines.append(
            f"| {label} | {r['rows']:,}, {r['files']}, {r['table_mb']:.2f} | {r['report']} | "
            f"{r['merge_s']:.2f} | {r['merge_mb']:.3f} | {r['rewrite_s']:.2f} | "
            f"{r['rewrite_mb']:.3f} | {r['rewrite_mb'] / max(r['merge_mb'], 1e-9):.1f}x | "
            f"{r['rewrite_s'] / r['merge_s']:.2f}x | {'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    results = run(args.rows)
    for result, placement in zip(results, ("recent", "uniform"), strict=True):
        result["placement"] = placement
    section = markdown(results, args.rows, "python -m bench delta_bench")
    print(section)
    if not args.no_docs:
        from bench._report import write_section

        write_section("Snapshot refresh (Delta MERGE vs rewrite)", section)


if __name__ == "__main__":
    main()
