"""The page stream: worker threads paging request chains under one rate limiter.

The consumer iterates :class:`PageStream` for pages; each worker takes a task (a whole chain, or
one end of a createdAt window's segment, see ``windows``) and pages it to the end, checking every
cursor: a token given twice, or pages bringing nothing new, is a typed error, never a loop.
"""

from __future__ import annotations

import array
import collections
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from types import TracebackType
from typing import Any

import pyarrow as pa

from healthimaging_df import aws
from healthimaging_df.core.progress import Progress, ProgressReporter
from healthimaging_df.engine import flatten, pages
from healthimaging_df.engine.fetch.call import (
    OPERATION,
    Prefetched,
    _lean,
    _pair_refusal,
    call_page,
    request_key,
)
from healthimaging_df.engine.fetch.readers import Window, _Segment, _Task
from healthimaging_df.engine.fetch.records import (
    Coverage,
    FetchOptions,
    Page,
    _Counters,
    _RecentIds,
)
from healthimaging_df.engine.fetch.windows import _Windows
from healthimaging_df.errors import PaginationError, SearchError
from healthimaging_df.plan import Chain, Plan

# the fetcher's logger, as before the split into modules
log = logging.getLogger("healthimaging_df.engine.fetch")

# Pages in a row that bring no new image set (empty, or holding only image sets the chain's recent
# pages held), each with a fresh nextToken, before a chain is called stuck. A service that filters
# while it scans can answer a few empty pages in a row; 50 is far beyond that (a healthy chain has
# never been seen to need more than a handful) yet stops a runaway chain within about two seconds
# at the default quota, instead of paging forever. The ids of the last EMPTY_PAGE_LIMIT pages are
# remembered (at most 2,500), so a cursor repeating a page, or cycling over up to 50, is caught.
EMPTY_PAGE_LIMIT = 50


class PageStream(_Windows):
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
        self._workers: list[threading.Thread] = []  # started as tasks come (_staff)
        self._idle = 0  # workers done with a task and not yet given another
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
        with self._lock:  # no worker starts after this (_staff)
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

    # -- worker side --------------------------------------------------------------------------

    def _submit(self, task: _Task) -> None:
        with self._lock:
            self._outstanding += 1
            self._task_ids += 1
            task.id = self._task_ids
            self._tasks.put(task)
            self._staff()

    def _staff(self) -> None:
        """Give the task just queued a worker: an idle one, else a new thread up to the bound.

        Threads start as tasks come, never more than the tasks so far: a one-page query needs
        one, and starting all 64 at once took about 30 ms of the interpreter (the local
        service's too) while its only request was in flight. Windows split into more tasks as
        they run (``_feed``, only while readers add throughput), each starting its thread then.
        At the bound a task waits for the next worker to finish (the idle count may then run
        one over: harmless, no thread can start at the bound). Called with the lock held.
        """
        if self._idle:
            self._idle -= 1
        elif len(self._workers) < self._threads and not self._cancel.is_set():
            name = f"ahi-fetch-{len(self._workers)}"
            worker = threading.Thread(target=self._work, name=name, daemon=True)
            self._workers.append(worker)
            worker.start()

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
                self._idle += 1  # takes the next task queued without a worker of its own
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
