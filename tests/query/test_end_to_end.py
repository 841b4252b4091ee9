"""Queries run through a real boto3 client against the local service, checked by brute force."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthimaging_df import Query, schema, search
from healthimaging_df.errors import SearchError, ThrottledError
from healthimaging_df.local import LocalService

from .conftest import brute_force, flat_row


def run(service: LocalService, query: Query, **options: Any) -> pd.DataFrame:
    options.setdefault("progress", False)
    return query.to_dataframe(client=service.client(), **options)


def test_full_scan_returns_every_image_set_once(service: LocalService, records: list) -> None:
    frame = run(service, Query(service.datastore_id), max_concurrency=4)
    assert len(frame) == len(records) == frame["imageSetId"].nunique()
    assert set(frame["imageSetId"]) == {r["imageSetId"] for r in records}
    assert list(frame["imageSetId"]) == brute_force(records, Query(service.datastore_id))
    # the scan was split into createdAt windows: more requests than a serial walk would need
    assert service.stats.by_operation["SearchImageSets"] > len(records) / 50


def test_windows_run_concurrently(service: LocalService, records: list) -> None:
    service.set_faults(latency_ms=30)
    frame = run(service, Query(service.datastore_id), max_concurrency=6, max_tps=None)
    assert len(frame) == len(records)
    assert service.stats.peak_concurrency >= 3


def test_fan_out_runs_one_chain_per_value(service: LocalService, records: list) -> None:
    patients = sorted({flat_row(r)["PatientID"] for r in records} - {None})[:6]
    query = Query(service.datastore_id).where(PatientID=patients)
    frame = run(service, query)
    assert sorted(frame["imageSetId"]) == sorted(brute_force(records, query))
    assert len(frame) > 6
    assert service.stats.by_operation["SearchImageSets"] == 6


def test_limit_stops_early(service: LocalService, records: list) -> None:
    query = Query(service.datastore_id).sort_by("createdAt", ascending=True).limit(10)
    frame = run(service, query)
    assert list(frame["imageSetId"]) == brute_force(records, query)
    assert service.stats.by_operation["SearchImageSets"] == 1


def test_limit_with_residual_keeps_paging_until_enough_rows(
    service: LocalService, records: list
) -> None:
    query = Query(service.datastore_id).where(Modality="MR").limit(60)
    frame = run(service, query)
    assert list(frame["imageSetId"]) == brute_force(records, query)
    assert len(frame) == 60
    assert service.stats.by_operation["SearchImageSets"] < len(records) / 50


def test_exact_microsecond_bounds_on_created_at(service: LocalService, records: list) -> None:
    stamps = sorted(r["createdAt"] for r in records)
    low, high = stamps[100], stamps[400]
    assert low.microsecond
    assert high.microsecond
    query = Query(service.datastore_id).between("createdAt", low, high)
    frame = run(service, query)
    assert len(frame) == 301
    assert sorted(frame["imageSetId"]) == sorted(brute_force(records, query))
    outside = Query(service.datastore_id).between(
        "createdAt", low + timedelta(microseconds=1), high
    )
    assert len(run(service, outside)) == 300


def test_iter_dataframes_yields_each_image_set_once(service: LocalService, records: list) -> None:
    chunks = list(
        Query(service.datastore_id)
        .where(isPrimary=True)
        .iter_dataframes(chunk_rows=200, client=service.client(), progress=False)
    )
    assert len(chunks) > 2
    combined = pd.concat(chunks)
    expected = brute_force(records, Query(service.datastore_id).where(isPrimary=True))
    assert sorted(combined["imageSetId"]) == sorted(expected)
    assert combined["imageSetId"].is_unique
    assert all(c.dtypes.to_dict() == schema.pandas_dtypes() for c in chunks)


def test_empty_results_keep_the_schema(service: LocalService) -> None:
    nothing = Query(service.datastore_id).where(PatientID="NO-SUCH-PATIENT")
    for backend in schema.DTYPE_BACKENDS:
        frame = run(service, nothing, dtype_backend=backend)
        assert len(frame) == 0
        assert frame.dtypes.to_dict() == schema.pandas_dtypes(backend)
    chunks = list(nothing.iter_dataframes(client=service.client(), progress=False))
    assert len(chunks) == 1
    assert len(chunks[0]) == 0


def test_contradiction_sends_nothing(service: LocalService) -> None:
    frame = run(service, Query(service.datastore_id).where(PatientID="A").where(PatientID="B"))
    assert len(frame) == 0
    assert service.stats.requests == 0


def test_pyarrow_backend_and_provenance(service: LocalService) -> None:
    frame = run(
        service, Query(service.datastore_id).where(Modality="CT").limit(5), dtype_backend="pyarrow"
    )
    assert all(isinstance(t, pd.ArrowDtype) for t in frame.dtypes)
    info = frame.attrs["healthimaging_df"]
    assert info["datastore_id"] == service.datastore_id
    assert info["endpoint_url"] == service.endpoint_url
    assert Query.from_dict(__import__("json").loads(info["query"])).row_limit == 5
    assert info["schema_version"] == schema.SCHEMA_VERSION


def test_search_one_liner(service: LocalService, records: list) -> None:
    patient = flat_row(records[0])["PatientID"]
    frame = search(service.datastore_id, client=service.client(), PatientID=patient)
    assert sorted(frame["imageSetId"]) == sorted(
        brute_force(records, Query(service.datastore_id).where(PatientID=patient))
    )


# -- faults -------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_backoff")
def test_throttling_and_server_errors_are_retried(service: LocalService, records: list) -> None:
    service.set_faults(tps=40, burst=2, error_rate=0.15)  # below what one client pages
    frame = run(service, Query(service.datastore_id), max_concurrency=6, max_tps=None)
    assert sorted(frame["imageSetId"]) == sorted(r["imageSetId"] for r in records)
    stats = service.stats
    assert stats.throttled > 0
    assert stats.errors_injected > 0


def test_client_side_rate_limit_avoids_throttling(service: LocalService, records: list) -> None:
    service.set_faults(tps=40, burst=5)
    frame = run(service, Query(service.datastore_id), max_concurrency=6, max_tps=30)
    assert len(frame) == len(records)
    assert service.stats.throttled == 0


@pytest.mark.usefixtures("no_backoff")
def test_unrecoverable_throttling_raises_not_half_a_result(service: LocalService) -> None:
    service.set_faults(tps=0.001, burst=1)
    client = service.client(retries={"mode": "standard", "max_attempts": 2})
    with pytest.raises(ThrottledError) as info:
        Query(service.datastore_id).to_dataframe(client=client, progress=False, max_tps=None)
    assert info.value.code == "ThrottlingException"


@pytest.mark.usefixtures("no_backoff")
def test_persistent_server_errors_raise(service: LocalService) -> None:
    service.set_faults(error_rate=1.0)
    client = service.client(retries={"mode": "standard", "max_attempts": 2})
    with pytest.raises(SearchError) as info:
        Query(service.datastore_id).where(PatientID="P").to_dataframe(client=client, progress=False)
    assert info.value.code == "InternalServerException"
    assert info.value.status == 500


def test_unknown_datastore_is_a_typed_error(service: LocalService) -> None:
    with pytest.raises(SearchError) as info:
        run(service, Query("f" * 32).where(PatientID="SECRET-PATIENT"))
    assert info.value.code == "ResourceNotFoundException"
    assert info.value.request_index == 0
    assert "SECRET-PATIENT" not in str(info.value)


# -- randomized: any query equals brute force, with faults on ------------------------------


@st.composite
def queries(draw: st.DrawFn, records: list[dict[str, Any]], datastore_id: str) -> Query:
    rows = [flat_row(r) for r in records]
    pick = lambda column: draw(st.sampled_from([r[column] for r in rows if r[column] is not None]))  # noqa: E731
    query = Query(datastore_id)
    for step in draw(st.lists(st.integers(0, 11), min_size=0, max_size=3)):
        if step == 0:
            query = query.where(
                PatientID=[pick("PatientID") for _ in range(draw(st.integers(1, 3)))]
            )
        elif step == 1:
            query = query.where(StudyInstanceUID=pick("StudyInstanceUID"))
        elif step == 2:
            modalities = draw(
                st.lists(
                    st.sampled_from(["CT", "MR", "CR", "DX", "US", "SR"]), min_size=1, max_size=3
                )
            )
            query = query.where(Modality=modalities)
        elif step == 3:
            query = query.where(isPrimary=draw(st.booleans()))
        elif step in (4, 5):
            column = "createdAt" if step == 4 else "updatedAt"
            a, b = sorted([pick(column), pick(column)])
            shift = timedelta(microseconds=draw(st.integers(-2_000_000, 2_000_000)))
            query = query.between(column, a + shift, max(a + shift, b))
        elif step == 6:
            a, b = sorted([pick("StudyDateTime"), pick("StudyDateTime")])
            query = query.between("StudyDateTime", a, b)
        elif step == 7:
            query = query.where_not(BodyPartExamined=pick("BodyPartExamined"))
        elif step == 8:
            query = query.contains(
                "StudyDescription",
                draw(st.sampled_from(["CT", "chest", "MR", "BRAIN"])),
                case=draw(st.booleans()),
            )
        elif step == 9:
            query = query.is_null(
                draw(st.sampled_from(["StudyTime", "AccessionNumber", "BodyPartExamined"]))
            )
        elif step == 10:
            query = query.sort_by(
                draw(st.sampled_from(["createdAt", "updatedAt", "StudyDateTime", "SeriesNumber"])),
                ascending=draw(st.booleans()),
            )
        else:
            query = query.limit(draw(st.integers(1, 120)))
    return query


@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize(
    "faults", [{}, {"tps": 200.0, "burst": 4, "error_rate": 0.1}], ids=["clean", "faulty"]
)
def test_any_query_equals_brute_force(cohort_service: LocalService, faults: dict) -> None:
    cohort_service.set_faults(latency_ms=0.0, tps=None, burst=None, error_rate=0.0)
    records = cohort_service.backend.image_sets(cohort_service.datastore_id)
    client = cohort_service.client()

    @settings(
        max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(query=queries(records, cohort_service.datastore_id))
    def check(query: Query) -> None:
        cohort_service.set_faults(**faults)
        frame = query.to_dataframe(client=client, progress=False, max_concurrency=4, max_tps=None)
        cohort_service.set_faults(latency_ms=0.0, tps=None, burst=None, error_rate=0.0)
        expected = brute_force(records, query)
        got = list(frame["imageSetId"])
        assert len(got) == len(set(got)), "duplicated rows"
        assert got == expected

    try:
        with cohort_service.dicomweb_environment():
            check()
    finally:
        cohort_service.set_faults(latency_ms=0.0, tps=None, burst=None, error_rate=0.0)


def test_progress_callback_counts_pages_and_image_sets(
    service: LocalService, records: list
) -> None:
    calls: list[tuple[int, int]] = []
    Query(service.datastore_id).to_dataframe(
        client=service.client(), progress=lambda pages, sets: calls.append((pages, sets))
    )
    assert calls
    assert [p for p, _ in calls] == list(range(1, len(calls) + 1))
    assert calls[-1][1] >= len(records)  # windows may deliver a boundary image set twice


def test_progress_bar_runs(service: LocalService, capsys: pytest.CaptureFixture[str]) -> None:
    frame = (
        Query(service.datastore_id)
        .where(Modality="CT")
        .to_dataframe(client=service.client(), progress=True)
    )
    assert len(frame) > 0
    assert "SearchImageSets" in capsys.readouterr().err


def test_client_made_from_a_boto3_session(
    service: LocalService, records: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No client given: the library makes one from the session, reaching the endpoint from env."""
    import boto3

    for name, value in service.env().items():
        monkeypatch.setenv(name, value)
    session = boto3.Session()
    patient = next(flat_row(r)["PatientID"] for r in records if flat_row(r)["PatientID"])
    query = Query(service.datastore_id).where(PatientID=patient)
    frame = query.to_dataframe(boto3_session=session, progress=False)
    assert sorted(frame["imageSetId"]) == sorted(brute_force(records, query))
    assert frame.attrs["healthimaging_df"]["endpoint_url"] == service.endpoint_url


def test_pacing_at_the_quota_never_trips_a_strict_sliding_window(
    service: LocalService, records: list
) -> None:
    """Every request of a full scan takes a slot of the one limiter, so none overruns the quota.

    That none is then throttled depends on the machine's jitter (a grant late under CPU load can
    land in the service's next window): ``python -m bench pacing_bench`` measures it.
    """
    from healthimaging_df import aws

    service.set_faults(window_tps=25)  # at most 25 requests in any one-second window
    client = service.client()
    frame = Query(service.datastore_id).to_dataframe(
        client=client, progress=False, max_concurrency=8, max_tps=25
    )
    assert sorted(frame["imageSetId"]) == sorted(r["imageSetId"] for r in records)
    limiter = aws.limiter_for(client, aws.SEARCH, 25)
    assert limiter is not None
    assert limiter.acquired == service.stats.by_operation["SearchImageSets"]


def test_a_throttle_widens_the_shared_limiters_margin(
    service: LocalService, records: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quota below max_tps throttles; each 429 botocore retries is seen by the limiter.

    The margin doubles per throttle (up to its cap), so the scan slows to what the service
    admits instead of being throttled at the same rate all the way; the result stays exact.
    """
    from botocore.retries import standard

    from healthimaging_df import aws

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.0)
    service.set_faults(window_tps=20)  # 20 a second: a client at 25 TPS is throttled
    client = service.client(retries={"mode": "standard", "max_attempts": 40})
    frame = Query(service.datastore_id).to_dataframe(client=client, max_tps=25, progress=False)
    assert len(frame) == len(records) == frame["imageSetId"].nunique()
    limiter = aws.limiter_for(client, aws.SEARCH, 25)
    assert limiter is not None
    assert service.stats.throttled > 0
    assert limiter.throttles == service.stats.throttled  # every 429 reached the limiter
    assert limiter.margin > aws.MARGIN
    assert limiter.rate < 25 / (1 + aws.MARGIN)


def _two_scans_at_once(service: LocalService) -> tuple[list[pd.DataFrame], float]:
    """Two full scans in threads, each with a client of its own; their frames and seconds."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    query = Query(service.datastore_id)
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        frames = list(
            pool.map(lambda _: run(service, query, max_concurrency=8, max_tps=25), range(2))
        )
    return frames, time.monotonic() - started


def test_queries_at_once_share_the_quota_and_never_trip_a_strict_sliding_window(
    service: LocalService, records: list
) -> None:
    """One quota, so one limiter for both scans (a limiter each: 33 throttled).

    Each scan has a client of its own; both take their slots from one limiter. The throttles
    left depend on the machine's jitter: ``python -m bench pacing_bench`` measures them.
    """
    from healthimaging_df import aws

    service.set_faults(window_tps=25, latency_ms=20.0)
    frames, _ = _two_scans_at_once(service)
    service.set_faults(window_tps=None)
    assert [len(frame) for frame in frames] == [len(records)] * 2
    shared = aws.limiter_for(service.client(), aws.SEARCH, 25)
    assert shared is not None
    assert shared.acquired == service.stats.by_operation["SearchImageSets"]


def test_queries_at_once_are_paced_together(service: LocalService, records: list) -> None:
    """No service limiter to slow them: two scans still send at most 24 requests a second.

    A floor on the seconds, so a slow machine cannot fail it; a limiter each sent 48 a second.
    """
    service.set_faults(latency_ms=20.0)
    frames, seconds = _two_scans_at_once(service)
    assert [len(frame) for frame in frames] == [len(records)] * 2
    requests = service.stats.by_operation["SearchImageSets"]
    assert requests > 25
    assert seconds >= (requests - 1) / 25
