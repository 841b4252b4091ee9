"""A StudyDateTime or updatedAt range cut into sub-ranges of its own key, all read from the start.

A range filter alone reads as one lazy chain (``Chain.lazy``): one reader, a second end after its
first page, splits by createdAt windows after both ends have read; at 300 ms that ramp is most
of a second at a fraction of the quota. With the range column's quantiles that a full scan in
this process measured (``DatastoreStats.key_quantiles``), the range starts instead as one chain
per sub-range of about equal size: each sends its own range filter alone (one BETWEEN, the
documented shape: nothing to verify), and each is still split lazily by createdAt windows while
it has pages left.

Exact: BETWEEN is inclusive at both ends, and neighbouring sub-ranges share their boundary, so
together they are the range and nothing else, whatever the service's precision; a row whose
value is a boundary (a same-second burst of a study's image sets included) is in two sub-ranges,
read twice and kept once (the collector keeps one copy of an image set). Every predicate is still
applied on the client.

What a cut changes: an image set whose value of the key changes while the range is read can
move from a sub-range not yet read past it into one already read past it (one chain reads it at
its createdAt whatever the value). For updatedAt every update changes it, so only a range that
ended before the run is cut (an update moves an image set out of it); for StudyDateTime it takes
an edit of the study's date or time during the read, of an image set that matches before and
after, landing in another sub-range. A cut plan therefore says ``catch_up``: after every
sub-range, the engine reads once more every image set updated since the run started (minus
``dates.CLOCK_MARGIN``) through the same collector, one request when nothing changed, so such
an image set is read again at its latest version (``engine.run.catch_up``).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from healthimaging_df import schema
from healthimaging_df.core import dates
from healthimaging_df.plan.conditions import ranges
from healthimaging_df.plan.facts import Facts
from healthimaging_df.plan.limits import PAGE_ROWS, Filter
from healthimaging_df.plan.model import Plan, rank_share

SPLIT_RANGES = ("StudyDateTime", "updatedAt")  # ranges split by createdAt windows or their own key
# Pages a sub-range should hold at least: each costs about half a page more than its rows (its
# last page is part-empty, its two ends overlap), 3% at fifteen, leaving room in 5% for the
# createdAt splits each still makes.
SUBRANGE_MIN_PAGES = 15
_SECOND = timedelta(seconds=1)
# A range expected to hold this many pages starts from both ends even when too short to cut:
# the second end costs at most the page where the two meet.
LONG_PAGES = 4
# An updatedAt range is cut only when it ended this long before the run: an update during the
# run then takes an image set out of the range (its new updatedAt is later), never from one
# sub-range into another already read (the margin: the service's clock against ours).
UPDATED_SETTLED = timedelta(hours=1)


def between_filter(column: str, low: datetime, high: datetime) -> Filter:
    """The BETWEEN filter of *column* over ``[low, high]`` as the API takes it.

    Timestamps go out as whole seconds (widened); a StudyDateTime as its date and time strings.
    """
    key = schema.BY_NAME[column].search_key
    assert key is not None
    values: list[dict[str, Any]]
    if column == "StudyDateTime":
        values = [{key: dates.study_date_and_time(low)}, {key: dates.study_date_and_time(high)}]
    else:
        values = [{key: dates.floor_second(low)}, {key: dates.ceil_second(high)}]
    return {"operator": "BETWEEN", "values": values}


def subranged(plan: Plan, facts: Facts) -> Plan:
    """*plan*, its one range chain cut into sub-ranges of its own key when that pays.

    Only a run's plan (``facts.for_run``) whose one chain is a lazy chain filtering on a
    StudyDateTime or updatedAt range alone, with that column's quantiles known: a sub-range
    for every two readers the run has (``facts.max_concurrency``; each sub-range is read from
    both ends at once, ``Chain.long``), at most one per ``SUBRANGE_MIN_PAGES`` pages the
    quantiles expect in the range.
    """
    stats = facts.stats
    if not facts.for_run or stats is None or plan.qido is not None or len(plan.chains) != 1:
        return plan
    chain = plan.chains[0]
    found = ranges(plan.pushed)
    column = next((c for c in SPLIT_RANGES if c in found), None)
    if column is None or not (chain.lazy and chain.unbounded):
        return plan
    low, high = found[column]
    if chain.filters != (between_filter(column, low, high),):
        return plan  # it sends something besides the range: not this shape
    known = stats.quantiles_of(column)
    if known is None or expected_pages(known, low, high) < LONG_PAGES:
        return plan
    parts = max(2, facts.max_concurrency // 2)  # each read from both ends at once
    settled = column != "updatedAt" or high < datetime.now(timezone.utc) - UPDATED_SETTLED
    cuts = sub_cuts(known, low, high, parts) if settled else ()
    if not cuts:  # too few pages to cut: still read from both ends at once
        said = f"the {column} range is read from both ends at once (the scan's quantiles)"
        return replace(plan, chains=(replace(chain, long=True),), note=_noted(plan.note, said))
    edges = [low, *cuts, high]
    chains = tuple(
        replace(chain, index=i, filters=(between_filter(column, a, b),), long=True)
        for i, (a, b) in enumerate(itertools.pairwise(edges))
    )
    said = (
        f"the {column} range starts as {len(chains)} sub-ranges of about equal size (from a scan "
        "in this process; neighbours share a boundary, read once), each split further as it "
        "runs; then what was updated since the run started is read again"
    )
    return replace(plan, chains=chains, note=_noted(plan.note, said), catch_up=True)


def _noted(note: str | None, said: str) -> str:
    return f"{note}; {said}" if note else said


def expected_pages(known: tuple[tuple[datetime, ...], int], low: datetime, high: datetime) -> float:
    """Pages ``[low, high]`` holds by *known* (quantiles and the rows they rank); 0 if unknown."""
    points, rows = known
    if (points[0].tzinfo is None) != (low.tzinfo is None) or high <= low:
        return 0.0
    return rows * (rank_share(points, high) - rank_share(points, low)) / PAGE_ROWS


def sub_cuts(
    known: tuple[tuple[datetime, ...], int], low: datetime, high: datetime, readers: int
) -> tuple[datetime, ...]:
    """Whole seconds strictly inside ``(low, high)`` cutting it into parts of about equal size.

    *known*: the column's values at evenly spaced ranks and the rows they rank. Up to *readers*
    parts, at least ``SUBRANGE_MIN_PAGES`` pages each by the quantiles; () for fewer than two.
    """
    points, _ = known
    parts = min(readers, int(expected_pages(known, low, high) // SUBRANGE_MIN_PAGES))
    if parts < 2:
        return ()
    first, last = rank_share(points, low), rank_share(points, high)
    cuts = {
        _clear_of_bursts(points, _at_rank(points, first + (last - first) * k / parts))
        for k in range(1, parts)
    }
    return tuple(sorted(c for c in cuts if low < c < high))


def _clear_of_bursts(points: tuple[datetime, ...], at: datetime) -> datetime:
    """The whole second at or after *at* where a cut reads no burst twice.

    A boundary is in both neighbours: a second holding two quantiles or more (a study's image
    sets, a bulk import at midnight: 1/64 of the range or more) would be read twice; the cut
    goes to the second after it instead, so the burst is in the lower neighbour alone.
    """
    cut = dates.floor_second(at)
    while sum(cut <= p < cut + _SECOND for p in points) >= 2:
        cut += _SECOND
    return cut


def _at_rank(points: tuple[datetime, ...], share: float) -> datetime:
    """The value at rank *share* (0..1) of *points*, interpolated between neighbours."""
    x = share * (len(points) - 1)
    i = min(int(x), len(points) - 2)
    return points[i] + (points[i + 1] - points[i]) * (x - i)
