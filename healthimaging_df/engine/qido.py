"""The QIDO-RS step of a plan, run: its searches, then the SearchImageSets plan on their answer.

The planner decided everything it could before a request (``plan.qido``: the searches, their
budget of records, the non-primary sweep, sized; the plan it replaces as the plan's chains).
:func:`run_step` sends the searches and hands the answer to the pure ``plan.resolve``:

- every page is checked (``dicomweb.check_page``): a JSON list of DICOM JSON objects, each with
  the UIDs the answer is resolved by; a malformed page is retried, then a typed error;
- a search ends on an empty page only, so a server that returns fewer records than asked
  costs a request, never rows;
- past the budget of records the plan it replaces is cheaper: abandoned, that plan runs;
- a result that may be truncated (exactly 10,000 records, the older cap; past the largest
  offset; a ``Warning`` header) is split by StudyDate halves when the query bounds
  ``StudyDateTime`` and the caller let study-level keys go to QIDO-RS, else abandoned; with
  ``strategy="qido"`` a truncation raises ``DICOMwebTruncatedError``;
- DICOMweb denied (403), absent (404), unreachable (DNS, TLS, refused) or broken after every
  retry: in ``auto`` the plan it replaces runs, a ``DICOMwebUnavailableWarning`` says why once
  per endpoint and region, and a lasting refusal is remembered (``statistics.remember_access``);
  a forced ``using("qido")`` raises the typed error instead.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import replace
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from healthimaging_df import aws
from healthimaging_df.dicomweb import QidoClient, make_qido_client, query_params, unavailable
from healthimaging_df.engine import statistics
from healthimaging_df.errors import (
    DICOMwebError,
    DICOMwebTruncatedError,
    DICOMwebUnavailableError,
    DICOMwebUnavailableWarning,
)
from healthimaging_df.plan import (
    Needs,
    Plan,
    QidoSearch,
    QidoStep,
    fall_back,
    resolve,
    whole_scan,
)
from healthimaging_df.plan.qido import RESOLVE_TAGS, answer_keys

if TYPE_CHECKING:
    from healthimaging_df.engine.prepared import Run

log = logging.getLogger(__name__)

MAX_SPLITS = 64  # StudyDate sub-ranges at most, before the scan is cheaper anyway
# Attempts per QIDO-RS request: an optional path gives up sooner than the one that always exists
# (about 3.5 s of backoff before the plan it replaces runs), and a DNS or TLS failure at once.
ATTEMPTS = 4
RETRY_BASE = 1.0  # backoff scale in seconds (tests make it small)


def default_client(run: Run) -> QidoClient:
    """The QIDO-RS client of a run: the search client's credentials and region, its TPS."""
    return make_qido_client(
        run.client,
        dicomweb_endpoint_url=run.dicomweb_endpoint_url,
        max_tps=run.fetch.max_tps,
        max_attempts=ATTEMPTS,
        retry_base=RETRY_BASE,
    )


# Replaceable (tests set a client whose record_cap matches the local service's setting).
CLIENT_FACTORY: Callable[[Run], QidoClient] = default_client
_WARNED: set[tuple[str, str]] = set()  # (endpoint, region) said in this process
_WARNED_LOCK = threading.Lock()


class _Abandon(Exception):
    """The QIDO-RS step cannot answer cheaper or completely: the plan it replaces runs."""

    def __init__(self, reason: str, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated


class _Budget:
    """What a step may read before the plan it replaces is cheaper, and what it sent so far.

    Records (a budget for when that plan's cost is unknown), and chains its answer needs.
    """

    def __init__(self, step: QidoStep) -> None:
        self.records = step.budget
        replaced = None if step.forced else step.replaced  # forced: never abandoned for cost
        self.chains = None if replaced is None else replaced - step.sweep.requests
        self.level = step.level
        self.read = 0
        self.requests = 0
        self.keys: dict[str, set[str]] = {}

    def remaining(self) -> int | None:
        return None if self.records is None else max(self.records - self.read, 0) + 1

    def check(self, records: list[dict[str, Any]]) -> None:
        """Stop as soon as the answer so far needs more chains than the replaced plan costs."""
        if self.chains is None:
            return
        for column, values in answer_keys(records, self.level).items():
            self.keys.setdefault(column, set()).update(values)
        if self.keys and min(len(v) for v in self.keys.values()) >= self.chains:
            fewest = min(len(v) for v in self.keys.values())
            raise _Abandon(f"its answer needs {fewest:,}+ chains: the plan it replaces is cheaper")


def run_step(plan: Plan, run: Run) -> Plan:
    """Run *plan*'s QIDO-RS step; return the SearchImageSets plan that answers the query."""
    step = plan.qido
    assert step is not None
    access = plan.facts.qido
    if access.state in ("no_endpoint", "not_installed"):  # only a forced step gets this far
        raise DICOMwebUnavailableError(access.reason or access.state)
    qido = CLIENT_FACTORY(run)
    budget = _Budget(step)
    try:
        records = _run(step, qido, plan.datastore_id, budget)
    except _Abandon as stop:
        if step.forced and stop.truncated:
            raise DICOMwebTruncatedError("SearchDICOM", budget.read, stop.reason) from None
        log.info("QIDO-RS step abandoned after %d request(s): %s", qido.requests_sent, stop.reason)
        return fall_back(
            plan, f"QIDO-RS abandoned after {qido.requests_sent} request(s) ({stop.reason})"
        )
    except DICOMwebError as error:
        if step.forced:
            raise
        return _unavailable(plan, qido, error)
    statistics.remember_access(qido.endpoint_url, qido.region, "available", None, "a search")
    resolution = resolve(plan, records, budget.requests)
    if resolution.plan is None:  # many keys, and the size of the plan replaced unknown
        plan = _measured(plan, run, resolution.needs)
        resolution = resolve(plan, records, budget.requests)
    assert resolution.plan is not None
    return resolution.plan


def _measured(plan: Plan, run: Run, needs: Needs) -> Plan:
    """*plan* with the datastore's size measured (a probe), for choosing how to resolve."""
    scan = whole_scan(fall_back(plan, ""))
    needs = replace(needs, probe_scan=None if scan is None else scan)
    limiter = aws.limiter_for(run.client, aws.SEARCH, run.fetch.max_tps)
    gathered = statistics.gather(run.client, plan.datastore_id, needs, plan.facts, limiter)
    facts = replace(gathered.facts, probe_window=None, probe_cuts=())  # its pages are not kept
    return replace(plan, facts=facts)


def _unavailable(plan: Plan, qido: QidoClient, error: DICOMwebError) -> Plan:
    """The plan QIDO-RS replaces, after saying once why QIDO-RS could not be used here."""
    reason = unavailable(error)
    words = reason or (
        f"{error.code}" + (f" (HTTP {error.status})" if error.status else "") + " after retries"
    )
    if reason is not None:
        statistics.remember_access(
            qido.endpoint_url, qido.region, "unavailable", reason, "a search"
        )
    key = (qido.endpoint_url, qido.region)
    with _WARNED_LOCK:
        first = key not in _WARNED
        _WARNED.add(key)
    if first:
        remembered = "; remembered for an hour (explain() shows it)" if reason else ""
        warnings.warn(
            f"QIDO-RS unavailable to this caller: {words}; the query ran on SearchImageSets "
            f"alone (exact, in more requests){remembered}",
            DICOMwebUnavailableWarning,
            stacklevel=2,
        )
    log.info("QIDO-RS unavailable (%s): the plan it replaces runs", words)
    return fall_back(plan, f"QIDO-RS not used: {words}; SearchImageSets alone")


def forget_warnings() -> None:
    """Say the next refusal again (tests; a new process does so anyway)."""
    with _WARNED_LOCK:
        _WARNED.clear()


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
    params = query_params(search.level, dict(search.match), includefield=search.fields)
    required = [RESOLVE_TAGS["StudyInstanceUID"]]
    if search.level == "series":
        required.append(RESOLVE_TAGS["SeriesInstanceUID"])
    result = qido.search(
        datastore_id,
        search.level,
        params,
        max_records=budget.remaining(),
        on_truncation="report",
        required=required,
        on_page=budget.check,
    )
    budget.requests += result.requests
    budget.read += len(result.records)
    if budget.records is not None and budget.read > budget.records:
        raise _Abandon(f"more than {budget.records:,} records: the plan it replaces is cheaper")
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
