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
``--image-sets N`` and ``--latencies 20,100``. Results go to docs/benchmarks.md.
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


def run_cell(service: Any, limiter: str, latency: float, n: int) -> dict[str, dict[str, float]]:
    from healthimaging_df import Query

    ds = service.datastore_id
    client = service.client()
    out = {}
    os.environ["HEALTHIMAGING_DF_CACHE"] = tempfile.mkdtemp(prefix="scan-grid-")
    for name in ("first", "rescan"):
        _limit(service, limiter, latency)
        t0 = time.perf_counter()
        frame = Query(ds).to_dataframe(
            client=client, progress=False, max_concurrency=MAX_CONCURRENCY, max_tps=MAX_TPS
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
                    cell = run_cell(service, limiter, latency, n)
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
    body = f"""Measured with `python -m bench scan_grid_bench` on {machine()}, load average
{load:.1f} at the start (quota shares drop under CPU contention: compare runs at like loads); the
whole grid took {elapsed / 60:.1f} minutes. {n:,} image sets ({pages} pages of 50 at the
minimum), `max_tps={MAX_TPS:g}`, `max_concurrency={MAX_CONCURRENCY}`; the client paces at
{aws.HEADROOM:.0%} of `max_tps` ({MAX_TPS * aws.HEADROOM:g}/s).

Definitions: **share of quota** = requests sent / seconds / `max_tps` (seconds of the whole
`to_dataframe` call, frame building included); it cannot exceed the pacing ({aws.HEADROOM:.0%}).
**of the floor** = ({pages} minimum pages / `max_tps`) / seconds: the useful share, which also
counts wasted requests against the scan. *first*: no statistics, so the scan probes (two
requests for the oldest and newest image set, then eight windows at once whose pages are the
scan's own first pages: the probe costs it the two requests) and starts in those eight pieces,
splitting further as it learns the spread; *rescan*: pre-split from the quantiles the first
scan cached. Requests and shares count the probe's. Targets per
cell: share >= 95%, requests / minimum pages <= 1.05, 0 throttled. Met: share in
{met["share"]} of {met["cells"]} scans, requests in {met["per_page"]} of {met["cells"]}, no throttle
in {met["throttled"]} of {met["cells"]}. Every scan returned all {n:,} image sets.

{chr(10).join(table)}

Where the share goes (read with the table): the pacing itself caps it at 96% (24 of 25/s), so 95%
leaves 1% for the ramp (the first pages take one latency before a scan knows where to split) and
the tail (the last pages of the last segments, serial); at 300 ms eight readers at about 0.34 s a
round trip on this loaded machine give 23.5/s at best, so the 300 ms cells stay near 85% even in
steady state, and a 200-page scan spends a round trip ramping and one on its last page, so its
ceiling at 300 ms is about 93% (95% needs a scan of well over 1,000 pages). First scans at 300 ms
are the weak cells. Bursty data: with no statistics, two ends inside one long import burst see
dense pages while the density over everything read says the gap between them is nearly empty;
the fetcher used to trust the latter and left two readers on the burst for half the scan (55%
two grids ago; 57% / 76% in the last, with the probe's eight pieces). While a whole reader's
worth of pages a second is missing (`fetch.readers_short`: the missing rate times the round
trip), the larger estimate now decides a split: 83% / 81% above, and in a separate A/B of that
cell alone (three runs each, token bucket) 15.0 / 15.3 / 10.8 s before against 10.8 / 11.6 / 10.9 s.
Same-second data stays near 72%: a third of the datastore within 3 seconds can be split only at
whole seconds (botocore up to 1.43 sends request timestamps as whole seconds), so that burst of
3,333 rows has at most six readers, chains of 11 pages or more at 0.3 s a page. Rescans follow the
cached quantiles, which the change does not touch; their requests move between runs (bursty
100 ms sliding window: 205 before, 219 with 2 throttles here). Steering the fetcher by the
probe's eight-window profile made the bursty cell worse (33%), so a probe leaves no
quantiles. The paced rate was not raised: at 98% the sliding window throttled
once in 12 scans of a trial run on this machine, so 96% stays (not proven safe here either: the
window throttled once at 96% under a load average of 6). The paginator's throttles are its own
(it is not paced).
"""
    print(body)
    if not args.no_write:
        write_section(
            "Scan grid: share of the quota by createdAt distribution, latency, limiter", body
        )


if __name__ == "__main__":
    main()
