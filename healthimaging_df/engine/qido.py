"""The QIDO-RS step of a plan, run at run time: searches, then a SearchImageSets plan on their answer.

``plan.compile_plan`` stays pure: a plan whose access is ``"qido"`` carries the QIDO-RS searches
(``Plan.qido``) and, as its chains, the SearchImageSets-only plan. :func:`resolve` runs the
searches and compiles the plan that actually runs:

1. Unless the query keeps primary image sets only, the sweep of the non-primary image sets
   (QIDO-RS sees primary ones only, and a non-primary copy, a conflict, may differ from its
   primary in the very attribute matched) is sized first: from the statistics, or from its first
   page (one request; two when that page is not the whole answer). When the searches plus that sweep cost as much as the scan, no
   QIDO-RS request is sent. A sweep of at most ``SWEEP_ONE_CHAIN_PAGES`` pages runs as one
   chain.
2. The searches run with a budget of records: past it the scan is cheaper (ten records per
   request the scan costs beyond the sweep, from the datastore's cached statistics; 10,000
   records when none).
3. A result that may be truncated (a full page at the older revision's 10,000 cap, at the
   largest offset, or a ``Warning`` header) is split by StudyDate halves when the query bounds
   ``StudyDateTime`` (every row it keeps then has a valid StudyDate), else abandoned.
4. The studies, series or patients found (whichever are fewest) become an IN list that the
   planner fans out on, plus the sweep; or, when those chains and the sweep cost as much as
   the scan, the scan runs. Every predicate of the query is applied exactly on the client.

Abandoned (over budget, or truncated and not splittable), the SearchImageSets-only plan runs;
with ``strategy="qido"`` a truncation raises ``DICOMwebTruncatedError`` instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any

from healthimaging_df import aws
from healthimaging_df.dicomweb import QidoClient, make_qido_client, query_params
from healthimaging_df.engine import statistics
from healthimaging_df.errors import DICOMwebTruncatedError, QueryValidationError
from healthimaging_df.plan import (
    PAGE_ROWS,
    QIDO_RECORDS,
    SCAN_OVERHEAD,
    STABLE_SORT,
    Candidate,
    Chain,
    DatastoreStats,
    Plan,
    QidoSearch,
    QidoStep,
    compile_plan,
    keeps_primary_only,
    predicates,
    scan_requests,
)

log = logging.getLogger(__name__)

NO_STATS_RECORDS = 10_000  # records read before giving up when the scan's cost is unknown
RECORDS_PER_SCAN_REQUEST = 10  # budget: records worth one request of the scan
MAX_SPLITS = 64  # StudyDate sub-ranges at most, before the scan is cheaper anyway
# A sweep estimated at most this many pages runs as one chain: every page full, no window's
# part-empty last page (windows would add up to one request per worker for little speed).
SWEEP_ONE_CHAIN_PAGES = 20
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
    scan_cost = _scan_cost(plan, client, stats, max_tps)
    sweep = _sweep(plan, client, stats, max_tps)
    if not forced and scan_cost is not None and len(step.searches) + sweep.requests >= scan_cost:
        fallback = _recompile(plan, (), stats, client, max_tps=max_tps).plan
        note = (
            f"QIDO-RS not sent: its {len(step.searches)} search(es) and the sweep of the "
            f"non-primary image sets ({sweep.label}) cost as much as the scan"
        )
        candidates = (*plan.candidates, sweep.candidate(chosen=False))
        return replace(fallback, access="qido", note=note, candidates=candidates)
    if forced:
        records: int | None = None
    elif scan_cost is not None:
        left = max(scan_cost - sweep.requests, 0.0)  # what the fan-out may cost to still win
        records = max(QIDO_RECORDS, math.ceil(left * RECORDS_PER_SCAN_REQUEST))
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
        fallback = _recompile(plan, (), stats, client, max_tps=max_tps).plan
        note = f"QIDO-RS abandoned after {budget.requests} request(s) ({stop.reason})"
        return replace(fallback, access="qido", note=note, candidates=plan.candidates)
    return _resolved(plan, found, budget, stats, client, max_tps, sweep, scan_cost)


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
    sweep: _Sweep,
    scan_cost: float | None,
) -> Plan:
    step = plan.qido
    assert step is not None
    keys = _keys(records, step.level)
    found = _found(plan, budget)
    if not records:
        empty = _recompile(plan, (), stats, client, measure=False).plan
        note = f"QIDO-RS matched nothing in {budget.requests} request(s)" + (
            f"; only the non-primary image sets are read ({sweep.label})"
            if sweep.chains
            else ": no SearchImageSets call"
        )
        candidates = (*found, sweep.candidate(chosen=True))
        return replace(
            empty, chains=_numbered(sweep.chains, 0), access="qido", note=note,
            candidates=candidates,
        )  # fmt: skip
    order = sorted(keys, key=lambda c: (len(keys[c]), RESOLVE_ORDER.index(c)))
    for column in order:
        try:
            extra = predicates.build(column, "in", sorted(keys[column]))
        except QueryValidationError:
            continue  # a value SearchImageSets would refuse: resolve by another key
        resolved = _recompile(plan, (extra,), stats, client, max_tps=max_tps)
        known = resolved.stats
        text = f"QIDO-RS found {len(records):,} record(s) in {budget.requests} request(s)"
        candidates = (*found, *resolved.plan.candidates, sweep.candidate(chosen=True))
        chains = resolved.plan.chains
        scan = scan_cost if scan_cost is not None else scan_requests(plan, known)
        dearer = scan is not None and len(chains) + sweep.requests >= scan
        if resolved.plan.access == "scan" or dearer:
            fallback = _recompile(plan, (), known, client, max_tps=max_tps).plan
            candidates = (
                *found,
                Candidate(
                    f"fan-out ({len(chains)} chains) plus the non-primary sweep",
                    len(chains) + sweep.requests,
                    False,
                ),
                Candidate("scan", scan, True),
            )
            note = f"{text}; but scanning is cheaper than {len(keys[column]):,} chains" + (
                f" and the non-primary sweep ({sweep.label})" if sweep.requests else ""
            )
            return replace(fallback, access="qido", note=note, candidates=candidates)
        if sweep.chains:
            chains += _numbered(sweep.chains, len(chains))
        tail = (
            f"; plus a sweep of the non-primary image sets ({sweep.label})" if sweep.swept else ""
        )
        note = f"{text}; resolved by {column} ({len(keys[column]):,} value(s)){tail}"
        # The UID chains read a superset of the matches: the query's own predicates decide.
        return replace(
            resolved.plan,
            chains=chains,
            predicates=plan.predicates,
            access="qido",
            note=note,
            candidates=candidates,
        )
    fallback = _recompile(plan, (), stats, client, max_tps=max_tps).plan
    note = "QIDO-RS answer had no key SearchImageSets can filter on: scan"
    return replace(fallback, access="qido", note=note, candidates=plan.candidates)


def _now(plan: Plan) -> datetime | None:
    """The *now* *plan* was compiled with, as far as its windows show (so a rerun matches)."""
    windows = [c.window for c in plan.chains if c.window is not None]
    if not windows:
        return None
    return windows[0][1] - timedelta(days=2)  # compile_plan's unbounded scans end "tomorrow"


def _scan_cost(
    plan: Plan, client: Any, stats: DatastoreStats | None, max_tps: float | None
) -> float | None:
    """Requests the SearchImageSets-only plan needs.

    A scan narrowed by a filter the statistics cannot weigh (a ``StudyDateTime`` range: one
    chain, no createdAt window; the statistics know createdAt only) is sized by its first page
    (one or two requests, see ``statistics.probe_chain``); any other from the statistics (None without them).
    """
    if len(plan.chains) != 1 or plan.chains[0].window is not None or not plan.chains[0].filters:
        return scan_requests(plan, stats)
    limiter = aws.limiter_for(client, aws.SEARCH, max_tps)
    image_sets, _ = statistics.probe_chain(client, plan.datastore_id, plan.chains[0], limiter)
    return float(max(1, math.ceil(image_sets / PAGE_ROWS)))


@dataclass(frozen=True)
class _Sweep:
    """The chains reading the non-primary image sets QIDO-RS cannot see, and their estimate."""

    chains: tuple[Chain, ...]
    requests: float  # estimated (0 when nothing is swept)
    image_sets: int | None = None  # non-primary image sets the sweep reads, when measured
    exact: bool = False
    swept: bool = True  # False: the query keeps primary image sets only

    @property
    def label(self) -> str:
        """Its size for notes and ``explain()``: counts only, no values."""
        if not self.swept:
            return "none: primary image sets only"
        count = (
            "size unknown"
            if self.image_sets is None
            else f"{self.image_sets:,} image set(s)"
            if self.exact
            else f"about {self.image_sets:,} image set(s)"
        )
        shape = (
            "one chain"
            if len(self.chains) == 1 and self.chains[0].window is None
            else (f"{len(self.chains)} chain(s)" if self.chains else "no chain")
        )
        return f"{count}, {shape}, about {self.requests:,.0f} request(s)"

    def candidate(self, chosen: bool) -> Candidate:
        """Its line among the access paths weighed."""
        return Candidate(f"non-primary sweep ({self.label})", self.requests, chosen)


def _sweep(plan: Plan, client: Any, stats: DatastoreStats | None, max_tps: float | None) -> _Sweep:
    """The sweep of every non-primary image set the query's pushable ranges admit, sized.

    QIDO-RS sees primary image sets only, and a non-primary copy (a conflict) may differ from
    its primary in exactly the attribute matched, or have no primary left: only SearchImageSets
    ``isPrimary=false`` finds them all. Nothing narrows it soundly: the QIDO-RS answer's
    studies or patients would miss a conflicting copy whose primary does not match.

    Its size comes from the statistics (a whole-datastore sweep) or from its first page (one
    request, exact when that page is the whole answer; else one more for its last createdAt).
    A small sweep runs as one chain.
    """
    if keeps_primary_only(plan.predicates):
        return _Sweep((), 0.0, 0, True, swept=False)
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
    chains = sweep.chains
    if len(chains) != 1:  # several chains (an ID fan-out) or none: not sized
        return _Sweep(chains, float(len(chains)), None)
    (chain,) = chains
    whole = chain.window is not None and not chain.filters[1:] and _unbounded(plan, chain)
    image_sets: int | None = None
    exact = False
    if whole and stats is not None and stats.non_primary is not None:
        image_sets = stats.non_primary
    else:
        limiter = aws.limiter_for(client, aws.SEARCH, max_tps)
        image_sets, exact = statistics.probe_chain(client, plan.datastore_id, chain, limiter)
        if whole and stats is not None:
            statistics.remember(client, plan.datastore_id, replace(stats, non_primary=image_sets))
    pages = math.ceil(image_sets / PAGE_ROWS)
    if exact and image_sets == 0:
        return _Sweep((), 0.0, 0, True)  # its first page was the whole (empty) answer
    if chain.window is not None and pages <= SWEEP_ONE_CHAIN_PAGES:
        low, high = chain.window
        between = {"operator": "BETWEEN", "values": [{"createdAt": low}, {"createdAt": high}]}
        one = replace(chain, filters=(*chain.filters, between), sort=STABLE_SORT, window=None)
        return _Sweep((one,), float(max(pages, 1)), image_sets, exact)
    cost = float(max(pages, 1)) if chain.window is None else max(1.0, pages * SCAN_OVERHEAD)
    return _Sweep(chains, cost, image_sets, exact)


def _unbounded(plan: Plan, chain: Chain) -> bool:
    """Whether a windowed sweep spans the whole datastore (no createdAt range of the query)."""
    return chain.window is not None and not any(
        p.column == "createdAt" and p.op == "between" for p in plan.predicates
    )


def _numbered(chains: tuple[Chain, ...], first: int) -> tuple[Chain, ...]:
    return tuple(replace(c, index=first + i) for i, c in enumerate(chains))


def _found(plan: Plan, budget: _Budget) -> tuple[Candidate, ...]:
    return (Candidate(f"QIDO-RS step ({budget.requests} request(s) sent)", budget.requests, True),)


@dataclass(frozen=True)
class _Compiled:
    plan: Plan
    stats: DatastoreStats | None  # what the choice was made with (measured when it needed it)


def _recompile(
    plan: Plan,
    extra: tuple[predicates.Predicate, ...],
    stats: DatastoreStats | None,
    client: Any,
    measure: bool = True,
    max_tps: float | None = None,
) -> _Compiled:
    """The SearchImageSets-only plan of *plan*'s query plus *extra* (fan-out or scan, weighed).

    Returned with the statistics it was weighed with (measured here when the choice needed them).
    """

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
            limiter = aws.limiter_for(client, aws.SEARCH, max_tps)
            found = statistics.probe(client, plan.datastore_id, limiter)
            statistics.remember(client, plan.datastore_id, found)
        stats = found
        resolved = compile(found)
    return _Compiled(resolved, stats)
