"""Pacing against a strict sliding window: are requests throttled, on this machine, at this load?

The client paces at 98% of ``max_tps`` (at most 25 requests in any second plus 20 ms). Whether the
service then throttles none depends on the jitter between our grant and the service's count of a
request, which grows with CPU load: so this is a figure here, not an assertion in a test (the tests
check that every attempt takes a slot of the one limiter). The service admits at most ``max_tps``
requests in any one-second window, with no burst credit (the local service's ``window_tps``):

1. one full scan of 5,000 image sets at ``max_tps=25``;
2. two full scans at once in threads, each with a client of its own (one quota, one limiter;
   with a limiter each they sent 48 a second and were throttled 33 times);
3. ``fetch_metadata`` of 200 image sets at ``max_tps=24`` against a window of 25.

Each runs ``--repeats`` times (default 3). Run: ``python -m bench pacing_bench`` (about two
minutes); ``--no-write`` to print only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

N_IMAGE_SETS = 5_000
METADATA_SETS = 200
REPEATS = 3
SECTION = "Pacing against a strict sliding window (throttles by load)"


def _scan(service: Any) -> int:
    from healthimaging_df import Query

    frame = Query(service.datastore_id).to_dataframe(
        client=service.client(), progress=False, max_concurrency=8, max_tps=25
    )
    return int(frame["imageSetId"].nunique())


def _runs(service: Any, frame: Any) -> dict[str, Any]:
    """Each run once: its callable, the window it runs against, and the operation it counts."""
    from healthimaging_df.errors import ArchiveAccessWarning

    def one() -> None:
        assert _scan(service) == N_IMAGE_SETS

    def two() -> None:
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda _: _scan(service), range(2))) == [N_IMAGE_SETS] * 2

    def metadata() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ArchiveAccessWarning)
            frame.ahi.fetch_metadata(
                client=service.client(),
                max_tps=24,
                max_concurrency=8,
                progress=False,
                allow_archive_access=True,
            )

    return {
        "one scan at max_tps=25": (one, "SearchImageSets"),
        "two scans at once, max_tps=25": (two, "SearchImageSets"),
        "fetch_metadata at max_tps=24": (metadata, "GetImageSetMetadata"),
    }


def main() -> None:
    from bench._report import machine, write_section
    from healthimaging_df import Query, aws
    from healthimaging_df.local import LocalService

    parser = argparse.ArgumentParser(prog="pacing_bench")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(sys.argv[1:])
    rows = []
    with LocalService.seeded(image_sets=N_IMAGE_SETS, seed=5) as service:
        assert service.datastore_id is not None
        frame = (
            Query(service.datastore_id)
            .limit(METADATA_SETS)
            .to_dataframe(client=service.client(), progress=False, max_tps=None)
        )
        for name, (run, operation) in _runs(service, frame).items():
            for repeat in range(args.repeats):
                aws.forget_limiters()
                service.set_faults(window_tps=25, latency_ms=20.0)
                service.reset_stats()
                load = os.getloadavg()[0]
                started = time.perf_counter()
                run()
                seconds = time.perf_counter() - started
                stats = service.stats
                sent = stats.by_operation.get(operation, 0)
                rows.append((name, repeat + 1, load, sent, stats.throttled, sent / seconds))
                print(
                    f"{name:32s} #{repeat + 1} load {load:4.1f} {sent} sent "
                    f"{stats.throttled} throttled {sent / seconds:.1f}/s",
                    flush=True,
                )
    table = [
        "| run | repeat | load average | requests | throttled | requests/s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {repeat} | {load:.1f} | {sent} | {throttled} | {rate:.1f} |"
            for name, repeat, load, sent, throttled, rate in rows
        ),
    ]
    body = f"""Measured with `python -m bench pacing_bench` on {machine()}: the local service in the
client's process, 20 ms latency, at most 25 requests in any one-second window (no burst credit).
A throttle is retried by botocore and the result stays exact; a throttle here says the grant-to-
count jitter exceeded the limiter's 20 ms margin (the load average is the 1-minute one at the
start of each run: the machine is shared). The limiter widens its margin after each.

{chr(10).join(table)}
"""
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
