"""aws.RateLimiter's schedule, on a fake clock: slots, catch-up after a late wake, bursts, windows.

A fake clock is enough for the limiter's arithmetic (no request is sent here); that its pacing
holds against a real strict sliding-window limiter is tested end to end in
tests/accessor/test_metadata.py and tests/query/test_end_to_end.py.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections.abc import Callable

import pytest

from healthimaging_df import aws


class FakeClock:
    """Monotonic time that moves only when slept on; each sleep may oversleep by ``late()``."""

    def __init__(self, late: Callable[[], float] = lambda: 0.0) -> None:
        self.now = 1000.0
        self.late = late
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps += 1
        # a real clock always moves on; a float sum can round back to now (then sleep forever)
        self.now = max(self.now + seconds + self.late(), math.nextafter(self.now, math.inf))


def limiter(clock: FakeClock, rate: float = 50.0, **kwargs: object) -> aws.RateLimiter:
    return aws.RateLimiter(rate, clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def grants(clock: FakeClock, bucket: aws.RateLimiter, n: int, work: float = 0.0) -> list[float]:
    """Grant times of *n* acquisitions by one caller that works *work* seconds after each."""
    times = []
    for _ in range(n):
        bucket.acquire()
        times.append(clock.now)
        clock.now += work
    return times


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_even_pacing_at_headroom_times_the_rate() -> None:
    clock = FakeClock()
    bucket = limiter(clock)
    times = grants(clock, bucket, 97)
    interval = 1 / (50 * aws.HEADROOM)
    assert times[0] == 1000.0  # the first goes at once
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g == pytest.approx(interval) for g in gaps)
    assert bucket.acquired == 97
    assert bucket.waiting == 0


def test_a_late_wake_delays_only_its_own_request() -> None:
    """Slot k+1 is slot k + 1/rate, whenever slot k's thread actually woke."""
    lateness = iter([0.0, 0.012, 0.0, 0.0] + [0.0] * 10)
    clock = FakeClock(late=lambda: next(lateness))
    bucket = limiter(clock)
    interval = 1 / bucket.rate
    times = grants(clock, bucket, 5)
    slots = [times[0] + k * interval for k in range(5)]
    assert times[2] == pytest.approx(slots[2] + 0.012)  # this one woke 12 ms late...
    assert times[3] == pytest.approx(slots[3])  # ...the next keeps its slot: no drift
    assert times[4] == pytest.approx(slots[4])


def test_oversleep_does_not_accumulate_over_a_long_run() -> None:
    """Random late wakes (as under a busy GIL) cost well under 1% of the rate, not the lateness."""
    rng = random.Random(4)
    clock = FakeClock(late=lambda: rng.uniform(0, 0.008))  # up to 8 ms late, 40% of a slot
    bucket = limiter(clock)
    times = grants(clock, bucket, 2000)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate >= 0.99 * bucket.rate
    # The old bucket refilled from wake-up times would have paced at 1 / (interval + 4 ms).
    assert rate > 1.05 / (1 / bucket.rate + 0.004)


def test_no_window_of_a_second_and_the_margin_holds_more_than_the_quota() -> None:
    """Late wakes that catch up are held back: at most 50 grants in any 1 s + 20 ms at 50 TPS."""
    rng = random.Random(5)
    clock = FakeClock(late=lambda: rng.choice([0.0, 0.0, 0.0, 0.03]))  # some wake 30 ms late
    bucket = limiter(clock)
    assert bucket.window_limit == 50
    assert bucket.span == pytest.approx(1.0 + aws.MARGIN)
    times = grants(clock, bucket, 1500, work=0.0)
    assert max_in_window(times, 1.0 + aws.MARGIN) <= 50
    # so a service that counts each request up to 20 ms late still sees at most 50 in a second
    assert max_in_window(times, 1.0) <= 50


def test_a_request_that_arrived_late_counts_that_much_longer_against_the_window() -> None:
    """Issue 31 (d): under load a request can reach the service tens of ms after its grant.

    Its round trip, slower than the fastest lately, says by how much: past the margin, its
    grant counts that much longer, so the request a window after it waits for it. A service
    counting the late one at its arrival then never sees one too many in a second.
    """
    clock = FakeClock()
    bucket = limiter(clock, rate=10.0)
    arrivals = []
    for k in range(40):
        bucket.acquire()
        late = 0.08 if k == 12 else 0.0  # this one sat 80 ms on a busy machine
        arrivals.append(clock.now + late)
        bucket.observe(0.1 + late)  # the same thread: its answer, a latency on
    assert max_in_window(arrivals, 1.0) <= 10
    for k in range(10, 40):  # the grant a window after the late one waited for its arrival
        assert arrivals[k] - arrivals[k - 10] >= 1.0
    # without the round trips a late arrival would have made eleven in a second
    plain = limiter(FakeClock(), rate=10.0)
    times = grants(plain.__dict__["_clock"], plain, 40)  # type: ignore[arg-type]
    moved = [t + (0.08 if k == 12 else 0.0) for k, t in enumerate(times)]
    assert max_in_window(moved, 1.0) == 11


def test_an_idle_limiter_banks_no_burst() -> None:
    clock = FakeClock()
    bucket = limiter(clock)
    grants(clock, bucket, 3)
    clock.now += 60.0  # a minute idle
    back = clock.now
    times = grants(clock, bucket, 3)
    assert times[0] == back  # at once...
    assert times[1] - times[0] == pytest.approx(1 / bucket.rate)  # ...then paced again


def test_burst_lets_that_many_through_at_once() -> None:
    clock = FakeClock()
    bucket = limiter(clock, rate=10.0, burst=4)
    times = grants(clock, bucket, 6)
    assert times[:4] == [1000.0] * 4
    assert times[4] > 1000.0
    assert max_in_window(times) <= max(4, bucket.window_limit)


def test_window_limit_is_the_quota_and_the_margin_sets_the_pace() -> None:
    clock = FakeClock()
    for rate in (50.0, 25.0, 10.0):
        bucket = limiter(clock, rate=rate)
        assert bucket.window_limit == rate  # what a strict window admits in a second...
        assert bucket.rate == pytest.approx(rate / 1.02)  # ...spread over 1 s + 20 ms
        assert bucket.headroom == pytest.approx(aws.HEADROOM)
    slow = limiter(clock, rate=0.5)  # under one a second: one per two seconds and the margin
    assert (slow.window_limit, slow.span, slow.rate) == (1, pytest.approx(2.02), 1 / 2.02)
    assert limiter(clock, rate=24.5).window_limit == 24  # a strict window admits whole requests
    assert limiter(clock, rate=50.0, margin=0.0).rate == 50.0
    assert limiter(clock, rate=100.0, burst=5).window_limit == 100
    assert limiter(clock, rate=10.0, burst=40).window_limit == 40


def test_a_throttle_widens_the_margin_for_one_clean_window_then_the_pace_is_back() -> None:
    """Issue 31: a throttle cost the next half minute (30 clean windows) of every later query
    on the endpoint; now the margin goes back once the service admitted one window at the
    widened pace, measured on the limiter's own clock."""
    clock = FakeClock()
    bucket = limiter(clock, rate=25.0)
    paced = bucket.rate
    bucket.throttled()
    assert bucket.throttles == 1
    assert bucket.margin == pytest.approx(2 * aws.MARGIN)
    assert bucket.rate == pytest.approx(25 / (1 + 2 * aws.MARGIN))
    for _ in range(10):
        bucket.throttled()
    assert bucket.margin == aws.MAX_MARGIN  # never paced below 25 / 1.25 = 20 a second
    throttled_at = clock.now
    times = grants(clock, bucket, 60)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] == pytest.approx((1 + aws.MAX_MARGIN) / 25)  # the widened pace first
    back = next(t for t in times if bucket.margin == aws.MARGIN and t >= times[0])
    assert bucket.margin == pytest.approx(aws.MARGIN)
    assert bucket.rate == pytest.approx(paced, rel=1e-3)
    # back within one window of the widened pace (plus a slot), not thirty
    restored = max(t for t, g in zip(times[1:], gaps, strict=True) if g > 1.1 / paced)
    assert back >= throttled_at
    assert restored - throttled_at <= (1 + aws.MAX_MARGIN) + 2 / paced
    assert min(gaps[-20:]) == pytest.approx(1 / paced, rel=1e-3)


def test_an_idle_limiter_recovers_by_its_clock_for_the_next_query() -> None:
    clock = FakeClock()
    bucket = limiter(clock, rate=25.0)
    bucket.throttled()
    clock.now += 2.0  # the query ended; the next starts two seconds later
    grants(clock, bucket, 1)
    assert bucket.margin == pytest.approx(aws.MARGIN)


def test_a_throttle_soon_after_going_back_lengthens_the_probation_up_to_a_bound() -> None:
    clock = FakeClock()
    bucket = limiter(clock, rate=25.0)
    bucket.throttled()
    assert bucket.probation == 1
    for expected in (2, 4, 8, 16, aws.RECOVER_WINDOWS, aws.RECOVER_WINDOWS):
        while bucket.margin > aws.MARGIN:
            grants(clock, bucket, 1)
        bucket.throttled()  # at once after going back: the quota is shared, settle longer
        assert bucket.probation == expected
    for _ in range(2):  # back to the starting margin, then a whole probation clean after it
        clock.now += (aws.RECOVER_WINDOWS + 1) * bucket.span
        grants(clock, bucket, 1)
    assert bucket.margin == pytest.approx(aws.MARGIN)
    assert bucket.probation == 1  # the next throttle costs one window again


def test_concurrency_is_rate_times_round_trip_plus_a_margin_bounded() -> None:
    clock = FakeClock()
    bucket = limiter(clock, rate=25.0)
    assert bucket.concurrency(0.1) == math.ceil(bucket.rate * 0.1) + aws.CONCURRENCY_MARGIN
    assert limiter(clock, rate=250.0).concurrency(0.3) == aws.MAX_CONCURRENCY
    bucket.observe(0.3)
    assert bucket.concurrency() == math.ceil(bucket.rate * 0.3) + aws.CONCURRENCY_MARGIN
    wide = bucket.concurrency()
    for _ in range(10):
        bucket.throttled()
    assert bucket.concurrency() < wide  # a throttle shrinks the paced rate, and the threads


def test_threads_get_distinct_slots_and_the_counters_add_up() -> None:
    """Real threads on the fake clock: every acquisition is counted, nobody is left waiting."""
    lock = threading.Lock()

    class LockedClock(FakeClock):
        def sleep(self, seconds: float) -> None:
            with lock:
                super().sleep(seconds)

    clock = LockedClock()
    bucket = limiter(clock)
    workers = [
        threading.Thread(target=lambda: [bucket.acquire() for _ in range(25)]) for _ in range(8)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert bucket.acquired == 200
    assert bucket.waiting == 0
    assert not bucket.saturated


def test_one_limiter_per_endpoint_operation_and_rate() -> None:
    """Clients of one endpoint share a limiter per operation; another rate or operation does not."""
    import boto3

    def client(endpoint: str) -> object:
        return boto3.client(
            "medical-imaging",
            region_name="us-east-1",
            endpoint_url=endpoint,
            aws_access_key_id="x",
            aws_secret_access_key="y",
        )

    a, b, other = (
        client("http://127.0.0.1:1"),
        client("http://127.0.0.1:1"),
        client("http://127.0.0.1:2"),
    )
    search = aws.limiter_for(a, aws.SEARCH, 25)
    assert search is not None
    assert aws.limiter_for(b, aws.SEARCH, 25) is search
    assert aws.limiter_for(other, aws.SEARCH, 25) is not search
    assert aws.limiter_for(a, "GetImageSetMetadata", 25) is not search
    assert aws.limiter_for(a, aws.SEARCH, 10) is not search
    assert aws.limiter_for(a, aws.SEARCH, None) is None
