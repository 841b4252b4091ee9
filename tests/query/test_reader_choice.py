"""Which reader a windowed scan starts next, from what its readers have seen so far.

The scenario behind the rule: a first scan (no statistics) whose two ends are both inside one
long import burst. Each end reads dense pages, while the density over everything read (months
with nothing in them) says the gap between the ends is nearly empty. With readers to spare that
gap is split anyway; the service-level effect is in docs/benchmarks.md (scan grid).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from healthimaging_df.fetch import (
    ADD_READER_ROWS,
    _Reader,
    _Segment,
    next_reader,
    readers_short,
)
from healthimaging_df.plan import Chain

UTC = timezone.utc
BURST = datetime(2024, 6, 1, tzinfo=UTC)  # two image sets a second from here on
CHAIN = Chain(
    0, (), None, window=(datetime(2023, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
)
SPARSE = 0.001  # rows a second over everything read so far


def _inside_one_burst(seconds: int) -> _Segment:
    """A segment *seconds* wide whose ends each read a page of 50 rows in 25 seconds."""
    low, high = BURST + timedelta(seconds=100), BURST + timedelta(seconds=100 + seconds)
    segment = _Segment(CHAIN, low, high)
    segment.asc = _Reader(segment, False, low, high, low, density=2.0, span=25.0, read=True)
    segment.desc = _Reader(segment, True, low, high, high, density=2.0, span=25.0, read=True)
    return segment


def test_with_readers_short_a_burst_between_two_ends_is_split() -> None:
    segment = _inside_one_burst(1200)  # 2,400 rows left at the ends' density
    assert segment.remaining_rows(SPARSE) < ADD_READER_ROWS  # the overall density: ~1 row
    assert next_reader([segment], SPARSE, short=False) is None

    move = next_reader([segment], SPARSE, short=True)
    assert move is not None
    chosen, cut = move
    assert chosen is segment
    assert isinstance(cut, datetime)
    assert cut.microsecond == 0
    assert segment.low < cut < segment.high


def test_a_gap_of_a_few_pages_is_left_to_the_ends() -> None:
    narrow = _inside_one_burst(140)  # 280 rows left: under six pages
    assert next_reader([narrow], SPARSE, short=True) is None


def test_a_segment_with_one_end_gets_the_other_first() -> None:
    segment = _inside_one_burst(1200)
    segment.desc = None
    wide = _inside_one_burst(1200)
    move = next_reader([wide, segment], SPARSE, short=False)
    assert move == (segment, "desc")


def test_readers_are_short_when_a_reader_a_round_trip_is_missing() -> None:
    # 25 TPS, 10 pages a second arriving: 14 missing; at 300 ms a round trip, 4 readers' worth
    assert readers_short(25.0, 10.0, 0.3)
    assert not readers_short(25.0, 10.0, 0.05)  # a reader brings 20 a second: 0.7 of one
    assert not readers_short(25.0, 24.5, 5.0)  # at the limiter's rate already
