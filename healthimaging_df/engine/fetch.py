"""The executor: pages from a boto3 client, concurrently, under one client-side rate limit.

Request chains (one per fanned-out value, or createdAt windows read from both ends and split while
workers are free) run on a pool of threads sharing one client. The shared rate limiter
(``aws.RateLimiter``) paces every call below ``max_tps`` so we do not cause the throttling we would
then retry, first come, first served. botocore's standard retry mode
retries throttling and 5xx; anything it gives up on becomes a typed error and the whole fetch
stops: a fault we cannot recover from raises, it never returns half a result.
"""

from __future__ import annotations

import array
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import aws
from healthimaging_df.core import checks, dates
from healthimaging_df.core.progress import Progress, ProgressReporter
from healthimaging_df.engine import flatten, pagecheck, pages
from healthimaging_df.errors import (
    HealthImagingDFWarning,
    MalformedResponseError,
    PaginationError,
    SearchError,
)
from healthimaging_df.plan import Chain, Plan, rows_between

log = logging.getLogger(__name__)

Window = tuple[datetime, datetime]
# first pages already read, by request_key: what a probe hands the scan it decided on
Prefetched = dict[str, tuple[pa.Table, str | None]]

_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
OPERATION = aws.SEARCH
# Pages in a row that bring no new image set (empty, or holding only image sets the chain's recent
# pages held), each with a fresh nextToken, before a chain is called stuck. A service that filters
# while it scans can answer a few empty pages in a row; 50 is far beyond that (a healthy chain has
# never been seen to need more than a handful) yet stops a runaway chain within about two seconds
# at the default quota, instead of paging forever. The ids of the last EMPTY_PAGE_LIMIT pages are
# remembered (at most 2,500), so a cursor repeating a page, or cycling over up to 50, is caught.
EMPTY_PAGE_LIMIT = 50
# Windowed scans (see PageStream._feed): a segment's two ends stop reading from one side once
# fewer rows than this are left between them (the other end's page in flight reads them); a
# missing end is started only for a segment with at least ADD_READER_ROWS left, a split only
# with SPLIT_ROWS left.
PAGE_ROWS = 50
EARLY_STOP_ROWS = 2 * PAGE_ROWS
ADD_READER_ROWS = 3 * PAGE_ROWS
SPLIT_ROWS = 6 * PAGE_ROWS
CHECKPOINT_PAGES = 5  # a reader hands over what it covered every this many pages
LOCAL_REACH = 20  # an end's density holds for this many times its last page's span...
LOCAL_REACH_SECONDS = 5.0  # ...and for at least this long (splits fall on whole seconds)
AT_RATE = 0.97  # pages arriving at this share of the limiter's rate: no new reader
STATS_QUANTILES = 64  # createdAt quantiles a full scan leaves for the next one's pre-split
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Endpoints that refused a range filter with createdAt BETWEEN as the second filter (AWS does not
# document which pairs it takes beyond an ID or series UID with one date range): a lazy range
# chain there is read by its two ends, which send the chain's one filter. Per process.
_REFUSED_PAIRS: set[str] = set()
_REFUSED_LOCK = threading.Lock()


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
class _Task:
    chain: Chain
    window: Window | None = None
    id: int = 0
    reader: _Reader | None = None  # a windowed task: one end of a segment
    pages: int = 0


@dataclass(eq=False)
class _Reader:
    """One request chain reading a segment from its low end (ascending) or high end (descending).

    Its query covers ``[low, high]`` (whole seconds); every row of the query beyond ``frontier``
    in its direction (before it ascending, after it descending) has been delivered.
    """

    segment: _Segment
    descending: bool
    low: datetime
    high: datetime
    frontier: datetime
    sole: bool = False  # the other end stopped early: this reader must run to the meeting
    density: float | None = None  # rows per second on its last page
    span: float = 0.0  # seconds of createdAt its last page covered
    read: bool = False  # it has had a page with rows


@dataclass(eq=False)
class _Segment:
    """An unfinished part of a createdAt window, read from both ends until they meet.

    Every row created before ``low`` and every row created after ``high`` has been delivered
    (by this segment's readers or by a neighbouring segment's); the segment is complete once
    ``low > high``, or once a reader's chain ends (its query covers the whole segment).
    """

    chain: Chain
    low: datetime
    high: datetime
    asc: _Reader | None = None
    desc: _Reader | None = None
    closed: bool = False

    @property
    def complete(self) -> bool:
        return self.closed or self.low > self.high

    def remaining_rows(self, overall: float | None = None, most: bool = False) -> float:
        """Rows left between the ends (inf when unknown).

        By the chain's profile (statistics), else by the ends' densities: each end's density
        holds for its reach (``LOCAL_REACH`` times the span its last page covered, at least
        ``LOCAL_REACH_SECONDS``) into the gap, and the *overall* density read so far for the
        rest. An end in an import burst says little about the months after it, but two ends
        inside one long burst (or one same-second import) say the rows between them are dense:
        a cut-off from "local" to "overall" at the reach left such a segment unsplit with two
        readers for seconds. *most*: at least the local estimate, for decisions that would
        leave one reader alone.
        """
        profiled = rows_between(self.chain, self.low, self.high)
        if profiled is not None:
            return profiled
        ends = [r for r in (self.asc, self.desc) if r is not None and r.density]
        if not ends:
            return float("inf")
        gap = max((self.high - self.low).total_seconds(), 0.0)
        local = gap * sum(r.density or 0.0 for r in ends) / len(ends)
        if overall is None:
            return local
        share = gap / len(ends)  # the part of the gap each end reaches into at most
        near = [min(max(LOCAL_REACH * r.span, LOCAL_REACH_SECONDS), share) for r in ends]
        blended = sum((r.density or 0.0) * n for r, n in zip(ends, near, strict=True))
        blended += overall * (gap - sum(near))
        return max(local, blended) if most else blended


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


class PageStream:
    """Pages of a plan as they arrive from worker threads.

    Use as a context manager: leaving it (also by an exception) stops the workers.
    ``stop_chain(i)`` tells chain *i* to fetch no more pages (a limit has been reached).
    """

    def __init__(
        self,
        plan: Plan,
        client: Any,
        options: FetchOptions,
        progress: Progress = None,
        resume: Coverage | None = None,
        prefetched: Prefetched | None = None,
    ) -> None:
        self.plan = plan
        self.resume = resume
        self._prefetched = prefetched if prefetched is not None else {}
        self.client = client
        self.options = options
        self.counters = _Counters()
        self._limiter = aws.limiter_for(client, OPERATION, options.max_tps, options.burst)
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._threads = options.max_concurrency or aws.MAX_CONCURRENCY
        self._results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=8 * self._threads)
        self._cancel = threading.Event()
        self._winding = threading.Event()  # wind_down(): no new page; tasks hand over, then end
        self._stopped: set[int] = set()
        self._lock = threading.RLock()  # re-entrant: a reader's page handling submits new readers
        self._outstanding = 0
        self._segments: set[_Segment] = set()
        self._samples: array.array[int] = array.array("q")  # createdAt (us) of pages' ends
        self._arrivals: collections.deque[float] = collections.deque()  # windowed pages' times
        self._round_trip: float | None = None  # seconds from grant to page, a moving average
        self._began = time.monotonic()
        self._rows_read = 0
        self._seconds_read = 0.0
        self._task_ids = 0
        self._workers: list[threading.Thread] = []
        self._progress = ProgressReporter(
            progress, "SearchImageSets", " pages", postfix="{} image sets"
        )
        self._started = False
        self._hooks = contextlib.ExitStack()  # our botocore handlers, for the stream's life

    # -- consumer side ------------------------------------------------------------------------

    def __enter__(self) -> PageStream:
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Page]:
        self._start()
        while True:
            kind, payload = self._results.get()
            if kind == "page":
                if not payload.done:
                    self.counters.pages += 1
                    self.counters.image_sets += payload.rows
                    self._progress.update(self.counters.pages, self.counters.image_sets)
                yield payload
                if payload.seen is not None:
                    payload.seen.set()  # the consumer has had its say (stop_chain) on this page
            elif kind == "error":
                self.close()
                raise payload
            else:
                return

    def wind_down(self) -> None:
        """Send no new request; end the stream once the pages in flight are in.

        Each window's reader hands over the range it has read: what the consumer got is then all
        that finished (an interrupted export checkpoints it); a plain chain left unfinished is not.
        """
        self._winding.set()

    @property
    def winding_down(self) -> bool:
        """Whether :meth:`wind_down` was called."""
        return self._winding.is_set()

    def stop_chain(self, index: int) -> None:
        """Fetch no further pages for chain *index*."""
        with self._lock:
            self._stopped.add(index)

    def close(self) -> None:
        """Stop the workers and wait for them (draining so none blocks on a full queue)."""
        self._cancel.set()
        for _ in self._workers:
            self._tasks.put(None)
        while any(w.is_alive() for w in self._workers):
            self._drain()
            for w in self._workers:
                w.join(timeout=0.01)
        self._workers.clear()
        self._progress.close()
        self._hooks.close()  # the client is left as it was given

    def _drain(self) -> None:
        try:
            while True:
                self._results.get_nowait()
        except queue.Empty:
            pass

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._hooks.enter_context(aws.pacing(self.client))  # once, not per page
        if _lean(self.client):
            self._hooks.enter_context(pages.hooked(self.client))
        self._began = time.monotonic()
        # in the plan's order: plain chains and windows alike start as the chains are listed
        starts: list[_Task | tuple[Chain, Window, tuple[datetime, ...]]] = []
        for chain in self.plan.chains:
            if self.resume is not None and chain.index in self.resume.chains:
                continue
            if chain.window is None:
                starts.append(_Task(chain))
            elif self.resume is None or chain.index not in self.resume.windows:
                starts.append((chain, chain.window, chain.splits))  # nothing of it read yet
            else:
                starts += [(chain, w, ()) for w in self.resume.remaining(chain)]
        tasks = [s for s in starts if isinstance(s, _Task)]
        windows = [s for s in starts if not isinstance(s, _Task)]
        if not starts:
            self._results.put(("done", None))
            return
        with self._lock:
            for start in starts:
                if isinstance(start, _Task):
                    self._submit(start)
                else:
                    chain, (low, high), splits = start
                    self._open_window(chain, low, high, splits)
        # windows split into more tasks as they run; plain chains never outnumber their tasks.
        # Threads past rate x round trip only wait for the limiter's slot (no request more);
        # readers of windows are started only while they add throughput (_feed)
        limit = self._threads
        count = limit if windows else min(limit, len(tasks))
        for n in range(count):
            worker = threading.Thread(target=self._work, name=f"ahi-fetch-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _open_window(
        self, chain: Chain, low: datetime, high: datetime, splits: tuple[datetime, ...]
    ) -> None:
        """Start reading a window: pre-split at *splits*, each piece from its low end.

        Without splits, from both ends at once (the first two pages also find the oldest and
        newest rows, so the first splits know the spread).
        """
        edges = [low, *sorted(s for s in set(splits) if low < s < high), high]
        if len(edges) == 2:
            segment = _Segment(chain, low, high)
            self._segments.add(segment)
            self._add_reader(segment, descending=False)
            if high > low and not chain.lazy:  # a lazy chain's second end comes with pages left
                self._add_reader(segment, descending=True)
            return
        for a, b in itertools.pairwise(edges):
            segment = _Segment(chain, a, b)
            self._segments.add(segment)
            self._add_reader(segment, descending=False)

    def created_quantiles(self, count: int = STATS_QUANTILES) -> tuple[datetime, ...]:
        """The createdAt at *count* + 1 evenly spaced ranks of the windowed rows read (first to last).

        Sampled from the first and last row of every page (pages hold 50 rows in createdAt
        order, so the samples are about evenly spaced in rank); what a later scan pre-splits on.
        """
        if not self._samples:
            return ()
        ordered = sorted(self._samples)
        last = len(ordered) - 1
        picks = sorted({ordered[round(last * k / count)] for k in range(count + 1)})
        return tuple(_EPOCH + timedelta(microseconds=us) for us in picks)

    # -- worker side --------------------------------------------------------------------------

    def _submit(self, task: _Task) -> None:
        with self._lock:
            self._outstanding += 1
            self._task_ids += 1
            task.id = self._task_ids
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None or self._cancel.is_set():
                return
            try:
                self._run(task)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                self._cancel.set()
                self._put(("error", exc))
                return
            with self._lock:
                self._outstanding -= 1
                finished = self._outstanding == 0
                unread = any(not s.complete for s in self._segments)
            if (
                finished
                and unread
                and not self._cancel.is_set()
                and not self._stopped
                and not self._winding.is_set()
            ):
                self._cancel.set()
                self._put(
                    (
                        "error",
                        PaginationError(
                            OPERATION,
                            task.chain.index,
                            "IncompleteWindow",
                            detail="every reader of a createdAt window stopped before it was read",
                        ),
                    )
                )
                return
            if finished:
                self._put(("done", None))

    def _put(self, item: tuple[str, Any]) -> None:
        while True:
            try:
                self._results.put(item, timeout=0.05)
                return
            except queue.Full:
                if self._cancel.is_set() and item[0] == "page":
                    return

    def _emit(self, task: _Task, table: pa.Table) -> None:
        """Hand a page to the consumer; when chains stop early, wait for its verdict first.

        Without that wait a chain would fetch its next page while the consumer is still deciding
        that it already has enough: one wasted request per chain.
        """
        seen = threading.Event() if self.plan.stops_early else None
        self._put(("page", Page(task.chain.index, table, task.id, seen=seen)))
        while seen is not None and not seen.wait(0.05):
            if self._cancel.is_set():
                return

    def _finish(self, task: _Task, covered: Window | None) -> None:
        if not self._cancel.is_set():
            empty = flatten.EMPTY_TABLE
            self._put(("page", Page(task.chain.index, empty, task.id, True, covered)))

    def _halted(self, chain: int) -> bool:
        return self._cancel.is_set() or chain in self._stopped

    def _run(self, task: _Task) -> None:
        chain = task.chain
        kwargs = chain.request(self.plan.datastore_id, task.window)
        kwargs["maxResults"] = self.options.page_size
        if task.reader is not None and task.reader.descending:
            kwargs["searchCriteria"]["sort"] = {"sortField": "createdAt", "sortOrder": "DESC"}
        tokens: set[bytes] = set()  # digests: a chain of 100,000 pages must not keep 8 KB each
        recent = _RecentIds(EMPTY_PAGE_LIMIT)
        empty_run = 0
        page_number = 0
        while not self._halted(chain.index):
            if self._winding.is_set():
                if task.reader is not None:
                    self._hand_over(task, task.reader)
                return
            try:
                table, token = self._call(kwargs, chain.index)
            except SearchError as exc:
                if not (page_number == 0 and _pair_refusal(exc, chain, kwargs)):
                    raise
                self._refused(task)
                return
            page_number += 1
            log.debug(
                "chain %d page %d: %d image sets%s",
                chain.index,
                page_number,
                table.num_rows,
                ", more" if token else "",
            )
            if token is not None:
                digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
                if digest in tokens:
                    raise PaginationError(
                        OPERATION,
                        chain.index,
                        "RepeatedNextToken",
                        detail="the service returned a nextToken it had already given",
                    )
                tokens.add(digest)
                empty_run = 0 if recent.add(table) else empty_run + 1
                if empty_run >= EMPTY_PAGE_LIMIT:
                    raise PaginationError(
                        OPERATION,
                        chain.index,
                        "NoProgress",
                        detail=f"{empty_run} pages in a row brought no new image set (empty "
                        "pages in a row, or the same image sets again), each with a new nextToken",
                    )
            if task.reader is None:
                self._emit(task, table)
                if token is None:
                    self._finish(task, None)
            else:
                stop, covered = self._segment_page(task, task.reader, table, token)
                if stop:
                    self._finish(task, covered)
                    return
            if token is None:
                return
            kwargs["nextToken"] = token

    def _segment_page(
        self, task: _Task, reader: _Reader, table: pa.Table, token: str | None
    ) -> tuple[bool, Window | None]:
        """Emit a reader's page, move its end of the segment, and decide whether it goes on.

        Returns whether the reader stops (its chain ended, the two ends met, or the other end
        will finish the little that is left) and then the createdAt range it delivered
        completely (None: the whole chain, a lazy chain's reader that read its own query). Every page is emitted whole: rows both ends read are deduplicated downstream.
        """
        created = table.column("createdAt")
        rows = table.num_rows
        if rows > 1:
            head, tail = created.slice(0, rows - 1), created.slice(1)
            ordered = (
                pc.less_equal(tail, head) if reader.descending else pc.greater_equal(tail, head)
            )
            if not pc.all(ordered).as_py():
                raise PaginationError(
                    OPERATION,
                    task.chain.index,
                    "UnsortedPage",
                    detail="a createdAt window came back out of createdAt order; splitting it would lose rows",
                )
        self._emit(task, table)
        with self._lock:
            self._arrivals.append(time.monotonic())
            segment = reader.segment
            if rows:
                first, last = created[0].as_py(), created[-1].as_py()
                self._samples.extend((_micros(first), _micros(last)))
                if rows > 1:
                    span = abs((last - first).total_seconds())
                    reader.density = (rows - 1) / max(span, 1e-6)
                    reader.span = span
                # the span read: from the previous page's end (from this page's first row on a
                # reader's first page, whose query may start decades before the data)
                since = reader.frontier if reader.read else first
                self._rows_read += rows
                self._seconds_read += abs((last - since).total_seconds())
                reader.read = True
                reader.frontier = last
                if reader.descending:
                    segment.high = min(segment.high, last)
                else:
                    segment.low = max(segment.low, last)
            if token is None:
                segment.closed = True  # the query covers the segment: nothing of it is left
            stop = segment.complete or self._leave_to_other_end(segment, reader)
            covered: Window | None = None
            task.pages += 1
            handed: tuple[int, Window] | None = None
            if not stop and task.pages % CHECKPOINT_PAGES == 0 and rows:
                handed = self._roll_over(task, reader)
            if stop:
                if segment.asc is reader:
                    segment.asc = None
                if segment.desc is reader:
                    segment.desc = None
                if segment.complete:
                    self._segments.discard(segment)
                if (
                    token is None
                    and task.chain.lazy
                    and (reader.low, reader.high) == (task.chain.window)
                ):
                    covered = None  # its query was the chain's own: the whole chain is read
                elif token is None:
                    covered = (reader.low, reader.high)
                elif reader.descending:
                    covered = (reader.frontier + _MICROSECOND, reader.high)
                else:
                    covered = (reader.low, reader.frontier - _MICROSECOND)
            self._feed()
        if handed is not None:  # outside the lock: the results queue may be full
            self._put(
                ("page", Page(task.chain.index, flatten.EMPTY_TABLE, handed[0], True, handed[1]))
            )
        return stop, covered

    def _leave_to_other_end(self, segment: _Segment, reader: _Reader) -> bool:
        """Whether *reader* stops early: the other end's page in flight will likely finish it.

        Only once both ends have read (else the estimate is this end's alone: a burst may lie
        beyond), neither end already the sole one, and little is left. Called with the lock held.
        """
        other = segment.asc if reader.descending else segment.desc
        if (
            other is None
            or not other.read
            or other.sole
            or reader.sole
            or segment.remaining_rows(self._overall(), most=True) >= EARLY_STOP_ROWS
        ):
            return False
        other.sole = True  # its page in flight will most likely finish the segment
        return True

    def _hand_over(self, task: _Task, reader: _Reader) -> None:
        """On :meth:`wind_down`: end *task*, handing over the range its reader has read."""
        with self._lock:
            if not reader.read:
                return
            ended, covered = self._roll_over(task, reader)
        self._put(("page", Page(task.chain.index, flatten.EMPTY_TABLE, ended, True, covered)))

    def _roll_over(self, task: _Task, reader: _Reader) -> tuple[int, Window]:
        """End the task (not the chain), returning its id and coverage; go on under a new id.

        A reader can run for the whole scan; its coverage is what a checkpoint saves, so it is
        handed over every few pages at no cost in requests (the same nextToken chain goes on).
        """
        if reader.descending:
            covered = (reader.frontier + _MICROSECOND, reader.high)
            reader.high = reader.frontier
        else:
            covered = (reader.low, reader.frontier - _MICROSECOND)
            reader.low = reader.frontier
        ended = task.id
        self._task_ids += 1
        task.id = self._task_ids
        return ended, covered

    def _feed(self) -> None:
        """Start a reader if there is a free worker and it would shorten the scan.

        Below the limiter's rate, the segment with the most rows left gets its missing end, or,
        read from both ends already, is split at a whole second between them (the dense side's
        next second, else the middle) with a new reader at the split. At the rate, none does:
        a reader more would only wait for the limiter. Each reader costs about half a page more
        (its last page is part-empty), so none starts for a segment with little left. Called
        with the lock held.
        """
        cap = self.options.concurrency(self._limiter, self._round_trip)
        if self._outstanding >= cap or self._at_rate():
            return
        limiter, round_trip = self._limiter, self._round_trip
        if (
            limiter is not None
            and round_trip is not None
            and self._outstanding >= limiter.rate * round_trip + 1
        ):
            # readers enough to keep the limiter busy are on their way (Little's law: rate x
            # round trip in flight; its queue shows them a round trip later)
            return
        # one reader per page that arrives: the rate is measured again before the next
        move = next_reader(
            self._segments, self._overall(), self._readers_short(), allowed=self._allowed
        )
        if move is None:
            return
        segment, step = move
        if isinstance(step, datetime):
            cuts = [step]
            if segment.chain.lazy:  # no statistics pre-split it: catch up at once
                wanted = min(cap - self._outstanding, self._missing_readers())
                pieces = int(segment.remaining_rows(self._overall(), most=True) // SPLIT_ROWS)
                cuts = even_cuts(segment, min(wanted, pieces)) or cuts
            for cut in sorted(cuts, reverse=True):  # each from the top: the rest stays below
                self._split_at(segment, cut)
        else:
            self._add_reader(segment, descending=step == "desc")

    def _missing_readers(self) -> int:
        """Readers missing to keep the limiter busy: (rate - arriving) x round trip, at least 1."""
        if self._limiter is None or self._round_trip is None:
            return 1
        elapsed = min(1.0, time.monotonic() - self._began)
        arriving = len(self._arrivals) / max(elapsed, 0.25)
        missing = (AT_RATE * self._limiter.rate - arriving) * self._round_trip
        return max(1, math.floor(missing))

    def _overall(self) -> float | None:
        """Rows per second of createdAt over everything the windows have read so far."""
        if self._rows_read < 2 * PAGE_ROWS or self._seconds_read <= 0:
            return None
        return self._rows_read / self._seconds_read

    def _at_rate(self) -> bool:
        """Whether a reader more would only wait: some thread is waiting for the limiter's slot.

        The limiter's queue says it the moment it happens: when readers finish near the end of
        a scan, nobody waits and slots go unused at once, while a count of the last second's
        pages said "at rate" for up to a second longer (bursty first scan, 100 ms: the last
        segment got its second reader 0.6 s after the others ended). Threads of a query running
        beside this one on the shared limiter wait in the same queue.
        """
        return self._limiter is not None and self._limiter.saturated

    def _readers_short(self) -> bool:
        """Whether a whole reader's worth of pages a second is missing (see readers_short)."""
        if self._limiter is None:
            return True
        if self._round_trip is None:
            return False
        elapsed = min(1.0, time.monotonic() - self._began)
        arriving = len(self._arrivals) / max(elapsed, 0.25)
        return readers_short(self._limiter.rate, arriving, self._round_trip)

    def _endpoint(self) -> str:
        meta = getattr(self.client, "meta", None)
        return str(getattr(meta, "endpoint_url", None) or id(self.client))

    def _pairs_refused(self, chain: Chain) -> bool:
        """Whether *chain* is a lazy range chain at an endpoint that refused the range pair."""
        return _range_pair(chain) and self._endpoint() in _REFUSED_PAIRS

    def _allowed(self, segment: _Segment, step: str | datetime) -> bool:
        """Whether a move sends only what the endpoint takes (see :func:`next_reader`)."""
        chain = segment.chain
        if not self._pairs_refused(chain) or chain.window is None:
            return True
        if step == "asc":
            return dates.floor_second(segment.low) <= chain.window[0]
        if step == "desc":
            return dates.ceil_second(segment.high) >= chain.window[1]
        return False  # a split needs the pair

    def _refused(self, task: _Task) -> None:
        """A reader's range + createdAt pair was refused: remember it, leave its part to others.

        Its segment's other end, if any, reads it to the meeting; else a reader from the
        chain's own end (one filter) replaces it. It had delivered nothing: no page, no done.
        """
        endpoint = self._endpoint()
        with _REFUSED_LOCK:
            first = endpoint not in _REFUSED_PAIRS
            _REFUSED_PAIRS.add(endpoint)
        if first:
            warnings.warn(
                "this endpoint refused a StudyDateTime/updatedAt range with createdAt BETWEEN "
                "as the second filter: such ranges are read from their two ends only (exact, "
                "at most two readers each)",
                HealthImagingDFWarning,
                stacklevel=2,
            )
        reader = task.reader
        assert reader is not None
        with self._lock:
            segment = reader.segment
            if segment.asc is reader:
                segment.asc = None
            if segment.desc is reader:
                segment.desc = None
            other = segment.desc if not reader.descending else segment.asc
            if segment.complete:
                self._segments.discard(segment)
            elif other is not None:
                other.sole = True
            else:
                self._add_reader(segment, descending=reader.descending)

    def _add_reader(self, segment: _Segment, descending: bool) -> None:
        low, high = dates.floor_second(segment.low), dates.ceil_second(segment.high)
        chain = segment.chain
        if chain.lazy and chain.window is not None:
            # a reader stops where the ends meet, so its far bound can be the chain's: a reader
            # from either end of a lazy chain then sends the chain's own request, no second
            # filter; where that pair was refused, every reader starts from an end of the chain
            refused = self._pairs_refused(chain)
            if descending or refused:
                low = chain.window[0]
            if not descending or refused:
                high = chain.window[1]
        reader = _Reader(segment, descending, low, high, high if descending else low)
        if descending:
            segment.desc = reader
        else:
            segment.asc = reader
        self._submit(_Task(segment.chain, (low, high), reader=reader))

    def _split_at(self, segment: _Segment, cut: datetime) -> None:
        """Split *segment* at *cut*: ``[cut, high]`` goes to a new segment.

        The new segment takes the descending reader and gets a new ascending one from *cut*;
        the ascending reader keeps ``[low, cut]``.
        """
        upper = _Segment(segment.chain, cut, segment.high, desc=segment.desc)
        if segment.desc is not None:
            segment.desc.segment = upper
        segment.high, segment.desc = cut, None
        self._segments.add(upper)
        self._add_reader(upper, descending=False)

    def _call(self, kwargs: dict[str, Any], chain: int) -> tuple[pa.Table, str | None]:
        if self._prefetched and "nextToken" not in kwargs:
            with self._lock:
                ready = self._prefetched.pop(request_key(kwargs), None)
            if ready is not None:
                return ready
        called = time.monotonic()
        page = call_page(self.client, self._limiter, kwargs, chain, self._cancel)
        # the round trip from the slot's grant: the wait for the slot is the limiter's, and
        # counting it made a ramp of eight paced first requests look like 0.5 s at 300 ms
        took = time.monotonic() - max(called, aws.sent_at() or called)
        with self._lock:
            last = self._round_trip
            self._round_trip = took if last is None else 0.8 * last + 0.2 * took
        if self._limiter is not None:
            self._limiter.observe(took)  # the next run on this endpoint starts from it
        return page


stream = PageStream
"""Start fetching a plan (skipping what *resume* covers); iterate it for pages.

*prefetched*: first pages already read (by a probe), keyed by :func:`request_key`; a chain whose
first request is one of them starts from it instead of asking again.
"""


def request_key(kwargs: dict[str, Any]) -> str:
    """A first request's exact identity: its keyword arguments as canonical JSON."""
    return json.dumps(kwargs, sort_keys=True, default=lambda v: v.isoformat())


def readers_short(rate: float, arriving: float, round_trip: float) -> bool:
    """Whether at least one whole reader's worth of pages a second is missing.

    A reader delivers a page a *round_trip* (seconds from its slot's grant); *arriving*
    pages a second against the limiter's *rate*. When a reader's worth is missing (high latency,
    few segments) a segment is split by the larger of its two estimates of the rows left (see
    ``next_reader``).
    """
    return (AT_RATE * rate - arriving) * round_trip >= 1.0


def next_reader(
    segments: Iterable[_Segment],
    overall: float | None,
    short: bool,
    allowed: Callable[[_Segment, str | datetime], bool] | None = None,
) -> tuple[_Segment, str | datetime] | None:
    """The next reader: ``(segment, "asc" | "desc")``, an end; ``(segment, cut)``, a split.

    None when no segment has enough left for one. The segment with the most rows left goes
    first; a segment read from both ends is split once ``SPLIT_ROWS`` are left (a split that
    finds little costs a part-empty page). With readers *short*, the larger estimate of the rows
    left decides: both ends of a segment may be inside one long import burst, seeing dense pages
    while the *overall* density says the gap between them is nearly empty, and trusting that
    left a bursty first scan at 300 ms with two readers for half its time (55% of the quota).
    *allowed* vetoes a move (a split the endpoint would refuse); the next segment is tried.
    """
    live = sorted(
        ((s.remaining_rows(overall), n, s) for n, s in enumerate(segments) if not s.complete),
        key=lambda item: (item[0], item[1]),
        reverse=True,
    )
    for left, _, segment in live:
        move = _reader_for(segment, left, overall, short)
        if move is not None and (allowed is None or allowed(*move)):
            return move
    return None


def _reader_for(
    segment: _Segment, left: float, overall: float | None, short: bool
) -> tuple[_Segment, str | datetime] | None:
    """*segment*'s missing end, else a split of it, if it has rows enough left for one."""
    if segment.asc is None or segment.desc is None:
        end = segment.asc or segment.desc
        if segment.chain.lazy and (end is None or not end.read):
            return None  # a lazy chain's second end waits for rows: pages left, density known
        if segment.remaining_rows(overall, most=True) >= ADD_READER_ROWS:
            return segment, "desc" if segment.desc is None else "asc"
        return None
    if not (segment.asc.read and segment.desc.read):
        return None  # an end not yet read may show the segment ends far sooner (none beyond now)
    if short:
        left = segment.remaining_rows(overall, most=True)
    cut = _split_point(segment) if SPLIT_ROWS <= left < float("inf") else None
    return (segment, cut) if cut is not None else None


def even_cuts(segment: _Segment, pieces: int) -> list[datetime]:
    """Whole seconds cutting *segment* into up to *pieces* parts of equal time ([] for < 3).

    A lazy chain has no statistics of its own: one reader a round trip would take the ramp of
    a 300 ms, 100 TPS read of 150 pages longer than the reading; its gap is cut evenly at once,
    and the pieces split further as their ends tell the spread.
    """
    if pieces < 3:
        return []
    first = dates.floor_second(segment.low) + _SECOND
    last = dates.ceil_second(segment.high) - _SECOND
    if first > last:
        return []
    step = (segment.high - segment.low) / pieces
    cuts = {dates.floor_second(segment.low + step * k) for k in range(1, pieces)}
    return sorted(c for c in cuts if first <= c <= last)


def _split_point(segment: _Segment) -> datetime | None:
    """A whole second strictly between a segment's ends, or None (they are in the same second).

    Where an end reads more than a page per second, the mass is there: cut at its next second,
    so a burst's seconds get readers of their own. Otherwise cut in the middle.
    """
    first = dates.floor_second(segment.low) + _SECOND
    last = dates.ceil_second(segment.high) - _SECOND
    if first > last:
        return None
    up = segment.asc.density if segment.asc is not None and segment.asc.density else 0.0
    down = segment.desc.density if segment.desc is not None and segment.desc.density else 0.0
    if up >= PAGE_ROWS and up >= down:
        return first
    if down >= PAGE_ROWS:
        return last
    middle = dates.floor_second(segment.low + (segment.high - segment.low) / 2)
    return min(max(middle, first), last)


def _range_pair(chain: Chain) -> bool:
    """Whether *chain*'s split readers send a range with createdAt BETWEEN (not documented)."""
    return chain.lazy and any(f["operator"] == "BETWEEN" for f in chain.filters)


def _pair_refusal(exc: SearchError, chain: Chain, kwargs: dict[str, Any]) -> bool:
    """Whether *exc* is the service refusing a range chain's createdAt window as second filter."""
    if exc.code != "ValidationException" or not _range_pair(chain):
        return False
    filters = kwargs.get("searchCriteria", {}).get("filters", [])
    return len(filters) == 2 and all(f["operator"] == "BETWEEN" for f in filters)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


_no_lean: weakref.WeakSet[Any] = weakref.WeakSet()


def _lean(client: Any) -> bool:
    """Whether *client*'s pages can take the lean path (a botocore client with events).

    Otherwise botocore parses them and ``pagecheck`` checks them.
    """
    return hasattr(getattr(client, "meta", None), "events") and client not in _no_lean


def call_page(
    client: Any,
    limiter: aws.RateLimiter | None,
    kwargs: dict[str, Any],
    chain: int | None = None,
    cancel: threading.Event | None = None,
) -> tuple[pa.Table, str | None]:
    """One page, checked against the service model; a malformed page is asked for again.

    Every attempt waits for *limiter* (:meth:`aws.RateLimiter.acquire`).

    The body is parsed straight into Arrow columns (``pages``) where botocore allows it; a client
    that does not is parsed by botocore and checked by ``pagecheck``. Every attempt, botocore's own retries of throttling and 5xx included, waits for the rate
    limiter, so a retry never overruns the quota.
    """
    from botocore.parsers import ResponseParserError

    cancel = cancel or threading.Event()

    def attempt(_: int) -> tuple[pa.Table, str | None]:
        try:
            with aws.paced(client, limiter):
                if _lean(client):
                    try:
                        page = pages.fetch_page(client, kwargs, request_index=chain)
                        return page.table, page.next_token
                    except SearchError as exc:
                        if exc.code != "LeanPathUnavailable":
                            raise
                        _no_lean.add(client)  # an old botocore: parse as botocore does
                response = client.search_image_sets(**kwargs)
            items, token = pagecheck.check_page(response, chain)
            return flatten.summaries_to_table(items), token
        except aws.aws_errors() as exc:
            raise aws.service_error(OPERATION, chain, exc) from None
        except (ResponseParserError, ValueError, TypeError):
            # a body botocore could not read (a bad timestamp) or that broke the model
            raise pagecheck.malformed(chain, "botocore could not parse the response") from None

    def malformed(exc: BaseException) -> bool:
        if not isinstance(exc, MalformedResponseError):
            return False
        log.debug("chain %s: malformed page: %s", chain, exc.rule)
        return True

    try:
        return aws.retrying(
            attempt,
            retry_if=malformed,
            backoff=aws.MALFORMED,
            wait=cancel.wait,
        )
    except aws.RetryCancelled:
        raise SearchError(OPERATION, chain, "Cancelled") from None
