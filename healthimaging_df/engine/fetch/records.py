"""What a fetch is told and what it hands back: options, pages, coverage; and its counters."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import pyarrow as pa

from healthimaging_df import aws
from healthimaging_df.core import checks, dates
from healthimaging_df.engine.fetch.readers import _MICROSECOND, Window
from healthimaging_df.plan import Chain


@dataclass(frozen=True)
class FetchOptions:
    """How pages are fetched.

    Attributes
    ----------
    max_concurrency
        Requests in flight at once; None (the default): enough to keep the limiter busy, the
        paced rate times the round trip measured on the endpoint plus a margin, at most
        ``aws.MAX_CONCURRENCY``, shrunk when the service throttles (``RateLimiter.concurrency``).
    max_tps
        Requests per second across all threads; None for no client-side limit.
    burst
        Requests the limiter lets through at once after idling (default 1: evenly paced, so a
        service with a smaller burst allowance is not overrun).
    page_size
        ``maxResults`` per request (the API allows 1-50).
    """

    max_concurrency: int | None = None
    max_tps: float | None = aws.SEARCH_TPS
    burst: int | None = None
    page_size: int = 50

    def __post_init__(self) -> None:
        checks.optional_positive_int("max_concurrency", self.max_concurrency)
        checks.optional_positive_number("max_tps", self.max_tps)
        checks.integer("page_size", self.page_size, minimum=1, maximum=50)

    def concurrency(self, limiter: aws.RateLimiter | None, round_trip: float | None = None) -> int:
        """Requests worth having in flight: the explicit value, else the limiter's measure."""
        if self.max_concurrency is not None:
            return self.max_concurrency
        if limiter is None:
            return aws.MAX_CONCURRENCY  # unpaced: as many as the bound
        return limiter.concurrency(round_trip)


@dataclass
class Page:
    """One checked response as a table of the declared schema, tagged with its chain and task.

    A task (a chain, or one createdAt window of it) ends with a page whose ``done`` is True and whose
    ``covered`` says which createdAt range (inclusive, to the microsecond) the task has delivered
    completely; None for a whole non-windowed chain. Checkpoints are built from these.
    """

    chain: int
    table: pa.Table = field(repr=False)  # summaries are PHI
    task: int = 0
    done: bool = False
    covered: Window | None = None
    seen: threading.Event | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        """Image sets on this page."""
        return int(self.table.num_rows)


@dataclass
class Coverage:
    """What an interrupted fetch had completed: whole chains, and createdAt ranges of windows."""

    chains: set[int] = field(default_factory=set)
    windows: dict[int, list[Window]] = field(default_factory=dict)

    def add(self, page: Page) -> None:
        """Record a ``done`` page."""
        if page.covered is None:
            self.chains.add(page.chain)
        else:
            self.windows.setdefault(page.chain, []).append(page.covered)

    def remaining(self, chain: Chain) -> list[Window]:
        """The parts of a windowed chain not yet covered, widened to whole seconds."""
        assert chain.window is not None
        low, high = chain.window
        gaps: list[Window] = []
        cursor = low
        for a, b in sorted(self.windows.get(chain.index, [])):
            if a > cursor:
                gaps.append((cursor, a))
            cursor = max(cursor, b + _MICROSECOND)
        if cursor <= high:
            gaps.append((cursor, high))
        return [(dates.floor_second(a), dates.ceil_second(b)) for a, b in gaps]


@dataclass
class _Counters:
    """What the consumer has received (only its thread touches these)."""

    pages: int = 0
    image_sets: int = 0


class _RecentIds:
    """The image set ids of a chain's last *pages* pages, to tell whether a page brings a new one."""

    def __init__(self, pages: int) -> None:
        self._pages: collections.deque[list[str]] = collections.deque(maxlen=pages)
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, table: pa.Table) -> bool:
        """Remember *table*'s ids; True if one of them was not among the remembered ones."""
        ids = table.column("imageSetId").to_pylist() if table.num_rows else []
        new = any(i not in self._counts for i in ids)
        if len(self._pages) == self._pages.maxlen:
            for old in self._pages[0]:
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
        self._pages.append(ids)
        self._counts.update(ids)
        return new
