"""Full scans at the quota: 3 createdAt distributions x 3 latencies x 2 service limiters.

Each cell runs, in the same run and against the same local service:

1. ``Query(ds).to_dataframe()`` with no statistics (a first scan: read from both ends, split as
   it learns the spread);
2. the same again, now pre-split from the statistics the first scan left (a rescan);
3. botocore's paginator walked serially (the obvious alternative), retries as botocore does.

Distributions of ``createdAt`` (the image sets are the generator's, only createdAt moved, and
updatedAt / lastAccessedAt with it): ``uniform`` over three years; ``bursty``: import bursts of
Pareto-distributed sizes at random times, each creating two image sets a second; ``same-second``:
a third of the datastore created within the same 3 seconds, the rest uniform.

Limiters: the local service's token bucket (25 TPS, burst 50) and its strict sliding window
(at most 25 requests in any 1-second window, no burst credit).

Run: ``python -m bench scan_grid_bench`` (about 15 minutes at 10,000 image sets); options
``--image-sets N``, ``--latencies 20,100``, ``--distributions``, ``--max-concurrency`` and
``--section TITLE`` (the section of docs/benchmarks.md the results replace; the issue's own
conditions have theirs: ``--image-sets 20000 --latencies 100 --section "Scan at the issue's
conditions: 20,000 image sets, 100 ms"``), ``--no-write`` to print only.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Any

N_IMAGE_SETS = 10_000
LATENCIES = (20, 100, 300)
MAX_TPS = 25.0
MAX_CONCURRENCY = 12
DISTRIBUTIONS = ("uniform", "bursty", "same-second")
LIMITERS = ("token bucket", "sliding window")
GRID_SECTION = "Scan grid: share of the quota by createdAt distribution, latency, limiter"
_START = datetime(2023, 1, 1, tzinfo=timezone.utc)
_SPAN = timedelta(days=3 * 365)


def created_times(distribution: str, n: int, seed: int = 3) -> list[datetime]:
    """*n* createdAt values drawn from *distribution*."""
    rng = random.Random(seed)

    def uniform() -> datetime:
        return _START + _SPAN * rng.random()

    if distribution == "uniform":
        return [uniform() for _ in range(n)]
    if distribution == "same-second":
        burst = _START + _SPAN / 2
        third = n // 3
        same = [burst + timedelta(seconds=3) * rng.random() for _ in range(third)]
        return same + [uniform() for _ in range(n - third)]
    if distribution == "bursty":
        out: list[datetime] = []
        while len(out) < n:
            size = min(n - len(out), int(20 * rng.paretovariate(1.2)))
            start = uniform()
            out += [start + timedelta(seconds=k / 2 + rng.random() / 2) for k in range(size)]
        return out
    raise ValueError(distribution)


def build_service(distribution: str, n: int) -> Any:
    """A local service whose one datastore holds *n* image sets created per *distribution*."""
    from healthimaging_df.local import LocalService, generate_image_sets
    from healthimaging_df.local.backend import Backend

    records = generate_image_sets(n, seed=11)
    for record, created in zip(records, created_times(distribution, n), strict=True):
        shift = created - record["createdAt"]
        for key in ("createdAt", "updatedAt", "lastAccessedAt"):
            record[key] = record[key] + shift
    backend = Backend()
    datastore_id = backend.create_datastore(distribution)
    backend.add_image_sets(datastore_id, records)
    service = LocalService(backend)
    service.datastore_id = datastore_id
    return service


def _limit(service: Any, limiter: str, latency: float) -> None:
    if limiter == "token bucket":
        service.set_faults(latency_ms=latency, tps=MAX_TPS, burst=50, window_tps=None)
    else:
        service.set_faults(latency_ms=latency, tps=None, window_tps=int(MAX_TPS))
    service.reset_stats()


def _figures(service: Any, seconds: float, rows: int, n: int) -> dict[str, float]:
    stats = service.stats
    requests = stats.by_operation.get("SearchImageSets", 0)
    return {
        "seconds": seconds,
        "rows": rows,
        "requests": requests,
        "per_page": requests / -(-n // 50),
        "rate": requests / seconds,
        "share": requests / seconds / MAX_TPS,
        "floor": -(-n // 50) / MAX_TPS / seconds,
        "throttled": stats.throttled,
        "peak": stats.peak_concurrency,
    }


def run_cell(
    service: Any, limiter: str, latency: float, n: int, concurrency: int = MAX_CONCURRENCY
) -> dict[str, dict[str, float]]:
    from healthimaging_df import Query

    ds = service.datastore_id
    client = service.client()
    out = {}
    os.environ["HEALTHIMAGING_DF_CACHE"] = tempfile.mkdtemp(prefix="scan-grid-")
    for name in ("first", "rescan"):
        _limit(service, limiter, latency)
        t0 = time.perf_counter()
        frame = Query(ds).to_dataframe(
            client=client, progress=False, max_concurrency=concurrency, max_tps=MAX_TPS
        )
        out[name] = _figures(service, time.perf_counter() - t0, frame["imageSetId"].nunique(), n)
    _limit(service, limiter, latency)
    t0 = time.perf_counter()
    ids: set[str] = set()
    for page in client.get_paginator("search_image_sets").paginate(datastoreId=ds):
        ids.update(s["imageSetId"] for s in page["imageSetsMetadataSummaries"])
    out["paginator"] = _figures(service, time.perf_counter() - t0, len(ids), n)
    return out


def main() -> None:
    from bench._report import machine, write_section
    from healthimaging_df import aws

    parser = argparse.ArgumentParser(prog="scan_grid_bench")
    parser.add_argument("--image-sets", type=int, default=N_IMAGE_SETS)
    parser.add_argument("--latencies", default=",".join(map(str, LATENCIES)))
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
    parser.add_argument("--max-concurrency", type=int, default=MAX_CONCURRENCY)
    parser.add_argument("--section", default=GRID_SECTION, help="docs/benchmarks.md section")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(sys.argv[1:])
    n = args.image_sets
    latencies = [float(x) for x in args.latencies.split(",")]
    rows = []
    load = os.getloadavg()[0]
    started = time.perf_counter()
    for distribution in args.distributions.split(","):
        with build_service(distribution, n) as service:
            for latency in latencies:
                for limiter in LIMITERS:
                    cell = run_cell(service, limiter, latency, n, args.max_concurrency)
                    rows.append((distribution, latency, limiter, cell))
                    f, r, p = cell["first"], cell["rescan"], cell["paginator"]
                    print(
                        f"{distribution:12s} {latency:4.0f} ms {limiter:15s} "
                        f"first {f['seconds']:.1f}s {f['requests']} ({f['per_page']:.3f}) "
                        f"{f['share']:.0%} thr {f['throttled']} peak {f['peak']} | "
                        f"rescan {r['seconds']:.1f}s {r['requests']} ({r['per_page']:.3f}) "
                        f"{r['share']:.0%} thr {r['throttled']} peak {r['peak']} | "
                        f"paginator {p['seconds']:.1f}s thr {p['throttled']}",
                        flush=True,
                    )
    elapsed = time.perf_counter() - started
    table = [
        "| distribution | latency | service limiter | scan | seconds | requests | requests / minimum "
        "pages | requests/s | share of quota | of the floor | throttled | peak in flight | "
        "paginator seconds | paginator / scan |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    met = {"share": 0, "per_page": 0, "throttled": 0, "cells": 0}
    for distribution, latency, limiter, cell in rows:
        p = cell["paginator"]
        for name in ("first", "rescan"):
            c = cell[name]
            met["cells"] += 1
            met["share"] += c["share"] >= 0.95
            met["per_page"] += c["per_page"] <= 1.05
            met["throttled"] += c["throttled"] == 0
            assert c["rows"] == n, f"{distribution}/{name}: {c['rows']} of {n} image sets"
            table.append(
                f"| {distribution} | {latency:.0f} ms | {limiter} | {name} | {c['seconds']:.1f} | "
                f"{c['requests']} | {c['per_page']:.3f} | {c['rate']:.1f} | {c['share']:.0%} | "
                f"{c['floor']:.0%} | {c['throttled']} | {c['peak']} | {p['seconds']:.1f} "
                f"(throttled {p['throttled']}) | {p['seconds'] / c['seconds']:.1f}x |"
            )
    pages = -(-n // 50)
    paced = MAX_TPS * aws.HEADROOM

    def ceilings(count: int) -> str:
        """First scan / rescan ceilings by latency: two round trips lost, or one."""

        def share(trips: int, lat: float) -> float:
            return aws.HEADROOM * (count / paced) / (count / paced + trips * lat / 1000)

        return ", ".join(f"{x:.0f} ms {share(2, x):.1%} / {share(1, x):.1%}" for x in latencies)

    issue_scale = (
        f"; of a 400-page scan, the issue's 20,000 image sets: {ceilings(400)}"
        if pages != 400
        else ""
    )
    body = f"""Measured with `python -m bench scan_grid_bench{_options(args)}` on {machine()}, load
average {load:.1f} at the start (quota shares drop under CPU contention: compare runs at like
loads); the whole run took {elapsed / 60:.1f} minutes. {n:,} image sets ({pages} pages of 50 at
the minimum), `max_tps={MAX_TPS:g}`, `max_concurrency={args.max_concurrency}`; the client paces
at {aws.HEADROOM:.1%} of `max_tps` ({paced:.2f}/s: at most 25 requests in any second plus
{aws.MARGIN * 1000:.0f} ms).

Definitions: **share of quota** = requests sent / seconds / `max_tps` (seconds of the whole
`to_dataframe` call, frame building included); it cannot exceed the pacing ({aws.HEADROOM:.1%}).
**of the floor** = ({pages} minimum pages / `max_tps`) / seconds: the useful share, which also
counts wasted requests against the scan. *first*: no statistics, so the scan finds the oldest and
newest image set (two requests at once) and starts in eight pieces of equal time between them,
splitting further as it learns the spread; *rescan*: pre-split from the quantiles the first scan
cached. Requests and shares count those two requests. Targets per cell: share >= 95%, requests /
minimum pages <= 1.05, 0 throttled. Met: share in {met["share"]} of {met["cells"]} scans,
requests in {met["per_page"]} of {met["cells"]}, no throttle in {met["throttled"]} of
{met["cells"]}. Every scan returned all {n:,} image sets.

{chr(10).join(table)}

Where the share goes (read with the table). Pacing caps it at {aws.HEADROOM:.1%}. On top, a first
scan spends about a round trip before its readers start (finding the two ends) and every scan one
after its last request (the last page coming back), so the ceiling of a {pages}-page scan is about
the pacing times pages / rate over that time plus two latencies (first) or one (rescan):
{ceilings(pages)}{issue_scale}. Where
that ceiling is under 95%, no client reaches 95% at that latency and size. What the fetcher
decides moves a cell below its
ceiling: how soon a dense burst gets the readers it needs (requests can only name whole seconds,
so a second of a same-second import is two request chains, one from each end, and at 300 ms each
takes about 0.3 s a page), and how many requests are part-empty last pages. Two rules address
those: an end's density holds for its reach into a gap (at least 5 s) and the overall density for
the rest; a segment is split, and one of its ends stopped early, only once both ends have read.
At the limiter's rate no reader is added (a critical-path rule that did was measured and removed:
`scan_ablation_bench`). `max_concurrency` bounds what a burst can get: a same-second first scan at
300 ms needs eight readers for the rate and six more for its burst's three seconds. The paginator's throttles are its own (it is
not paced).
"""
    print(body)
    if not args.no_write:
        write_section(args.section, body)


def _options(args: argparse.Namespace) -> str:
    """The command line's options that differ from the defaults, as typed."""
    given = [
        ("--image-sets", args.image_sets, N_IMAGE_SETS),
        ("--latencies", args.latencies, ",".join(map(str, LATENCIES))),
        ("--distributions", args.distributions, ",".join(DISTRIBUTIONS)),
        ("--max-concurrency", args.max_concurrency, MAX_CONCURRENCY),
    ]
    out = "".join(f" {flag} {value}" for flag, value, default in given if value != default)
    if args.section != GRID_SECTION:
        out += f' --section "{args.section}"'
    return out


if __name__ == "__main__":
    main()
