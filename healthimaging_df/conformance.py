"""The service contract, checked live and read-only: what the library assumes of HealthImaging.

Each check sends a few requests against one datastore and reports whether an assumption holds
there (``ok``), does not or could not be tested (``warn``), or a documented rule is broken
(``fail``). None writes, and none reads an archived image set's metadata (that access would move
it back to the frequent tier): GetImageSetMetadata is tried on a FREQUENT_ACCESS image set only.
``healthimaging-df doctor --conformance`` runs them against a live datastore; the test suite runs
the same checks against the bundled local service. Details name counts and error codes, never
values (PHI).

>>> sorted(CHECKS)[:2]
['metadata.gzip_json', 'qido.api_host_404']
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from healthimaging_df.aws.errors import failure
from healthimaging_df.errors import DICOMwebError

Status = Literal["ok", "warn", "fail"]
UTC = timezone.utc
_TAG = re.compile(r"[0-9A-F]{8}")
_STUDY_LEVEL = ("DICOMStudyDescription", "DICOMPatientName", "DICOMPatientBirthDate")


@dataclass(frozen=True)
class Check:
    """One finding: a name, ``ok`` / ``warn`` / ``fail``, and PHI-free words."""

    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, str]:
        """``{"name": ..., "status": ..., "detail": ...}``."""
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class Target:
    """What the checks run against: a boto3 client, a datastore, a QIDO-RS client if any."""

    client: Any
    datastore_id: str
    qido: Any = None  # a dicomweb.QidoClient, or None when DICOMweb is not addressable
    _page: list[dict[str, Any]] | None = field(default=None, repr=False)  # summaries: PHI

    def page(self) -> list[dict[str, Any]]:
        """The newest 50 image sets (one request, made once)."""
        if self._page is None:
            found = self.client.search_image_sets(datastoreId=self.datastore_id, maxResults=50)
            self._page = list(found["imageSetsMetadataSummaries"])
        return self._page

    def search(self, **kwargs: Any) -> dict[str, Any]:
        """One SearchImageSets call on the datastore."""
        response: dict[str, Any] = self.client.search_image_sets(
            datastoreId=self.datastore_id, **kwargs
        )
        return response


def _code(error: Exception) -> str:
    return failure(error).code


def _status_code(error: Exception) -> int | None:
    return failure(error).status


def _refused(target: Target, kwargs: dict[str, Any]) -> str | None:
    """The error code a SearchImageSets call with *kwargs* got, or None when it was answered."""
    from botocore.exceptions import ClientError

    try:
        target.search(**kwargs)
    except ClientError as error:
        return _code(error)
    return None


# -- SearchImageSets ----------------------------------------------------------------------------


def check_page_size(target: Target) -> Check:
    """The default page holds at most 50 image sets, newest update first, sort not echoed."""
    page = target.search()
    rows = page["imageSetsMetadataSummaries"]
    stamps = [r["updatedAt"] for r in rows]
    if len(rows) > 50 or stamps != sorted(stamps, reverse=True):
        return Check("search.default_page", "fail", f"{len(rows)} rows, not updatedAt DESC")
    return Check("search.default_page", "ok", f"{len(rows)} rows, updatedAt descending")


def check_created_at_order(target: Target) -> Check:
    """``createdAt`` ASC and DESC are ordered (every chain the library sends relies on ASC)."""
    name = "search.created_at_order"
    for order in ("ASC", "DESC"):
        criteria = {"sort": {"sortField": "createdAt", "sortOrder": order}}
        rows = target.search(maxResults=50, searchCriteria=criteria)["imageSetsMetadataSummaries"]
        stamps = [r["createdAt"] for r in rows]
        if stamps != sorted(stamps, reverse=order == "DESC"):
            return Check(name, "fail", f"createdAt {order} came out of order")
    return Check(name, "ok", "createdAt ASC and DESC pages are ordered")


def check_pagination(target: Target) -> Check:
    """Paging a createdAt window by nextToken gives each image set once, no token twice."""
    name = "search.pagination"
    oldest = {"sort": {"sortField": "createdAt", "sortOrder": "ASC"}}
    rows = target.search(maxResults=30, searchCriteria=oldest)["imageSetsMetadataSummaries"]
    if len(rows) < 2:
        return Check(name, "warn", "untested: fewer than two image sets")
    created = sorted(r["createdAt"] for r in rows)
    window = {
        "filters": [
            {
                "operator": "BETWEEN",
                "values": [
                    {"createdAt": created[0] - timedelta(seconds=1)},
                    {"createdAt": created[-1] + timedelta(seconds=1)},
                ],
            }
        ],
        "sort": {"sortField": "createdAt", "sortOrder": "ASC"},
    }
    seen: list[str] = []
    tokens: set[str] = set()
    kwargs: dict[str, Any] = {"maxResults": 13, "searchCriteria": window}
    for _ in range(40):
        page = target.search(**kwargs)
        seen += [r["imageSetId"] for r in page["imageSetsMetadataSummaries"]]
        token = page.get("nextToken")
        if token is None:
            break
        if token in tokens:
            return Check(name, "fail", "a nextToken came back twice")
        tokens.add(token)
        kwargs["nextToken"] = token
    else:
        return Check(name, "warn", f"untested: more than 40 pages ({len(seen)} rows) in the window")
    if len(seen) != len(set(seen)):
        return Check(name, "fail", f"{len(seen) - len(set(seen))} image set(s) came twice")
    missing = {r["imageSetId"] for r in rows} - set(seen)
    if missing:
        return Check(name, "fail", f"{len(missing)} image set(s) of the window never came")
    return Check(name, "ok", f"{len(seen)} image sets in {len(tokens) + 1} pages, each once")


def check_example_requests(target: Target) -> Check:
    """The developer guide's four example requests are answered, every row matching."""
    name = "search.example_requests"
    rows = [r for r in target.page() if r.get("DICOMTags", {}).get("DICOMSeriesInstanceUID")]
    if not rows:
        return Check(name, "warn", "untested: no image set with a series UID in the sample")
    record = rows[len(rows) // 2]
    tags = record["DICOMTags"]
    updated = record["updatedAt"].astimezone(UTC)
    examples: list[dict[str, Any]] = [
        {
            "filters": [
                _between(
                    "DICOMStudyDateAndTime",
                    {"DICOMStudyDate": "19900101", "DICOMStudyTime": "000000"},
                    {"DICOMStudyDate": "20230101", "DICOMStudyTime": "000000"},
                )
            ]
        },
        {"filters": [_between("createdAt", "1985-04-12T23:20:50.52Z", "2022-04-12T23:20:50.52Z")]},
        {
            "filters": [
                _between("updatedAt", updated - timedelta(hours=1), updated + timedelta(hours=1)),
                _equal("DICOMSeriesInstanceUID", tags["DICOMSeriesInstanceUID"]),
            ],
            "sort": {"sortField": "updatedAt", "sortOrder": "ASC"},
        },
    ]
    if tags.get("DICOMPatientId"):
        examples.insert(0, {"filters": [_equal("DICOMPatientId", tags["DICOMPatientId"])]})
    for number, criteria in enumerate(examples, 1):
        page = target.search(searchCriteria=criteria)["imageSetsMetadataSummaries"]
        if not all(matches(r, criteria) for r in page):
            return Check(name, "fail", f"example {number}: a row does not match its filters")
    return Check(name, "ok", f"{len(examples)} example requests answered, every row matching")


def check_range_pairs(target: Target) -> Check:
    """A StudyDateTime or updatedAt range with createdAt BETWEEN as the second filter.

    Not among AWS's documented pairs; split range chains send it (``engine.fetch`` verifies it
    on the first split and, refused, reads the range from its two ends). ``warn`` when refused.
    """
    name = "search.range_pairs"
    rows = [
        r
        for r in target.page()
        if re.fullmatch(r"[0-9]{8}", str(r.get("DICOMTags", {}).get("DICOMStudyDate", "")))
    ]
    if not rows:
        return Check(name, "warn", "untested: no dated image set in the sample")
    record = rows[len(rows) // 2]
    created = record["createdAt"].astimezone(UTC)
    updated = record["updatedAt"].astimezone(UTC)
    window = _between("createdAt", created - timedelta(seconds=1), created + timedelta(seconds=1))
    pairs = {
        "StudyDateTime": _between(
            "DICOMStudyDateAndTime", {"DICOMStudyDate": "19000101"}, {"DICOMStudyDate": "21000101"}
        ),
        "updatedAt": _between(
            "updatedAt", updated - timedelta(days=1), updated + timedelta(days=1)
        ),
    }
    for label, first in pairs.items():
        criteria = {
            "filters": [first, window],
            "sort": {"sortField": "createdAt", "sortOrder": "ASC"},
        }
        code = _refused(target, {"searchCriteria": criteria, "maxResults": 50})
        if code is not None:
            return Check(
                name, "warn", f"{label} with createdAt refused ({code}): ranges read by two ends"
            )
        answer = target.search(searchCriteria=criteria, maxResults=50)
        page = answer["imageSetsMetadataSummaries"]
        found = any(r["imageSetId"] == record["imageSetId"] for r in page)
        if not found and "nextToken" not in answer:
            return Check(name, "fail", f"{label} with createdAt: a matching image set is missing")
        if not all(matches(r, criteria) for r in page):
            return Check(name, "fail", f"{label} with createdAt: a row does not match both")
    return Check(name, "ok", "StudyDateTime and updatedAt ranges each take createdAt as a second")


INVALID: dict[str, dict[str, Any]] = {
    "maxResults 51": {"maxResults": 51},
    "three filters": {
        "searchCriteria": {
            "filters": [
                {"values": [{"DICOMStudyInstanceUID": "1.2.3"}], "operator": "EQUAL"},
                {"values": [{"createdAt": 0}, {"createdAt": 1}], "operator": "BETWEEN"},
                {"values": [{"updatedAt": 0}, {"updatedAt": 1}], "operator": "BETWEEN"},
            ]
        }
    },
    "UID with letters": {
        "searchCriteria": {
            "filters": [{"values": [{"DICOMStudyInstanceUID": "1.2.abc"}], "operator": "EQUAL"}]
        }
    },
    "BETWEEN on an ID": {
        "searchCriteria": {
            "filters": [
                {
                    "values": [{"DICOMPatientId": "A"}, {"DICOMPatientId": "B"}],
                    "operator": "BETWEEN",
                }
            ]
        }
    },
}


def check_validation(target: Target) -> Check:
    """Requests the model allows but the service must refuse get ValidationException (400)."""
    name = "search.validation"
    wrong = {case: _refused(target, kwargs) for case, kwargs in INVALID.items()}
    bad = sorted(case for case, code in wrong.items() if code != "ValidationException")
    if bad:
        return Check(name, "warn", f"not refused with ValidationException: {', '.join(bad)}")
    return Check(name, "ok", f"{len(INVALID)} invalid requests refused with ValidationException")


def check_error_messages(target: Target) -> Check:
    """An error's message does not quote the value sent (the library withholds it anyway)."""
    from botocore.exceptions import ClientError

    marker = "1." + "".join(secrets.choice("123456789") for _ in range(20)) + "."
    try:
        target.search(searchCriteria={"filters": [_equal("DICOMSeriesInstanceUID", marker)]})
    except ClientError as error:
        message = failure(error).message or ""
        if marker.strip(".") in message:
            return Check("search.error_messages", "warn", "the message quotes the value sent")
        return Check("search.error_messages", "ok", f"{_code(error)}, the value not quoted")
    return Check("search.error_messages", "warn", "a UID ending in a dot was not refused")


def check_tokens(target: Target) -> Check:
    """A forged or foreign nextToken is refused; a genuine one works with another page size."""
    name = "search.tokens"
    first = target.search(maxResults=5)
    token = first.get("nextToken")
    if token is None:
        return Check(name, "warn", "untested: the datastore holds five image sets or fewer")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    foreign = {"sort": {"sortField": "createdAt", "sortOrder": "ASC"}}
    codes = [
        _refused(target, {"nextToken": forged}),
        _refused(target, {"nextToken": "not-a-token"}),
        _refused(target, {"nextToken": token, "searchCriteria": foreign}),
    ]
    if any(code is None for code in codes):
        return Check(name, "warn", "a forged, malformed or foreign token was answered")
    second = target.search(maxResults=7, nextToken=token)["imageSetsMetadataSummaries"]
    firsts = {r["imageSetId"] for r in first["imageSetsMetadataSummaries"]}
    if firsts & {r["imageSetId"] for r in second}:
        return Check(name, "fail", "the next page repeated image sets of the first")
    return Check(name, "ok", f"bad tokens refused ({', '.join(sorted(set(map(str, codes))))})")


def check_unknown_datastore(target: Target) -> Check:
    """An unknown datastore is ResourceNotFoundException (or AccessDenied under a scoped role)."""
    from botocore.exceptions import ClientError

    other = "".join(secrets.choice("0123456789abcdef") for _ in range(32))
    try:
        target.client.search_image_sets(datastoreId=other, maxResults=1)
    except ClientError as error:
        code = _code(error)
        status: Status = (
            "ok" if code in ("ResourceNotFoundException", "AccessDeniedException") else "warn"
        )
        return Check("search.unknown_datastore", status, f"{code} (HTTP {_status_code(error)})")
    return Check("search.unknown_datastore", "warn", "a random datastore ID was answered")


def check_is_primary(target: Target) -> Check:
    """The ``isPrimary`` filter (botocore 1.38+) is accepted and keeps only rows with that flag."""
    from botocore.exceptions import ClientError, ParamValidationError

    name = "search.is_primary"
    try:
        for flag in (True, False):
            page = target.search(
                maxResults=20, searchCriteria={"filters": [_equal("isPrimary", flag)]}
            )
            rows = page["imageSetsMetadataSummaries"]
            if any(r.get("isPrimary") is not flag for r in rows):
                return Check(name, "fail", f"isPrimary={flag} kept a row without that flag")
    except (ClientError, ParamValidationError) as error:
        return Check(name, "warn", f"the isPrimary filter was refused ({type(error).__name__})")
    return Check(name, "ok", "isPrimary=true and =false keep only rows with that flag")


def check_metadata(target: Target) -> Check:
    """GetImageSetMetadata is gzip JSON with the documented layout (a FREQUENT_ACCESS one only)."""
    name = "metadata.gzip_json"
    frequent = [r for r in target.page() if r.get("storageTier") == "FREQUENT_ACCESS"]
    if not frequent:
        return Check(
            name, "warn", "untested: no FREQUENT_ACCESS image set in the sample (reading an "
            "archived one would move it back to the frequent tier)"
        )  # fmt: skip
    record = frequent[0]
    response = target.client.get_image_set_metadata(
        datastoreId=target.datastore_id, imageSetId=record["imageSetId"]
    )
    document = json.loads(gzip.decompress(response["imageSetMetadataBlob"].read()))
    keys = {"SchemaVersion", "DatastoreID", "ImageSetID", "Patient", "Study"}
    if response.get("contentEncoding") != "gzip" or not keys <= set(document):
        return Check(name, "fail", "not gzip JSON with SchemaVersion, Patient and Study")
    return Check(name, "ok", "gzip JSON with the documented top-level keys")


def check_consistent_studies(target: Target) -> Check:
    """Whether a study's primary image sets agree on study- and patient-level attributes.

    What ``assume_consistent_studies=True`` asserts, and AWS does not guarantee. Sampled: the
    studies of the newest 50 image sets with two primary image sets or more (a search each).
    """
    name = "studies.consistent"
    studies: dict[str, int] = {}
    for record in target.page():
        uid = record.get("DICOMTags", {}).get("DICOMStudyInstanceUID")
        if uid and record.get("isPrimary") is not False:
            studies[uid] = studies.get(uid, 0) + 1
    sampled = [uid for uid, count in studies.items() if count > 1][:5]
    if not sampled:
        return Check(name, "warn", "untested: no study with two primary image sets in the sample")
    disagree = 0
    for uid in sampled:
        page = target.search(searchCriteria={"filters": [_equal("DICOMStudyInstanceUID", uid)]})
        rows = [r for r in page["imageSetsMetadataSummaries"] if r.get("isPrimary") is not False]
        values = {tuple(r.get("DICOMTags", {}).get(k) for k in _STUDY_LEVEL) for r in rows}
        disagree += len(values) > 1
    if disagree:
        return Check(
            name,
            "warn",
            f"{disagree} of {len(sampled)} sampled studies disagree: assume_consistent_studies "
            "would lose rows here",
        )
    return Check(name, "ok", f"{len(sampled)} sampled studies agree (a sample, not a guarantee)")


# -- QIDO-RS ------------------------------------------------------------------------------------


def _needs_qido(name: str) -> Callable[[Callable[[Target, str], Check]], Callable[[Target], Check]]:
    """A QIDO-RS check named *name*: a warning without running it when no endpoint is known."""

    def wrap(check: Callable[[Target, str], Check]) -> Callable[[Target], Check]:
        @functools.wraps(check)
        def run(target: Target) -> Check:
            if target.qido is None:
                return Check(
                    name, "warn", "untested: no DICOMweb endpoint known (or the extra missing)"
                )
            return check(target, name)

        return run

    return wrap


@_needs_qido("qido.dicom_json")
def check_qido_json(target: Target, name: str) -> Check:
    """A QIDO-RS page is a JSON list of DICOM JSON objects; ``limit`` and ``offset`` agree."""
    try:
        two, _ = target.qido.get(target.datastore_id, "studies", {}, limit=2)
        one, _ = target.qido.get(target.datastore_id, "studies", {}, limit=1, offset=1)
    except DICOMwebError as error:
        return Check(name, "warn", f"QIDO-RS unavailable: {error.code} (HTTP {error.status})")
    if len(two) > 2 or two[1:] != one:
        return Check(name, "fail", "limit or offset not honoured (offset 1 is not the 2nd record)")
    if not all(all(_TAG.fullmatch(t) for t in r) and "0020000D" in r for r in two):
        return Check(name, "fail", "records are not DICOM JSON with a StudyInstanceUID")
    return Check(name, "ok", f"{len(two)} record(s): DICOM JSON; limit and offset honoured")


@_needs_qido("qido.series_order")
def check_series_order(target: Target, name: str) -> Check:
    """A study's series come by SeriesNumber ascending (documented for ``/studies/{S}/series``)."""
    try:
        studies, _ = target.qido.get(target.datastore_id, "studies", {}, limit=1)
        if not studies:
            return Check(name, "warn", "untested: QIDO-RS found no study")
        study = _first(studies[0].get("0020000D"))
        series, _ = target.qido.get(target.datastore_id, "series", {}, study_uid=study, limit=100)
    except DICOMwebError as error:
        return Check(name, "warn", f"QIDO-RS unavailable: {error.code} (HTTP {error.status})")
    numbers = [int(n) for n in (_first(r.get("00200011")) for r in series) if n is not None]
    if numbers != sorted(numbers):
        return Check(name, "warn", "a study's series are not in SeriesNumber order")
    return Check(name, "ok", f"{len(series)} series of a study, by SeriesNumber ascending")


@_needs_qido("qido.series_are_image_sets")
def check_series_are_image_sets(target: Target, name: str) -> Check:
    """A QIDO-RS series record carries its primary image set's series-level values.

    What QIDO-RS matching of Modality and SeriesNumber relies on (a primary image set holds one
    series). Sampled: up to five primary image sets, one ``/series?SeriesInstanceUID=`` each.
    """
    rows = [
        r
        for r in target.page()
        if r.get("isPrimary") is not False and r.get("DICOMTags", {}).get("DICOMSeriesInstanceUID")
    ][:5]
    if not rows:
        return Check(name, "warn", "untested: no primary image set with a series UID sampled")
    wrong = 0
    try:
        for record in rows:
            tags = record["DICOMTags"]
            found, _ = target.qido.get(
                target.datastore_id,
                "series",
                {
                    "SeriesInstanceUID": tags["DICOMSeriesInstanceUID"],
                    "includefield": ["Modality", "SeriesNumber"],
                },
                limit=10,
            )
            modality = [_first(r.get("00080060")) for r in found]
            wrong += len(found) != 1 or modality != [tags.get("DICOMSeriesModality")]
    except DICOMwebError as error:
        return Check(name, "warn", f"QIDO-RS unavailable: {error.code} (HTTP {error.status})")
    if wrong:
        return Check(
            name, "warn", f"{wrong} of {len(rows)} series records disagree with their image set"
        )
    return Check(
        name, "ok", f"{len(rows)} sampled series: one record each, the image set's Modality"
    )


@_needs_qido("qido.signing")
def check_qido_signing(target: Target, name: str) -> Check:
    """A match value holding a space is signed as AWS canonicalises it (``%20``, not ``+``)."""
    try:
        target.qido.get(
            target.datastore_id, "studies", {"StudyDescription": "NO SUCH VALUE*"}, limit=1
        )
    except DICOMwebError as error:
        return Check(name, "warn", f"refused: {error.code} (HTTP {error.status})")
    return Check(name, "ok", "a value with spaces and a wildcard was accepted as signed")


def check_api_host_has_no_dicomweb(target: Target) -> Check:
    """The API's own address answers 404 for DICOMweb paths (DICOMweb has an address of its own)."""
    import requests

    from healthimaging_df.dicomweb import make_qido_client

    name = "qido.api_host_404"
    if target.qido is None:
        return Check(name, "warn", "untested: no QIDO-RS client")
    endpoint = str(target.client.meta.endpoint_url)
    if endpoint.startswith("https://medical-imaging."):
        endpoint = endpoint.replace("https://", "https://runtime-", 1)  # where the API answers
    probe = make_qido_client(
        target.client, dicomweb_endpoint_url=endpoint, max_tps=None, max_attempts=1
    )
    try:
        probe.get(target.datastore_id, "studies", {}, limit=1)
    except DICOMwebError as error:
        found: Status = "ok" if error.status == 404 else "warn"
        return Check(name, found, f"HTTP {error.status} for /studies at the API address")
    except requests.RequestException as error:  # pragma: no cover - depends on the network
        return Check(name, "warn", f"untested: {type(error).__name__}")
    return Check(name, "warn", "the API address answered QIDO-RS (AWS's does not)")


def _first(element: Any) -> Any:
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


CHECKS: dict[str, Callable[[Target], Check]] = {
    "search.default_page": check_page_size,
    "search.created_at_order": check_created_at_order,
    "search.pagination": check_pagination,
    "search.example_requests": check_example_requests,
    "search.range_pairs": check_range_pairs,
    "search.validation": check_validation,
    "search.error_messages": check_error_messages,
    "search.tokens": check_tokens,
    "search.unknown_datastore": check_unknown_datastore,
    "search.is_primary": check_is_primary,
    "metadata.gzip_json": check_metadata,
    "studies.consistent": check_consistent_studies,
    "qido.dicom_json": check_qido_json,
    "qido.series_order": check_series_order,
    "qido.series_are_image_sets": check_series_are_image_sets,
    "qido.signing": check_qido_signing,
    "qido.api_host_404": check_api_host_has_no_dicomweb,
}


def run(target: Target, names: list[str] | None = None) -> list[Check]:
    """Run the checks named (default: all), each turned into ``fail`` if it raises."""
    out = []
    for name in names or list(CHECKS):
        try:
            out.append(CHECKS[name](target))
        except Exception as error:
            out.append(Check(name, "fail", f"the check failed: {_code(error)}"))
    return out


# -- the reference matcher: what a row of the examples must satisfy -----------------------------


def _equal(attribute: str, value: Any) -> dict[str, Any]:
    return {"values": [{attribute: value}], "operator": "EQUAL"}


def _between(attribute: str, low: Any, high: Any) -> dict[str, Any]:
    return {"values": [{attribute: low}, {attribute: high}], "operator": "BETWEEN"}


def record_study_datetime(tags: dict[str, Any]) -> datetime | None:
    """A summary's StudyDate and StudyTime as one moment, None when not a valid date."""
    date = tags.get("DICOMStudyDate")
    if not isinstance(date, str) or not re.fullmatch(r"\d{8}", date):
        return None
    time = tags.get("DICOMStudyTime") or ""
    found = re.fullmatch(r"(\d\d)(\d\d)?(\d\d)?(?:\.(\d{1,6}))?", time) if time else None
    if time and found is None:
        return None
    try:
        day = datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return None
    if found is None:
        return day
    return day.replace(
        hour=int(found[1]),
        minute=int(found[2] or 0),
        second=int(found[3] or 0),
        microsecond=int((found[4] or "0").ljust(6, "0")),
    )


def request_study_datetime(value: dict[str, str]) -> datetime:
    """A request's ``DICOMStudyDateAndTime`` bound as a moment (StudyTime defaults to 00:00)."""
    day = datetime.strptime(value["DICOMStudyDate"], "%Y%m%d")
    time = value.get("DICOMStudyTime", "000000")
    whole, _, frac = time.partition(".")
    return day.replace(
        hour=int(whole[:2]),
        minute=int(whole[2:4]),
        second=int(whole[4:6]),
        microsecond=int(frac.ljust(6, "0")) if frac else 0,
    )


def _utc(value: datetime | str | int | float) -> datetime:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):  # the guide's examples: "1985-04-12T23:20:50.52Z"
        from dateutil.parser import isoparse

        value = isoparse(value)
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return value.astimezone(UTC)


def matches(record: dict[str, Any], criteria: dict[str, Any]) -> bool:
    """Whether a summary meets every filter of *criteria* (BETWEEN inclusive, whole seconds)."""
    return all(_holds(record, f) for f in criteria.get("filters", []))


def _holds(record: dict[str, Any], flt: dict[str, Any]) -> bool:
    values = flt["values"]
    (attribute,) = values[0]
    if flt["operator"] == "EQUAL":
        wanted = values[0][attribute]
        if attribute == "isPrimary":
            return bool(record.get("isPrimary")) is wanted
        return bool(record["DICOMTags"].get(attribute) == wanted)
    if attribute == "DICOMStudyDateAndTime":
        moment = record_study_datetime(record["DICOMTags"])
        low = request_study_datetime(values[0][attribute])
        high = request_study_datetime(values[1][attribute])
        return moment is not None and low <= moment <= high
    # botocore sends whole epoch seconds (up to 1.43) or microseconds: compare whole seconds
    low = _utc(values[0][attribute]).replace(microsecond=0)
    high = _utc(values[1][attribute])
    stamp = _utc(record[attribute])
    return low <= stamp and stamp.replace(microsecond=0) <= high
