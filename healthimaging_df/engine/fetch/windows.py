"""The createdAt windows' side of a :class:`~healthimaging_df.engine.fetch.stream.PageStream`.

Each window is cut into segments read from both ends; a reader's page moves its end, hands over
what it covered every few pages (a checkpoint's unit) and, while readers add throughput, starts
another end or splits a segment (``_feed``, by :func:`readers.next_reader`). ``PageStream``
runs the threads, the queues and the page loop; this base holds the state of the windows under
the stream's lock.
"""

from __future__ import annotations

import array
import collections
import itertools
import math
import threading
import time
import warnings
from abc import ABC, abstractmethod
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import aws
from healthimaging_df.core import dates
from healthimaging_df.engine import flatten
from healthimaging_df.engine.fetch.call import OPERATION, _range_pair
from healthimaging_df.engine.fetch.readers import (
    _MICROSECOND,
    AT_RATE,
    CHECKPOINT_PAGES,
    EARLY_STOP_ROWS,
    PAGE_ROWS,
    SPLIT_ROWS,
    STATS_QUANTILES,
    Window,
    _Reader,
    _Segment,
    _Task,
    even_cuts,
    next_reader,
    readers_short,
)
from healthimaging_df.engine.fetch.records import FetchOptions, Page
from healthimaging_df.errors import HealthImagingDFWarning, PaginationError
from healthimaging_df.plan import Chain

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Endpoints that refused a range filter with createdAt BETWEEN as the second filter (AWS does not
# document which pairs it takes beyond an ID or series UID with one date range): a lazy range
# chain there is read by its two ends, which send the chain's one filter. Per process.
_REFUSED_PAIRS: set[str] = set()
_REFUSED_LOCK = threading.Lock()


class _Windows(ABC):
    """Segments of createdAt windows and their readers; the stream's state they share.

    ``PageStream.__init__`` sets the attributes; segments and readers change only under
    ``_lock``.
    """

    client: Any
    options: FetchOptions
    _limiter: aws.RateLimiter | None
    _lock: threading.RLock
    _outstanding: int
    _task_ids: int
    _segments: set[_Segment]
    _samples: array.array[int]
    _arrivals: collections.deque[float]
    _round_trip: float | None
    _began: float
    _rows_read: int
    _seconds_read: float

    @abstractmethod
    def _submit(self, task: _Task) -> None:
        """Queue *task* for a worker."""

    @abstractmethod
    def _put(self, item: tuple[str, Any]) -> None:
        """Hand *item* to the consumer."""

    @abstractmethod
    def _emit(self, task: _Task, table: pa.Table) -> None:
        """Hand a page of *task* to the consumer."""

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
            # a lazy chain's second end comes with pages left, unless it is known to be long
            if high > low and (chain.long or not chain.lazy):
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


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND
