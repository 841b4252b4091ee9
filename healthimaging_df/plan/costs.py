"""The cost model: requests each access path needs, from what the facts say.

A path is always weighed against the plan it would replace (the scan or fan-out that always
exists), counting every request it sends: QIDO-RS searches and the empty page that ends each,
the non-primary sweep, the chains its answer becomes. Seconds are requests over the run's pace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from healthimaging_df import schema
from healthimaging_df.plan.conditions import keeps_primary_only, ranges
from healthimaging_df.plan.facts import DatastoreStats, Facts
from healthimaging_df.plan.limits import (
    NO_STATS_RECORDS,
    PAGE_ROWS,
    QIDO_RECORDS,
    RECORDS_PER_SCAN_REQUEST,
    SCAN_OVERHEAD,
)
from healthimaging_df.plan.model import Chain, Plan
from healthimaging_df.plan.predicates import Predicate
from healthimaging_df.plan.qido import QidoStep

_ID_KEYS = {schema.BY_NAME[c].search_key for c in schema.ID_RANK}


def pages(image_sets: float, windowed: bool) -> float:
    """Requests to read *image_sets* in one chain (full pages) or in windows (their last pages)."""
    count = math.ceil(image_sets / PAGE_ROWS)
    if windowed:
        return max(1.0, count * SCAN_OVERHEAD)
    return float(max(count, 1))


def scan_requests(scan: Plan, stats: DatastoreStats | None) -> float | None:
    """Requests a scan plan needs by the statistics: its share of the datastore over 50 a page.

    A chain without a createdAt window (a ``StudyDateTime`` or ``updatedAt`` range filter) is
    counted as reading everything: the statistics know ``createdAt`` only. :func:`plan_requests`
    uses such a chain's measured size instead, when the facts have it.
    """
    if stats is None:
        return None
    window = scan.chains[0].window if scan.chains else None
    share = stats.share(*window) if window is not None else 1.0
    return pages(stats.image_sets * share, windowed=True)


def chain_requests(chain: Chain, facts: Facts) -> float | None:
    """Requests one chain needs: measured, by the statistics, or one for an ID chain.

    A chain narrowed by a range the statistics cannot weigh (StudyDateTime, updatedAt) is
    unknown until its first page sizes it (``Plan.needs``).
    """
    measured = facts.size(chain)
    if measured is not None:
        return pages(measured.image_sets, chain.window is not None)
    stats = facts.stats
    if chain.window is not None and not chain.lazy:  # a lazy window narrows an ID or a range
        if stats is None:
            return None
        return pages(stats.image_sets * stats.share(*chain.window), windowed=True)
    if any(next(iter(f["values"][0]), None) in _ID_KEYS for f in chain.filters):
        return 1.0  # an ID pins a few image sets: one page, mostly
    if not chain.filters and stats is not None:
        return pages(stats.image_sets, windowed=False)
    return None


def plan_requests(plan: Plan, facts: Facts) -> float | None:
    """Requests a SearchImageSets plan needs (None when a chain's size is unknown)."""
    total = 0.0
    for chain in plan.chains:
        cost = chain_requests(chain, facts)
        if cost is None:
            return None
        total += cost
    return total + (1.0 if plan.catch_up else 0.0)  # the catch-up's one page when nothing changed


def sweep_requests(predicates: Sequence[Predicate], stats: DatastoreStats | None) -> float | None:
    """Requests the non-primary sweep of a QIDO-RS plan needs, when *stats* count them.

    0 when the query keeps primary image sets only; None when the count is unknown. Every
    non-primary image set the query's createdAt range admits is read: one page per 50, plus
    windows' last pages.
    """
    if keeps_primary_only(predicates):
        return 0.0
    if stats is None or stats.non_primary is None:
        return None
    share = 1.0
    found = ranges(tuple(predicates))
    if "createdAt" in found:
        share = stats.share(*found["createdAt"])
    count = math.ceil(stats.non_primary * share / PAGE_ROWS)
    return float(count) if count <= 1 else count * SCAN_OVERHEAD


def qido_requests(step: QidoStep) -> float:
    """Requests of a QIDO-RS path before its answer is known: a lower bound.

    Each search sends at least its first page and the empty page that ends it; the sweep; and
    at least one SearchImageSets chain for what is found.
    """
    return 2.0 * len(step.searches) + step.sweep.requests + 1.0


def qido_budget(replaced: float | None, sweep: float) -> int:
    """Records a QIDO-RS step may read before the plan it replaces is cheaper.

    Ten records for every request the replaced plan costs beyond the sweep (records become
    chains, and several records share a study or patient); 10,000 when its cost is unknown.
    """
    if replaced is None:
        return NO_STATS_RECORDS
    left = max(replaced - sweep, 0.0)
    return max(QIDO_RECORDS, math.ceil(left * RECORDS_PER_SCAN_REQUEST))


def seconds(requests: float, max_tps: float | None) -> float | None:
    """How long *requests* take at *max_tps* (None when unpaced)."""
    return None if max_tps is None else requests / max_tps
