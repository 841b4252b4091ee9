"""What the planner may know before it compiles, and what it would like measured.

The engine gathers the facts in one step (cached statistics, a probe, chains sized by their first
page, whether DICOMweb answers this caller) and the planner compiles once from them:
:class:`Spec` is the query's parts, :class:`Facts` what is known, :class:`Needs` what a compile
with the facts at hand would like measured. Values here are counts, times and states, never PHI.
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from healthimaging_df.plan.limits import (
    CHAIN_PROBE_REQUESTS,
    ENDS_REQUESTS,
    PAGE_ROWS,
    PROBE_REQUESTS,
    Strategy,
)
from healthimaging_df.plan.predicates import Predicate

if TYPE_CHECKING:
    from healthimaging_df.plan.model import Chain


@dataclass(frozen=True)
class DatastoreStats:
    """What the planner knows about a datastore's size, cheaply.

    From a previous full scan of it (exact), a snapshot, a probe of a few requests (estimated), or
    the caller.
    """

    image_sets: int
    created_min: datetime | None = None
    created_max: datetime | None = None
    source: str = "given"
    _: KW_ONLY  # what later releases add goes by name, so positional callers never shift
    # isPrimary=false image sets (what a QIDO-RS plan must sweep), None when not measured
    non_primary: int | None = None
    # createdAt at evenly spaced ranks, oldest to newest (a full scan leaves 65, a probe 9):
    # where a scan pre-splits its window so that each piece holds about as many image sets
    created_quantiles: tuple[datetime, ...] = ()
    # per range column a full scan in this process measured (StudyDateTime, updatedAt): its
    # values at evenly spaced ranks and how many image sets have one; where a range of that
    # column is cut into sub-ranges of about equal size. Never written to disk, never shown:
    # study date-times are PHI (the cache file keeps counts and createdAt only)
    key_quantiles: tuple[tuple[str, tuple[datetime, ...], int], ...] = field(
        default=(), repr=False, compare=False
    )

    def quantiles_of(self, column: str) -> tuple[tuple[datetime, ...], int] | None:
        """*column*'s quantiles and the image sets they rank (None when not measured)."""
        return next(((q, n) for c, q, n in self.key_quantiles if c == column and q), None)

    def share(self, low: datetime | None, high: datetime | None) -> float:
        """The fraction of image sets created in ``[low, high]``, assuming an even spread."""
        if self.created_min is None or self.created_max is None or (low is None and high is None):
            return 1.0
        span = (self.created_max - self.created_min).total_seconds()
        if span <= 0:
            return 1.0
        a = max(low or self.created_min, self.created_min)
        b = min(high or self.created_max, self.created_max)
        return max(0.0, min(1.0, (b - a).total_seconds() / span))


QidoState = Literal["untested", "available", "unavailable", "no_endpoint", "not_installed"]


@dataclass(frozen=True)
class QidoAccess:
    """Whether QIDO-RS answers this caller at this endpoint, as far as is known.

    ``untested`` and ``available`` let the planner weigh QIDO-RS; ``unavailable`` (a 403, a
    404, a connection, DNS or TLS failure seen lately), ``no_endpoint`` (a custom ``endpoint_url``
    without a DICOMweb address) and ``not_installed`` (no ``dicomweb`` extra) leave it out.
    """

    state: QidoState = "untested"
    reason: str | None = None  # PHI-free words: an error code and HTTP status, or a rule
    source: str = "default"  # "cache", "this process", "doctor", "argument"...
    until: datetime | None = None  # when a remembered state expires

    @property
    def usable(self) -> bool:
        """Whether the planner may weigh QIDO-RS."""
        return self.state in ("untested", "available")

    def describe(self) -> str:
        """One line of ``explain()``."""
        if self.state == "available":
            return f"QIDO-RS answered this caller here ({self.source})"
        if self.state == "untested":
            return "QIDO-RS not tried yet at this endpoint: weighed; on failure the scan runs"
        if self.state == "no_endpoint":
            return f"QIDO-RS not weighed: {self.reason or 'no DICOMweb endpoint known'}"
        if self.state == "not_installed":
            return "QIDO-RS not weighed: the dicomweb extra is not installed"
        until = f", rechecked after {self.until:%Y-%m-%dT%H:%MZ}" if self.until else ""
        return f"QIDO-RS not weighed: unavailable here ({self.reason}; {self.source}{until})"


@dataclass(frozen=True)
class ChainSize:
    """How many image sets one request chain reads, from its first page(s)."""

    image_sets: int
    exact: bool  # True when its first page was the whole answer


def chain_key(chain: Chain) -> str:
    """A chain's criteria as text: the key its measured size is kept under (values: PHI)."""
    return json.dumps(chain.criteria(), default=str, sort_keys=True)


@dataclass(frozen=True)
class Facts:
    """Everything the planner is told before it compiles; every field has a safe default."""

    stats: DatastoreStats | None = None
    sizes: tuple[tuple[str, ChainSize], ...] = field(default=(), repr=False)  # keys hold PHI
    # a probe of the whole datastore run for this plan: the createdAt window it cut, its cuts
    probe_window: tuple[datetime, datetime] | None = None
    probe_cuts: tuple[datetime, ...] = ()
    qido: QidoAccess = field(default_factory=QidoAccess)
    max_tps: float | None = None  # the run's pace (aws.quotas); None: unpaced, or not known
    max_concurrency: int = 8
    page_size: int = PAGE_ROWS
    for_run: bool = False  # compiled as the run starts it (pre-split scans, the run's pace)

    def size(self, chain: Chain) -> ChainSize | None:
        """The measured size of *chain*, if it was measured."""
        key = chain_key(chain)
        return next((s for k, s in self.sizes if k == key), None)

    def with_sizes(self, found: dict[str, ChainSize]) -> Facts:
        """These facts plus chain sizes measured since."""
        return replace(self, sizes=(*self.sizes, *found.items()))


@dataclass(frozen=True)
class Needs:
    """What a compile would like measured before it decides (each a few requests)."""

    size: bool = False  # the datastore's size (a probe of about ten requests)
    probe_scan: Chain | None = None  # the whole scan whose first pages that probe reads
    cuts: Chain | None = None  # a whole scan with no size known: find its two ends
    chains: tuple[Chain, ...] = field(default=(), repr=False)  # chains to size by first page
    # one of *chains*: the sweep of every non-primary image set (its count is worth caching)
    non_primary: Chain | None = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        """Whether nothing needs measuring."""
        return not (self.size or self.cuts is not None or self.chains)

    def requests(self) -> int:
        """About how many requests measuring costs (sent at once)."""
        total = PROBE_REQUESTS if self.size else 0
        if self.cuts is not None and not self.size:
            total += ENDS_REQUESTS
        return total + CHAIN_PROBE_REQUESTS * len(self.chains)

    def describe(self) -> list[str]:
        """Lines of ``explain()``: what the run measures first."""
        lines = []
        if self.size:
            lines.append(
                f"the datastore's size (unknown: no statistics cached): a probe of about "
                f"{PROBE_REQUESTS} requests, whose window pages are the scan's first pages"
            )
        elif self.cuts is not None:
            lines.append(
                f"the datastore's two ends ({ENDS_REQUESTS} requests): where the scan starts "
                "in pieces"
            )
        if self.chains:
            lines.append(
                f"{len(self.chains)} chain(s) sized by their first page (1 or "
                f"{CHAIN_PROBE_REQUESTS} requests each): the non-primary sweep, or a scan the "
                "statistics cannot size"
            )
        return lines


@dataclass(frozen=True)
class Spec:
    """A query's parts, as the planner takes them (it never sees a ``Query``).

    ``groups`` holds one conjunction of predicates per query (one for an ordinary query, one
    per member of a union) and ``strategies`` the access path asked for, per group.
    """

    datastore_id: str
    groups: tuple[tuple[Predicate, ...], ...]
    strategies: tuple[Strategy, ...]
    sort_column: str | None = None
    ascending: bool = True
    limit: int | None = None
    now: datetime | None = None
    union: bool = False
    # the caller asserts that a study's primary image sets agree on study- and patient-level
    # attributes (AWS does not guarantee it): those may then be matched by QIDO-RS per study
    assume_consistent_studies: bool = False

    def __repr__(self) -> str:
        return f"Spec({self.datastore_id!r}, {len(self.groups)} group(s))"  # no values: PHI

    def with_strategy(self, strategy: Strategy) -> Spec:
        """The same query with every group's strategy replaced."""
        return replace(self, strategies=(strategy,) * len(self.groups))
