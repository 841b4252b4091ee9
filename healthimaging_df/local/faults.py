"""Fault injection for the local service: latency, a token-bucket rate limit, random 500s, counters.

The real service throttles (HTTP 429 ``ThrottlingException``) and occasionally fails
(HTTP 500 ``InternalServerException``); a client that never meets either in tests will meet
both in production. These knobs let tests provoke them on purpose.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Faults", "Stats", "StatsRecorder", "TokenBucket"]


@dataclass
class Faults:
    """Fault settings of one local server; mutable at runtime (read on every request).

    Attributes
    ----------
    latency_ms
        Added to every request (``time.sleep`` inside the handler, so requests overlap).
    tps
        Token-bucket refill rate in requests per second; ``None`` means no rate limit.
    burst
        Bucket capacity; ``None`` means ``max(1, tps)``.
    error_rate
        Fraction of requests (0..1) answered HTTP 500 ``InternalServerException``.
    seed
        Seed of the random generator that picks which requests fail.
    """

    latency_ms: float = 0.0
    tps: float | None = None
    burst: int | None = None
    error_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot be honoured."""
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.tps is not None and self.tps <= 0:
            raise ValueError("tps must be > 0 (or None for no limit)")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be >= 1 (or None for the default)")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")


class TokenBucket:
    """A thread-safe token bucket: ``rate`` tokens per second, at most ``capacity`` stored.

    The bucket starts full. ``try_take`` never blocks: an empty bucket means the request is
    throttled, as the real service answers at once rather than queueing.
    """

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._last = clock()
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        """Take one token if available; return whether the request may proceed."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


@dataclass(frozen=True)
class Stats:
    """A snapshot of a server's request counters.

    Attributes
    ----------
    requests
        Every request received, including throttled, failed and unknown ones.
    by_operation
        Requests per operation name (``"Unknown"`` for unrouted paths).
    throttled
        Requests answered 429 by the rate limit.
    errors_injected
        Requests answered 500 by ``error_rate``.
    peak_concurrency
        The most requests in flight at once since the last reset.
    """

    requests: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    errors_injected: int = 0
    peak_concurrency: int = 0


class StatsRecorder:
    """Thread-safe counters behind :class:`Stats`; also decides throttling and injected errors."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._lock = threading.Lock()
        self._requests = 0
        self._by_operation: dict[str, int] = {}
        self._throttled = 0
        self._errors = 0
        self._in_flight = 0
        self._peak = 0
        self._bucket: TokenBucket | None = None
        self._bucket_key: tuple[float | None, int | None] = (None, None)
        self._rng = random.Random(faults.seed)
        self._rng_seed = faults.seed

    def replace_faults(self, faults: Faults) -> None:
        """Install new settings and reset the token bucket and the error generator."""
        with self._lock:
            self.faults = faults
            self._bucket = None
            self._bucket_key = (None, None)
            self._rng = random.Random(faults.seed)
            self._rng_seed = faults.seed

    def begin(self, operation: str) -> None:
        """Count a request entering the handler."""
        with self._lock:
            self._requests += 1
            self._by_operation[operation] = self._by_operation.get(operation, 0) + 1
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)

    def end(self) -> None:
        """Count a request leaving the handler."""
        with self._lock:
            self._in_flight -= 1

    def should_throttle(self) -> bool:
        """Apply the token bucket (if ``faults.tps`` is set); count and report a throttle."""
        faults = self.faults
        with self._lock:
            if faults.tps is None:
                self._bucket = None
                return False
            key = (faults.tps, faults.burst)
            if self._bucket is None or key != self._bucket_key:
                # Settings changed by attribute assignment: start a fresh, full bucket.
                capacity = float(faults.burst) if faults.burst is not None else max(1.0, faults.tps)
                self._bucket = TokenBucket(faults.tps, capacity)
                self._bucket_key = key
            bucket = self._bucket
        if bucket.try_take():
            return False
        with self._lock:
            self._throttled += 1
        return True

    def should_fail(self) -> bool:
        """Draw against ``faults.error_rate``; count and report an injected error."""
        faults = self.faults
        if faults.error_rate <= 0.0:
            return False
        with self._lock:
            if faults.seed != self._rng_seed:
                self._rng = random.Random(faults.seed)
                self._rng_seed = faults.seed
            fail = self._rng.random() < faults.error_rate
            if fail:
                self._errors += 1
            return fail

    def snapshot(self) -> Stats:
        """Return the current counters as an immutable :class:`Stats`."""
        with self._lock:
            return Stats(
                requests=self._requests,
                by_operation=dict(self._by_operation),
                throttled=self._throttled,
                errors_injected=self._errors,
                peak_concurrency=self._peak,
            )

    def reset(self) -> None:
        """Zero the counters; requests in flight stay counted for the concurrency peak."""
        with self._lock:
            self._requests = 0
            self._by_operation = {}
            self._throttled = 0
            self._errors = 0
            self._peak = self._in_flight
