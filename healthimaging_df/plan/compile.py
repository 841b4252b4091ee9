"""Compiling: a query's parts and the facts known become the plan that runs.

Rules (see ``docs/queries.md``):

- At most two filters go out: one EQUAL (the most selective ID the query pins, else ``isPrimary``)
  and one BETWEEN (``StudyDateTime``, then ``createdAt``, then ``updatedAt``).
- An IN list on the chosen ID fans out into one request chain per value, or is read by a scan
  and applied on the client, whichever the facts price lower.
- Timestamps go out as whole seconds (botocore drops fractions), so bounds are widened to whole
  seconds; every predicate, pushed or not, is then applied exactly on the client.
- A scan with no ID to pin reads a ``createdAt`` window, pre-split from statistics when the run
  has some (:func:`presplit`) and split further at run time.
- Every chain pages in an order no update can change: ``createdAt`` ascending. Only a query with
  a ``limit`` pushes its own sort down, to stop early.
- A chain on an ID, or on a StudyDateTime / updatedAt range, is a lazy createdAt window: it
  starts as one chain and is split like a scan while it has pages left (``Chain.lazy``).
  ``isPrimary=True`` with such a range goes to the client, so the range can be split.
- A union reads pages its members share once (:func:`shared_chains`).
- QIDO-RS (``plan.qido``) is weighed when DICOMweb may answer this caller and a condition can go
  to it soundly; it is priced against the plan it would replace, which stays the plan's chains.

:func:`compile_spec` is pure: the engine gathers what ``Plan.needs`` asks for and compiles again
from the facts; nothing here sends a request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from healthimaging_df import schema
from healthimaging_df.core import dates
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.plan import costs, predicates
from healthimaging_df.plan.conditions import allowed_values, keeps_primary_only, ranges
from healthimaging_df.plan.facts import DatastoreStats, Facts, Needs, Spec
from healthimaging_df.plan.limits import (
    ALWAYS_FAN_OUT,
    DEFAULT_SORT,
    PAGE_ROWS,
    PRESPLIT_MIN_PAGES,
    QIDO_MARGIN,
    QIDO_RECORDS,
    STABLE_SORT,
    STRATEGIES,
    SWEEP_ONE_CHAIN_PAGES,
    WINDOW_FLOOR,
    Filter,
    Strategy,
)
from healthimaging_df.plan.model import Candidate, Chain, Plan, any_of
from healthimaging_df.plan.predicates import Predicate
from healthimaging_df.plan.qido import QIDO_COLUMNS, QidoStep, Sweep, qido_step
from healthimaging_df.plan.subranges import SPLIT_RANGES, between_filter, subranged

ID_RANK = schema.ID_RANK  # from each column's push-down role and rank in the schema
RANGE_RANK = schema.RANGE_RANK


def compile_plan(
    datastore_id: str,
    predicates: tuple[Predicate, ...] = (),
    sort_column: str | None = None,
    ascending: bool = True,
    limit: int | None = None,
    now: datetime | None = None,
    strategy: Strategy = "auto",
    stats: DatastoreStats | None = None,
    *,
    facts: Facts | None = None,
    assume_consistent_studies: bool = False,
) -> Plan:
    """Plan a query from its parts; pure and deterministic for a given *now* (bounds full scans).

    Without a *sort_column* the result is ordered by ``updatedAt``, newest first (the API's own
    default order) and *ascending* is ignored. An IN list on an ID can be answered by fanning out
    (a chain per value) or by a scan that filters on the client: ``strategy="auto"`` picks the
    one with fewer estimated requests (with *stats*, the datastore's size), ``"fanout"`` and
    ``"scan"`` force one. *facts* (what the engine measured) replace *stats* when given.
    """
    if strategy not in STRATEGIES:
        raise QueryValidationError("strategy", f"must be one of {', '.join(STRATEGIES)}")
    spec = Spec(
        datastore_id,
        (tuple(predicates),),
        (strategy,),
        sort_column,
        ascending,
        limit,
        now,
        assume_consistent_studies=assume_consistent_studies,
    )
    return compile_spec(spec, facts if facts is not None else Facts(stats=stats))


def compile_spec(spec: Spec, facts: Facts | None = None) -> Plan:
    """The plan of *spec* given *facts*, with what it would still like measured (``needs``)."""
    facts = facts if facts is not None else Facts()
    for strategy in spec.strategies:
        if strategy not in STRATEGIES:
            raise QueryValidationError("strategy", f"must be one of {', '.join(STRATEGIES)}")
    if spec.union:
        plan = _union(spec, facts)
    else:
        plan = subranged(_single(spec, spec.groups[0], spec.strategies[0], facts), facts)
    plan = presplit_for_run(plan, facts)
    estimate = None if plan.qido is not None else costs.plan_requests(plan, facts)
    needs = _needs(plan, spec, facts)
    return replace(plan, spec=spec, facts=facts, needs=needs, estimate=estimate)


# -- one query -----------------------------------------------------------------------------------


def _single(spec: Spec, preds: tuple[Predicate, ...], strategy: Strategy, facts: Facts) -> Plan:
    """The SearchImageSets plan (fan-out or scan, weighed), then QIDO-RS weighed against it."""
    search = _search_plan(spec, preds, strategy, facts)
    if strategy not in ("auto", "qido") or not search.chains:
        return search
    pinned = any(c in allowed_values(preds) for c in ID_RANK)
    # A limit whose sort is pushed stops the one search early: auto leaves QIDO-RS out then.
    if strategy == "auto" and (pinned or search.stops_early):
        return search
    return _with_qido(spec, preds, strategy, search, facts)


def _search_plan(
    spec: Spec, preds: tuple[Predicate, ...], strategy: Strategy, facts: Facts
) -> Plan:
    """SearchImageSets only: an IN list on an ID fans out or is scanned, whichever costs less."""
    fan = _search_chains(spec, preds, scan=False)
    ids = len(fan.chains) if fan.chains and fan.chains[0].filters else 0
    pinned = bool(fan.pushed) and fan.pushed[0].column in ID_RANK
    if not pinned or ids <= 1 or spec.limit is not None:
        return fan  # nothing to weigh (a limit stops chains early: fan-out reads least)
    scan = _search_chains(spec, preds, scan=True)
    fan_cost = float(ids)
    scan_cost = costs.scan_requests(scan, facts.stats)
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


def _with_qido(
    spec: Spec, preds: tuple[Predicate, ...], strategy: Strategy, search: Plan, facts: Facts
) -> Plan:
    """*search*, or a QIDO-RS step in front of it when it can be cheaper (or is forced)."""
    choice = qido_step(preds, spec.assume_consistent_studies)
    notes = (choice.why_not,) if choice.why_not else ()
    if choice.step is None:
        if strategy == "qido":
            raise QueryValidationError(
                "strategy",
                "'qido' needs a condition QIDO-RS can match: "
                + ", ".join(QIDO_COLUMNS)
                + " (eq/in, contains or a plain matches; study- and patient-level ones with "
                "assume_consistent_studies=True)",
            )
        return replace(search, access_notes=notes)
    forced = strategy == "qido"
    if not facts.qido.usable and not forced:
        return replace(search, access_notes=(*notes, facts.qido.describe()))
    sweep = _sweep(spec, preds, facts)
    replaced = costs.plan_requests(search, facts)
    step = replace(
        choice.step,
        sweep=sweep,
        replaced=replaced,
        forced=forced,
        budget=None if forced else costs.qido_budget(replaced, sweep.requests),
    )
    qido_cost = costs.qido_requests(step)
    use_qido = forced or replaced is None or qido_cost * QIDO_MARGIN <= replaced
    candidates = (
        Candidate(
            f"QIDO-RS: {len(step.searches)} search(es) at {QIDO_RECORDS:,} records a request "
            "(and the empty page that ends each), then one SearchImageSets chain per study, "
            f"series or patient found (at least one), plus {_sweep_words(sweep)}",
            qido_cost,
            chosen=use_qido,
        ),
        Candidate("SearchImageSets only (the plan below)", replaced, not use_qido),
    )
    if use_qido:
        return replace(search, candidates=candidates, access="qido", qido=step, access_notes=notes)
    note = (
        f"QIDO-RS not sent: its {len(step.searches)} search(es), the chains of its answer and "
        f"the non-primary sweep ({sweep.label}) cost as much as the plan they would replace"
    )
    return replace(search, candidates=candidates, access="search", access_notes=(*notes, note))


def _sweep_words(sweep: Sweep) -> str:
    if not sweep.swept:
        return "nothing more: the query keeps primary image sets only"
    if sweep.image_sets is None:
        return (
            "a sweep of the non-primary image sets (sized at run time with one or two "
            "requests; not counted here)"
        )
    return f"a sweep of the non-primary image sets (about {sweep.requests:,.0f} requests)"


def _sweep(spec: Spec, preds: tuple[Predicate, ...], facts: Facts) -> Sweep:
    """The sweep of every non-primary image set the query's pushable ranges admit, sized.

    Its size comes from the statistics (a whole-datastore sweep) or from its first page (a
    fact the engine measures); a sweep of at most ``SWEEP_ONE_CHAIN_PAGES`` pages is one chain.
    """
    if keeps_primary_only(preds):
        return Sweep((), 0.0, 0, True, swept=False)
    flag = predicates.build("isPrimary", "eq", (False,))
    rest = (*(p for p in preds if p.column != "isPrimary"), flag)
    chains = _search_plan(spec, rest, "search", facts).chains
    if len(chains) != 1:  # several chains (an ID fan-out) or none: not sized
        return Sweep(chains, float(len(chains)), None)
    (chain,) = chains
    stats = facts.stats
    measured = facts.size(chain)
    if sweep_is_whole(chain, preds) and stats is not None and stats.non_primary is not None:
        count, exact = stats.non_primary, False
    elif measured is not None:
        count, exact = measured.image_sets, measured.exact
    else:  # not measured yet: at least its first page
        estimate = costs.sweep_requests(preds, stats)
        return Sweep(chains, max(estimate or 0.0, 1.0), None)
    if exact and count == 0:
        return Sweep((), 0.0, 0, True)  # its first page was the whole (empty) answer
    pages = math.ceil(count / PAGE_ROWS)
    if chain.window is not None and pages <= SWEEP_ONE_CHAIN_PAGES:
        low, high = chain.window
        between = {"operator": "BETWEEN", "values": [{"createdAt": low}, {"createdAt": high}]}
        one = replace(chain, filters=(*chain.filters, between), sort=STABLE_SORT, window=None)
        return Sweep((one,), float(max(pages, 1)), count, exact)
    return Sweep(chains, costs.pages(count, chain.window is not None), count, exact)


def sweep_is_whole(chain: Chain, preds: Sequence[Predicate]) -> bool:
    """Whether a sweep chain reads every non-primary image set (its count is the statistics')."""
    return (
        chain.window is not None
        and not chain.filters[1:]
        and not any(p.column == "createdAt" and p.op == "between" for p in preds)
    )


# -- SearchImageSets chains of one query ------------------------------------------------------------


@dataclass(frozen=True)
class _Pushed:
    """What one SearchImageSets plan sends: its EQUAL column and values, its range filter."""

    equal_column: str | None
    equal_values: tuple[Any, ...]
    range_column: str | None
    range_filter: Filter | None
    predicates: tuple[Predicate, ...]


def _search_chains(spec: Spec, preds: tuple[Predicate, ...], scan: bool) -> Plan:
    """One access path: fan-out on the best ID (or a scan when *scan*), ranges pushed."""
    allowed = allowed_values(preds)
    found = ranges(preds)
    sort_column = spec.sort_column or DEFAULT_SORT
    ascending = spec.ascending if spec.sort_column else False
    sort_field = schema.BY_NAME[sort_column].sort_field
    stops_early = spec.limit is not None and sort_field is not None
    base = Plan(
        datastore_id=spec.datastore_id,
        chains=(),
        predicates=preds,
        pushed=(),
        sort_column=sort_column,
        ascending=ascending,
        sort_pushed=stops_early,
        limit=spec.limit,
    )
    empty = [c for c, v in allowed.items() if not v] + [
        c for c, (lo, hi) in found.items() if lo > hi
    ]
    if empty:
        return replace(
            base, note=f"no request sent: the conditions on {', '.join(empty)} cannot all hold"
        )
    pushed = _pushed(preds, allowed, found, scan)
    sort = STABLE_SORT
    if stops_early and sort_field is not None:
        sort = {"sortField": sort_field, "sortOrder": "ASC" if ascending else "DESC"}
    if not stops_early:  # a sorted chain that stops early beats reading every window
        pushed = _for_split_ranges(pushed)
    windowed = (
        pushed.equal_column is None or pushed.equal_column in schema.FLAG_COLUMNS
    ) and pushed.range_column in (None, "createdAt")
    # a chain that filters on an ID or a StudyDateTime / updatedAt range is split lazily
    lazy = not windowed and _splittable(pushed, "createdAt" in found)
    if stops_early:
        windowed = lazy = False
    chains = _chains(pushed, found, sort, windowed, spec.now, lazy)
    return replace(base, chains=chains, pushed=pushed.predicates)


def _splittable(pushed: _Pushed, created_range: bool) -> bool:
    """Whether the chains can take a createdAt window as their second filter.

    An ID alone (or with a createdAt range, which becomes the window): ID EQUAL + one date
    BETWEEN is the documented pair. A StudyDateTime or updatedAt range alone: range + createdAt
    BETWEEN is not documented, so the fetcher verifies it on the first split and, refused,
    reads the range by its two pair-free ends (``engine.fetch``). An ID with another range
    (three filters) stays one chain: an ID pins few image sets; so does a range with a
    createdAt range too (its every request would need the unverified pair).
    """
    equal, rng = pushed.equal_column, pushed.range_column
    if equal is not None and equal not in schema.FLAG_COLUMNS:
        return rng in (None, "createdAt")
    return equal is None and rng in SPLIT_RANGES and not created_range


def _for_split_ranges(pushed: _Pushed) -> _Pushed:
    """``isPrimary=True`` with a StudyDateTime / updatedAt range: the flag moves to the client.

    Three filters cannot go out; nearly every image set is primary, so the flag narrows little
    while the range split into windows reads at the quota instead of one chain's pace. Every
    predicate is applied on the client anyway. ``isPrimary=False`` (few image sets) stays pushed.
    """
    if (
        pushed.equal_column in schema.FLAG_COLUMNS
        and pushed.equal_values == (True,)
        and pushed.range_column in SPLIT_RANGES
    ):
        kept = tuple(p for p in pushed.predicates if p.column != pushed.equal_column)
        return replace(pushed, equal_column=None, equal_values=(), predicates=kept)
    return pushed


def _pushed(
    preds: tuple[Predicate, ...],
    allowed: dict[str, tuple[Any, ...]],
    found: dict[str, tuple[Any, Any]],
    scan: bool,
) -> _Pushed:
    """The EQUAL filter (the best ID, else a one-value flag) and the best range filter."""
    pushed: list[Predicate] = []
    equal_column = None if scan else next((c for c in ID_RANK if c in allowed), None)
    equal_values: tuple[Any, ...] = allowed[equal_column] if equal_column else ()
    flag = next((c for c in schema.FLAG_COLUMNS if len(allowed.get(c, ())) == 1), None)
    if equal_column is None and flag is not None:
        equal_column, equal_values = flag, allowed[flag]
    if equal_column:
        pushed += [p for p in preds if p.column == equal_column and p.op in ("eq", "in")]
    range_column = next((c for c in RANGE_RANK if c in found), None)
    range_filter: Filter | None = None
    if range_column:
        pushed += [p for p in preds if p.column == range_column and p.op == "between"]
        range_filter = between_filter(range_column, *found[range_column])
    return _Pushed(equal_column, equal_values, range_column, range_filter, tuple(pushed))


def _chains(
    pushed: _Pushed,
    found: dict[str, tuple[Any, Any]],
    sort: dict[str, str],
    windowed: bool,
    now: datetime | None,
    lazy: bool = False,
) -> tuple[Chain, ...]:
    key = schema.BY_NAME[pushed.equal_column].search_key if pushed.equal_column else None
    base: list[Filter | None] = [
        {"operator": "EQUAL", "values": [{key: v}]} for v in pushed.equal_values
    ] or [None]
    by_window = windowed or lazy
    # a lazy chain's createdAt range is its window; any other range stays its filter
    created = pushed.range_column == "createdAt"
    chains = []
    for index, equal in enumerate(base):
        bounded = None if windowed or (lazy and created) else pushed.range_filter
        filters = tuple(f for f in (equal, bounded) if f is not None)
        window = None
        if by_window:
            low, high = found.get("createdAt", (WINDOW_FLOOR, _tomorrow(now)))
            window = (dates.floor_second(low), dates.ceil_second(high))
        unbounded = lazy and "createdAt" not in found
        chains.append(
            Chain(
                index, filters, None if by_window else sort, window, lazy=lazy, unbounded=unbounded
            )
        )
    return tuple(chains)


def _tomorrow(now: datetime | None) -> datetime:
    today = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return today.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)


# -- unions --------------------------------------------------------------------------------------


def _union(spec: Spec, facts: Facts) -> Plan:
    """Every query's plan, renumbered into one; ``AnyOf`` the groups applied on the client.

    Each group (one query's predicates) is planned with the union's sort and limit and its own
    strategy; a row is kept when its latest copy read matches any query, and rows read by
    several chains are deduplicated by imageSetId like any fan-out. Queries whose weighed
    access paths disagree are all planned as fan-outs, so a resumed export (which forces one
    recorded path on every query) reads the same chains.
    """

    def plan_all(forced: Sequence[Strategy]) -> list[Plan]:
        return [
            subranged(_search_only(_single(spec, g, s, facts)), facts)
            for g, s in zip(spec.groups, forced, strict=True)
        ]

    parts = plan_all(spec.strategies)
    accesses = {p.access for p in parts if p.access != "auto"}
    if len(accesses) > 1:
        parts = plan_all(["fanout"] * len(spec.groups))
        accesses = {"fanout"}
    access: Strategy = accesses.pop() if accesses else "auto"
    chains: list[Chain] = []
    numbered: list[Plan] = []
    for part in parts:
        renumbered = tuple(replace(c, index=len(chains) + i) for i, c in enumerate(part.chains))
        chains += renumbered
        numbered.append(replace(part, chains=renumbered))
    shared = shared_chains(chains)
    note = None
    if len(shared) < len(chains):
        note = (
            f"the union's {len(chains)} chains read as {len(shared)}: members share a scan or "
            "a window's pages (each member's conditions applied to the shared rows, exactly)"
        )
    head = parts[0]
    return Plan(
        datastore_id=spec.datastore_id,
        chains=shared,
        note=note,
        predicates=(any_of(spec.groups),),
        pushed=(),
        sort_column=head.sort_column,
        ascending=head.ascending,
        sort_pushed=head.sort_pushed,
        limit=spec.limit,
        candidates=tuple(c for p in parts for c in p.candidates),
        wants_statistics=any(p.wants_statistics for p in parts),
        access=access,
        catch_up=any(p.catch_up for p in parts),
        parts=tuple(numbered),
    )


def shared_chains(chains: Sequence[Chain]) -> tuple[Chain, ...]:
    """A union's chains with each page read once, renumbered in order.

    A scan of everything stands for every chain, createdAt windows of the same filters that
    overlap or touch are one window, and a chain asked for twice is one.

    Every row a dropped chain would read is read by the chain that stands for it, and the union
    applies each member's conditions (``AnyOf``) to every row read: nothing is lost, nothing
    kept that no member matches. Lazy chains (an ID or a range, split at run time) are kept as
    they are unless a scan of everything covers them.
    """
    ends = [c.window[1] for c in chains if c.window is not None]
    for chain in chains:  # an unfiltered scan from the floor to the last window: everything
        if (
            not chain.filters
            and not chain.lazy
            and chain.window is not None
            and chain.window[0] <= WINDOW_FLOOR
            and chain.window[1] >= max(ends)
        ):
            return (replace(chain, index=0),)
    merged: dict[str, Chain] = {}
    windows: dict[str, list[Chain]] = {}
    for chain in chains:
        if chain.window is not None and not chain.lazy:
            key = json.dumps([chain.filters, chain.sort], default=str, sort_keys=True)
            windows.setdefault(key, []).append(chain)
            continue
        merged.setdefault(json.dumps(chain.criteria(), default=str, sort_keys=True), chain)
    out: list[Chain] = list(merged.values())
    for group in windows.values():
        group.sort(key=lambda c: c.window[0] if c.window else WINDOW_FLOOR)
        current = group[0]
        for chain in group[1:]:
            assert current.window is not None
            assert chain.window is not None
            if chain.window[0] <= current.window[1]:  # overlapping or touching (inclusive)
                high = max(current.window[1], chain.window[1])
                current = replace(current, window=(current.window[0], high), splits=())
            else:
                out.append(current)
                current = chain
        out.append(current)
    order = {id(c): n for n, c in enumerate(chains)}
    out.sort(key=lambda c: order.get(id(c), c.index))
    return tuple(replace(c, index=i) for i, c in enumerate(out))


def _search_only(part: Plan) -> Plan:
    """A union's query as SearchImageSets alone: a union runs no QIDO-RS step (yet)."""
    if part.qido is None:
        return part
    note = "QIDO-RS is not used inside a union: SearchImageSets alone"
    return replace(part, qido=None, access="search", access_notes=(*part.access_notes, note))


# -- what the run measures first --------------------------------------------------------------------


def whole_scan(plan: Plan, now: datetime | None = None) -> Chain | None:
    """*plan*'s one chain if it reads every image set, by createdAt windows, else None."""
    if plan.parts or not plan.full_scan:
        return None
    chain = plan.chains[0]
    moment = now or datetime.now(timezone.utc)
    whole = chain.window is not None and chain.window[1] >= moment
    return chain if whole else None


def _needs(plan: Plan, spec: Spec, facts: Facts) -> Needs:
    """What *plan*'s choices lack that a few requests would tell."""
    size = plan.wants_statistics and facts.stats is None
    probe_scan = None
    if size and not spec.union:
        probe_scan = whole_scan(_search_chains(spec, spec.groups[0], scan=True), spec.now)
    cuts = None
    if not size and facts.stats is None and facts.probe_window is None and plan.qido is None:
        cuts = whole_scan(plan, spec.now)
    step = plan.qido
    if step is None:
        return Needs(size, probe_scan, cuts)
    if step.replaced is None and _sizable(plan):
        # first what the plan QIDO-RS would replace costs: its first page is its first page
        return Needs(size, probe_scan, cuts, (plan.chains[0],))
    sweep = step.sweep
    if sweep.image_sets is None and len(sweep.chains) == 1:
        # then, QIDO-RS still cheaper, the sweep it needs (its first page, the sweep's first)
        whole = sweep_is_whole(sweep.chains[0], spec.groups[0])
        return Needs(size, probe_scan, cuts, sweep.chains, sweep.chains[0] if whole else None)
    return Needs(size, probe_scan, cuts)


def _sizable(plan: Plan) -> bool:
    """Whether the plan is one filtered chain the statistics cannot size (its first page can).

    A StudyDateTime or updatedAt range: the statistics know createdAt only.
    """
    chain = plan.chains[0] if len(plan.chains) == 1 else None
    return chain is not None and (chain.window is None or chain.lazy) and bool(chain.filters)


# -- pre-split scans -------------------------------------------------------------------------------


def presplit_pieces(stats: DatastoreStats, max_concurrency: int, page_size: int = PAGE_ROWS) -> int:
    """Pieces a scan starts with: half the workers (each piece soon reads from both ends).

    A small datastore gets fewer: every piece costs about half a page more (its last page).
    """
    pages = stats.image_sets // page_size
    return max(2, min(max_concurrency // 2, pages // 16))


def presplit_for_run(plan: Plan, facts: Facts) -> Plan:
    """*plan* pre-split as the run starts it: at a probe's cuts, else by the statistics."""
    if not facts.for_run or not plan.windowed or plan.parts:
        return plan
    whole = whole_scan(plan)
    if whole is not None and facts.probe_window is not None and whole.window == facts.probe_window:
        return presplit_at(plan, facts.stats, [facts.probe_cuts], "at the probe's windows")
    if facts.stats is not None:
        pieces = presplit_pieces(facts.stats, facts.max_concurrency, facts.page_size)
        return presplit(plan, facts.stats, pieces)
    return plan


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
        if chain.window is None or chain.lazy:  # a filtered chain: the profile is not its own
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
        if chain.window is None or chain.lazy:
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


def replaced_cost(step: QidoStep, fallback: Plan, facts: Facts) -> float | None:
    """What the plan a QIDO-RS step replaces costs: compiled in, else from facts since."""
    return step.replaced if step.replaced is not None else costs.plan_requests(fallback, facts)
