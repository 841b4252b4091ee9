"""What a plan is made of: request chains, the plan itself, and the weighed access paths.

Data only (plus the requests a chain sends): compiling lives in ``plan.compile``, the costs in
``plan.costs``, the QIDO-RS step in ``plan.qido``, the readable account in ``plan.explain``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from healthimaging_df.plan import explain as _explain
from healthimaging_df.plan.facts import Facts, Needs, Spec
from healthimaging_df.plan.limits import WINDOW_FLOOR, Filter, Strategy
from healthimaging_df.plan.predicates import Predicate

if TYPE_CHECKING:
    import pyarrow as pa

    from healthimaging_df.plan.qido import QidoStep


@dataclass(frozen=True)
class Candidate:
    """One access path the planner weighed: its estimated requests and the one chosen."""

    name: str
    requests: float | None  # None: unknown without statistics
    chosen: bool = False

    def describe(self, max_tps: float | None = None) -> str:
        """A line of ``explain()``, priced at *max_tps* (the run's pace; None: unpaced)."""
        mark = "chosen" if self.chosen else "not chosen"
        if self.requests is None:
            return f"{self.name}: size unknown ({mark})"
        if max_tps is None:
            return f"{self.name}: about {self.requests:,.0f} requests, unpaced ({mark})"
        seconds = self.requests / max_tps
        return (
            f"{self.name}: about {self.requests:,.0f} requests, {seconds:,.1f} s at "
            f"{max_tps:g} TPS ({mark})"
        )


def rows_between(chain: Chain, low: datetime, high: datetime) -> float | None:
    """Rows of the datastore created in ``[low, high]`` by *chain*'s profile, None without one.

    The quantiles are evenly spaced in rank; rows are taken as spread evenly between two.
    """
    points = chain.profile
    if len(points) < 2 or high < low:
        return None if len(points) < 2 else 0.0
    return chain.profile_rows * (rank_share(points, high) - rank_share(points, low))


def rank_share(points: tuple[datetime, ...], moment: datetime) -> float:
    """The share of rows created before *moment* (0..1), interpolated between quantiles."""
    if moment <= points[0]:
        return 0.0
    if moment >= points[-1]:
        return 1.0
    i = bisect.bisect_right(points, moment) - 1
    width = (points[i + 1] - points[i]).total_seconds()
    inside = (moment - points[i]).total_seconds() / width if width > 0 else 0.0
    return (i + inside) / (len(points) - 1)


@dataclass(frozen=True)
class Chain:
    """One request chain: a request followed by its nextToken pages.

    A windowed chain is a ``createdAt`` window ``[low, high]`` (whole seconds, inclusive) that the
    executor splits further while it still has more pages.

    A *lazy* window narrows a chain that already filters (an ID, or a StudyDateTime or updatedAt
    range): it starts with one reader, its first request the chain's own, and gains a second
    end and splits only while it has pages left, so a chain of one page costs one request, as
    before, and a long one is read from both ends and split like a scan. An *unbounded* window
    is the whole of time: a request for all of it carries no createdAt filter (a lazy range
    chain's first request has its one filter); only readers a split starts inside it add
    ``createdAt BETWEEN`` as the second filter.
    """

    index: int
    filters: tuple[Filter, ...]
    sort: dict[str, str] | None
    window: tuple[datetime, datetime] | None = None
    splits: tuple[datetime, ...] = ()  # whole seconds where the window starts pre-split
    # createdAt quantiles of the datastore and its size (from statistics): how many rows a part
    # of the window holds, for the fetcher's decisions to add readers or stop one
    profile: tuple[datetime, ...] = field(default=(), repr=False)
    profile_rows: int = 0
    lazy: bool = False
    unbounded: bool = False
    # a lazy chain known to hold many pages (a range's sub-range, by the statistics): its
    # second end starts at once with its first, both sending the chain's own filter
    long: bool = False

    def __repr__(self) -> str:
        keys = [next(iter(f["values"][0]), "?") for f in self.filters]
        where = (
            f", window={self.window[0]:%Y-%m-%d}..{self.window[1]:%Y-%m-%d}" if self.window else ""
        )
        return f"Chain({self.index}, filters on {keys or 'nothing'}{where})"  # no values: PHI

    def criteria(self, window: tuple[datetime, datetime] | None = None) -> dict[str, Any]:
        """``searchCriteria`` for this chain, or for a sub-window of it."""
        filters = list(self.filters)
        sort = self.sort
        bounds = window or self.window
        if bounds is not None and not (self.unbounded and bounds == self.window):
            filters.append(
                {
                    "operator": "BETWEEN",
                    "values": [{"createdAt": bounds[0]}, {"createdAt": bounds[1]}],
                }
            )
        if bounds is not None:
            sort = {"sortField": "createdAt", "sortOrder": "ASC"}
        criteria: dict[str, Any] = {}
        if filters:
            criteria["filters"] = filters
        if sort:
            criteria["sort"] = sort
        return criteria

    def request(
        self, datastore_id: str, window: tuple[datetime, datetime] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of ``search_image_sets`` for the first page (no paging keys)."""
        kwargs: dict[str, Any] = {"datastoreId": datastore_id}
        criteria = self.criteria(window)
        if criteria:
            kwargs["searchCriteria"] = criteria
        return kwargs

    def pieces(self) -> list[tuple[datetime, datetime]]:
        """The createdAt windows the chain starts in (one without pre-split cuts)."""
        if self.window is None:
            return []
        edges = [self.window[0], *self.splits, self.window[1]]
        return list(itertools.pairwise(edges))


@dataclass(frozen=True)
class Plan:
    """What a query sends, and what it applies on the client."""

    datastore_id: str
    chains: tuple[Chain, ...]
    predicates: tuple[Predicate, ...]
    pushed: tuple[Predicate, ...]
    sort_column: str
    ascending: bool
    sort_pushed: bool
    limit: int | None
    note: str | None = None
    candidates: tuple[Candidate, ...] = ()
    wants_statistics: bool = False  # the choice would be better with the datastore's size
    access: Strategy = "auto"  # the access path weighed and chosen ("auto": nothing to weigh)
    parts: tuple[Plan, ...] = ()  # a union's plans, one per query (their chains renumbered here)
    qido: QidoStep | None = None  # QIDO-RS searches to run first (engine.choose runs them)
    # a range cut into sub-ranges of its own key (``plan.subranges``): after every chain, the
    # engine reads once more what was updated since the run started (``engine.run.catch_up``)
    catch_up: bool = False
    # why QIDO-RS was or was not weighed, and what a QIDO-RS step assumed (lines of explain())
    access_notes: tuple[str, ...] = ()
    # requests the run sends by the cost model (None: a size is unknown; QIDO-RS: see its step)
    estimate: float | None = field(default=None, compare=False)
    # what the plan was compiled from and with: the query's parts, and what was known
    spec: Spec | None = field(default=None, repr=False, compare=False)
    facts: Facts = field(default_factory=Facts, repr=False, compare=False)
    needs: Needs = field(default_factory=Needs, repr=False, compare=False)

    def __repr__(self) -> str:
        if self.parts:
            return (
                f"Plan(datastore_id={self.datastore_id!r}, union of {len(self.parts)}, "
                f"chains={len(self.chains)}, limit={self.limit})"  # no values: PHI
            )
        return (
            f"Plan(datastore_id={self.datastore_id!r}, chains={len(self.chains)}, "
            f"predicates={list(self.predicates)!r}, limit={self.limit})"  # no values: PHI
        )

    @property
    def predicate_groups(self) -> tuple[tuple[Predicate, ...], ...]:
        """What the client applies, as OR of ANDs (every predicate of any group).

        One group (``predicates``) for an ordinary plan, one per query for a union.
        """
        if self.parts:
            return tuple(p.predicates for p in self.parts)
        return (self.predicates,)

    @property
    def split_chains(self) -> tuple[Chain, ...]:
        """The chains that filter and are still split into createdAt windows at run time."""
        return tuple(c for c in self.chains if c.lazy)

    @property
    def windowed(self) -> bool:
        """Whether the scan is split into createdAt windows at run time (lazy chains aside)."""
        return any(c.window is not None and not c.lazy for c in self.chains)

    @property
    def full_scan(self) -> bool:
        """Whether the plan reads every image set of the datastore (it leaves an exact count)."""
        return (
            len(self.chains) == 1
            and not self.chains[0].filters
            and self.chains[0].window is not None
            and self.chains[0].window[0] <= WINDOW_FLOOR
        )

    @property
    def stops_early(self) -> bool:
        """Chains arrive in result order, so each can stop once it holds ``limit`` matches."""
        return self.limit is not None and self.sort_pushed and not self.windowed

    def requests(self) -> list[dict[str, Any]]:
        """The first request of every chain, exactly as passed to ``search_image_sets``.

        A chain pre-split into createdAt pieces (from statistics) lists one request per piece.
        """
        out: list[dict[str, Any]] = []
        for chain in self.chains:
            pieces = chain.pieces() if chain.splits else []
            if pieces:
                out += [chain.request(self.datastore_id, piece) for piece in pieces]
            else:
                out.append(chain.request(self.datastore_id))
        return out

    def explain(self, show_values: bool = False, max_tps: float | None = None) -> str:
        """A readable account of the plan; values hidden unless *show_values*.

        Costs are priced at *max_tps*, else at the pace the plan was compiled for.
        """
        return _explain.explain(self, show_values, max_tps)

    def summary(self, max_tps: float | None = None) -> str:
        """The plan in a few value-free lines: paths weighed, requests and seconds at *max_tps*.

        *max_tps* defaults to the pace the plan was compiled for (none: seconds unknown).
        """
        from healthimaging_df.plan import display

        return display.text(self, max_tps if max_tps is not None else self.facts.max_tps)

    def to_html(self, max_tps: float | None = None) -> str:
        """:meth:`summary` as an HTML table (what a notebook shows)."""
        from healthimaging_df.plan import display

        return display.html(self, max_tps if max_tps is not None else self.facts.max_tps)

    def _repr_html_(self) -> str:
        return self.to_html()


@dataclass(frozen=True, repr=False)
class AnyOf(Predicate):
    """Several queries' predicates as one: a row matches if it meets every predicate of a group.

    What a union's plan (and its query) hands to whatever applies ``predicates`` on the client,
    so every way of running, a refresh included, keeps exactly the rows of any of its queries.
    ``column`` and ``op`` are placeholders: the planner never pushes an ``AnyOf`` down.
    """

    groups: tuple[tuple[Predicate, ...], ...] = field(default=())

    def __repr__(self) -> str:
        return " or ".join(f"({' and '.join(map(repr, g)) or 'everything'})" for g in self.groups)

    def describe(self, show_values: bool = False) -> str:
        """Readable form; values only when asked (they may be PHI)."""
        return " or ".join(
            f"({' and '.join(p.describe(show_values) for p in g) or 'everything'})"
            for g in self.groups
        )

    def mask(self, table: pa.Table) -> pa.Array:
        """OR over the groups of the AND of each group's masks (an empty group matches all)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        hits: Any = pa.array([False] * table.num_rows, pa.bool_())
        for group in self.groups:
            if not group:
                return pa.array([True] * table.num_rows, pa.bool_())
            both = group[0].mask(table)
            for p in group[1:]:
                both = pc.and_(both, p.mask(table))
            hits = pc.or_(hits, both)
        return hits


def any_of(groups: Sequence[tuple[Predicate, ...]]) -> AnyOf:
    """The disjunction of *groups* (each a conjunction) as one predicate."""
    return AnyOf("(any of)", "in", groups=tuple(tuple(g) for g in groups))
