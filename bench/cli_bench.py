"""Command-line start-up: ``--help`` and ``search --explain`` against ``python -c pass``.

Each command is a fresh process (``subprocess.run``), timed by the wall clock from start to exit,
the three commands run in turn ``RUNS`` times after one warm-up each; the median counts. The
console script's own code path is used (``import healthimaging_df_cli``, then the CLI), as the
installed ``healthimaging-df`` runs it. ``search --explain`` sends nothing and needs no
credentials. Goal: both at most 0.3 s. Run: ``python -m bench cli_bench``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 15
TITLE = "Command-line start-up"
DATASTORE = "0123456789abcdef0123456789abcdef"
CLI = (  # what the installed console script runs
    "import sys, healthimaging_df_cli; sys.argv[0] = 'healthimaging-df'; "
    "sys.exit(healthimaging_df_cli.main())"
)
COMMANDS: dict[str, list[str]] = {
    "`python -c pass` (the floor)": [sys.executable, "-c", "pass"],
    "`healthimaging-df --help`": [sys.executable, "-c", CLI, "--help"],
    "`healthimaging-df search --datastore-id ID --where PatientID=P1 --explain`": [
        sys.executable,
        "-c",
        CLI,
        "search",
        "--datastore-id",
        DATASTORE,
        "--where",
        "PatientID=P1",
        "--explain",
    ],
}


def once(command: list[str]) -> float:
    """Wall seconds of one run of *command* (it must exit 0)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    from bench._report import machine, write_section

    for command in COMMANDS.values():  # warm-up: file-system caches, .pyc files
        once(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(RUNS):
        for name, command in COMMANDS.items():
            times[name].append(once(command))
    floor = statistics.median(next(iter(times.values())))
    lines = [
        f"Whole process, wall clock (`subprocess.run`), median of {RUNS} runs taken in turn after "
        f"one warm-up each; {machine()}. Goal: `--help` and `search --explain` at most 0.3 s.",
        "",
        "| command | median s | min s | max s | minus the floor, s |",
        "|---|---|---|---|---|",
    ]
    for name, runs in times.items():
        median = statistics.median(runs)
        lines.append(
            f"| {name} | {median:.3f} | {min(runs):.3f} | {max(runs):.3f} | {median - floor:.3f} |"
        )
    lines += [
        "",
        "Neither command imports pandas, pyarrow or boto3 (tests/cli/test_layout.py checks it): "
        "the package root skips the `df.ahi` accessor under the console script, the schema "
        "builds its Arrow types on first use, and `Query` loads the engine when a query runs.",
    ]
    body = "\n".join(lines)
    print(body)
    if "--no-write" not in sys.argv:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
