"""Which reader a windowed scan starts next, from what its readers have seen so far.

The scenario behind the rules: a first scan (no statistics) whose two ends are both inside one
long import burst. Each end reads dense pages, while the density over everything read (months
with nothing in them) says the gap between the ends is nearly empty. Each end's density holds
for its reach into the gap, the overall density beyond it, so that gap is split; the
service-level effect is in docs/benchmarks.md (scan grid).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from healthimaging_df.engine.fetch import (
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


def test_a_burst_between_two_ends_is_split() -> None:
    segment = _inside_one_burst(1200)  # 2,400 rows left at the ends' density
    # each end reaches 20 of its pages' spans (500 s) into the gap, the overall density the rest
    assert segment.remaining_rows(SPARSE) == pytest.approx(2 * 2.0 * 500 + SPARSE * 200)
    move = next_reader([segment], SPARSE, short=False)
    assert move is not None
    chosen, cut = move
    assert chosen is segment
    assert isinstance(cut, datetime)
    assert cut.microsecond == 0
    assert segment.low < cut < segment.high


def test_ends_in_bursts_months_apart_count_the_months_at_the_overall_density() -> None:
    segment = _inside_one_burst(90 * 86_400)
    gap = 90 * 86_400.0
    local = gap * 2.0  # the ends' density all the way: 15.5 million rows, far from the truth
    assert segment.remaining_rows(SPARSE) == pytest.approx(2 * 2.0 * 500 + SPARSE * (gap - 1000))
    assert segment.remaining_rows(SPARSE, most=True) == pytest.approx(local)


def test_a_same_second_burst_holds_its_density_for_whole_seconds() -> None:
    """A page spanning 20 ms still reaches five seconds: splits can only fall on whole seconds."""
    low = BURST
    high = BURST + timedelta(seconds=2)
    segment = _Segment(CHAIN, low, high)
    segment.asc = _Reader(segment, False, low, high, low, density=2500.0, span=0.02, read=True)
    segment.desc = _Reader(segment, True, low, high, high, density=2500.0, span=0.02, read=True)
    assert segment.remaining_rows(SPARSE) == pytest.approx(5000.0)
    assert next_reader([segment], SPARSE, short=False) == (segment, BURST + timedelta(seconds=1))


def test_a_gap_of_a_few_pages_is_left_to_the_ends() -> None:
    narrow = _inside_one_burst(140)  # 280 rows left: under six pages
    assert next_reader([narrow], SPARSE, short=True) is None


def test_a_segment_with_one_end_gets_the_other() -> None:
    segment = _inside_one_burst(1200)
    segment.desc = None
    narrow = _inside_one_burst(140)
    assert next_reader([narrow, segment], SPARSE, short=False) == (segment, "desc")


def test_readers_are_short_when_a_reader_a_round_trip_is_missing() -> None:
    # 25 TPS, 10 pages a second arriving: 14 missing; at 300 ms a round trip, 4 readers' worth
    assert readers_short(25.0, 10.0, 0.3)
    assert not readers_short(25.0, 10.0, 0.05)  # a reader brings 20 a second: 0.7 of one
    assert not readers_short(25.0, 24.5, 5.0)  # at the limiter's rate already


def _same_second(second: int, asc_read: bool = True) -> _Segment:
    """A segment over one burst second and the next, 2,500 rows a second, read from both ends."""
    low = BURST + timedelta(seconds=second, milliseconds=20)
    high = BURST + timedelta(seconds=second + 1, milliseconds=980)
    segment = _Segment(CHAIN, low, high)
    segment.asc = _Reader(segment, False, low, high, low, density=2500.0, span=0.02, read=asc_read)
    segment.desc = _Reader(segment, True, low, high, high, density=2500.0, span=0.02, read=True)
    return segment


def test_a_segment_is_split_only_once_both_ends_have_read() -> None:
    """An end whose first page is still out may show the data ends far sooner (at now)."""
    unread = _same_second(0, asc_read=False)
    assert next_reader([unread], SPARSE, short=True) is None
    assert next_reader([_same_second(0)], SPARSE, short=True) is not None
