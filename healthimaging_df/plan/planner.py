"""The planner: a ``Query`` becomes request chains the API can answer plus client-side predicates.

Rules (see ``docs/queries.md``):

- At most two filters go out: one EQUAL (the most selective ID the query pins, else ``isPrimary``)
  and one BETWEEN (``StudyDateTime``, then ``createdAt``, then ``updatedAt``).
- An IN list on the chosen ID fans out into one request chain per value.
- Timestamps go out as whole seconds (botocore drops fractions), so bounds are widened to whole
  seconds; every predicate, pushed or not, is then applied exactly on the client.
- A scan with no ID to pin reads a ``createdAt`` window, pre-split from statistics when there are
  some (:func:`presplit`) and split further at run time (createdAt never changes, so windows are
  stable while the datastore is written to).
- Every chain pages in an order no update can change: ``createdAt`` ascending. The service's default
  (``updatedAt`` descending) would move an image set updated mid-query ahead of the cursor, where
  it is never returned. Only a query with a ``limit`` pushes its own sort down, to stop early.

The planner never sees a ``Query``: it takes the query's parts, so it sits below the builder.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from healthimaging_df import schema
from healthimaging_df.core import dates
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.plan.predicates import Predicate

if TYPE_CHECKING:
    import pyarrow as pa

ID_RANK = schema.ID_RANK  # from each column's push-down role and rank in the schema
RANGE_RANK = schema.RANGE_RANK
DEFAULT_SORT = "updatedAt"
STABLE_SORT = {"sortField": "createdAt", "sortOrder": "ASC"}  # no update moves a row in it
WINDOW_FLOOR = datetime(1970, 1, 1, tzinfo=timezone.utc)

Filter = dict[str, Any]
Strategy = Literal["auto", "fanout", "scan", "search", "qido"]
# "search": SearchImageSets only (never QIDO-RS); "qido": QIDO-RS first whenever it can match.
STRATEGIES: tuple[Strategy, ...] = ("auto", "fanout", "scan", "search", "qido")
PAGE_ROWS = 50
# An IN list this short always fans out: even a one-page scan would not save a request worth a
# probe of the datastore's size.
ALWAYS_FAN_OUT = 10
SCAN_OVERHEAD = 1.05  # a windowed scan's extra requests per minimum page (windows' last pages)
PROBE_REQUESTS = 10  # what measuring an unknown datastore costs (see engine.statistics)
QIDO_RECORDS = 1000  # records a QIDO-RS request returns at most
QIDO_MAX_SEARCHES = (
    16  # IN lists of QIDO-able columns multiply into searches; past this, fewer keys
)


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


@dataclass(frozen=True)
class Candidate:
    """One access path the planner weighed: its estimated requests and the one chosen."""

    name: str
    requests: float | None  # None: unknown without statistics
    chosen: bool = False

    def describe(self, max_tps: float) -> str:
        """A line of ``explain()``."""
        mark = "chosen" if self.chosen else "not chosen"
        if self.requests is None:
            return f"{self.name}: size of the datastore unknown ({mark})"
        seconds = self.requests / max_tps
        return f"{self.name}: about {self.requests:,.0f} requests, {seconds:,.1f} s at {max_tps:g} TPS ({mark})"


def rows_between(chain: Chain, low: datetime, high: datetime) -> float | None:
    """Rows of the datastore created in ``[low, high]`` by *chain*'s profile, None without one.

    The quantiles are evenly spaced in rank; rows are taken as spread evenly between two.
    """
    points = chain.profile
    if len(points) < 2 or high < low:
        return None if len(points) < 2 else 0.0
    return chain.profile_rows * (_rank(points, high) - _rank(points, low))


def _rank(points: tuple[datetime, ...], moment: datetime) -> float:
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
        if bounds is not None:
            filters.append(
                {
                    "operator": "BETWEEN",
                    "values": [{"createdAt": bounds[0]}, {"createdAt": bounds[1]}],
                }
            )
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
    def windowed(self) -> bool:
        """Whether the scan is split into createdAt windows at run time."""
        return any(c.window is not None for c in self.chains)

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
        """The first request of every chain, exactly as passed to ``search_image_sets``."""
        return [c.request(self.datastore_id) for c in self.chains]

    def explain(self, show_values: bool = False) -> str:
        """A readable account of the plan; values hidden unless *show_values*."""
        if self.parts:
            return self._explain_union(show_values)
        lines = [f"Plan for datastore {self.datastore_id}"]
        if self.note:
            lines.append(f"  {self.note}")
        count = len(self.chains)
        if self.candidates:
            lines.append("  access paths weighed:")
            lines += [f"    {c.describe(25.0)}" for c in self.candidates]
            if self.wants_statistics:
                lines.append(
                    f"    (the datastore's size is measured at run time with about "
                    f"{PROBE_REQUESTS} requests, or read from a previous scan's statistics)"
                )
        if self.qido is not None:
            lines += self.qido.explain_lines(show_values)
            lines.append(
                "  if QIDO-RS is abandoned (too many matches, or truncated), this scan runs:"
            )
        lines.append(f"  SearchImageSets request chains: {count}")
        if self.pushed:
            lines.append("  pushed down to the API:")
            lines += [f"    {p.describe(show_values)}" for p in self.pushed]
        if count > 1:
            lines.append(f"    (IN list fanned out: one chain per value, {count} chains)")
        if self.chains and self.chains[0].sort:
            sort = self.chains[0].sort
            lines.append(f"    sort: {sort['sortField']} {sort['sortOrder']}")
        window = self.chains[0].window if self.chains else None
        if window is not None:
            low, high = window
            lines.append(
                f"  exhaustive scan: createdAt {low:%Y-%m-%dT%H:%M:%SZ} .. {high:%Y-%m-%dT%H:%M:%SZ}"
                " read from both ends (createdAt ASC and DESC) and split at run time while workers"
                " are free; windows run concurrently under max_tps"
            )
        client_side = [p for p in self.predicates if p not in self.pushed]
        lines.append("  applied on the client, exactly:")
        lines += [f"    {p.describe(show_values)}" for p in client_side] or ["    (nothing else)"]
        if self.pushed:
            lines.append("    + pushed predicates re-checked (timestamps to the microsecond)")
        order = "ascending" if self.ascending else "descending"
        if self.sort_pushed:
            where = "sorted by the API" if count == 1 else "each chain sorted by the API, merged"
        else:
            where = "pages read by createdAt ascending, sorted on the client"
        lines.append(
            f"  result: one row per imageSetId (highest version), ordered by {self.sort_column} "
            f"{order} ({where}; ties by imageSetId)"
        )
        if self.limit is not None:
            how = (
                "each chain stops once it holds enough matches"
                if self.stops_early
                else "every page is read first"
            )
            lines.append(f"  limit: first {self.limit} rows; {how}")
        if count:
            lines.append(
                f"  expected calls: at least {count} (50 image sets per page"
                + ("; more as windows split)" if self.windowed else ")")
            )
        return "\n".join(lines)

    def summary(self, max_tps: float | None = 25.0) -> str:
        """The plan in a few value-free lines: paths weighed, requests and seconds at *max_tps*."""
        from healthimaging_df.plan import display

        return display.text(self, max_tps)

    def to_html(self, max_tps: float | None = 25.0) -> str:
        """:meth:`summary` as an HTML table (what a notebook shows)."""
        from healthimaging_df.plan import display

        return display.html(self, max_tps)

    def _repr_html_(self) -> str:
        return self.to_html()

    def _explain_union(self, show_values: bool) -> str:
        """Each query's chains and client-side predicates, then what the union applies."""
        count = len(self.chains)
        lines = [
            f"Plan for datastore {self.datastore_id}",
            f"  union (OR) of {len(self.parts)} queries: SearchImageSets request chains: {count}",
        ]
        first = 0
        for number, part in enumerate(self.parts, 1):
            span = len(part.chains)
            which = f"chains {first}..{first + span - 1}" if span > 1 else f"chain {first}"
            which = which if span else "no chain"
            lines.append(f"  query {number} ({which}):")
            first += span
            body = part.explain(show_values).splitlines()[1:]
            lines += [
                f"  {line}"
                for line in body
                if not line.startswith(("  result:", "  limit:", "  expected calls:"))
            ]
        lines.append(
            "  applied on the client, exactly: a row is kept if its latest copy read matches "
            f"any of the {len(self.parts)} queries (all of query 1's conditions, or all of "
            "query 2's, ...)"
        )
        order = "ascending" if self.ascending else "descending"
        where = (
            "each chain sorted by the API, merged" if self.sort_pushed else "sorted on the client"
        )
        lines.append(
            f"  result: one row per imageSetId (highest version), whichever queries it matches, "
            f"ordered by {self.sort_column} {order} ({where}; ties by imageSetId)"
        )
        if self.limit is not None:
            how = (
                "each chain stops once it holds enough matches"
                if self.stops_early
                else "every page is read first"
            )
            lines.append(f"  limit: first {self.limit} rows of the union; {how}")
        if count:
            lines.append(
                f"  expected calls: at least {count} (50 image sets per page"
                + ("; more as windows split)" if self.windowed else ")")
            )
        return "\n".join(lines)


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


def union(
    datastore_id: str,
    groups: Sequence[tuple[Predicate, ...]],
    sort_column: str | None = None,
    ascending: bool = True,
    limit: int | None = None,
    now: datetime | None = None,
    strategies: Sequence[Strategy] = (),
    stats: DatastoreStats | None = None,
) -> Plan:
    """Plan the OR of several queries over one datastore: every query's chains, renumbered.

    Each group (one query's predicates) is planned by :func:`compile_plan` with the union's sort
    and limit (and its own strategy from *strategies*, default ``"auto"``); the union applies
    :class:`AnyOf` the groups on the client, so a row is kept when its latest copy read matches
    any query, and rows read by several chains are deduplicated by imageSetId like any fan-out.
    Queries whose weighed access paths disagree are all planned as fan-outs, so a resumed export
    (which forces one recorded path on every query) reads the same chains.
    """
    chosen = list(strategies) or ["auto"] * len(groups)
    if len(chosen) != len(groups):
        raise QueryValidationError("strategy", "give one per query of the union")
    if not groups:
        raise QueryValidationError("union", "needs at least one query")

    def plan_all(forced: Sequence[Strategy]) -> list[Plan]:
        return [
            compile_plan(datastore_id, g, sort_column, ascending, limit, now, s, stats)
            for g, s in zip(groups, forced, strict=True)
        ]

    parts = plan_all(chosen)
    accesses = {p.access for p in parts if p.access != "auto"}
    if len(accesses) > 1:
        parts = plan_all(["fanout"] * len(groups))
        accesses = {"fanout"}
    access: Strategy = accesses.pop() if accesses else "auto"
    chains: list[Chain] = []
    numbered: list[Plan] = []
    for part in parts:
        renumbered = tuple(replace(c, index=len(chains) + i) for i, c in enumerate(part.chains))
        chains += renumbered
        numbered.append(replace(part, chains=renumbered))
    head = parts[0]
    return Plan(
        datastore_id=datastore_id,
        chains=tuple(chains),
        predicates=(any_of(groups),),
        pushed=(),
        sort_column=head.sort_column,
        ascending=head.ascending,
        sort_pushed=head.sort_pushed,
        limit=limit,
        candidates=tuple(c for p in parts for c in p.candidates),
        wants_statistics=any(p.wants_statistics for p in parts),
        access=access,
        parts=tuple(numbered),
    )


def compile_plan(
    datastore_id: str,
    predicates: tuple[Predicate, ...] = (),
    sort_column: str | None = None,
    ascending: bool = True,
    limit: int | None = None,
    now: datetime | None = None,
    strategy: Strategy = "auto",
    stats: DatastoreStats | None = None,
) -> Plan:
    """Plan a query from its parts; pure and deterministic for a given *now* (bounds full scans).

    Without a *sort_column* the result is ordered by ``updatedAt``, newest first (the API's own
    default order) and *ascending* is ignored. An IN list on an ID can be answered by fanning out
    (a chain per value) or by a scan that filters on the client: ``strategy="auto"`` picks the
    one with fewer estimated requests (with *stats*, the datastore's size), ``"fanout"`` and
    ``"scan"`` force one.
    """
    if strategy not in STRATEGIES:
        raise QueryValidationError("strategy", f"must be one of {', '.join(STRATEGIES)}")
    fan = _compile(datastore_id, predicates, sort_column, ascending, limit, now, scan=False)
    ids = len(fan.chains) if fan.chains and fan.chains[0].filters else 0
    pinned = bool(fan.pushed) and fan.pushed[0].column in ID_RANK
    # A limit whose sort is pushed stops the one search early: auto leaves QIDO-RS out then.
    unweighed = pinned or fan.stops_early
    if strategy in ("auto", "qido") and fan.chains and (strategy == "qido" or not unweighed):
        step = qido_step(predicates)
        if step is None and strategy == "qido":
            raise QueryValidationError(
                "strategy",
                "'qido' needs a condition QIDO-RS can match: "
                + ", ".join(QIDO_COLUMNS)
                + " (eq/in, contains or a plain matches)",
            )
        if step is not None:
            scan_cost = scan_requests(fan, stats)
            sweep = sweep_requests(predicates, stats)
            qido_cost = len(step.searches) + (sweep or 0.0)
            # QIDO-RS first only while it can still win: its searches plus the sweep of the
            # non-primary image sets must cost less than the scan (a known sweep only)
            use_qido = strategy == "qido" or scan_cost is None or qido_cost < scan_cost
            what = (
                "nothing more: the query keeps primary image sets only"
                if keeps_primary_only(predicates)
                else f"a sweep of the non-primary image sets (about {sweep:,.0f} requests)"
                if sweep is not None
                else "a sweep of the non-primary image sets (sized at run time with one or two"
                " requests; not counted here)"
            )
            candidates = (
                Candidate(
                    f"QIDO-RS: {len(step.searches)} search(es) at {QIDO_RECORDS:,} records a "
                    "request, then one SearchImageSets chain per study, series or patient found, "
                    f"plus {what}",
                    qido_cost,
                    chosen=use_qido,
                ),
                Candidate("SearchImageSets only (the plan below)", scan_cost, not use_qido),
            )
            if use_qido:
                step = replace(step, forced=strategy == "qido")
                return replace(fan, candidates=candidates, access="qido", qido=step)
            return replace(fan, candidates=candidates, access="search")
    if not pinned or ids <= 1 or limit is not None:
        return fan  # nothing to weigh (a limit stops chains early: fan-out reads least)
    scan = _compile(datastore_id, predicates, sort_column, ascending, limit, now, scan=True)
    fan_cost = float(ids)
    scan_cost = _scan_requests(scan, stats)
    if strategy in ("auto", "search", "qido"):
        use_scan = scan_cost is not None and scan_cost < fan_cost
        wants = scan_cost is None and ids > ALWAYS_FAN_OUT
    else:
        use_scan, wants = strategy == "scan", False
    candidates = (
        Candidate(f"fan-out ({ids} chains)", fan_cost, chosen=not use_scan),
        Candidate("scan, IN list applied on the client", scan_cost, chosen=use_scan),
    )
    chosen = scan if use_scan else fan
    access: Strategy = "scan" if use_scan else "fanout"
    return replace(chosen, candidates=candidates, wants_statistics=wants, access=access)


PRESPLIT_MIN_PAGES = 4  # fewer pages than this per piece: not worth a piece's part-empty page


def presplit(plan: Plan, stats: DatastoreStats, pieces: int) -> Plan:
    """*plan* with each createdAt window split into up to *pieces* of about equal size.

    From *stats*' createdAt quantiles (evenly in time between its oldest and newest image set
    without them): the fetcher starts one reader per piece at once instead of discovering the
    spread page by page, and the pieces then grow second readers, from their high end, and
    split further as workers fall idle. Boundaries are whole seconds (what a request can say).
    """
    if not plan.windowed or pieces < 2 or plan.parts:
        return plan
    cuts: list[tuple[datetime, ...]] = []
    for chain in plan.chains:
        if chain.window is None:
            cuts.append(())
            continue
        low, high = chain.window
        share = stats.share(low, high)
        count = min(pieces, int(stats.image_sets * share / PAGE_ROWS / PRESPLIT_MIN_PAGES))
        cuts.append(_cuts(stats, low, high, count))
    return presplit_at(plan, stats, cuts, f"from the {stats.source} statistics")


def presplit_at(
    plan: Plan, stats: DatastoreStats | None, cuts: Sequence[tuple[datetime, ...]], why: str
) -> Plan:
    """*plan* with chain k's createdAt window starting pre-split at ``cuts[k]`` (whole seconds).

    The chains take *stats*' createdAt quantiles as their profile (none without *stats*).
    """
    chains = []
    for chain, at in zip(plan.chains, cuts, strict=True):
        if chain.window is None:
            chains.append(chain)
            continue
        chains.append(
            replace(
                chain,
                splits=tuple(at),
                profile=stats.created_quantiles if stats is not None else (),
                profile_rows=stats.image_sets if stats is not None else 0,
            )
        )
    note = plan.note
    if any(c.splits for c in chains):
        parts = max(len(c.splits) + 1 for c in chains)
        note = (f"{note}; " if note else "") + f"window pre-split into {parts} pieces {why}"
    return replace(plan, chains=tuple(chains), note=note)


def _cuts(stats: DatastoreStats, low: datetime, high: datetime, count: int) -> tuple[datetime, ...]:
    """Whole seconds strictly inside ``(low, high)`` that cut it into *count* equal shares."""
    if count < 2:
        return ()
    points = [q for q in stats.created_quantiles if low <= q <= high]
    if len(points) < 2:
        if stats.created_min is None or stats.created_max is None:
            return ()
        a, b = max(low, stats.created_min), min(high, stats.created_max)
        points = [a, b] if b > a else []
    if len(points) < 2:
        return ()
    last = len(points) - 1
    cuts = set()
    for k in range(1, count):
        x = k * last / count
        i = min(int(x), last - 1)
        at = points[i] + (points[i + 1] - points[i]) * (x - i)
        cut = dates.floor_second(at)
        if low < cut < high:
            cuts.add(cut)
    return tuple(sorted(cuts))


def scan_requests(scan: Plan, stats: DatastoreStats | None) -> float | None:
    """Requests a scan plan needs (public for the QIDO-RS step); see :func:`_scan_requests`.

    A ``StudyDateTime`` range filter is counted as reading everything: the statistics know
    ``createdAt`` only, and StudyDateTime is not createdAt. The QIDO-RS step sizes such a scan
    at run time from its first page instead (``qido_plan._scan_cost``).
    """
    return _scan_requests(scan, stats)


def _scan_requests(scan: Plan, stats: DatastoreStats | None) -> float | None:
    """Requests a scan plan needs: the image sets it reads over 50 a page, plus windows' share."""
    if stats is None:
        return None
    window = scan.chains[0].window if scan.chains else None
    share = stats.share(*window) if window is not None else 1.0
    pages = math.ceil(stats.image_sets * share / PAGE_ROWS)
    return max(1.0, pages * SCAN_OVERHEAD)


def keeps_primary_only(predicates: Sequence[Predicate]) -> bool:
    """Whether *predicates* keep primary image sets only (QIDO-RS sees all of those)."""
    return any(
        p.column == "isPrimary" and p.op in ("eq", "in") and set(p.values) == {True}
        for p in predicates
    )


def sweep_requests(predicates: Sequence[Predicate], stats: DatastoreStats | None) -> float | None:
    """Requests the non-primary sweep of a QIDO-RS plan needs, when *stats* count them.

    0 when the query keeps primary image sets only; None when the count is unknown. QIDO-RS
    sees primary image sets only, so every other image set the query's pushable ranges admit
    is read from SearchImageSets ``isPrimary=false``: one page per 50, plus windows' last pages.
    """
    if keeps_primary_only(predicates):
        return 0.0
    if stats is None or stats.non_primary is None:
        return None
    share = 1.0
    ranges = _ranges(tuple(predicates))
    if "createdAt" in ranges:
        share = stats.share(*ranges["createdAt"])
    pages = math.ceil(stats.non_primary * share / PAGE_ROWS)
    return float(pages) if pages <= 1 else pages * SCAN_OVERHEAD


# -- QIDO-RS as an access path (pure: the engine runs the searches, see qido_plan.py) ---------
#
# A condition goes to QIDO-RS only where the documented matching (PS3.4 C.2.2.2) returns a
# superset of what the client keeps:
# - single-value matching is exact and case-sensitive, except PN, which a server may match
#   case-insensitively: either way a superset of the client's case-sensitive ``==``;
# - ``*`` and ``?`` match any characters, so a value holding them matches a superset of itself;
#   ``\\`` (value multiplicity) and control characters are never sent;
# - ``contains(s)`` becomes ``*s*``, ``matches`` only for a plain literal (``^lit``, ``lit`` or
#   ``lit$``, anchors at the end dropped); ignoring case only when ``s`` has no cased letter,
#   because wildcard matching of non-PN values is case-sensitive;
# - dates (DA) only as whole 8-digit dates: a raw-string range on the client also admits partial
#   dates (``"1950"``) that a DA range never matches, so ranges on raw strings stay on the client;
# - PN values holding ``=`` (other name groups) are not sent: which group a server compares is
#   undocumented;
# - ``fuzzymatching`` is never used (its word splitting is undocumented).
# ``StudyDateTime`` ranges narrow the search by StudyDate (a row the client keeps has a valid
# StudyDate in that day range).

QIDO_STUDY_COLUMNS = ("PatientName", "StudyDescription", "PatientBirthDate", "StudyDate")
QIDO_SERIES_COLUMNS = ("Modality", "SeriesNumber")
QIDO_COLUMNS = (*QIDO_SERIES_COLUMNS, *QIDO_STUDY_COLUMNS)
_DA_COLUMNS = ("PatientBirthDate", "StudyDate")
_REGEX_META = set(".^$*+?{}[]\\|()")


@dataclass(frozen=True)
class QidoSearch:
    """One QIDO-RS search: a level and its match keys (DICOM keyword to QIDO text)."""

    level: Literal["studies", "series"]
    match: tuple[tuple[str, str], ...]

    def __repr__(self) -> str:
        return f"QidoSearch({self.level}, keys={[k for k, _ in self.match]})"  # no values: PHI

    def describe(self, show_values: bool = False) -> str:
        """``GET /series?Modality=...`` with values hidden unless *show_values*."""
        keys = "&".join(f"{k}={v if show_values else '<value>'}" for k, v in self.match)
        return f"GET /{self.level}?{keys}"


@dataclass(frozen=True)
class QidoStep:
    """QIDO-RS searches whose union holds (a superset of) the primary image sets that match.

    Run at run time by ``engine.choose``; the answer's studies, series or patients (whichever
    gives the fewest chains) become an IN list the SearchImageSets plan fans out on.
    """

    searches: tuple[QidoSearch, ...]
    pushed: tuple[Predicate, ...]
    date_range: tuple[str, str] | None = None  # StudyDate bounds (YYYYMMDD), for splitting
    forced: bool = False  # strategy "qido": never abandoned for cost, truncation raises

    @property
    def level(self) -> Literal["studies", "series"]:
        """``series`` when a series key is matched, else ``studies``."""
        return self.searches[0].level

    def explain_lines(self, show_values: bool) -> list[str]:
        """Lines of ``Plan.explain()``."""
        lines = [
            "  QIDO-RS step (run first, at run time; primary image sets only):",
            *(f"    {s.describe(show_values)}" for s in self.searches),
            "    matched by QIDO-RS (a superset; re-checked on the client):",
            *(f"      {p.describe(show_values)}" for p in self.pushed),
            f"    {QIDO_RECORDS:,} records a request; a full page at the 10,000 cap or the largest"
            " offset means 'maybe more': "
            + (
                "split by StudyDate, else the scan below"
                if self.date_range
                else "the scan below runs instead"
            ),
            "    then SearchImageSets by StudyInstanceUID, SeriesInstanceUID or PatientID (fewest"
            " chains; no isPrimary filter, so non-primary copies of those come too), plus a sweep"
            " of every non-primary image set (isPrimary=false: QIDO-RS cannot see them, and a"
            " conflicting copy may hold the value matched; sized first from the statistics or"
            " with one or two requests, and the scan runs instead when the sweep and the chains cost as"
            " much), unless the query keeps isPrimary=True",
        ]
        return lines


def qido_step(predicates: tuple[Predicate, ...]) -> QidoStep | None:
    """The QIDO-RS searches for *predicates*, or None when no condition can go to QIDO-RS."""
    per_column: dict[str, tuple[Predicate, tuple[str, ...]]] = {}
    for p in predicates:
        if p.column in QIDO_COLUMNS and p.column not in per_column:
            values = _qido_values(p)
            if values:
                per_column[p.column] = (p, values)
    if not per_column:
        return None
    date_range = _study_date_range(predicates)
    keys: list[tuple[str, tuple[str, ...]]] = []
    pushed: list[Predicate] = []
    searches = 1
    # most selective first: one value before several, series keys before study keys
    for column in sorted(per_column, key=lambda c: (len(per_column[c][1]), QIDO_COLUMNS.index(c))):
        p, values = per_column[column]
        if keys and searches * len(values) > QIDO_MAX_SEARCHES:
            continue
        searches *= len(values)
        keys.append((column, values))
        pushed.append(p)
    if date_range is not None and "StudyDate" not in dict(keys):
        keys.append(("StudyDate", (f"{date_range[0]}-{date_range[1]}",)))
        pushed += [p for p in predicates if p.column == "StudyDateTime" and p.op == "between"]
    level: Literal["studies", "series"] = (
        "series" if any(k in QIDO_SERIES_COLUMNS for k, _ in keys) else "studies"
    )
    combos: list[tuple[tuple[str, str], ...]] = [()]
    for column, values in keys:
        combos = [(*c, (column, v)) for c in combos for v in values]
    found = tuple(QidoSearch(level, tuple(sorted(c))) for c in combos)
    return QidoStep(found, tuple(pushed), date_range)


def _qido_values(p: Predicate) -> tuple[str, ...]:
    """QIDO-RS values whose matches are a superset of *p*'s, or () when there are none."""
    if p.op in ("eq", "in"):
        if p.column == "SeriesNumber":
            return tuple(str(v) for v in p.values)
        if p.column in _DA_COLUMNS and not all(_whole_date(v) for v in p.values):
            return ()
        texts = tuple(str(v) for v in p.values)
    elif p.op in ("contains", "regex") and p.column not in _DA_COLUMNS:
        literal = p.values[0] if p.op == "contains" else _regex_literal(p.values[0])
        if literal is None or literal.strip("*") == "":
            return ()
        if not p.case and literal.lower() != literal.upper():
            return ()  # wildcard matching of non-PN values is case-sensitive
        anchored = p.op == "regex" and p.values[0].startswith("^")
        texts = (("" if anchored else "*") + literal + "*",)
    else:
        return ()
    for text in texts:
        if "\\" in text or len(text) > 1000 or any(ord(c) < 32 for c in text) or text == "":
            return ()
        if p.column == "PatientName" and "=" in text:
            return ()
        if text.strip("*") == "":
            return ()  # universal matching: nothing gained
    return texts


def _regex_literal(pattern: str) -> str | None:
    """The literal a plain regex (``^lit``, ``lit``, ``lit$``) searches for, else None."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    out: list[str] = []
    escaped = False
    for c in body:
        if escaped:
            if c.isalnum():
                return None  # \d, \b ... are classes or assertions, not literals
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in _REGEX_META:
            return None
        else:
            out.append(c)
    return None if escaped or not out else "".join(out)


def _whole_date(value: Any) -> bool:
    if not (isinstance(value, str) and len(value) == 8 and value.isascii() and value.isdigit()):
        return False
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def _study_date_range(predicates: tuple[Predicate, ...]) -> tuple[str, str] | None:
    """The StudyDate day range every kept row falls in, from ``StudyDateTime`` ranges."""
    ranges = _ranges(predicates)
    if "StudyDateTime" not in ranges:
        return None
    low, high = ranges["StudyDateTime"]
    if low > high:
        return None
    return f"{max(low.year, 1):04d}{low:%m%d}", f"{high.year:04d}{high:%m%d}"


def _compile(
    datastore_id: str,
    predicates: tuple[Predicate, ...],
    sort_column: str | None,
    ascending: bool,
    limit: int | None,
    now: datetime | None,
    scan: bool,
) -> Plan:
    """One access path: fan-out on the best ID (or a scan when *scan*), ranges pushed."""
    preds = predicates
    allowed = _allowed_values(preds)
    ranges = _ranges(preds)
    sorted_by = sort_column
    sort_column = sorted_by or DEFAULT_SORT
    ascending = ascending if sorted_by else False
    sort_field = schema.BY_NAME[sort_column].sort_field
    stops_early = limit is not None and sort_field is not None
    plan_args: dict[str, Any] = {
        "datastore_id": datastore_id,
        "predicates": preds,
        "sort_column": sort_column,
        "ascending": ascending,
        "sort_pushed": stops_early,
        "limit": limit,
    }
    empty = [c for c, v in allowed.items() if not v] + [
        c for c, (lo, hi) in ranges.items() if lo > hi
    ]
    if empty:
        return Plan(
            chains=(),
            pushed=(),
            note=f"no request sent: the conditions on {', '.join(empty)} cannot all hold",
            **plan_args,
        )

    pushed: list[Predicate] = []
    equal_column = None if scan else next((c for c in ID_RANK if c in allowed), None)
    equal_values: list[Any] = list(allowed[equal_column]) if equal_column else []
    flag = next((c for c in schema.FLAG_COLUMNS if len(allowed.get(c, ())) == 1), None)
    if equal_column is None and flag is not None:
        equal_column, equal_values = flag, list(allowed[flag])
    if equal_column:
        pushed += [p for p in preds if p.column == equal_column and p.op in ("eq", "in")]

    range_column = next((c for c in RANGE_RANK if c in ranges), None)
    range_filter: Filter | None = None
    if range_column:
        pushed += [p for p in preds if p.column == range_column and p.op == "between"]
        range_filter = _between_filter(range_column, *ranges[range_column])

    sort = STABLE_SORT
    if stops_early and sort_field is not None:
        sort = {"sortField": sort_field, "sortOrder": "ASC" if ascending else "DESC"}

    windowed = (equal_column is None or equal_column in schema.FLAG_COLUMNS) and range_column in (
        None,
        "createdAt",
    )
    if stops_early:
        windowed = False  # a sorted chain that stops early beats reading every window
    key = schema.BY_NAME[equal_column].search_key if equal_column else None
    base: list[Filter | None] = [
        {"operator": "EQUAL", "values": [{key: v}]} for v in equal_values
    ] or [None]
    chains = []
    for index, equal in enumerate(base):
        filters = tuple(f for f in (equal, None if windowed else range_filter) if f is not None)
        window = None
        if windowed:
            low, high = ranges.get("createdAt", (WINDOW_FLOOR, _tomorrow(now)))
            window = (dates.floor_second(low), dates.ceil_second(high))
        chains.append(Chain(index, filters, None if windowed else sort, window))
    return Plan(chains=tuple(chains), pushed=tuple(pushed), **plan_args)


def _allowed_values(preds: tuple[Predicate, ...]) -> dict[str, tuple[Any, ...]]:
    """Per column, the values every eq/in predicate on it admits (intersection, first order)."""
    allowed: dict[str, tuple[Any, ...]] = {}
    for p in preds:
        if p.op in ("eq", "in"):
            if p.column in allowed:
                keep = set(p.values)
                allowed[p.column] = tuple(v for v in allowed[p.column] if v in keep)
            else:
                allowed[p.column] = p.values
    return allowed


def _ranges(preds: tuple[Predicate, ...]) -> dict[str, tuple[Any, Any]]:
    """Per pushable range column, the intersection of its between predicates."""
    ranges: dict[str, tuple[Any, Any]] = {}
    for p in preds:
        if p.op == "between" and p.column in RANGE_RANK:
            low, high = p.values
            if p.column in ranges:
                low = max(low, ranges[p.column][0])
                high = min(high, ranges[p.column][1])
            ranges[p.column] = (low, high)
    return ranges


def _between_filter(column: str, low: datetime, high: datetime) -> Filter:
    key = schema.BY_NAME[column].search_key
    assert key is not None
    values: list[dict[str, Any]]
    if column == "StudyDateTime":
        values = [{key: dates.study_date_and_time(low)}, {key: dates.study_date_and_time(high)}]
    else:
        values = [{key: dates.floor_second(low)}, {key: dates.ceil_second(high)}]
    return {"operator": "BETWEEN", "values": values}


def _tomorrow(now: datetime | None) -> datetime:
    today = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return today.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
