"""The reader model of createdAt windows and the pure choice of the next reader.

A window is cut into segments, each read from its two ends (``_Reader``) until they meet; while
workers are free the segment with the most rows left gets its missing end or is split
(:func:`next_reader`). Nothing here sends a request or takes a lock: ``windows`` acts on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from healthimaging_df.core import dates
from healthimaging_df.plan import Chain, rows_between

Window = tuple[datetime, datetime]

_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
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
