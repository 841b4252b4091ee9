"""The lean page path against botocore's own: same table, same retries and errors, no PHI logged."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from healthimaging_df import schema
from healthimaging_df.core import logs
from healthimaging_df.engine import flatten, pages
from healthimaging_df.errors import MalformedResponseError, SearchError
from healthimaging_df.local import LocalService, generate_image_sets

from .conftest import RawServer, Reply

SECRET = "SECRET^PATIENT"
ID = "0123456789abcdef0123456789abcdef"


def _crafted() -> list[dict[str, Any]]:
    """Edge cases the generator rarely or never makes: non-ASCII, no tags, odd dates and times."""
    base = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)
    tags: list[dict[str, Any]] = [
        {
            "DICOMPatientName": "Müller^Zoë",
            "DICOMPatientId": "病院-001",
            "DICOMStudyDate": "20240229",
        },
        {"DICOMPatientName": "山田^太郎", "DICOMStudyDate": "20240230", "DICOMStudyTime": "1200"},
        {"DICOMStudyDate": "00000101", "DICOMStudyTime": "235959.123456"},
        {"DICOMStudyDate": "19991231", "DICOMStudyTime": "24"},
        {"DICOMStudyDate": "", "DICOMStudyTime": "", "DICOMSeriesNumber": -3},
        {},
    ]
    return [
        {
            "imageSetId": f"{i:032x}",
            "version": i + 1,
            "createdAt": base + timedelta(microseconds=7 * i),
            "updatedAt": base + timedelta(days=i, microseconds=1),
            "isPrimary": i % 2 == 0,
            "DICOMTags": t,
        }
        for i, t in enumerate(tags)
    ]


@pytest.fixture(scope="module")
def service() -> Iterator[LocalService]:
    svc = LocalService.seeded(image_sets=0)
    assert svc.datastore_id is not None
    svc.backend.add_image_sets(svc.datastore_id, generate_image_sets(700, seed=4) + _crafted())
    with svc:
        yield svc


def _chain(client: Any, request: dict[str, Any], fetch: Callable[..., Any]) -> Iterator[Any]:
    kwargs = dict(request)
    while True:
        page = fetch(client, kwargs)
        yield page
        token = page.next_token if isinstance(page, pages.ParsedPage) else page.get("nextToken")
        if not token:
            return
        kwargs["nextToken"] = token


@pytest.mark.parametrize(
    "sort", [None, {"sortField": "createdAt", "sortOrder": "ASC"}], ids=["default", "createdAt"]
)
def test_every_page_equals_the_botocore_path(service: LocalService, sort: Any) -> None:
    client = service.client()
    request: dict[str, Any] = {"datastoreId": service.datastore_id, "maxResults": 50}
    if sort:
        request["searchCriteria"] = {"sort": sort}
    lean = list(_chain(client, request, pages.fetch_page))
    boto = list(_chain(client, request, lambda c, k: c.search_image_sets(**k)))
    assert len(lean) == len(boto) == 15
    for mine, theirs in zip(lean, boto, strict=True):
        expected = flatten.summaries_to_table(theirs["imageSetsMetadataSummaries"])
        assert mine.table.schema == schema.arrow_schema()
        assert mine.table.equals(expected)
        assert mine.next_token == theirs.get("nextToken")
    table = pa.concat_tables(p.table for p in lean)
    assert table.num_rows == 706
    # The comparison covered what matters: nulls, non-ASCII, year 0, invalid dates and times.
    names = set(table.column("PatientName").to_pylist())
    assert {"Müller^Zoë", "山田^太郎"} <= names
    assert table.column("PatientID").null_count > 0
    assert table.column("StudyDateTime").null_count > 0
    assert pc.min(table.column("StudyDateTime")).value == -62167219200000000 + 86399123456


def test_timestamps_round_like_botocore(raw_server: RawServer) -> None:
    stamps = [1704067200.123456, 1704067200.0000005, 1704067200.9999995, -1.5, 0, 1e9 + 0.25]
    summaries = [
        {"imageSetId": f"{i:032x}", "version": 1, "createdAt": s, "updatedAt": s}
        for i, s in enumerate(stamps)
    ]
    body = json.dumps({"imageSetsMetadataSummaries": summaries}).encode()
    raw_server.replies = [Reply(body)]
    client = raw_server.client()
    page = pages.fetch_page(client, {"datastoreId": ID})
    parsed = client.search_image_sets(datastoreId=ID)["imageSetsMetadataSummaries"]
    want = [p["createdAt"].astimezone(timezone.utc) for p in parsed]
    assert page.table.column("createdAt").to_pylist() == want
    assert page.table.column("lastAccessedAt").null_count == len(stamps)


_DATES = st.one_of(
    st.none(), st.from_regex(r"[0-9]{8}", fullmatch=True), st.text("0123456789a\n", max_size=9)
)
_TIMES = st.one_of(
    st.none(),
    st.from_regex(r"[0-9]{2,6}(\.[0-9]{1,7})?", fullmatch=True),
    st.text("0123456789. \n", max_size=14),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_DATES, _TIMES), min_size=1, max_size=60))
def test_wallclock_matches_frame_study_datetime(pairs: list[tuple[str | None, str | None]]) -> None:
    dates, times = zip(*pairs, strict=True)
    expected = flatten.study_datetime(pa.array(dates, pa.string()), pa.array(times, pa.string()))
    got = [pages.wallclock_us(d, t) for d, t in pairs]
    assert got == pc.cast(expected, pa.int64()).to_pylist()


def test_the_users_client_is_untouched_outside_the_lean_call(service: LocalService) -> None:
    client = service.client()
    request = {"datastoreId": service.datastore_id, "maxResults": 5}
    pages.fetch_page(client, request)  # installs the handler on this client
    plain = client.search_image_sets(**request)
    summary = plain["imageSetsMetadataSummaries"][0]
    assert isinstance(summary["createdAt"], datetime)
    assert not any(k.startswith("healthimaging_df") for k in plain)
    document = client.get_image_set_metadata(
        datastoreId=service.datastore_id, imageSetId=summary["imageSetId"]
    )
    assert document["imageSetMetadataBlob"].read()[:2] == b"\x1f\x8b"
    assert client.get_datastore(datastoreId=service.datastore_id)["datastoreProperties"]


def test_other_threads_calls_are_not_taken_while_one_is_armed(service: LocalService) -> None:
    client = service.client()
    request = {"datastoreId": service.datastore_id, "maxResults": 50}
    stop = threading.Event()
    plain: list[Any] = []

    def user() -> None:
        while not stop.is_set():
            plain.append(client.search_image_sets(**request)["imageSetsMetadataSummaries"][0])

    thread = threading.Thread(target=user)
    thread.start()
    try:
        lean = [pages.fetch_page(client, request).num_rows for _ in range(10)]
    finally:
        stop.set()
        thread.join()
    assert lean == [50] * 10
    assert plain
    assert all(isinstance(s["updatedAt"], datetime) for s in plain)


def test_throttling_and_500s_are_still_retried_by_botocore(
    ahi_service_factory: Callable[..., LocalService], monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.05)
    svc = ahi_service_factory(image_sets=60, seed=2, error_rate=0.5, fault_seed=3)
    client = svc.client()
    request = {"datastoreId": svc.datastore_id, "maxResults": 10}
    got = list(_chain(client, request, pages.fetch_page))
    assert sum(p.num_rows for p in got) == 60
    assert sum(p.retry_attempts for p in got) > 0
    assert svc.stats.requests > len(got)

    svc.set_faults(error_rate=0.0, tps=5, burst=1)
    retried = [pages.fetch_page(client, request).retry_attempts for _ in range(3)]
    assert retried[0] == 0
    assert sum(retried) > 0

    svc.set_faults(error_rate=1.0, tps=None)
    once = svc.client(retries={"mode": "standard", "max_attempts": 2})
    with pytest.raises(ClientError) as raised:
        pages.fetch_page(once, request)
    assert raised.value.response["Error"]["Code"] == "InternalServerException"


def test_error_responses_stay_botocores(raw_server: RawServer) -> None:
    raw_server.replies = [
        Reply(
            b'{"message": "bad request"}',
            status=400,
            headers={"x-amzn-ErrorType": "ValidationException"},
        )
    ]
    with pytest.raises(ClientError) as raised:
        pages.fetch_page(raw_server.client(), {"datastoreId": ID})
    assert raised.value.response["Error"]["Code"] == "ValidationException"


def _summary(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "imageSetId": ID,
        "version": 1,
        "createdAt": 1704067200.5,
        "updatedAt": 1704067200.5,
        "DICOMTags": {"DICOMPatientName": SECRET},
    }
    item.update(changes)
    return {k: v for k, v in item.items() if v is not ...}


def _body(*items: Any, **top: Any) -> bytes:
    return json.dumps({"imageSetsMetadataSummaries": list(items), **top}).encode()


MALFORMED = {
    "truncated JSON": (Reply(_body(_summary())[:-7]), "not JSON"),
    "HTML page": (Reply(b"<html><body>" + SECRET.encode() + b"</body></html>"), "not JSON"),
    "empty body": (Reply(b""), "empty"),
    "not an object": (Reply(b"[]"), "not a JSON object"),
    "summaries missing": (Reply(b'{"nextToken": "abc"}'), "imageSetsMetadataSummaries is missing"),
    "summaries null": (
        Reply(b'{"imageSetsMetadataSummaries": null, "nextToken": "abc"}'),
        "imageSetsMetadataSummaries is missing",
    ),
    "summaries not a list": (
        Reply(b'{"imageSetsMetadataSummaries": {"a": 1}}'),
        "imageSetsMetadataSummaries is not a list",
    ),
    "item not an object": (Reply(_body(_summary(), SECRET)), "summary #1 is not an object"),
    "short imageSetId": (Reply(_body(_summary(imageSetId=ID[:31]))), "imageSetId is not 32"),
    "upper-case imageSetId": (Reply(_body(_summary(imageSetId=ID.upper()))), "imageSetId"),
    "no imageSetId": (Reply(_body(_summary(imageSetId=...))), "summary #0 has no imageSetId"),
    "version a string": (Reply(_body(_summary(version="1"))), "version is not an integer"),
    "version a bool": (Reply(_body(_summary(version=True))), "version is not an integer"),
    "version a float": (Reply(_body(_summary(version=1.0))), "version is not an integer"),
    "createdAt a string": (
        Reply(_body(_summary(createdAt="2024-01-01T00:00:00Z"))),
        "createdAt is not a number",
    ),
    "no updatedAt": (Reply(_body(_summary(updatedAt=...))), "has no updatedAt"),
    "timestamp out of range": (Reply(_body(_summary(createdAt=1e300))), "outside years"),
    "tags not an object": (Reply(_body(_summary(DICOMTags=[SECRET]))), "DICOMTags is not"),
    "tag of the wrong type": (
        Reply(_body(_summary(DICOMTags={"DICOMPatientId": 12345}))),
        "DICOMTags.DICOMPatientId is not a string",
    ),
    "integer tag a string": (
        Reply(_body(_summary(DICOMTags={"DICOMSeriesNumber": SECRET}))),
        "DICOMTags.DICOMSeriesNumber is not an integer",
    ),
    "integer out of range": (
        Reply(_body(_summary(DICOMTags={"DICOMSeriesNumber": 2**63}))),
        "out of its type's range",
    ),
    "empty nextToken": (Reply(_body(_summary(), nextToken="")), "nextToken"),
    "nextToken a number": (Reply(_body(_summary(), nextToken=7)), "nextToken"),
    "short body": (
        Reply(_body(_summary()), content_length=len(_body(_summary())) + 100),
        "Content-Length",
    ),
    "chunked body cut short": (Reply(_body(_summary()), chunked_cut=True), "cut short"),
}


@pytest.mark.parametrize(("reply", "rule"), MALFORMED.values(), ids=MALFORMED)
def test_a_malformed_page_raises_a_typed_error_naming_the_rule(
    raw_server: RawServer, reply: Reply, rule: str
) -> None:
    good = Reply(_body(_summary()))
    raw_server.replies = [reply, good]
    client = raw_server.client()
    with pytest.raises(MalformedResponseError) as raised:
        pages.fetch_page(client, {"datastoreId": ID}, request_index=3)
    error = raised.value
    assert isinstance(error, SearchError)
    assert rule in error.rule
    assert str(error).startswith("SearchImageSets request #3 failed with MalformedResponse")
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert pages.fetch_page(client, {"datastoreId": ID}).num_rows == 1  # the retry the engine makes


def test_botocore_alone_reads_these_pages_as_a_last_page(raw_server: RawServer) -> None:
    """Why the lean path checks: botocore turns a broken page into an empty, final one."""
    raw_server.replies = [Reply(_body(_summary())[:-7])]
    response = raw_server.client().search_image_sets(datastoreId=ID)
    assert "imageSetsMetadataSummaries" not in response
    assert "nextToken" not in response


@pytest.fixture
def raw_botocore_logs() -> Iterator[None]:
    logs.redact_botocore_logs(False)
    yield
    logs.redact_botocore_logs(True)


def test_response_bodies_never_reach_botocores_debug_log(
    service: LocalService, caplog: pytest.LogCaptureFixture, raw_botocore_logs: None
) -> None:
    client = service.client()
    request = {"datastoreId": service.datastore_id, "maxResults": 50}
    with caplog.at_level(logging.DEBUG):
        page = pages.fetch_page(client, request)
    names = [n for n in page.table.column("PatientName").to_pylist() if n]
    assert names
    assert not any(n in caplog.text for n in names)
    assert "Response body" in caplog.text  # botocore did log a body: the empty one we gave it
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        client.search_image_sets(**request)
    assert any(json.dumps(n)[1:-1] in caplog.text or n in caplog.text for n in names)  # control


def test_every_attempt_is_paced_retries_included(
    ahi_service_factory: Callable[..., LocalService], monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.retries import standard

    from healthimaging_df import aws

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.0)
    svc = ahi_service_factory(image_sets=20, seed=2, error_rate=0.5, fault_seed=3)
    client = svc.client()
    limiter = aws.RateLimiter(1e6, burst=1_000_000)
    pages_read = []
    for _ in range(12):
        with aws.paced(client, limiter):
            pages_read.append(
                pages.fetch_page(client, {"datastoreId": svc.datastore_id}).retry_attempts
            )
    assert sum(pages_read) > 0
    assert limiter.acquired == svc.stats.requests == 12 + sum(pages_read)
    client.search_image_sets(datastoreId=svc.datastore_id)  # not inside paced(): not paced
    assert limiter.acquired == 12 + sum(pages_read)
