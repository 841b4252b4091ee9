"""``doctor`` (``healthimaging_df.doctor``): a read-only check of a live setup in a few requests.

Credentials, region and endpoint resolution, the datastore's status, each permission the library
uses (SearchImageSets, GetImageSet, the DICOMweb searches; GetImageSetMetadata only against a
FREQUENT_ACCESS image set, else reported untested), whether DICOMweb answers, the botocore
model's features, round-trip latency and throttling seen. No request un-archives anything and
none writes. What it learns about DICOMweb feeds the capability cache the planner reads, so a
refusal found here is not paid for again by the next query. With ``conformance=True`` it also
runs the service contract checks (:mod:`healthimaging_df.conformance`).

>>> Report((Check("region", "ok", "eu-west-1"),)).to_json()
'{"checks": [{"name": "region", "status": "ok", "detail": "eu-west-1"}]}'
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from healthimaging_df import aws, conformance
from healthimaging_df.aws.errors import failure
from healthimaging_df.conformance import Check
from healthimaging_df.errors import DICOMwebError, QueryValidationError

if TYPE_CHECKING:
    from healthimaging_df.dicomweb import Level

_DATASTORE_ID = re.compile(r"[0-9a-z]{32}")
SEARCHING = ("credentials", "region", "SearchImageSets")  # what searching needs
CHECK_TPS = 5.0  # doctor's own pace for its DICOMweb searches: a few requests, gently


@dataclass(frozen=True)
class Report:
    """Every check, in order; ``exit_code`` is 0 when searching works, else 1."""

    checks: tuple[Check, ...]

    @property
    def searching_works(self) -> bool:
        """Whether the checks searching needs all passed."""
        return all(c.status == "ok" for c in self.checks if c.name in SEARCHING)

    @property
    def exit_code(self) -> int:
        """0 when searching works, 1 when it cannot."""
        return 0 if self.searching_works else 1

    def to_json(self) -> str:
        """``{"checks": [{"name": ..., "status": "ok" | "warn" | "fail", "detail": ...}]}``."""
        return json.dumps({"checks": [c.to_dict() for c in self.checks]})

    def table(self) -> str:
        """A readable table: one check a line."""
        width = max((len(c.name) for c in self.checks), default=4)
        lines = [f"{'check':<{width}}  status  detail"]
        lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in self.checks]
        verdict = "searching works" if self.searching_works else "searching does NOT work"
        lines.append(f"\n{verdict}")
        return "\n".join(lines)


@dataclass
class _Probe:
    """Round trips timed, and throttles botocore retried, while the checks ran."""

    seconds: list[float] = field(default_factory=list)
    throttled: int = 0

    def timed(self, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.seconds.append(time.perf_counter() - started)

    def count_throttle(self, response: Any = None, **_: Any) -> None:
        http = response[0] if isinstance(response, tuple) and response else None
        if getattr(http, "status_code", None) == 429:
            self.throttled += 1


def doctor(
    datastore_id: str,
    *,
    client: Any = None,
    boto3_session: Any = None,
    dicomweb_endpoint_url: str | None = None,
    conformance_checks: bool = False,
    max_tps: float | None = CHECK_TPS,
) -> Report:
    """Check a live setup, read-only, in a few requests; see the module's description.

    Parameters
    ----------
    datastore_id
        The datastore to check (32 characters).
    client, boto3_session
        As for ``Query.to_dataframe``.
    dicomweb_endpoint_url
        Where DICOMweb lives, when the client's endpoint is not AWS's own (see
        ``docs/dicomweb.md``).
    conformance_checks
        Also run the service contract checks (about forty requests more).
    max_tps
        Pace of the DICOMweb requests.
    """
    if not isinstance(datastore_id, str) or _DATASTORE_ID.fullmatch(datastore_id) is None:
        raise QueryValidationError("datastore_id", "must be 32 characters of [0-9a-z]")
    checks: list[Check] = []
    made = _client(client, boto3_session, checks)
    if made is None:
        return Report(tuple(checks))
    probe = _Probe()
    with _counting_throttles(made, probe):
        checks += _setup(made)
        checks.append(_datastore(made, datastore_id, probe))
        page, search = _search(made, datastore_id, probe)
        checks.append(search)
        checks += _reads(made, datastore_id, page, probe)
        qido, found = _dicomweb(made, dicomweb_endpoint_url, max_tps)
        checks.append(found)
        if qido is not None:
            checks += _qido(qido, datastore_id, probe)
        if conformance_checks and search.status == "ok":
            target = conformance.Target(made, datastore_id, qido)
            checks += [replace_name(c) for c in conformance.run(target)]
    checks += _latency(probe)
    return Report(tuple(checks))


def replace_name(check: Check) -> Check:
    """A conformance finding, named as one."""
    return Check(f"conformance: {check.name}", check.status, check.detail)


def _client(client: Any, boto3_session: Any, checks: list[Check]) -> Any:
    from botocore.exceptions import BotoCoreError

    try:
        made = aws.make_client(client, boto3_session, 2)
    except BotoCoreError as error:
        checks.append(Check("region", "fail", f"no client: {type(error).__name__}"))
        return None
    credentials = made._get_credentials()
    if credentials is None:
        checks.append(Check("credentials", "fail", "none found (profile, environment, role)"))
        return None
    checks.append(
        Check("credentials", "ok", f"found ({getattr(credentials, 'method', None) or 'given'})")
    )
    return made


@contextmanager
def _counting_throttles(client: Any, probe: _Probe) -> Iterator[None]:
    """Count the 429s botocore retries, for the duration of the checks only."""
    events = client.meta.events
    events.register("needs-retry.medical-imaging", probe.count_throttle)
    try:
        yield
    finally:
        events.unregister("needs-retry.medical-imaging", probe.count_throttle)


def _setup(client: Any) -> list[Check]:
    """Region, endpoint and the botocore model's features (no request)."""
    import botocore

    from healthimaging_df.dicomweb import resolve_endpoint

    meta = client.meta
    endpoint = str(meta.endpoint_url)
    own = resolve_endpoint(client).source == "derived" or endpoint.endswith(".amazonaws.com")
    checks = [
        Check("region", "ok" if meta.region_name else "fail", meta.region_name or "none"),
        Check(
            "endpoint",
            "ok",
            f"{endpoint} ({'AWS' if own else 'custom'}; host prefix "
            f"{'on' if meta.config.inject_host_prefix else 'off'})",
        ),
    ]
    model = meta.service_model
    search_by = model.shape_for("SearchByAttributeValue").members
    summary = model.shape_for("ImageSetsMetadataSummary").members
    missing = [name for name, have in (("isPrimary", "isPrimary" in search_by),
               ("storageTier", "storageTier" in summary)) if not have]  # fmt: skip
    status: conformance.Status = "warn" if missing else "ok"
    detail = f"botocore {botocore.__version__}" + (
        f"; its model lacks {', '.join(missing)}: upgrade botocore" if missing else
        "; model has isPrimary and storageTier"
    )  # fmt: skip
    checks.append(Check("botocore", status, detail))
    return checks


def _code(error: Exception) -> str:
    found = failure(error)
    return f"{found.code} (HTTP {found.status})" if found.status else found.code


def _datastore(client: Any, datastore_id: str, probe: _Probe) -> Check:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        found = probe.timed(lambda: client.get_datastore(datastoreId=datastore_id))
    except (ClientError, BotoCoreError) as error:
        return Check("datastore", "warn", f"GetDatastore: {_code(error)} (optional)")
    status = found["datastoreProperties"]["datastoreStatus"]
    return Check("datastore", "ok" if status == "ACTIVE" else "fail", f"status {status}")


def _search(client: Any, datastore_id: str, probe: _Probe) -> tuple[list[dict[str, Any]], Check]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        page = probe.timed(
            lambda: client.search_image_sets(datastoreId=datastore_id, maxResults=50)
        )
    except (ClientError, BotoCoreError) as error:
        return [], Check("SearchImageSets", "fail", _code(error))
    rows = list(page["imageSetsMetadataSummaries"])
    return rows, Check("SearchImageSets", "ok", f"allowed; {len(rows)} image set(s) on a page")


def _reads(
    client: Any, datastore_id: str, page: list[dict[str, Any]], probe: _Probe
) -> list[Check]:
    """GetImageSet (not an access) and GetImageSetMetadata on a FREQUENT_ACCESS image set only."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not page:
        return [
            Check("GetImageSet", "warn", "untested: no image set found"),
            Check("GetImageSetMetadata", "warn", "untested: no image set found"),
        ]
    checks = []
    first = page[0]["imageSetId"]
    try:
        probe.timed(lambda: client.get_image_set(datastoreId=datastore_id, imageSetId=first))
        checks.append(Check("GetImageSet", "ok", "allowed (not an access)"))
    except (ClientError, BotoCoreError) as error:
        checks.append(Check("GetImageSet", "warn", f"{_code(error)}: metadata tier look-ups fail"))
    frequent = [r for r in page if r.get("storageTier") == "FREQUENT_ACCESS"]
    if not frequent:
        checks.append(
            Check(
                "GetImageSetMetadata",
                "warn",
                "untested: no FREQUENT_ACCESS image set on the page (reading an archived one "
                "would un-archive it)",
            )
        )
        return checks
    chosen = frequent[0]["imageSetId"]
    try:
        probe.timed(
            lambda: client.get_image_set_metadata(datastoreId=datastore_id, imageSetId=chosen)
        )
        checks.append(
            Check("GetImageSetMetadata", "ok", "allowed (tried on a FREQUENT_ACCESS one)")
        )
    except (ClientError, BotoCoreError) as error:
        checks.append(Check("GetImageSetMetadata", "warn", f"{_code(error)}: enrichment fails"))
    return checks


def _dicomweb(client: Any, explicit: str | None, max_tps: float | None) -> tuple[Any, Check]:
    """The QIDO-RS client, or why there is none."""
    from healthimaging_df import dicomweb

    if not dicomweb.installed():
        return None, Check("DICOMweb endpoint", "warn", "the dicomweb extra is not installed")
    found = dicomweb.resolve_endpoint(client, None, explicit)
    if found.url is None:
        return None, Check("DICOMweb endpoint", "warn", f"unknown: {found.why}")
    qido = dicomweb.make_qido_client(
        client, dicomweb_endpoint_url=found.url, max_tps=max_tps, max_attempts=2, retry_base=0.2
    )
    return qido, Check("DICOMweb endpoint", "ok", f"{found.url} ({found.source})")


def _qido(qido: Any, datastore_id: str, probe: _Probe) -> list[Check]:
    """One search per QIDO-RS action the library uses; the finding is remembered."""
    from healthimaging_df import dicomweb
    from healthimaging_df.engine import statistics as cache

    checks = []
    outcome: tuple[str, str | None] | None = None
    study = series = None
    levels: tuple[tuple[str, Level], ...] = (
        ("SearchDICOMStudies", "studies"),
        ("SearchDICOMSeries", "series"),
    )
    for name, level in levels:

        def one(level: Level = level) -> Any:
            return qido.get(datastore_id, level, {}, limit=1)

        try:
            records, _ = probe.timed(one)
        except DICOMwebError as error:
            reason = dicomweb.unavailable(error)
            checks.append(Check(name, "warn", _qido_words(error)))
            if reason is not None and outcome is None:
                outcome = ("unavailable", reason)
            continue
        checks.append(Check(name, "ok", f"allowed; {len(records)} record(s)"))
        outcome = outcome or ("available", None)
        if records and level == "series":
            study = _uid(records[0].get("0020000D"))
            series = _uid(records[0].get("0020000E"))
    checks.append(_instances(qido, datastore_id, study, series, probe))
    if outcome is not None:
        state, reason = outcome
        cache.remember_access(qido.endpoint_url, qido.region, state, reason, "doctor")
    return checks


def _instances(
    qido: Any, datastore_id: str, study: str | None, series: str | None, probe: _Probe
) -> Check:
    if study is None or series is None:
        return Check("SearchDICOMInstances", "warn", "untested: no series found by QIDO-RS")
    try:
        probe.timed(
            lambda: qido.get(
                datastore_id, "instances", {}, study_uid=study, series_uid=series, limit=1
            )
        )
    except DICOMwebError as error:
        return Check("SearchDICOMInstances", "warn", _qido_words(error))
    return Check("SearchDICOMInstances", "ok", "allowed")


def _qido_words(error: DICOMwebError) -> str:
    status = f" (HTTP {error.status})" if error.status else ""
    return f"{error.code}{status}: queries run on SearchImageSets alone (exact, slower)"


def _uid(element: Any) -> str | None:
    values = element.get("Value") if isinstance(element, dict) else None
    value = values[0] if isinstance(values, list) and values else None
    return value if isinstance(value, str) else None


def _latency(probe: _Probe) -> list[Check]:
    throttling = Check(
        "throttling",
        "warn" if probe.throttled else "ok",
        f"{probe.throttled} SearchImageSets-side 429(s) retried by botocore while checking",
    )
    if not probe.seconds:
        return [Check("latency", "warn", "no round trip measured"), throttling]
    median = statistics.median(probe.seconds) * 1000
    slowest = max(probe.seconds) * 1000
    detail = f"median round trip {median:,.0f} ms, slowest {slowest:,.0f} ms, {len(probe.seconds)} requests"
    return [Check("latency", "ok", detail), throttling]
