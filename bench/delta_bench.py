"""Refresh of a Delta snapshot: MERGE of the changed image sets vs rewriting the whole table.

Run: ``.venv/bin/python -m bench delta_bench`` (``--rows``, ``--repeat``, ``--no-docs`` when run as
``python -c 'from bench.delta_bench import main; main([...])'``).

A table of ``--rows`` generated image sets (the cohort ``isPrimary`` true), in ``createdAt`` order,
written with 512 KiB target files. Then 1% of its image sets change: 60% get a new version (and a
new Modality), 20% flip ``isPrimary`` (they leave the cohort), and new image sets worth 20% are
created. Both refreshes start from the same table in the same run: ``merge_table`` with the
changed rows and the leavers, and ``write_table`` of the whole refreshed cohort. Bytes written are
the data files each commit adds (the log is a few KB either way). Two placements of the changes:
among recently created image sets (what HealthImaging workloads do: new imports get edited and
re-imported), and uniformly at random (the worst case for copy-on-write MERGE: most files hold a
changed row). Every figure is the median of ``--repeat`` runs; no HTTP.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from bench._report import machine
from healthimaging_df import delta, flatten
from healthimaging_df.local import generate_image_sets

TARGET_FILE_SIZE = 512 * 1024
PROVENANCE = {"datastore_id": "0" * 32, "schema_version": "1"}


def _cohort(rows: int) -> pa.Table:
    table = flatten.summaries_to_table(generate_image_sets(rows, seed=1))
    primary = table.set_column(
        table.schema.get_field_index("isPrimary"), "isPrimary", pa.array([True] * table.num_rows)
    )
    return primary.sort_by("createdAt")


def _changes(base: pa.Table, placement: str, seed: int) -> tuple[pa.Table, list[str], pa.Table]:
    """(incoming rows, leaver ids, expected refreshed table) for 1% of *base* changing."""
    rng = random.Random(seed)
    changed = max(1, base.num_rows // 100)
    pool = range(base.num_rows)
    if placement == "recent":
        pool = range(base.num_rows - 2 * changed, base.num_rows)  # the newest 2% of image sets
    picked = rng.sample(list(pool), int(changed * 0.8))
    updated_rows = sorted(picked[: int(changed * 0.6)])
    leaver_rows = sorted(picked[int(changed * 0.6) :])
    updated = base.take(updated_rows)
    updated = updated.set_column(
        updated.schema.get_field_index("version"), "version", pc.add(updated.column("version"), 1)
    )
    later = pc.add(updated.column("updatedAt"), pa.scalar(timedelta(days=1)))
    updated = updated.set_column(updated.schema.get_field_index("updatedAt"), "updatedAt", later)
    updated = updated.set_column(
        updated.schema.get_field_index("Modality"), "Modality", pa.array(["XA"] * len(updated))
    )
    new = flatten.summaries_to_table(generate_image_sets(changed - len(picked), seed=seed + 1000))
    new = new.set_column(
        new.schema.get_field_index("isPrimary"), "isPrimary", pa.array([True] * len(new))
    )
    leavers = base.take(leaver_rows).column("imageSetId").to_pylist()
    gone = pa.array(leavers + updated.column("imageSetId").to_pylist())
    kept = base.filter(pc.invert(pc.is_in(base.column("imageSetId"), value_set=gone)))
    expected = pa.concat_tables([kept, updated, new]).sort_by("createdAt")
    return pa.concat_tables([updated, new]), leavers, expected


def _one(rows: int, placement: str, seed: int) -> dict[str, float | bool | int]:
    base = _cohort(rows)
    incoming, leavers, expected = _changes(base, placement, seed)
    with tempfile.TemporaryDirectory() as tmp:
        merged, rewritten = Path(tmp) / "merged", Path(tmp) / "rewritten"
        first = delta.write_table(merged, base, PROVENANCE, target_file_size=TARGET_FILE_SIZE)
        delta.write_table(rewritten, base, PROVENANCE, target_file_size=TARGET_FILE_SIZE)
        start = time.perf_counter()
        merge = delta.merge_table(merged, incoming, leavers, PROVENANCE)
        merge_s = time.perf_counter() - start
        start = time.perf_counter()
        rewrite = delta.write_table(
            rewritten, expected, PROVENANCE, target_file_size=TARGET_FILE_SIZE
        )
        rewrite_s = time.perf_counter() - start
        got = delta.read_table(merged).table.sort_by("imageSetId")
        same = got.equals(delta.read_table(rewritten).table.sort_by("imageSetId"))
        same = same and got.equals(expected.sort_by("imageSetId"))
    return {
        "files": len(first.files),
        "table_mb": first.bytes / 1e6,
        "merge_s": merge_s,
        "merge_mb": merge.bytes_written / 1e6,
        "merge_files": merge.files_added,
        "rewrite_s": rewrite_s,
        "rewrite_mb": rewrite.bytes_written / 1e6,
        "identical": same,
    }


def run(rows: int, repeat: int) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for placement in ("recent", "uniform"):
        runs = [_one(rows, placement, seed) for seed in range(repeat)]
        summary: dict[str, object] = {"placement": placement}
        for name in runs[0]:
            values = [r[name] for r in runs]
            summary[name] = (
                all(values) if name == "identical" else statistics.median(map(float, values))
            )
        results.append(summary)
    return results


def markdown(results: list[dict[str, object]], rows: int, repeat: int, command: str) -> str:
    lines = [
        f"Command: `{command}` ({rows:,} image sets, 1% changed: 60% new versions, 20% leavers, "
        f"20% new; median of {repeat} runs; {machine()}). Delta table in `createdAt` order, "
        f"{TARGET_FILE_SIZE // 1024} KiB target files.",
        "",
        "| changes among | table (files, MB) | MERGE (s) | MERGE writes (MB) | rewrite (s) | "
        "rewrite writes (MB) | bytes: rewrite / MERGE | time: rewrite / MERGE | same result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        merge_mb, rewrite_mb = float(r["merge_mb"]), float(r["rewrite_mb"])  # type: ignore[arg-type]
        merge_s, rewrite_s = float(r["merge_s"]), float(r["rewrite_s"])  # type: ignore[arg-type]
        label = "the newest 2% of image sets" if r["placement"] == "recent" else "all, at random"
        lines.append(
            f"| {label} | {float(r['files']):.0f}, {float(r['table_mb']):.2f} | "  # type: ignore[arg-type]
            f"{merge_s:.2f} | {merge_mb:.3f} | {rewrite_s:.2f} | {rewrite_mb:.3f} | "
            f"{rewrite_mb / merge_mb:.1f}x | {rewrite_s / merge_s:.2f}x | "
            f"{'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    results = run(args.rows, args.repeat)
    section = markdown(results, args.rows, args.repeat, "python -m bench delta_bench")
    print(section)
    if not args.no_docs:
        from bench._report import write_section

        write_section("Snapshot refresh (Delta MERGE vs rewrite)", section)


if __name__ == "__main__":
    main()
