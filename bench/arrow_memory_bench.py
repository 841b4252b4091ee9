"""Peak client memory of ``to_arrow`` against ``to_dataframe`` at 300,000 rows, same run.

As ``memory_bench``: the local service in another process, each call in a fresh client process,
peak resident-set growth of the client. ``to_arrow`` gathers the result column by column from the
page tables and never builds pandas; ``to_dataframe`` converts that table to pandas once. Each
peak is divided by its own result's size (the table's ``nbytes``, the frame's deep
``memory_usage``) and by ``to_dataframe``'s peak. Run: ``python -m bench arrow_memory_bench``
(``--sizes 100000`` for a quicker look; ``--no-write`` to leave docs/benchmarks.md alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bench._report import machine, write_section

SIZES = (300_000,)
MODES = ("to_dataframe", "to_arrow", "iter_batches")
CHUNK_ROWS = 50_000
TITLE = "Peak client memory: to_arrow against to_dataframe"
NOTES = """\
`to_arrow` holds the page tables and the gathered result, never a pandas copy; `to_dataframe` adds
the conversion to pandas. `iter_batches` holds one batch plus the rank index (about 50 bytes an
image set); its growth here is measured at one size only, so how it grows with the result is not
shown by this table (`memory_bench`'s `iter_dataframes`, the same pipeline with pandas chunks,
grows 68 bytes a row). Unlike `iter_dataframes`, `iter_batches` does not switch Arrow to the
system allocator while it runs."""


@contextmanager
def served(image_sets: int) -> Iterator[tuple[str, str]]:
    """``page_bench.served`` with a patient stop: a 300,000-set server takes a while to exit."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "healthimaging_df",
            "local",
            "serve",
            "--image-sets",
            str(image_sets),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        endpoint = datastore = ""
        for line in process.stdout:
            if line.startswith("endpoint_url:"):
                endpoint = line.split()[1]
            if line.startswith("datastore_id:"):
                datastore = line.split()[1]
                break
        yield endpoint, datastore
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _child(mode: str, endpoint: str, datastore: str) -> None:
    """Run one mode in this (fresh) process and print its figures as JSON."""
    from bench._report import measure
    from bench.page_bench import client_for
    from healthimaging_df import Query

    query = Query(datastore)
    options = {
        "client": client_for(endpoint),
        "progress": False,
        "max_tps": None,
        "max_concurrency": 4,
    }
    size = 0
    rows = 0

    def run() -> None:
        nonlocal size, rows
        if mode == "to_dataframe":
            frame = query.to_dataframe(**options)
            size, rows = int(frame.memory_usage(deep=True).sum()), len(frame)
        elif mode == "to_arrow":
            table = query.to_arrow(**options)
            size, rows = int(table.nbytes), table.num_rows
        else:
            for batch in query.iter_batches(chunk_rows=CHUNK_ROWS, **options):
                size = max(size, int(batch.nbytes))
                rows += batch.num_rows

    seconds, peak, _ = measure(run)
    print(json.dumps({"seconds": seconds, "peak": peak, "size": size, "rows": rows}))


def _run(mode: str, endpoint: str, datastore: str) -> dict[str, float]:
    code = f"from bench.arrow_memory_bench import _child; _child({mode!r}, {endpoint!r}, {datastore!r})"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    lines = [
        f"Measured with `python -m bench arrow_memory_bench` on {machine()}; the server in another "
        "process, each client call in a fresh one, one after the other against the same server.",
        "",
        "| rows | call | seconds | peak growth | result (or largest batch) | peak / result "
        "| peak / to_dataframe's |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        with served(size) as (endpoint, datastore):
            results = {mode: _run(mode, endpoint, datastore) for mode in MODES}
        base = results["to_dataframe"]["peak"]
        for mode, r in results.items():
            label = f"`{mode}`" + (
                f" ({CHUNK_ROWS:,}-row batches)" if mode == "iter_batches" else ""
            )
            lines.append(
                f"| {int(r['rows']):,} | {label} | {r['seconds']:.1f} | {r['peak'] / 2**20:.0f} MiB "
                f"| {r['size'] / 2**20:.0f} MiB | {r['peak'] / r['size']:.2f}x "
                f"| {r['peak'] / base:.2f}x |"
            )
            print(lines[-1], flush=True)
    lines += ["", NOTES]
    if not args.no_write:
        write_section(TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()
