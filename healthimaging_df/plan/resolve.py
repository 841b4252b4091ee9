"""A QIDO-RS answer becomes the SearchImageSets plan that runs: pure, like compiling.

The studies, series or patients found (whichever give the fewest chains) become an IN list the
query is compiled with (fan-out, or a scan when that is cheaper), plus the non-primary sweep;
when those cost as much as the plan the step replaces, that plan runs instead. Every predicate
of the query is applied exactly on the client, so the chains may read a superset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from healthimaging_df.errors import QueryValidationError
from healthimaging_df.plan import costs, predicates
from healthimaging_df.plan.compile import compile_spec, presplit_for_run, replaced_cost
from healthimaging_df.plan.facts import Needs
from healthimaging_df.plan.model import Candidate, Chain, Plan
from healthimaging_df.plan.qido import RESOLVE_ORDER, QidoStep, answer_keys, fallback_of


@dataclass(frozen=True)
class Resolution:
    """The plan that runs, or what must be measured first (the datastore's size)."""

    plan: Plan | None
    needs: Needs = field(default_factory=Needs)


def resolve(plan: Plan, records: list[dict[str, object]], requests: int) -> Resolution:
    """The SearchImageSets plan answering *plan*'s query, given its QIDO-RS step's *records*.

    *requests* is what the step sent (for ``explain()``). Needs the datastore's size only when
    the answer holds more than a few keys and neither the compile nor the facts price the scan.
    """
    step = plan.qido
    assert step is not None
    assert plan.spec is not None
    found = Candidate(f"QIDO-RS step ({requests} request(s) sent)", float(requests), True)
    text = f"QIDO-RS found {len(records):,} record(s) in {requests} request(s)"
    if not records:
        return Resolution(_only_sweep(plan, step, found, requests))
    keys = answer_keys(records, step.level)
    for column in sorted(keys, key=lambda c: (len(keys[c]), RESOLVE_ORDER.index(c))):
        try:
            extra = predicates.build(column, "in", sorted(keys[column]))
        except QueryValidationError:
            continue  # a value SearchImageSets would refuse: resolve by another key
        spec = plan.spec
        group = (*spec.groups[0], extra)
        fan = compile_spec(replace(spec, groups=(group,), strategies=("search",)), plan.facts)
        if fan.wants_statistics and plan.facts.stats is None:
            return Resolution(None, Needs(size=True))
        replaced = replaced_cost(step, fallback_of(plan), plan.facts)
        fan_cost = costs.plan_requests(fan, plan.facts) or float(len(fan.chains))
        total = fan_cost + step.sweep.requests
        if fan.access == "scan" or (replaced is not None and total >= replaced):
            note = f"{text}; but the plan it replaces is cheaper than {len(keys[column]):,} " + (
                f"chains and the non-primary sweep ({step.sweep.label})"
                if step.sweep.requests
                else "chains"
            )
            weighed: tuple[Candidate, ...] = (
                found,
                Candidate(f"fan-out ({len(fan.chains)} chains) plus the non-primary sweep", total),
                Candidate("the plan QIDO-RS replaces", replaced, True),
            )
            return Resolution(_fallback(plan, note, weighed))
        tail = (
            f"; plus a sweep of the non-primary image sets ({step.sweep.label})"
            if step.sweep.swept
            else ""
        )
        note = f"{text}; resolved by {column} ({len(keys[column]):,} value(s)){tail}"
        candidates = (found, *fan.candidates, _sweep_candidate(step, chosen=True))
        chains = (*fan.chains, *_numbered(step.sweep.chains, len(fan.chains)))
        # The UID chains read a superset of the matches: the query's own predicates decide.
        resolved = replace(
            fan,
            chains=chains,
            predicates=plan.predicates,
            access="qido",
            note=note,
            candidates=candidates,
            access_notes=plan.access_notes,
            spec=plan.spec,
        )
        return Resolution(resolved)
    note = "QIDO-RS answer had no key SearchImageSets can filter on: the plan it replaces runs"
    return Resolution(_fallback(plan, note, plan.candidates))


def fall_back(plan: Plan, reason: str) -> Plan:
    """*plan*'s SearchImageSets plan, run because its QIDO-RS step could not answer (*reason*)."""
    return _fallback(plan, reason, plan.candidates)


def _fallback(plan: Plan, note: str, candidates: tuple[Candidate, ...]) -> Plan:
    fallback = presplit_for_run(fallback_of(plan), plan.facts)
    estimate = costs.plan_requests(fallback, plan.facts)
    return replace(fallback, access="qido", note=note, candidates=candidates, estimate=estimate)


def _only_sweep(plan: Plan, step: QidoStep, found: Candidate, requests: int) -> Plan:
    note = f"QIDO-RS matched nothing in {requests} request(s)" + (
        f"; only the non-primary image sets are read ({step.sweep.label})"
        if step.sweep.chains
        else ": no SearchImageSets call"
    )
    return replace(
        fallback_of(plan),
        chains=_numbered(step.sweep.chains, 0),
        access="qido",
        note=note,
        candidates=(found, _sweep_candidate(step, chosen=True)),
    )


def _sweep_candidate(step: QidoStep, chosen: bool) -> Candidate:
    return Candidate(f"non-primary sweep ({step.sweep.label})", step.sweep.requests, chosen)


def _numbered(chains: tuple[Chain, ...], first: int) -> tuple[Chain, ...]:
    return tuple(replace(c, index=first + i) for i, c in enumerate(chains))
