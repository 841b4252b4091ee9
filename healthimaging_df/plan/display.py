"""A plan in a notebook: the access paths weighed, with requests and seconds at a rate; no values.

``Plan.to_html(max_tps)`` and ``Plan.summary(max_tps)`` read from here. Every line describes a
shape (columns, operators, value counts, request estimates), never a value: predicates are shown
by ``Predicate.describe(show_values=False)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from healthimaging_df.core import display

if TYPE_CHECKING:
    from healthimaging_df.plan.model import Plan


def _at(requests: float, max_tps: float | None) -> str:
    """``about N requests, S s at T TPS`` (no seconds without a rate)."""
    if max_tps is None:
        return f"about {requests:,.0f} requests (no client-side rate limit: seconds unknown)"
    return f"about {requests:,.0f} requests, {requests / max_tps:,.1f} s at {max_tps:g} TPS"


def summary(plan: Plan, max_tps: float | None = None) -> list[tuple[str, str]]:
    """The plan as ``(label, text)`` rows, value-free; requests and seconds at *max_tps*."""
    rows: list[tuple[str, str]] = [("datastore", plan.datastore_id)]
    if plan.note:
        rows.append(("note", plan.note))
    rows.append(_access(plan, max_tps))
    if plan.qido is not None:
        rows.append(
            ("QIDO-RS first", f"{len(plan.qido.searches)} search(es), then SearchImageSets")
        )
    rows.append(("request chains", str(len(plan.chains))))
    if plan.parts:
        for number, part in enumerate(plan.parts, 1):
            pushed = "; ".join(p.describe(False) for p in part.pushed) or "(nothing)"
            rows.append((f"query {number}: pushed to the API", pushed))
    else:
        pushed = "; ".join(p.describe(False) for p in plan.pushed) or "(nothing)"
        rows.append(("pushed to the API", pushed))
    client = [p for p in plan.predicates if p not in plan.pushed]
    rows.append(
        (
            "applied on the client, exactly",
            "\n".join(p.describe(False) for p in client) or "(nothing else)",
        )
    )
    order = "ascending" if plan.ascending else "descending"
    rows.append(("order", f"{plan.sort_column} {order}, ties by imageSetId"))
    if plan.limit is not None:
        how = "chains stop early" if plan.stops_early else "every page is read first"
        rows.append(("limit", f"first {plan.limit} rows; {how}"))
    return rows


def _access(plan: Plan, max_tps: float | None) -> tuple[str, str]:
    """The access paths weighed, with their costs; or the one path and what it costs at least."""
    if plan.candidates:
        lines = []
        for c in plan.candidates:
            mark = "chosen" if c.chosen else "not chosen"
            cost = (
                "size of the datastore unknown" if c.requests is None else _at(c.requests, max_tps)
            )
            lines.append(f"{c.name}: {cost} ({mark})")
        if plan.wants_statistics and plan.facts.stats is None:
            lines.append(
                "(the datastore's size is unknown here: the run reads a previous scan's "
                "statistics or measures it first)"
            )
        return ("access paths weighed", "\n".join(lines))
    if plan.estimate is not None:
        return ("access path", f"one path, nothing to weigh: {_at(plan.estimate, max_tps)}")
    minimum = len(plan.chains)
    seconds = "" if max_tps is None else f", {minimum / max_tps:,.1f} s at {max_tps:g} TPS"
    return (
        "access path",
        f"one path, nothing to weigh: at least {minimum:,} request(s){seconds} (a request"
        " a page of 50"
        + ("; more as windows split" if plan.windowed or plan.split_chains else "")
        + "; the size is not known here)",
    )


def html(plan: Plan, max_tps: float | None = None) -> str:
    """:func:`summary` as an HTML table."""
    return display.section("Plan", summary(plan, max_tps))


def text(plan: Plan, max_tps: float | None = None) -> str:
    """:func:`summary` as plain text."""
    return display.plain("Plan", summary(plan, max_tps))
