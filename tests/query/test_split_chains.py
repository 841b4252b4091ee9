"""Every long chain is split like a scan: an ID, a StudyDateTime or an updatedAt range.

A filtered chain starts as it always did (one reader, its own request); with pages left it gains
a reader from its newest end and splits at whole seconds, each new reader adding createdAt
BETWEEN as the second filter. A range with createdAt is not a documented pair: a service that
refuses it gets the range read from its two ends, exactly, said once.
"""

from __future__ import annotations

import math
import random
import threading
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from healthimaging_df import Query
from healthimaging_df.engine import fetch
from healthimaging_df.errors import HealthImagingDFWarning
from healthimaging_df.local import LocalService, generate_image_sets

from .conftest import brute_force, first_requests, flat_row, read_while_updating, serve

UTC = timezone.utc
DS = "0123456789abcdef0123456789abcdef"
BURST = datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)


def _betweens(params: dict[str, Any]) -> int:
    filters = params.get("searchCriteria", {}).get("filters", [])
    return sum(f["operator"] == "BETWEEN" for f in filters)


# -- the plan -------------------------------------------------------------------------------


def test_a_study_date_range_is_one_lazy_chain_whose_first_request_is_unchanged() -> None:
    plan = Query(DS).between("StudyDateTime", "2020", "2021").compile()
    (chain,) = plan.chains
    assert chain.lazy
    assert chain.unbounded
    assert chain.window is not None
    (request,) = plan.requests()
    criteria = request["searchCriteria"]
    assert [next(iter(f["values"][0])) for f in criteria["filters"]] == ["DICOMStudyDateAndTime"]
    assert criteria["sort"] == {"sortField": "createdAt", "sortOrder": "ASC"}
    # a split reader's request: the range and a createdAt window, the two filters
    low, high = chain.window
    inner = chain.request(DS, (low + timedelta(days=9000), high))["searchCriteria"]["filters"]
    assert [next(iter(f["values"][0])) for f in inner] == ["DICOMStudyDateAndTime", "createdAt"]
    text = plan.explain()
    assert "split while it adds throughput" in text
    assert "verified by the first split" in text


@pytest.mark.parametrize(
    ("build", "lazy", "filters"),
    [
        (lambda q: q.between("updatedAt", "2024-01-01", "2024-06-01"), True, ["updatedAt"]),
        (lambda q: q.where(PatientID="P"), True, ["DICOMPatientId"]),
        (
            lambda q: q.where(PatientID="P").between("createdAt", "2024", "2025"),
            True,
            ["DICOMPatientId", "createdAt"],
        ),
        (
            lambda q: q.where(isPrimary=True).between("StudyDateTime", "2020", "2021"),
            True,
            ["DICOMStudyDateAndTime"],
        ),
        (
            lambda q: q.where(isPrimary=False).between("StudyDateTime", "2020", "2021"),
            False,
            ["isPrimary", "DICOMStudyDateAndTime"],
        ),
        (
            lambda q: q.where(PatientID="P").between("StudyDateTime", "2020", "2021"),
            False,
            ["DICOMPatientId", "DICOMStudyDateAndTime"],
        ),
        (lambda q: q.between("StudyDateTime", "2020", "2021").limit(5), False, None),
    ],
    ids=["updated", "id", "id-created", "primary-range", "non-primary", "id-range", "limit"],
)
def test_which_chains_split(build: Any, lazy: bool, filters: list[str] | None) -> None:
    plan = build(Query(DS)).compile()
    assert all(c.lazy == lazy for c in plan.chains)
    if filters is not None:
        sent = plan.requests()[0]["searchCriteria"]["filters"]
        assert [next(iter(f["values"][0])) for f in sent] == filters


# -- the run -------------------------------------------------------------------------------


def _service(n: int, seed: int) -> LocalService:
    """A third of the image sets created within one second (many in the same microsecond)."""
    rng = random.Random(seed)
    records = generate_image_sets(n, seed=seed)
    start = datetime(2023, 1, 1, tzinfo=UTC)
    for k, record in enumerate(records):
        if k % 3 == 0:
            moment = BURST + timedelta(microseconds=rng.choice((0, 1, rng.randrange(10**6))))
        else:
            moment = start + timedelta(days=900) * rng.random()
        shift = moment - record["createdAt"]
        for key in ("createdAt", "updatedAt", "lastAccessedAt"):
            record[key] = record[key] + shift
    return serve(records, "split")


@pytest.fixture
def burst_service(fresh_endpoint: None) -> Iterator[LocalService]:
    with _service(1500, seed=12) as service:
        yield service


def _range(service: LocalService) -> Query:
    """A StudyDateTime range holding about 40% of the dated image sets."""
    assert service.datastore_id is not None
    dated = sorted(
        r["StudyDateTime"]
        for r in map(flat_row, service.backend.image_sets(service.datastore_id))
        if r["StudyDateTime"]
    )
    a, b = dated[len(dated) // 5], dated[3 * len(dated) // 5]
    return Query(service.datastore_id).between("StudyDateTime", a, b)


def test_a_range_split_inside_a_same_second_burst_loses_nothing_while_image_sets_change(
    burst_service: LocalService,
) -> None:
    query = _range(burst_service)
    before = {
        r["imageSetId"]: r["version"]
        for r in burst_service.backend.image_sets(burst_service.datastore_id)
    }
    expected = brute_force(burst_service.backend.image_sets(burst_service.datastore_id), query)
    assert len(expected) > 400
    client = burst_service.client()
    sent = first_requests(client)
    frame = read_while_updating(burst_service, query, client, seed=5)
    assert sorted(frame["imageSetId"]) == sorted(expected)
    for image_set_id, version in zip(frame["imageSetId"], frame["version"], strict=True):
        assert version >= before[image_set_id]
    splits = [p for p in sent if _betweens(p) == 2]
    assert splits, "the range was read as one chain"
    # readers started at whole seconds around the burst: a reader's bound never cuts a second
    lows = [
        f["values"][0]["createdAt"]
        for p in splits
        for f in p["searchCriteria"]["filters"]
        if "createdAt" in f["values"][0]
    ]
    assert all(moment.microsecond == 0 for moment in lows)


def test_a_service_refusing_the_range_pair_gets_the_range_from_its_two_ends(
    burst_service: LocalService,
) -> None:
    burst_service.backend.one_range_filter = True
    query = _range(burst_service)
    expected = brute_force(burst_service.backend.image_sets(burst_service.datastore_id), query)
    client = burst_service.client()
    burst_service.set_faults(latency_ms=3.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        frame = query.to_dataframe(client=client, progress=False, max_concurrency=6, max_tps=None)
        sent = first_requests(client)
        again = query.to_dataframe(client=client, progress=False, max_concurrency=6, max_tps=None)
    assert sorted(frame["imageSetId"]) == sorted(expected)
    assert sorted(again["imageSetId"]) == sorted(expected)
    ours = [w for w in said if issubclass(w.category, HealthImagingDFWarning)]
    assert len(ours) == 1
    assert "two ends" in str(ours[0].message)
    # remembered for the endpoint: the second run never asks for the pair again
    assert [p for p in sent if _betweens(p) == 2] == []
    assert len(sent) == 2  # one reader from each end


# -- concurrency from the measured round trip -------------------------------------------------


def test_default_concurrency_is_rate_times_the_round_trip_and_an_explicit_value_wins() -> None:
    from healthimaging_df import aws
    from healthimaging_df.engine.enrichment import workers_for

    limiter = aws.RateLimiter(100.0)
    limiter.observe(0.3)
    auto = fetch.FetchOptions(max_tps=100.0)
    assert auto.concurrency(limiter) == math.ceil(limiter.rate * 0.3) + aws.CONCURRENCY_MARGIN
    assert auto.concurrency(limiter) > 8  # the old default capped 100 TPS at 300 ms to 27%
    assert fetch.FetchOptions(max_concurrency=5).concurrency(limiter) == 5
    assert workers_for(None, limiter) == auto.concurrency(limiter)  # metadata enrichment too
    assert workers_for(3, limiter) == 3
    assert aws.RateLimiter(250.0).concurrency(0.3) == aws.MAX_CONCURRENCY


def test_a_run_leaves_its_round_trip_on_the_endpoint_for_the_next(
    burst_service: LocalService,
) -> None:
    from healthimaging_df import aws

    client = burst_service.client()
    burst_service.set_faults(latency_ms=40.0)
    aws.forget_limiters()
    _range(burst_service).to_dataframe(client=client, progress=False, max_tps=500.0)
    limiter = aws.limiter_for(client, aws.SEARCH, 500.0)
    assert limiter is not None
    assert limiter.round_trip is not None
    assert limiter.round_trip >= 0.04  # the service's added latency is a floor
    assert fetch.FetchOptions(max_tps=500.0).concurrency(limiter) >= 500 * 0.04 * 0.98


def test_a_one_page_range_starts_one_fetch_thread_not_the_bound(
    service: LocalService, records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetch threads start as readers get tasks: a one-page range started all 64 (the bound),
    about 30 ms of the interpreter (the local service's too) while its one request was out."""
    from healthimaging_df.local.backend import study_datetime

    started: list[str] = []
    original = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("ahi-fetch-"):
            started.append(thread.name)
        original(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    dated = sorted(d for d in (study_datetime(r["DICOMTags"]) for r in records) if d)
    query = Query(service.datastore_id).between("StudyDateTime", dated[-5], dated[-1])
    service.reset_stats()
    frame = query.to_dataframe(client=service.client(), progress=False)
    assert sorted(frame["imageSetId"]) == sorted(brute_force(records, query))
    assert service.stats.by_operation["SearchImageSets"] == 1
    assert 1 <= len(started) <= 2  # its reader (and at most the other end's)


# -- unions share a scan's or a window's pages ------------------------------------------------


def test_union_members_sharing_a_scan_read_its_pages_once_and_each_keeps_its_conditions(
    burst_service: LocalService,
) -> None:
    ds = burst_service.datastore_id
    assert ds is not None
    records = burst_service.backend.image_sets(ds)
    rows = [flat_row(r) for r in records]
    patient = next(r["PatientID"] for r in rows if r["PatientID"] and r["Modality"] != "CT")
    members = [  # SearchImageSets only: what is compared is its pages
        Query(ds).where(Modality="CT").using("search"),  # a scan of everything
        Query(ds).where(PatientID=patient).using("search"),  # covered by it
        Query(ds).between("createdAt", "2023-06-01", "2024-06-01").using("search"),  # too
    ]
    union = Query.union(*members)
    plan = union.compile()
    assert len(plan.chains) == 1
    assert "read as 1" in (plan.note or "")
    client = burst_service.client()
    burst_service.reset_stats()
    got = union.to_dataframe(client=client, progress=False, max_tps=None)
    shared = burst_service.stats.by_operation["SearchImageSets"]
    expected = set().union(*(brute_force(records, q) for q in members))
    assert set(got["imageSetId"]) == expected
    assert got["imageSetId"].is_unique
    separately = 0
    for member in members:
        burst_service.reset_stats()
        member.to_dataframe(client=client, progress=False, max_tps=None)
        separately += burst_service.stats.by_operation["SearchImageSets"]
    pages = math.ceil(len(records) / 50)
    assert shared < pages * 1.5  # one scan's pages (and its windows' part-empty last pages)
    assert separately > shared + pages / 2  # members on their own read the scan's rows again


def test_union_windows_that_overlap_are_one_window() -> None:
    union = Query.union(
        Query(DS).between("createdAt", "2020-01-01", "2022-01-01"),
        Query(DS).between("createdAt", "2021-01-01", "2023-01-01"),
        Query(DS).between("createdAt", "2025-01-01", "2025-06-01"),
        Query(DS).where(PatientID="P"),
        Query(DS).where(PatientID=["P", "Q"]),
    )
    plan = union.compile()
    windows = sorted(c.window for c in plan.chains if not c.filters and c.window)
    assert [(a.year, b.year) for a, b in windows] == [(2020, 2023), (2025, 2025)]
    patients = [c for c in plan.chains if c.filters]
    assert len(patients) == 2  # P asked for twice is read once
    assert [c.index for c in plan.chains] == list(range(len(plan.chains)))
