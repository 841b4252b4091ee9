"""Snapshot write/read throughput and size per 100,000 image sets, against ``df.to_parquet``.

Run: ``.venv/bin/python -m bench snapshot_bench`` (``--rows``, ``--repeat``, ``--no-docs`` when run as
``python -c 'from bench.snapshot_bench import main; main([...])'``).
The frame is built from ``generate_image_sets`` + ``flatten.summaries_to_table`` (no HTTP), as
``Query.to_dataframe`` would return it. Every figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from healthimaging_df import schema
from healthimaging_df.engine import flatten
from healthimaging_df.local import generate_image_sets
from healthimaging_df.snapshot import read_snapshot, write_snapshot

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def run(rows: int, repeat: int) -> list[dict[str, object]]:
    table = flatten.summaries_to_table(generate_image_sets(rows, seed=1))
    df = schema.arrow_to_pandas(table)
    df = df.sort_values(["updatedAt", "imageSetId"], ascending=[False, True]).reset_index(drop=True)
    df.attrs["healthimaging_df"] = {"datastore_id": "0" * 32, "schema_version": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        cases: list[tuple[str, Path, Callable[[], object], Callable[[], pd.DataFrame]]] = [
            (
                "`df.to_parquet(path)` / `pd.read_parquet` (defaults: snappy)",
                base / "pandas.parquet",
                lambda: df.to_parquet(base / "pandas.parquet"),
                lambda: pd.read_parquet(base / "pandas.parquet"),
            ),
            (
                "`write_snapshot(df, 'x.parquet')` / `read_snapshot` (zstd)",
                base / "x.parquet",
                lambda: write_snapshot(df, base / "x.parquet"),
                lambda: read_snapshot(base / "x.parquet"),
            ),
            (
                "`write_snapshot(df, 'dir', partition_cols=['Modality'])` / `read_snapshot`",
                base / "dir",
                lambda: write_snapshot(df, base / "dir", partition_cols=["Modality"]),
                lambda: read_snapshot(base / "dir"),
            ),
        ]
        for label, path, write, read in cases:
            write_s = _median_seconds(write, repeat)
            # read and measure one write, not the superseded files of the timed repeats (a
            # partitioned snapshot is a Delta table: an overwrite leaves them until a vacuum)
            _remove(path)
            write()
            read_s = _median_seconds(read, repeat)
            back = read()
            same = list(back.dtypes) == list(df.dtypes) and back.equals(df)
            results.append(
                {
                    "case": label,
                    "write_s": write_s,
                    "read_s": read_s,
                    "mb": _size(path) / 1e6,
                    "identical": same,
                }
            )
    return results


def markdown(results: list[dict[str, object]], rows: int, repeat: int, command: str) -> str:
    scale = 100_000 / rows
    lines = [
        f"Command: `{command}` ({rows:,} generated image sets, median of {repeat} runs; "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, pandas {pd.__version__}).",
        "",
        "| writer / reader | write (s per 100k) | write (rows/s) | read (s per 100k) | "
        "read (rows/s) | size per 100k (MB) | read back identical (dtypes + values) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        write_s, read_s, mb = float(r["write_s"]), float(r["read_s"]), float(r["mb"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['case']} | {write_s * scale:.3f} | {rows / write_s:,.0f} | "
            f"{read_s * scale:.3f} | {rows / read_s:,.0f} | {mb * scale:.2f} | "
            f"{'yes' if r['identical'] else 'no'} |"
        )
    base = results[0]
    lines.append("")
    for r in results[1:]:
        lines.append(
            f"- {str(r['case']).split(' / ')[0]}: write {float(r['write_s']) / float(base['write_s']):.2f}x, "  # type: ignore[arg-type]
            f"read {float(r['read_s']) / float(base['read_s']):.2f}x, "  # type: ignore[arg-type]
            f"size {float(r['mb']) / float(base['mb']):.2f}x the `df.to_parquet` defaults."  # type: ignore[arg-type]
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    results = run(args.rows, args.repeat)
    section = markdown(results, args.rows, args.repeat, "python -m bench snapshot_bench")
    print(section)
    if not args.no_docs:
        from bench._report import write_section

        write_section("Snapshots (Parquet write, read, size)", section)


if __name__ == "__main__":
    main()
