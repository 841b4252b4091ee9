"""What each layer of the scan's reader model earns: full, without the critical path, static pre-split.

Each cell is a first scan (no cached statistics) of one createdAt distribution at one latency,
run as three variants of the same fetcher, interleaved so that each repeat meets like load:

- **full**: the fetcher as shipped: readers added and segments split while that adds throughput.
- **static**: the probe's pre-split pieces (eight, between the two ends the first two requests
  find), read from their low ends, and nothing added or split while the scan runs (``_feed`` off).

The critical-path layer (a reader more at the limiter's rate for a segment whose own chain would
outlast the rest, and the limiter serving readers with the most pages left first) was measured
here as a third variant, *no critical path*, and removed: over two runs of three repeats (load
average 4-21), the paired differences "no critical path minus full" were, in points of the quota:
bursty 100 ms -3, -13, 0, -16, -12, +4; bursty 300 ms +5, +2, +15, -3, +8, +12; same-second 100 ms
+13, +6, -6, +4, -7, -4; same-second 300 ms +1, +2, -8, +5, +3, +6; uniform 100 ms +14, +7, 0,
+3, +1, -15; uniform 300 ms -2, -2, -14, -5, -2, -9. No cell gained beyond the spread between its
repeats, and the cells the layer was built for (bursts at 300 ms) did better without it.

The figure is the share of the quota: requests / seconds / ``max_tps`` over the whole
``to_dataframe`` call, and seconds. The machine is shared: compare the variants within a repeat
(same minute, same load), and judge a difference by the spread across repeats.

Run: ``python -m bench scan_ablation_bench`` (about 12 minutes: 3 distributions x 2 latencies x
2 variants x 3 repeats of 10,000 image sets); ``--repeats``, ``--image-sets``, ``--latencies``,
``--distributions``, ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

N_IMAGE_SETS = 10_000
LATENCIES = (100, 300)
REPEATS = 3
MAX_TPS = 25.0
MAX_CONCURRENCY = 12
SECTION = "Scan ablation: what the reader model earns (first scans, 100 and 300 ms)"


@contextlib.contextmanager
def _static() -> Iterator[None]:
    """The probe's pre-split only: no reader is added and no segment split while the scan runs."""
    from healthimaging_df.engine import fetch

    feed = fetch.PageStream._feed
    fetch.PageStream._feed = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        fetch.PageStream._feed = feed  # type: ignore[method-assign]


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "full": contextlib.nullcontext,
    "static": _static,
}


def scan(service: Any, latency: float, n: int) -> dict[str, float]:
    """One first scan under the token bucket (25 TPS, burst 50): its seconds, share, requests."""
    from healthimaging_df import Query

    os.environ["HEALTHIMAGING_DF_CACHE"] = tempfile.mkdtemp(prefix="scan-ablation-")
    service.set_faults(latency_ms=latency, tps=MAX_TPS, burst=50, window_tps=None)
    service.reset_stats()
    started = time.perf_counter()
    frame = Query(service.datastore_id).to_dataframe(
        client=service.client(), progress=False, max_concurrency=MAX_CONCURRENCY, max_tps=MAX_TPS
    )
    seconds = time.perf_counter() - started
    assert frame["imageSetId"].nunique() == n, "every variant must return every image set"
    requests = service.stats.by_operation.get("SearchImageSets", 0)
    return {
        "seconds": seconds,
        "share": requests / seconds / MAX_TPS,
        "requests": requests,
        "throttled": service.stats.throttled,
    }


def main() -> None:
    from bench._report import machine, write_section
    from bench.scan_grid_bench import build_service

    parser = argparse.ArgumentParser(prog="scan_ablation_bench")
    parser.add_argument("--image-sets", type=int, default=N_IMAGE_SETS)
    parser.add_argument("--latencies", default=",".join(map(str, LATENCIES)))
    parser.add_argument("--distributions", default="uniform,bursty,same-second")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(sys.argv[1:])
    n = args.image_sets
    latencies = [float(x) for x in args.latencies.split(",")]
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    results: dict[tuple[str, float, str], list[dict[str, float]]] = {}
    for distribution in args.distributions.split(","):
        with build_service(distribution, n) as service:
            for latency in latencies:
                for repeat in range(args.repeats):
                    for variant, switch in VARIANTS.items():
                        with switch():
                            got = scan(service, latency, n)
                        results.setdefault((distribution, latency, variant), []).append(got)
                        print(
                            f"{distribution:12s} {latency:4.0f} ms #{repeat + 1} {variant:7s} "
                            f"{got['seconds']:5.1f} s {got['share']:.1%} "
                            f"{got['requests']:.0f} req thr {got['throttled']:.0f}",
                            flush=True,
                        )
                    loads.append(os.getloadavg()[0])
    elapsed = time.perf_counter() - started
    body = _report(results, args, n, machine(), loads, elapsed)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


def _report(
    results: dict[tuple[str, float, str], list[dict[str, float]]],
    args: argparse.Namespace,
    n: int,
    machine: str,
    loads: list[float],
    elapsed: float,
) -> str:
    table = [
        "| distribution | latency | variant | share of quota: median (min-max) | seconds: median "
        "(min-max) | requests | throttled | vs full, per repeat (share points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(d, lat) for d, lat, _ in results}, key=lambda c: (c[0], c[1]))
    for distribution, latency in cells:
        full = results[(distribution, latency, "full")]
        for variant in VARIANTS:
            runs = results[(distribution, latency, variant)]
            shares = [r["share"] for r in runs]
            seconds = [r["seconds"] for r in runs]
            deltas = ", ".join(
                f"{(r['share'] - f['share']) * 100:+.1f}" for r, f in zip(runs, full, strict=True)
            )
            table.append(
                f"| {distribution} | {latency:.0f} ms | {variant} | "
                f"{statistics.median(shares):.1%} ({min(shares):.1%}-{max(shares):.1%}) | "
                f"{statistics.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f}) | "
                f"{statistics.median(r['requests'] for r in runs):.0f} | "
                f"{sum(r['throttled'] for r in runs):.0f} | "
                f"{'-' if variant == 'full' else deltas} |"
            )
    options = "".join(
        f" --{name.replace('_', '-')} {value}"
        for name, value, default in (
            ("image_sets", args.image_sets, N_IMAGE_SETS),
            ("latencies", args.latencies, ",".join(map(str, LATENCIES))),
            ("repeats", args.repeats, REPEATS),
        )
        if value != default
    )
    return f"""Measured with `python -m bench scan_ablation_bench{options}` on {machine}, load
average {min(loads):.1f}-{max(loads):.1f} during the run (a shared machine: the variants of one
repeat run back to back, so compare them within a repeat); {elapsed / 60:.1f} minutes. First
scans of {n:,} image sets, token bucket of {MAX_TPS:g} TPS (burst 50), `max_tps={MAX_TPS:g}`,
`max_concurrency={MAX_CONCURRENCY}`, {args.repeats} repeats per cell. *full*: the shipped
fetcher; *static*: the probe's eight pre-split pieces, nothing added or split while it runs.
Every scan returned all {n:,} image sets.

{chr(10).join(table)}
"""


if __name__ == "__main__":
    main()
