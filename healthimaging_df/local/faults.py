"""Fault injection for the local service: latency, rate limits, 500s, malformed pages, churn.

The real service throttles (HTTP 429 ``ThrottlingException``) and occasionally fails
(HTTP 500 ``InternalServerException``); networks cut responses short, proxies answer HTML,
and a busy datastore changes while a query pages through it. A client that never meets these
in tests will meet them in production. These knobs let tests provoke each on purpose, and
every random choice comes from generators seeded by ``Faults.seed``.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "DOCUMENTED_QUOTAS",
    "MALFORMED_KINDS",
    "QIDO_MALFORMED_KINDS",
    "Faults",
    "SlidingWindow",
    "Stats",
    "StatsRecorder",
    "TokenBucket",
]

MALFORMED_KINDS = (
    "truncated",
    "short",
    "html",
    "empty",
    "null_summaries",
    "bad_item",
    "bad_timestamp",
)
"""Kinds of malformed HTTP 200 SearchImageSets bodies, see :class:`Faults`."""

QIDO_MALFORMED_KINDS = (
    "empty",
    "object",
    "not_list",
    "not_objects",
    "missing_uid",
    "missing_study_uid",
    "truncated",
    "html",
)
"""Kinds of malformed HTTP 200 QIDO-RS bodies, see :class:`Faults`."""

DOCUMENTED_QUOTAS: dict[str, tuple[float, int]] = {
    "SearchImageSets": (25.0, 50),
    "GetImageSet": (25.0, 50),
    "ListImageSetVersions": (25.0, 50),
    "GetImageSetMetadata": (50.0, 100),
    "GetDatastore": (10.0, 20),
    "ListDatastores": (5.0, 10),
    "UpdateImageSetMetadata": (10.0, 40),
}
"""(rate TPS, burst) per operation: developer guide "Throttling limits" (service-facts.md)."""

UPDATABLE = ("isPrimary",)
"""Besides DICOM tags, what ``update_tags`` may name (``isPrimary`` flips the flag)."""


@dataclass
class Faults:
    """Fault settings of one local server; mutable at runtime (read on every request).

    Attributes
    ----------
    latency_ms
        Added to every request (``time.sleep`` inside the handler, so requests overlap).
    tps
        Token-bucket refill rate in requests per second over all operations; ``None`` means
        no such limit.
    burst
        Bucket capacity; ``None`` means ``max(1, tps)``.
    window_tps
        Strict sliding window over all operations: at most this many requests accepted in
        any 1-second window, else 429 ``ThrottlingException``; ``None`` means none.
    documented_quotas
        One token bucket per operation at the documented quotas (:data:`DOCUMENTED_QUOTAS`).
    operation_quotas
        ``{operation: (rate, burst)}`` buckets that add to or override the documented ones
        (applied even when ``documented_quotas`` is False), e.g. a raised account quota.
    error_rate
        Fraction of requests (0..1) answered HTTP 500 ``InternalServerException``.
    malformed_rate
        Fraction of SearchImageSets answers (0..1) sent as a malformed HTTP 200 body.
    malformed_every
        Or: every n-th SearchImageSets answer (n, 2n, ...) is malformed; ``None`` = off.
    malformed_kinds
        Kinds used, in turn (round robin), from :data:`MALFORMED_KINDS`: ``truncated``
        (JSON cut short, Content-Length of the cut body), ``short`` (Content-Length of the
        whole body, only part sent, connection closed), ``html`` (a text/html error page),
        ``empty`` (zero bytes), ``null_summaries`` (``"imageSetsMetadataSummaries": null``),
        ``bad_item`` (one item with a 10-character imageSetId and version as a string),
        ``bad_timestamp`` (one item's createdAt a non-numeric string).
    endless_empty_pages
        SearchImageSets answers every page with zero items and a fresh, never-repeated
        nextToken (the request is still validated).
    empty_first_page
        SearchImageSets answers every first page (a request without a nextToken) with no items
        and a nextToken that resumes at the query's start: legal, and rare.
    stuck_cursor
        SearchImageSets answers every page with the query's first page (the same items each
        time) and a fresh, never-repeated nextToken: a cursor that does not advance.
    update_rate
        Image sets updated before each SearchImageSets page is computed: the integer part
        always, the fraction as a probability (0.25: one update on a quarter of requests;
        2.5: two or three). Each gets version + 1 and updatedAt = now.
    update_tags
        DICOM tags (or ``isPrimary``) an update changes, to another image set's value where
        one differs; empty (default) keeps the tags, so only updatedAt and version move.
    update_tags_rate
        Fraction (0..1) of updates that change ``update_tags``; the rest keep the tags.
    qido_malformed_rate
        Fraction of QIDO-RS answers (0..1) sent as a malformed HTTP 200 body.
    qido_malformed_every
        Or: every n-th QIDO-RS answer (n, 2n, ...) is malformed; ``None`` = off.
    qido_malformed_kinds
        Kinds used, in turn, from :data:`QIDO_MALFORMED_KINDS`: ``empty`` (a zero-byte 200),
        ``object`` (``{}``), ``not_list`` (``{"results": [...]}``: the page, not a list),
        ``not_objects`` (one item ``null``), ``missing_uid`` (one record without the level's
        UID: StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID), ``missing_study_uid`` (one
        record without StudyInstanceUID), ``truncated`` (JSON cut short), ``html`` (a text/html
        502 page). An empty page gets a placeholder record for the record kinds.
    qido_page_cap
        Every QIDO-RS page silently holds at most this many records, whatever ``limit`` asked,
        while more exist (the next offset continues after them); ``None`` = off.
    qido_short_rate
        Fraction (0..1) of QIDO-RS pages of two or more records silently cut to a random
        shorter length (at least one record) while more exist.
    seed
        Seed of the random generators (one per fault, so enabling one does not shift the
        draws of another). Serial requests give the same outcome on every run.
    """

    latency_ms: float = 0.0
    tps: float | None = None
    burst: int | None = None
    error_rate: float = 0.0
    seed: int = 0
    window_tps: int | None = None
    documented_quotas: bool = False
    operation_quotas: dict[str, tuple[float, int]] | None = None
    malformed_rate: float = 0.0
    malformed_every: int | None = None
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS
    endless_empty_pages: bool = False
    stuck_cursor: bool = False
    empty_first_page: bool = False
    update_rate: float = 0.0
    update_tags: tuple[str, ...] = ()
    update_tags_rate: float = 1.0
    qido_malformed_rate: float = 0.0
    qido_malformed_every: int | None = None
    qido_malformed_kinds: tuple[str, ...] = QIDO_MALFORMED_KINDS
    qido_page_cap: int | None = None
    qido_short_rate: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot be honoured (the first rule broken)."""
        for broken, message in _RULES:
            if broken(self):
                raise ValueError(message)
        for operation, quota in (self.operation_quotas or {}).items():
            if not isinstance(quota, tuple) or len(quota) != 2 or quota[0] <= 0 or quota[1] < 1:
                raise ValueError(f"operation_quotas[{operation}] must be (rate > 0, burst >= 1)")
        for name in _FRACTIONS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        for broken, message in _LATER_RULES:
            if broken(self):
                raise ValueError(message)
        for tag in self.update_tags:
            if tag not in UPDATABLE and not (tag.startswith("DICOM") and tag.isalnum()):
                raise ValueError("update_tags must name DICOM summary tags or isPrimary")

    def quotas(self) -> dict[str, tuple[float, int]]:
        """The per-operation ``(rate, burst)`` buckets these settings ask for."""
        quotas = dict(DOCUMENTED_QUOTAS) if self.documented_quotas else {}
        quotas.update(self.operation_quotas or {})
        return quotas


def _not_at_least_one(value: object) -> bool:
    """An optional count that is set but not an int >= 1 (a bool is no count)."""
    return value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    )


def _not_subset(kinds: tuple[str, ...], known: tuple[str, ...]) -> bool:
    return not kinds or not set(kinds) <= set(known)


_Rule = tuple[Callable[[Faults], bool], str]

# each rule: (broken?, message), checked in this order; the first broken one is raised
_RULES: tuple[_Rule, ...] = (
    (lambda f: f.latency_ms < 0, "latency_ms must be >= 0"),
    (lambda f: f.tps is not None and f.tps <= 0, "tps must be > 0 (or None for no limit)"),
    (
        lambda f: f.burst is not None and f.burst < 1,
        "burst must be >= 1 (or None for the default)",
    ),
    (
        lambda f: (
            f.window_tps is not None and (not isinstance(f.window_tps, int) or f.window_tps < 1)
        ),
        "window_tps must be an int >= 1 (or None for no window)",
    ),
)
_FRACTIONS = (
    "error_rate",
    "malformed_rate",
    "update_tags_rate",
    "qido_malformed_rate",
    "qido_short_rate",
)
_LATER_RULES: tuple[_Rule, ...] = (
    (
        lambda f: f.malformed_every is not None and f.malformed_every < 1,
        "malformed_every must be >= 1 (or None)",
    ),
    (
        lambda f: _not_subset(f.malformed_kinds, MALFORMED_KINDS),
        f"malformed_kinds must be a non-empty subset of {MALFORMED_KINDS}",
    ),
    (
        lambda f: f.qido_malformed_every is not None and f.qido_malformed_every < 1,
        "qido_malformed_every must be >= 1 (or None)",
    ),
    (
        lambda f: _not_subset(f.qido_malformed_kinds, QIDO_MALFORMED_KINDS),
        f"qido_malformed_kinds must be a non-empty subset of {QIDO_MALFORMED_KINDS}",
    ),
    (
        lambda f: _not_at_least_one(f.qido_page_cap),
        "qido_page_cap must be an int >= 1 (or None)",
    ),
    (
        lambda f: not (f.update_rate >= 0.0 and math.isfinite(f.update_rate)),
        "update_rate must be a finite number >= 0",
    ),
)


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

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def available(self) -> bool:
        """Whether a token could be taken now (takes none)."""
        with self._lock:
            self._refill()
            return self._tokens >= 1.0

    def try_take(self) -> bool:
        """Take one token if available; return whether the request may proceed."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class SlidingWindow:
    """A strict limiter: at most ``limit`` accepted requests in any ``window`` seconds.

    Unlike a token bucket there is no burst credit to save up: a request is accepted only if
    fewer than ``limit`` were accepted in the ``window`` seconds before it. Throttled
    requests do not count.
    """

    def __init__(
        self, limit: int, window: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._accepted: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._accepted and self._accepted[0] <= now - self.window:
            self._accepted.popleft()

    def available(self) -> bool:
        """Whether a request would be accepted now (records nothing)."""
        with self._lock:
            self._expire(self._clock())
            return len(self._accepted) < self.limit

    def try_take(self) -> bool:
        """Accept and record a request if the window has room."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._accepted) < self.limit:
                self._accepted.append(now)
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
        Requests answered 429 by any rate limit.
    errors_injected
        Requests answered 500 by ``error_rate``.
    peak_concurrency
        The most requests in flight at once since the last reset.
    throttled_by_operation
        Throttled requests per operation.
    throttled_by_limit
        Throttled requests per limit that refused them: ``"operation"`` (a per-operation
        bucket), ``"tps"`` (the shared token bucket), ``"window"`` (the sliding window).
    malformed_sent
        SearchImageSets answers sent malformed.
    malformed_by_kind
        The same, per kind.
    empty_pages_sent
        Empty pages sent by ``endless_empty_pages``.
    updates_applied
        Versions created by ``update_rate``.
    updated_image_sets
        ``{imageSetId: changed}`` for every image set ``update_rate`` updated; ``changed`` is
        True if any of its updates changed a tag or isPrimary (so its match may have changed),
        False if only version and updatedAt moved.
    auth_failures
        Requests answered 403 for their signature, per error code
        (``{"InvalidSignatureException": n, ...}``).
    denied
        Requests answered 403 ``AccessDeniedException`` by the deny list, per IAM action.
    qido_malformed_sent
        QIDO-RS answers sent malformed.
    qido_malformed_by_kind
        The same, per kind.
    qido_short_pages_sent
        QIDO-RS pages silently cut short (``qido_page_cap`` or ``qido_short_rate``).
    events_emitted
        Change events the backend produced (before loss and duplication).
    events_lost
        Events dropped by ``EventFaults.loss_rate``.
    events_duplicated
        Extra copies sent by ``EventFaults.duplicate_rate``.
    events_delivered
        SQS messages sent (duplicates included).
    events_failed
        Events not delivered because SQS refused them after retries.
    """

    requests: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    errors_injected: int = 0
    peak_concurrency: int = 0
    throttled_by_operation: dict[str, int] = field(default_factory=dict)
    throttled_by_limit: dict[str, int] = field(default_factory=dict)
    malformed_sent: int = 0
    malformed_by_kind: dict[str, int] = field(default_factory=dict)
    empty_pages_sent: int = 0
    updates_applied: int = 0
    updated_image_sets: dict[str, bool] = field(default_factory=dict)
    auth_failures: dict[str, int] = field(default_factory=dict)
    denied: dict[str, int] = field(default_factory=dict)
    qido_malformed_sent: int = 0
    qido_malformed_by_kind: dict[str, int] = field(default_factory=dict)
    qido_short_pages_sent: int = 0
    events_emitted: int = 0
    events_lost: int = 0
    events_duplicated: int = 0
    events_delivered: int = 0
    events_failed: int = 0


_EVENT_COUNTERS = ("emitted", "lost", "duplicated", "delivered", "failed")


def _chosen(every: int | None, rate: float, number: int, rng: random.Random) -> bool:
    """Whether answer *number* is malformed: every n-th when set, else drawn at *rate*."""
    if every is not None:
        return number % every == 0
    return rate > 0.0 and rng.random() < rate  # no draw at rate 0


class StatsRecorder:
    """Thread-safe counters behind :class:`Stats`; also makes every fault decision."""

    def __init__(self, faults: Faults, clock: Callable[[], float] = time.monotonic) -> None:
        self.faults = faults
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._zero()
        self._peak = 0
        self._reset_limiters()
        self._reseed(faults.seed)

    def _zero(self) -> None:
        # Stats's counters and per-key tallies, by the name of the Stats field they fill
        self._counts: collections.Counter[str] = collections.Counter()
        self._tallies: collections.defaultdict[str, collections.Counter[str]] = (
            collections.defaultdict(collections.Counter)
        )
        self._updated: dict[str, bool] = {}
        self._answers: collections.Counter[str] = collections.Counter()  # per spoilable surface

    def _reset_limiters(self) -> None:
        self._bucket: TokenBucket | None = None
        self._bucket_key: tuple[float | None, int | None] = (None, None)
        self._window: SlidingWindow | None = None
        self._window_key: int | None = None
        self._op_buckets: dict[str, TokenBucket] = {}
        self._op_key: tuple[tuple[str, tuple[float, int]], ...] = ()

    def _reseed(self, seed: int) -> None:
        self._rng_seed = seed
        self._rng = random.Random(seed)  # error_rate draws (as before the other faults)
        # per surface ("" SearchImageSets, "qido_" QIDO-RS): which answers are spoiled, and how
        self._spoil_rngs = {
            "": random.Random(f"{seed}:malformed"),
            "qido_": random.Random(f"{seed}:qido-malformed"),
        }
        self._spoil_turns: collections.Counter[str] = collections.Counter()
        self._update_rng = random.Random(f"{seed}:updates")
        self._qido_short_rng = random.Random(f"{seed}:qido-short")

    def replace_faults(self, faults: Faults) -> None:
        """Install new settings; reset the rate limiters and the random generators."""
        with self._lock:
            self.faults = faults
            self._reset_limiters()
            self._reseed(faults.seed)

    def _check_seed(self) -> None:
        if self.faults.seed != self._rng_seed:
            self._reseed(self.faults.seed)

    def begin(self, operation: str) -> None:
        """Count a request entering the handler."""
        with self._lock:
            self._counts["requests"] += 1
            self._tallies["by_operation"][operation] += 1
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)

    def end(self) -> None:
        """Count a request leaving the handler."""
        with self._lock:
            self._in_flight -= 1

    def _limiters(self, operation: str) -> list[tuple[str, TokenBucket | SlidingWindow]]:
        """The limiters a request of ``operation`` must pass, rebuilt when settings change."""
        faults = self.faults
        out: list[tuple[str, TokenBucket | SlidingWindow]] = []
        op_key = tuple(sorted(faults.quotas().items()))
        if op_key != self._op_key:
            self._op_buckets, self._op_key = {}, op_key
        quota = dict(op_key).get(operation)
        if quota is not None:
            bucket = self._op_buckets.get(operation)
            if bucket is None:
                bucket = TokenBucket(quota[0], float(quota[1]), self._clock)
                self._op_buckets[operation] = bucket
            out.append(("operation", bucket))
        if faults.tps is None:
            self._bucket = None
        else:
            key = (faults.tps, faults.burst)
            if self._bucket is None or key != self._bucket_key:
                # Settings changed by attribute assignment: start a fresh, full bucket.
                capacity = float(faults.burst) if faults.burst is not None else max(1.0, faults.tps)
                self._bucket = TokenBucket(faults.tps, capacity, self._clock)
                self._bucket_key = key
            out.append(("tps", self._bucket))
        if faults.window_tps is None:
            self._window = None
        else:
            if self._window is None or faults.window_tps != self._window_key:
                self._window = SlidingWindow(faults.window_tps, 1.0, self._clock)
                self._window_key = faults.window_tps
            out.append(("window", self._window))
        return out

    def should_throttle(self, operation: str = "") -> bool:
        """Apply every rate limit set for ``operation``; count and report a throttle.

        A request is admitted only if all limiters have room, and then takes from all of
        them; a refused request takes from none.
        """
        with self._lock:
            limiters = self._limiters(operation)
            refused = next((name for name, limiter in limiters if not limiter.available()), None)
            if refused is None:
                for _, limiter in limiters:
                    limiter.try_take()
                return False
            self._counts["throttled"] += 1
            self._tallies["throttled_by_operation"][operation] += 1
            self._tallies["throttled_by_limit"][refused] += 1
            return True

    def should_fail(self) -> bool:
        """Draw against ``faults.error_rate``; count and report an injected error."""
        faults = self.faults
        if faults.error_rate <= 0.0:
            return False
        with self._lock:
            self._check_seed()
            fail = self._rng.random() < faults.error_rate
            if fail:
                self._counts["errors_injected"] += 1
            return fail

    def draw_malformed(self) -> tuple[str, random.Random] | None:
        """For one SearchImageSets answer: the malformed kind to send (and a generator), or None."""
        faults = self.faults
        return self._spoil(
            "", faults.malformed_every, faults.malformed_rate, faults.malformed_kinds
        )

    def _spoil(
        self, surface: str, every: int | None, rate: float, kinds: tuple[str, ...]
    ) -> tuple[str, random.Random] | None:
        """Count an answer of *surface*; if it is chosen, its kind (in turn) and a generator."""
        with self._lock:
            self._check_seed()
            self._answers[surface] += 1
            rng = self._spoil_rngs[surface]
            if not _chosen(every, rate, self._answers[surface], rng):
                return None
            kind = kinds[self._spoil_turns[surface] % len(kinds)]
            self._spoil_turns[surface] += 1
            self._counts[f"{surface}malformed_sent"] += 1
            self._tallies[f"{surface}malformed_by_kind"][kind] += 1
            return kind, random.Random(rng.getrandbits(64))

    def draw_updates(self) -> tuple[int, random.Random]:
        """How many image sets to update before this SearchImageSets page, and a generator."""
        rate = self.faults.update_rate
        with self._lock:
            self._check_seed()
            if rate <= 0.0:
                return 0, self._update_rng
            whole = int(rate)
            count = whole + (self._update_rng.random() < rate - whole)
            return count, self._update_rng

    def record_updates(self, changes: Iterable[tuple[str, bool]]) -> None:
        """Count updates made by ``update_rate``: ``(imageSetId, tags_changed)`` pairs."""
        with self._lock:
            for image_set_id, changed in changes:
                self._counts["updates_applied"] += 1
                self._updated[image_set_id] = self._updated.get(image_set_id, False) or changed

    def draw_qido_malformed(self) -> tuple[str, random.Random] | None:
        """For one QIDO-RS answer: the malformed kind to send (and a generator), or None."""
        faults = self.faults
        return self._spoil(
            "qido_",
            faults.qido_malformed_every,
            faults.qido_malformed_rate,
            faults.qido_malformed_kinds,
        )

    def draw_qido_short(self, length: int) -> int | None:
        """How many records of a QIDO-RS page of ``length`` (>= 2) to send, or None for all."""
        faults = self.faults
        with self._lock:
            self._check_seed()
            keep = length
            if faults.qido_page_cap is not None:
                keep = min(keep, faults.qido_page_cap)
            if (
                faults.qido_short_rate > 0.0
                and self._qido_short_rng.random() < faults.qido_short_rate
            ):
                keep = min(keep, self._qido_short_rng.randrange(1, length))
            if keep >= length:
                return None
            self._counts["qido_short_pages_sent"] += 1
            return keep

    def record_auth_failure(self, code: str) -> None:
        """Count a request refused for its signature."""
        with self._lock:
            self._tallies["auth_failures"][code] += 1

    def record_denied(self, action: str) -> None:
        """Count a request refused by the deny list."""
        with self._lock:
            self._tallies["denied"][action] += 1

    def record_events(self, **counts: int) -> None:
        """Add to the event counters (``emitted``, ``lost``, ``duplicated``, ``delivered``, ``failed``)."""
        with self._lock:
            for name, count in counts.items():
                if name not in _EVENT_COUNTERS:
                    raise KeyError(name)
                self._counts[f"events_{name}"] += count

    def record_empty_page(self) -> None:
        """Count one page sent by ``endless_empty_pages``."""
        with self._lock:
            self._counts["empty_pages_sent"] += 1

    def snapshot(self) -> Stats:
        """Return the current counters as an immutable :class:`Stats`."""
        with self._lock:
            values: dict[str, Any] = {
                each.name: dict(self._tallies[each.name])
                if each.default_factory is dict
                else self._counts[each.name]
                for each in fields(Stats)
            }
            values.update(peak_concurrency=self._peak, updated_image_sets=dict(self._updated))
            return Stats(**values)

    def reset(self) -> None:
        """Zero the counters; requests in flight stay counted for the concurrency peak."""
        with self._lock:
            self._zero()
            self._peak = self._in_flight
