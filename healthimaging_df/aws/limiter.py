"""Pacing under the quota: one schedule per account, endpoint and operation in the process.

Every HTTP attempt, botocore's own retries included, takes a slot from a :class:`RateLimiter`
(armed per thread by :func:`healthimaging_df.aws.clients.paced`). The quota is the account's, per
operation, so :func:`limiter_for` hands every query of the process that calls one operation on
one endpoint the same limiter: two queries at once, or one right after another, share the 25 TPS
instead of sending 25 each.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from healthimaging_df.aws.session import identity

# The quota's window is given this much room for the jitter between our grant (botocore's
# before-send) and the service's count of the request: at most Q requests in any 1 s + MARGIN,
# so pacing runs at 1 / (1 + MARGIN) of the quota (98%). Measured on this 2-core machine with
# the local service in the client's process: 0.5-1 ms typical, 11 ms the worst of 1,800.
MARGIN = 0.02
# A throttle says the margin was too small (a loaded machine, another client on the quota):
# the limiter doubles it, up to this, and goes back to where it started as soon as the service
# has admitted the paced rate again: one clean window after the throttle (on its clock, or in
# grants). A throttle soon after going back doubles that probation, up to RECOVER_WINDOWS.
MAX_MARGIN = 0.25
RECOVER_WINDOWS = 30
HEADROOM = 1.0 / (1.0 + MARGIN)  # the paced share of a whole-number quota, by default
# Default concurrency: enough requests in flight to keep the schedule busy (Little's law: rate x
# round trip), plus a margin for the jitter of round trips, bounded: a thread past that only
# waits for its slot.
MAX_CONCURRENCY = 64
CONCURRENCY_MARGIN = 2
# The fastest of this many round trips is what a request takes when nothing delays it.
FASTEST_OF = 64
GUESS_ROUND_TRIP = 0.25  # seconds, before a round trip was measured on this endpoint


class RateLimiter:
    """Paces acquisitions under a quota of ``rate`` per second, across threads, on a fixed schedule.

    A strict quota admits ``limit = floor(rate * window)`` requests in any ``window`` (1 s).
    The limiter grants at most ``limit`` in any ``window + margin`` seconds: the margin absorbs
    the jitter between our grant and the service's count, so even a strict sliding window
    never sees one too many. Slots are spaced to match: ``paced = limit / (window + margin)``
    per second (98% of 25 TPS with the default 20 ms).

    Callers queue first come, first served (:meth:`acquire`); the head takes the next *slot* of
    an absolute schedule (slot k+1 = slot k + 1/paced) and sleeps until it. A thread that wakes late (the
    GIL held by another thread's parse, a busy machine) therefore delays only its own request:
    the next slot was fixed before, so the schedule does not accumulate oversleep as a bucket
    refilled from wake-up times does. The
    schedule never runs behind the clock by more than ``burst - 1`` slots, so an idle limiter
    lets at most ``burst`` requests through at once (``burst=1``, the default: evenly paced);
    late requests that catch up are held back by the window guard.

    :meth:`throttled` (a 429 seen through this limiter) doubles the margin, up to ``MAX_MARGIN``;
    once the service has admitted a whole window at the widened pace (``probation`` windows of
    the clock or of grants, one at first) the margin goes back to where it started. A throttle
    within a probation after going back doubles the next probation (up to ``RECOVER_WINDOWS``):
    a quota shared with another client settles, a passing spike costs one retry.

    :meth:`observe` keeps a moving average of round trips (grant to answer) on the endpoint;
    :meth:`concurrency` turns it into the requests worth having in flight.

    ``clock`` and ``sleep`` are injectable for unit tests of the schedule.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        margin: float = MARGIN,
        *,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.quota = float(rate)
        self.capacity = float(burst if burst is not None else 1)
        # whole requests a strict window admits (under 1 TPS: one per 1/rate s)
        self._admitted = max(math.floor(self.quota * window + 1e-9), 1)
        self.window = max(float(window), self._admitted / self.quota)
        self.window_limit = max(int(self.capacity), self._admitted)
        self.base_margin = float(margin)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[object] = collections.deque()  # waiting callers, in turn
        self._set_margin(self.base_margin)
        self._next = clock() - self._tolerance  # the first free slot of the schedule
        # [grant, lateness]: each grant counts against the window for a span, and for the
        # lateness its round trip showed on top (see observe)
        self._granted: collections.deque[list[float]] = collections.deque()
        self._mine = threading.local()  # this thread's last grant, for observe
        self._round_trips: collections.deque[float] = collections.deque(maxlen=FASTEST_OF)
        self._clean = 0  # grants since the margin last changed
        self._throttled_at: float | None = None  # the clock at the last throttle
        self._restored_at: float | None = None  # the clock when the margin last went back
        self.probation = 1  # windows clean at the widened pace before going back
        self.round_trip: float | None = None  # seconds from grant to answer, a moving average
        self.waiting = 0
        self.acquired = 0
        self.throttles = 0

    def _set_margin(self, margin: float) -> None:
        """Space slots and size the guard for *margin*; called with the lock held (or alone)."""
        self.margin = margin
        self.span = self.window + margin  # the guard's window
        self.rate = self._admitted / self.span  # the paced rate, per second
        self._interval = 1.0 / self.rate
        self._tolerance = (self.capacity - 1.0) * self._interval

    @property
    def headroom(self) -> float:
        """The paced rate as a share of the quota (0.98 with the default margin)."""
        return self.rate / self.quota

    @property
    def saturated(self) -> bool:
        """Some thread is waiting for its slot: more concurrency would not send more requests."""
        return self.waiting > 0

    def throttled(self) -> None:
        """The service throttled a request sent through this limiter: leave more room."""
        with self._lock:
            now = self._clock()
            self.throttles += 1
            self._clean = 0
            restored = self._restored_at
            if restored is not None and now - restored < self.probation * self.span:
                self.probation = min(RECOVER_WINDOWS, 2 * self.probation)  # went back too soon
            self._throttled_at = now
            self._set_margin(min(MAX_MARGIN, max(2.0 * self.margin, self.margin + 0.01)))

    def observe(self, seconds: float) -> None:
        """A request's round trip from its grant to its answer (shared by the endpoint's runs).

        Called by the thread the request's slot was granted to. A round trip slower than the
        fastest lately says the request may have reached the service that much late (a busy
        machine: the GIL, a thread not scheduled): its grant then counts against the window
        that much longer (the margin stays on top, for the jitter a round trip cannot show), so
        the requests a window after it cannot arrive within the same second of the service's
        strict window. Round trips that are all slow alike (a far region) cost nothing.
        """
        if seconds < 0:
            return
        with self._lock:
            last = self.round_trip
            self.round_trip = seconds if last is None else 0.8 * last + 0.2 * seconds
            self._round_trips.append(seconds)
            entry: list[float] | None = getattr(self._mine, "entry", None)
            self._mine.entry = None
            late = seconds - min(self._round_trips)
            if entry is not None and late > 0:
                entry[1] = late
                self._cond.notify_all()  # a waiting head plans its slot again

    def concurrency(self, round_trip: float | None = None) -> int:
        """Requests worth having in flight: paced rate x round trip, plus a margin, bounded.

        *round_trip* (seconds) else the one measured on this limiter, else a guess. The paced
        rate is the margin's: a throttle, which widens the margin, shrinks it.
        """
        rt = round_trip if round_trip is not None else self.round_trip
        rt = GUESS_ROUND_TRIP if rt is None else rt
        wanted = math.ceil(self.rate * rt) + CONCURRENCY_MARGIN
        return max(1, min(MAX_CONCURRENCY, wanted))

    def acquire(self) -> None:
        """Block until a request may go out; callers are served first come, first served.

        The caller at the head of the queue takes the next slot of the schedule (and of the
        window guard) when it comes.
        """
        with self._cond:
            ticket = object()
            self._queue.append(ticket)
            waited = served = False
            scheduled, after = 0.0, None  # the head's slot, planned when self._next was *after*
            try:
                while True:
                    moment = None
                    if self._queue[0] is ticket:
                        now = self._clock()
                        if after != self._next:  # planned once: a late wake keeps its slot
                            scheduled, after = max(self._next, now - self._tolerance), self._next
                        moment = scheduled
                        moment = max(moment, self._window_free(now))
                        # compared as the same sums that were waited for: no rounding back
                        if now >= moment:
                            self._queue.popleft()
                            served = True
                            self._next = scheduled + self._interval
                            self._mine.entry = [now, 0.0]
                            self._granted.append(self._mine.entry)
                            self.acquired += 1
                            self._recover()
                            self._cond.notify_all()  # the next head takes the next slot
                            return
                    if not waited:
                        waited = True
                        self.waiting += 1
                    self._pause(moment)
            finally:
                if waited:
                    self.waiting -= 1
                if not served:  # interrupted while waiting
                    self._queue.remove(ticket)
                    self._cond.notify_all()

    def _window_free(self, now: float) -> float:
        """When a grant more keeps at most ``window_limit`` counting (the lock held)."""
        granted = self._granted
        while granted and sum(granted[0]) + self.span <= now:
            granted.popleft()  # no longer counting (a round trip seen later cannot revive it)
        counting = sorted(until for g, late in granted if (until := g + late + self.span) > now)
        if len(counting) < self.window_limit:
            return now
        return counting[len(counting) - self.window_limit]  # the one whose end frees a place

    def _pause(self, moment: float | None) -> None:
        """Wait, the lock released: until *moment* (the head), else until the head is served."""
        if moment is None:
            self._cond.wait()
            return
        self._lock.release()
        try:
            while (left := moment - self._clock()) > 0:
                self._sleep(left)
        finally:
            self._lock.acquire()

    def _recover(self) -> None:
        """Back to the starting margin once the service admitted the widened pace long enough.

        ``probation`` windows since the last throttle, by the clock (an idle limiter recovers
        too: the next query is not slowed by a loaded minute before it) or by grants. Called
        with the lock held, at each grant.
        """
        now = self._clock()
        if self.margin <= self.base_margin:
            if self._restored_at is not None and now - self._restored_at >= (
                self.probation * self.span
            ):
                self.probation = 1  # a probation passed clean after going back
                self._restored_at = None
            return
        self._clean += 1
        since = now - self._throttled_at if self._throttled_at is not None else 0.0
        if since >= self.probation * self.span or self._clean >= self.probation * self.window_limit:
            self._clean = 0
            self._restored_at = now
            self._set_margin(self.base_margin)


_SHARED_LIMITERS = 256  # endpoints x operations x rates kept; an evicted one is only unshared
_shared: collections.OrderedDict[tuple[Any, ...], RateLimiter] = collections.OrderedDict()
_shared_lock = threading.Lock()


def limiter_for(
    client: Any, operation: str, max_tps: float | None, burst: int | None = None
) -> RateLimiter | None:
    """The process's one limiter for *operation* at *max_tps* on *client*'s account and endpoint.

    HealthImaging's quotas are per account, region and operation, so queries that run at the same
    time (threads of a cohort script) or back to back (the next cell of a notebook, whose first
    second still shares the service's window with the last one's) must draw from one schedule:
    with a limiter each, two scans send 48 requests a second into a 25 TPS quota. Clients of one
    account (:func:`healthimaging_df.aws.session.identity`: the account when the credentials name
    it, else the access key), region and endpoint share; two accounts in one process are two
    quotas, paced apart. A different rate or burst gets a limiter of its own. ``None`` without
    *max_tps*.
    """
    if not max_tps:
        return None
    meta = getattr(client, "meta", None)
    where = (
        (identity(client), getattr(meta, "region_name", None), getattr(meta, "endpoint_url", None))
        if meta is not None
        else ("client", id(client), None)
    )
    key = (*where, operation, float(max_tps), burst)
    with _shared_lock:
        limiter = _shared.get(key)
        if limiter is None:
            limiter = _shared[key] = RateLimiter(max_tps, burst)
            while len(_shared) > _SHARED_LIMITERS:
                _shared.popitem(last=False)
        else:
            _shared.move_to_end(key)
        return limiter


def forget_limiters() -> None:
    """Drop the process's shared limiters: the next query starts a fresh schedule and margin."""
    with _shared_lock:
        _shared.clear()
