"""The one place that talks to botocore: clients, pacing under the quota, error translation.

Search (``fetch``) and enrichment (``metadata``) share it. Every HTTP attempt, botocore's own retries
included, takes a token from the caller's :class:`RateLimiter`: the limiter is armed per thread
through botocore's ``before-send`` event, so a retry cannot overrun the quota that the first
attempt respected, and a user's own client is paced only inside our calls. The quota is the
account's, per operation, so :func:`limiter_for` hands every query of the process that calls one
operation on one endpoint the same limiter: two queries at once, or one right after another,
share the 25 TPS instead of sending 25 each.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from healthimaging_df import logs
from healthimaging_df._version import __version__
from healthimaging_df.errors import SearchError, ThrottledError

THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)
SERVICE = "medical-imaging"
SEARCH = "SearchImageSets"  # the operation every search path paces (its own quota bucket)
_HANDLER_ID = "healthimaging_df.aws.pace"
# Requests go out a hair under the rate asked for: evenly paced at exactly 25/s, scheduling
# jitter puts a 26th request into some one-second window, and a strict sliding-window limiter
# throttles it (seen: about 10% throttled at 25/s, none at 24/s).
HEADROOM = 0.96


class RateLimiter:
    """Paces acquisitions at ``rate * headroom`` per second, across threads, on a fixed schedule.

    Each caller reserves the next *slot* of an absolute schedule (slot k+1 = slot k + 1/rate)
    and sleeps until it. A thread that wakes late (the GIL held by another thread's parse, a
    busy machine) therefore delays only its own request: the next slot was fixed before, so the
    schedule does not accumulate oversleep as a bucket refilled from wake-up times does. The
    schedule never runs behind the clock by more than ``burst - 1`` slots, so an idle limiter
    lets at most ``burst`` requests through at once (``burst=1``, the default: evenly paced).

    On top, a sliding-window guard: at most ``window_limit`` grants in any ``window`` (1 s) of
    grant times, so late requests that catch up cannot crowd one second. The limit is what an
    evenly paced bucket of ``burst`` allows (``floor(burst + rate * headroom)``, 49 at 50 TPS)
    as long as that leaves the quota a request to spare for the network's jitter, else the
    paced rate rounded up (24 at 25 TPS, 10 at 10): a strict sliding-window limiter on the
    service is never overrun.

    ``clock`` and ``sleep`` are injectable for unit tests of the schedule.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        headroom: float = HEADROOM,
        *,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = float(rate) * headroom
        self.capacity = float(burst if burst is not None else 1)
        self.window = float(window)
        paced = math.ceil(self.rate * self.window - 1e-9)  # the paced rate, per window
        spare = math.floor(float(rate) * self.window) - 1  # the quota, less a request of room
        self.window_limit = max(
            int(self.capacity),
            paced,
            min(math.floor(self.capacity + self.rate * self.window), spare),
            1,
        )
        self._interval = 1.0 / self.rate
        self._tolerance = (self.capacity - 1.0) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._next = clock() - self._tolerance  # the first free slot of the schedule
        self._granted: collections.deque[float] = collections.deque(maxlen=self.window_limit)
        self._lock = threading.Lock()
        self.waiting = 0
        self.acquired = 0

    @property
    def saturated(self) -> bool:
        """Some thread is waiting for its slot: more concurrency would not send more requests."""
        return self.waiting > 0

    def recent(self) -> int:
        """Requests granted in the last ``window`` seconds, by every caller of this limiter."""
        with self._lock:
            since = self._clock() - self.window
            return sum(1 for granted in self._granted if granted > since)

    def acquire(self) -> None:
        """Block until a request may go out."""
        with self._lock:
            now = self._clock()
            slot = max(self._next, now - self._tolerance)
            self._next = slot + self._interval
            waited = slot > now
            if waited:
                self.waiting += 1
        try:
            while True:
                if waited:
                    self._wait_until(slot)
                with self._lock:
                    now = self._clock()
                    granted = self._granted
                    if len(granted) < self.window_limit or now - granted[0] >= self.window:
                        granted.append(now)
                        self.acquired += 1
                        return
                    slot = granted[0] + self.window  # the window is full: wait for its oldest
                    if not waited:
                        waited = True
                        self.waiting += 1
        finally:
            if waited:
                with self._lock:
                    self.waiting -= 1

    def _wait_until(self, moment: float) -> None:
        while (left := moment - self._clock()) > 0:
            self._sleep(left)


_SHARED_LIMITERS = 256  # endpoints x operations x rates kept; an evicted one is only unshared
_shared: collections.OrderedDict[tuple[Any, ...], RateLimiter] = collections.OrderedDict()
_shared_lock = threading.Lock()


def limiter_for(
    client: Any, operation: str, max_tps: float | None, burst: int | None = None
) -> RateLimiter | None:
    """The process's one limiter for *operation* at *max_tps* on *client*'s region and endpoint.

    HealthImaging's quotas are per account and operation, so queries that run at the same time
    (threads of a cohort script) or back to back (the next cell of a notebook, whose first second
    still shares the service's window with the last one's) must draw from one schedule: with a
    limiter each, two scans send 48 requests a second into a 25 TPS quota. Clients of one region
    and endpoint share, whatever their credentials (two accounts in one process are paced as
    one: slower, never throttled); a different rate or burst gets a limiter of its own. ``None``
    without *max_tps*.
    """
    if not max_tps:
        return None
    meta = getattr(client, "meta", None)
    where = (
        (getattr(meta, "region_name", None), getattr(meta, "endpoint_url", None))
        if meta is not None
        else ("client", id(client))
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


def make_client(
    client: Any, boto3_session: Any, max_concurrency: int = 8, endpoint_url: str | None = None
) -> Any:
    """Return *client*, or a ``medical-imaging`` client from *boto3_session* (default session).

    The client made here retries in botocore's standard mode (throttling and 5xx, 10 attempts),
    has a connection pool large enough for *max_concurrency*, and names us in its user agent.
    An *endpoint_url* (a local service) also turns off the ``runtime-`` host prefix.
    """
    logs.refresh()  # loggers of botocore modules imported since then are covered too
    if client is not None:
        return client
    import boto3
    from botocore.config import Config

    session = boto3_session if boto3_session is not None else boto3.Session()
    settings: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": 10},
        "max_pool_connections": max(10, max_concurrency + 2),
        "user_agent_extra": f"healthimaging-df/{__version__}",
    }
    if endpoint_url:
        settings["inject_host_prefix"] = False
    return session.client("medical-imaging", endpoint_url=endpoint_url, config=Config(**settings))


_armed = threading.local()


def _before_send(**_: Any) -> None:
    limiter: RateLimiter | None = getattr(_armed, "limiter", None)
    if limiter is not None:
        limiter.acquire()


@contextmanager
def paced(client: Any, limiter: RateLimiter | None) -> Iterator[None]:
    """Within the block, every HTTP attempt this thread makes on *client* waits for *limiter*.

    The handler is registered once per client (idempotent through its unique id) and does nothing
    on threads that are not inside this block.
    """
    if limiter is None:
        yield
        return
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:  # not a botocore client: pace the call itself
        limiter.acquire()
        yield
        return
    events.register("before-send", _before_send, unique_id=_HANDLER_ID)
    previous = getattr(_armed, "limiter", None)
    _armed.limiter = limiter
    try:
        yield
    finally:
        _armed.limiter = previous


def error_code(exc: BaseException) -> tuple[str, int | None, str | None]:
    """``(code, HTTP status, server message)`` of a botocore error; the class name otherwise."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code", "Unknown")), status, error.get("Message")
    return type(exc).__name__, None, None


def search_error(operation: str, index: int | None, exc: BaseException) -> SearchError:
    """The typed error for a botocore failure; botocore's text (which can quote PHI) is dropped."""
    code, status, message = error_code(exc)
    cls = ThrottledError if code in THROTTLING_CODES else SearchError
    return cls(operation, index, code, status, server_message=message)
