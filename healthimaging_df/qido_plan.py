"""The QIDO-RS step of a plan, run at run time: searches, then a SearchImageSets plan on their answer.

``plan.compile_plan`` stays pure: a plan whose access is ``"qido"`` carries the QIDO-RS searches
(``Plan.qido``) and, as its chains, the SearchImageSets-only plan. :func:`resolve` runs the
searches and compiles the plan that actually runs:

1. The searches run with a budget of records: past it the scan is cheaper (ten records per
   request of the scan, from the datastore's cached statistics; 10,000 records when none).
2. A result that may be truncated (a full page at the older revision's 10,000 cap, at the
   largest offset, or a ``Warning`` header) is split by StudyDate halves when the query bounds
   ``StudyDateTime`` (every row it keeps then has a valid StudyDate), else abandoned.
3. The studies, series or patients found (whichever are fewest) become an IN list that the
   planner fans out on (or, when that is dearer, the scan runs). QIDO-RS sees primary image
   sets only, and a non-primary copy (a conflict) may differ from its primary in the very
   attribute matched, so one more chain sweeps ``isPrimary=false`` (with the query's pushable
   range), unless the query keeps primary image sets only. Every predicate of the query is
   applied exactly on the client.

Abandoned (over budget, or truncated and not splittable), the SearchImageSets-only plan runs;
with ``strategy="qido"`` a truncation raises ``DICOMwebTruncatedError`` instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any

from healthimaging_df import aws, predicates, statistics
from healthimaging_df.dicomweb import QidoClient, make_qido_client, query_params
from healthimaging_df.errors import DICOMwebTruncatedError, QueryValidationError
from healthimaging_df.plan import (
    QIDO_RECORDS,
    Candidate,
    Chain,
    DatastoreStats,
    Plan,
    QidoSearch,
    QidoStep,
    compile_plan,
    scan_requests,
)

log = logging.getLogger(__name__)

NO_STATS_RECORDS = 10_000  # records read before giving up when the scan's cost is unknown
RECORDS_PER_SCAN_REQUEST = 10  # budget: records worth one request of the scan
MAX_SPLITS = 64  # StudyDate sub-ranges at most, before the scan is cheaper anyway
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "PatientID": "00100020"}
# Narrowest first: the planner's tie-break when two keys give as many chains.
RESOLVE_ORDER = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID")


def default_client(client: Any, max_tps: float | None) -> QidoClient:
    """The QIDO-RS client of a run: the search client's credentials, endpoint and TPS."""
    return make_qido_client(client, max_tps=max_tps)


# Replaceable (tests set a client whose record_cap matches the local service's setting).
CLIENT_FACTORY: Callable[[Any, float | None], QidoClient] = default_client


class _Abandon(Exception):
    """The QIDO-RS step cannot answer cheaper or completely: run the scan instead."""

    def __init__(self, reason: str, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated


class _Budget:
    def __init__(self, records: int | None) -> None:
        self.records = records
        self.read = 0
        self.requests = 0

    def remaining(self) -> int | None:
        return None if self.records is None else max(self.records - self.read, 0) + 1


def resolve(plan: Plan, client: Any, max_tps: float | None) -> Plan:
    """Run *plan*'s QIDO-RS step and return the SearchImageSets plan that answers the query."""
    step = plan.qido
    assert step is not None
    forced = step.forced
    stats = statistics.cached(client, plan.datastore_id)
    scan_cost = scan_requests(plan, stats)
    if forced:
        records: int | None = None
    elif scan_cost is not None:
        records = max(QIDO_RECORDS, math.ceil(scan_cost * RECORDS_PER_SCAN_REQUEST))
    else:
        records = NO_STATS_RECORDS
    budget = _Budget(records)
    qido = CLIENT_FACTORY(client, max_tps)
    try:
        found = _run(step, qido, plan.datastore_id, budget)
    except _Abandon as stop:
        if forced and stop.truncated:
            raise DICOMwebTruncatedError("SearchDICOM", budget.read, stop.reason) from None
        log.info("QIDO-RS step abandoned after %d request(s): %s", budget.requests, stop.reason)
        fallback = _recompile(plan, (), stats, client, max_tps=max_tps)
        note = f"QIDO-RS abandoned after {budget.requests} request(s) ({stop.reason})"
        return replace(fallback, access="qido", note=note, candidates=plan.candidates)
    return _resolved(plan, found, budget, stats, client, max_tps)


def _run(step: QidoStep, qido: QidoClient, datastore_id: str, budget: _Budget) -> list[Any]:
    records: list[Any] = []
    for search in step.searches:
        records += _search(search, step, qido, datastore_id, budget, splits=[0])
    return records


def _search(
    search: QidoSearch,
    step: QidoStep,
    qido: QidoClient,
    datastore_id: str,
    budget: _Budget,
    splits: list[int],
) -> list[Any]:
    fields = ["PatientID", "StudyInstanceUID"]
    if search.level == "series":
        fields.append("SeriesInstanceUID")
    params = query_params(search.level, dict(search.match), includefield=fields)
    result = qido.search(
        datastore_id,
        search.level,
        params,
        max_records=budget.remaining(),
        on_truncation="report",
    )
    budget.requests += result.requests
    budget.read += len(result.records)
    if budget.records is not None and budget.read > budget.records:
        raise _Abandon(f"more than {budget.records:,} records: the scan is cheaper")
    if not result.truncated:
        return result.records
    halves = _split(dict(search.match).get("StudyDate")) if step.date_range else None
    splits[0] += 1
    if halves is None or splits[0] > MAX_SPLITS:
        raise _Abandon(result.reason or "the result may be truncated", truncated=True)
    budget.read -= len(result.records)  # read again, narrower
    out: list[Any] = []
    for half in halves:
        match = tuple(sorted({**dict(search.match), "StudyDate": half}.items()))
        out += _search(QidoSearch(search.level, match), step, qido, datastore_id, budget, splits)
    return out


def _split(text: str | None) -> tuple[str, str] | None:
    """A StudyDate range ``A-B`` as two halves, or None when it is one day (or not a range)."""
    if text is None or "-" not in text:
        return None
    low_text, high_text = text.split("-")
    if len(low_text) != 8 or len(high_text) != 8:
        return None
    low = date(int(low_text[:4]), int(low_text[4:6]), int(low_text[6:]))
    high = date(int(high_text[:4]), int(high_text[4:6]), int(high_text[6:]))
    if high <= low:
        return None
    mid = low + (high - low) // 2
    after = mid + timedelta(days=1)
    return f"{low:%Y%m%d}-{mid:%Y%m%d}", f"{after:%Y%m%d}-{high:%Y%m%d}"


def _keys(records: list[Any], level: str) -> dict[str, set[str]]:
    """Per resolvable column, the distinct values found (a column some record lacks is left out)."""
    columns = [c for c in RESOLVE_ORDER if level == "series" or c != "SeriesInstanceUID"]
    keys: dict[str, set[str]] = {}
    for column in columns:
        values: set[str] = set()
        for record in records:
            element = record.get(_TAGS[column])
            value = element.get("Value") if isinstance(element, dict) else None
            text = value[0] if isinstance(value, list) and value else None
            if not isinstance(text, str) or not text:
                break
            values.add(text)
        else:
            keys[column] = values
    return keys


def _resolved(
    plan: Plan,
    records: list[Any],
    budget: _Budget,
    stats: DatastoreStats | None,
    client: Any,
    max_tps: float | None,
) -> Plan:
    step = plan.qido
    assert step is not None
    keys = _keys(records, step.level)
    if not records:
        empty = _recompile(plan, (), stats, client, measure=False)
        chains = () if _primary_only(plan) else _non_primary_sweep(plan, 0)
        note = f"QIDO-RS matched nothing in {budget.requests} request(s)" + (
            "; only the non-primary image sets are read" if chains else ": no SearchImageSets call"
        )
        return replace(
            empty, chains=chains, access="qido", note=note, candidates=_found(plan, budget)
        )
    order = sorted(keys, key=lambda c: (len(keys[c]), RESOLVE_ORDER.index(c)))
    for column in order:
        try:
            extra = predicates.build(column, "in", sorted(keys[column]))
        except QueryValidationError:
            continue  # a value SearchImageSets would refuse: resolve by another key
        resolved = _recompile(plan, (extra,), stats, client, max_tps=max_tps)
        found = f"QIDO-RS found {len(records):,} record(s) in {budget.requests} request(s)"
        candidates = _found(plan, budget) + resolved.candidates
        if resolved.access == "scan":
            scan = _recompile(plan, (), stats, client, max_tps=max_tps)
            note = f"{found}; but scanning is cheaper than {len(keys[column]):,} chains"
            return replace(scan, access="qido", note=note, candidates=candidates)
        chains = resolved.chains
        sweep = "" if _primary_only(plan) else "; plus a sweep of the non-primary image sets"
        if sweep:
            chains += _non_primary_sweep(plan, len(chains))
        note = f"{found}; resolved by {column} ({len(keys[column]):,} value(s)){sweep}"
        # The UID chains read a superset of the matches: the query's own predicates decide.
        return replace(
            resolved,
            chains=chains,
            predicates=plan.predicates,
            pushed=resolved.pushed,
            access="qido",
            note=note,
            candidates=candidates,
        )
    fallback = _recompile(plan, (), stats, client, max_tps=max_tps)
    note = "QIDO-RS answer had no key SearchImageSets can filter on: scan"
    return replace(fallback, access="qido", note=note, candidates=plan.candidates)


def _now(plan: Plan) -> datetime | None:
    """The *now* *plan* was compiled with, as far as its windows show (so a rerun matches)."""
    windows = [c.window for c in plan.chains if c.window is not None]
    if not windows:
        return None
    return windows[0][1] - timedelta(days=2)  # compile_plan's unbounded scans end "tomorrow"


def _primary_only(plan: Plan) -> bool:
    """Whether the query itself keeps primary image sets only (QIDO-RS sees all of them)."""
    return any(
        p.column == "isPrimary" and p.op in ("eq", "in") and set(p.values) == {True}
        for p in plan.predicates
    )


def _non_primary_sweep(plan: Plan, first: int) -> tuple[Chain, ...]:
    """Chains reading every non-primary image set the query's pushable ranges admit.

    QIDO-RS sees primary image sets only, and a non-primary copy (a conflict) may differ from
    its primary in exactly the attribute matched, or have no primary left: only SearchImageSets
    ``isPrimary=false`` finds them all.
    """
    flag = predicates.build("isPrimary", "eq", (False,))
    sweep = compile_plan(
        plan.datastore_id,
        (*(p for p in plan.predicates if p.column != "isPrimary"), flag),
        plan.sort_column,
        plan.ascending,
        plan.limit,
        now=_now(plan),
        strategy="search",
    )
    return tuple(replace(c, index=first + i) for i, c in enumerate(sweep.chains))


def _found(plan: Plan, budget: _Budget) -> tuple[Candidate, ...]:
    return (Candidate(f"QIDO-RS step ({budget.requests} request(s) sent)", budget.requests, True),)


def _recompile(
    plan: Plan,
    extra: tuple[predicates.Predicate, ...],
    stats: DatastoreStats | None,
    client: Any,
    measure: bool = True,
    max_tps: float | None = None,
) -> Plan:
    """The SearchImageSets-only plan of *plan*'s query plus *extra* (fan-out or scan, weighed)."""

    def compile(given: DatastoreStats | None) -> Plan:
        return compile_plan(
            plan.datastore_id,
            plan.predicates + extra,
            plan.sort_column,
            plan.ascending,
            plan.limit,
            now=_now(plan),
            strategy="search",
            stats=given,
        )

    resolved = compile(stats)
    if resolved.wants_statistics and stats is None and measure:
        found = statistics.cached(client, plan.datastore_id)
        if found is None:
            limiter = aws.RateLimiter(max_tps) if max_tps else None
            found = statistics.probe(client, plan.datastore_id, limiter)
            statistics.remember(client, plan.datastore_id, found)
        resolved = compile(found)
    return resolved
