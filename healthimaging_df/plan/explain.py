"""``Plan.explain()``: what a plan sends, what it applies on the client, and what it costs.

Rendering only: the estimates are the compile's (``Plan.estimate``, the candidates' requests,
``Plan.needs``), priced at the run's ``max_tps``. Values stay hidden unless asked for (PHI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from healthimaging_df.plan.facts import DatastoreStats
    from healthimaging_df.plan.model import Chain, Plan


def explain(plan: Plan, show_values: bool = False, max_tps: float | None = None) -> str:
    """A readable account of *plan*, costs priced at *max_tps* (else the plan's own pace)."""
    tps = max_tps if max_tps is not None else plan.facts.max_tps
    if plan.parts:
        return _union(plan, show_values, tps)
    lines = [f"Plan for datastore {plan.datastore_id}"]
    if plan.note:
        lines.append(f"  {plan.note}")
    lines += _known(plan)
    lines += _weighed(plan, tps)
    lines += [f"  {note}" for note in plan.access_notes]
    if plan.qido is not None:
        lines += plan.qido.explain_lines(show_values)
        lines.append("  the plan QIDO-RS replaces (it runs when QIDO-RS cannot answer):")
    lines += _chains(plan, show_values)
    lines += _result(plan, show_values)
    lines += _cost(plan, tps)
    return "\n".join(lines)


def _known(plan: Plan) -> list[str]:
    """What the plan was compiled knowing: the datastore's size, what the run measures first."""
    lines = []
    stats = plan.facts.stats
    if stats is not None:
        lines.append(f"  datastore size: {_size(stats)}")
    if not plan.needs.empty:
        lines.append(f"  measured first, at run time (about {plan.needs.requests()} requests):")
        lines += [f"    {line}" for line in plan.needs.describe()]
    return lines


def _size(stats: DatastoreStats) -> str:
    how = {
        "scan": "exact, from a full scan",
        "probe": "estimated by a probe",
        "given": "as given",
    }.get(stats.source, f"from {stats.source}")
    extra = ""
    if stats.non_primary is not None:
        extra = f", {stats.non_primary:,} of them non-primary"
    return f"{stats.image_sets:,} image sets{extra} ({how})"


def _weighed(plan: Plan, tps: float | None) -> list[str]:
    if not plan.candidates:
        return []
    lines = ["  access paths weighed:"]
    lines += [f"    {c.describe(tps)}" for c in plan.candidates]
    if plan.wants_statistics and plan.facts.stats is None:
        lines.append(
            "    (the datastore's size is unknown: the run reads a previous scan's statistics "
            "or measures it first, see above)"
        )
    return lines


def _chains(plan: Plan, show_values: bool) -> list[str]:
    count = len(plan.chains)
    lines = [f"  SearchImageSets request chains: {count}"]
    if plan.pushed:
        lines.append("  pushed down to the API:")
        lines += [f"    {p.describe(show_values)}" for p in plan.pushed]
    if count > 1 and plan.chains[0].long:
        lines.append(
            f"    (the range as {count} sub-ranges of its own key: one chain each; then one "
            "updatedAt search from the run's start, a request when nothing changed, reads again "
            "what an edit may have moved into a sub-range already read)"
        )
    elif count > 1:
        lines.append(f"    (IN list fanned out: one chain per value, {count} chains)")
    if plan.chains and plan.chains[0].sort:
        sort = plan.chains[0].sort
        lines.append(f"    sort: {sort['sortField']} {sort['sortOrder']}")
    window = plan.chains[0].window if plan.chains else None
    if plan.chains and plan.chains[0].lazy:
        lines.append(_split_line(plan.chains[0]))
    elif window is not None:
        low, high = window
        lines.append(
            f"  exhaustive scan: createdAt {low:%Y-%m-%dT%H:%M:%SZ} .. {high:%Y-%m-%dT%H:%M:%SZ}"
            " read from both ends (createdAt ASC and DESC) and split at run time while workers"
            " are free; windows run concurrently under max_tps"
        )
    client_side = [p for p in plan.predicates if p not in plan.pushed]
    lines.append("  applied on the client, exactly:")
    lines += [f"    {p.describe(show_values)}" for p in client_side] or ["    (nothing else)"]
    if plan.pushed:
        lines.append("    + pushed predicates re-checked (timestamps to the microsecond)")
    return lines


def _split_line(chain: Chain) -> str:
    """How a filtered chain is split: createdAt windows as its second filter, from its first page."""
    kind = next(iter(chain.filters[0]["values"][0]), "?") if chain.filters else "?"
    pair = (
        " (an ID with createdAt: the documented pair)"
        if chain.filters and chain.filters[0]["operator"] == "EQUAL"
        else " (a range with createdAt, not documented: verified by the first split; refused, "
        "the range is read from its two ends, which need no second filter)"
    )
    start = (
        "starts with two readers, from its oldest and newest end (createdAt ASC and DESC, "
        "its own filter alone)"
        if chain.long
        else "starts with one reader (createdAt ASC); a chain with pages left gains a reader from "
        "its newest end (createdAt DESC)"
    )
    return (
        f"  split while it adds throughput: each chain on {kind} {start} and splits at whole "
        "seconds, each new reader adding createdAt BETWEEN as the "
        f"second filter{pair}; readers run concurrently under max_tps"
    )


def _result(plan: Plan, show_values: bool, union: bool = False) -> list[str]:
    order = "ascending" if plan.ascending else "descending"
    if plan.sort_pushed:
        where = (
            "sorted by the API" if len(plan.chains) == 1 else "each chain sorted by the API, merged"
        )
    else:
        where = "pages read by createdAt ascending, sorted on the client"
    which = ", whichever queries it matches," if union else ""
    lines = [
        f"  result: one row per imageSetId (highest version){which} ordered by "
        f"{plan.sort_column} {order} ({where}; ties by imageSetId)"
    ]
    if plan.limit is not None:
        how = (
            "each chain stops once it holds enough matches"
            if plan.stops_early
            else "every page is read first"
        )
        of = " of the union" if union else ""
        lines.append(f"  limit: first {plan.limit} rows{of}; {how}")
    return lines


def _cost(plan: Plan, tps: float | None) -> list[str]:
    """The requests the run sends, as well as the facts tell, at the run's pace."""
    count = len(plan.chains)
    if not count and plan.qido is None:
        return []
    pace = "unpaced" if tps is None else f"at {tps:g} TPS"
    if plan.qido is not None:
        replaced = plan.qido.replaced
        tail = "" if replaced is None else f"; the plan it replaces: about {replaced:,.0f}"
        return [
            f"  expected requests: at least {2 * len(plan.qido.searches)} for QIDO-RS, then the "
            f"chains its answer becomes and the sweep{tail} ({pace})"
        ]
    if plan.estimate is not None:
        measured = plan.needs.requests()
        extra = f", plus about {measured} measuring first" if measured else ""
        seconds = "" if tps is None else f", about {plan.estimate / tps:,.1f} s"
        return [f"  expected requests: about {plan.estimate:,.0f}{extra} ({pace}{seconds})"]
    more = "; more as windows split" if plan.windowed or plan.split_chains else ""
    why = (
        "a size is unknown until measured"
        if plan.facts.for_run
        else "the datastore's size is not known to this explain (with client=, explain() reads "
        "the statistics a run would)"
    )
    return [f"  expected requests: at least {count} (50 image sets per page{more}); {why}"]


def _union(plan: Plan, show_values: bool, tps: float | None) -> str:
    """Each query's chains and client-side predicates, then what the union applies."""
    count = len(plan.chains)
    lines = [
        f"Plan for datastore {plan.datastore_id}",
        f"  union (OR) of {len(plan.parts)} queries: SearchImageSets request chains: {count}",
    ]
    lines += _known(plan)
    first = 0
    for number, part in enumerate(plan.parts, 1):
        span = len(part.chains)
        which = f"chains {first}..{first + span - 1}" if span > 1 else f"chain {first}"
        which = which if span else "no chain"
        lines.append(f"  query {number} ({which}):")
        first += span
        body = explain(part, show_values, tps).splitlines()[1:]
        lines += [
            f"  {line}"
            for line in body
            if not line.startswith(("  result:", "  limit:", "  expected requests:"))
        ]
    lines.append(
        "  applied on the client, exactly: a row is kept if its latest copy read matches "
        f"any of the {len(plan.parts)} queries (all of query 1's conditions, or all of "
        "query 2's, ...)"
    )
    lines += _result(plan, show_values, union=True)
    lines += _cost(plan, tps)
    return "\n".join(lines)
