"""QIDO-RS as an access path: pure planning, and runs against the local service vs brute force."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthimaging_df import Query, engine
from healthimaging_df.dicomweb import QidoClient, make_qido_client
from healthimaging_df.engine import qido as qido_plan
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.local import LocalService
from healthimaging_df.local.backend import Backend
from healthimaging_df.local.generate import generate_image_sets
from healthimaging_df.plan import DatastoreStats, Plan

from .conftest import brute_force, flat_row

DS = "0" * 32


def step_of(query: Query) -> Any:
    plan = query.compile()
    return plan.qido


# -- pure planning ---------------------------------------------------------------------------


def test_patient_name_becomes_a_qido_study_search_with_values_hidden() -> None:
    plan = Query(DS).where(PatientName="DOE^JANE").compile()
    assert plan.access == "qido"
    assert plan.qido is not None
    assert [s.describe(True) for s in plan.qido.searches] == ["GET /studies?PatientName=DOE^JANE"]
    text = plan.explain()
    assert "QIDO-RS step" in text
    assert "GET /studies?PatientName=<value>" in text
    assert "DOE" not in text
    assert "DOE^JANE" in plan.explain(show_values=True)
    assert "DOE" not in repr(plan.qido.searches[0])
    assert plan.chains
    assert plan.chains[0].window is not None


def test_modality_goes_to_series_and_study_datetime_narrows_by_study_date() -> None:
    step = step_of(Query(DS).where(Modality=["MG", "CT"]).between("StudyDateTime", "2020", "2021"))
    assert step.level == "series"
    assert sorted(s.describe(True) for s in step.searches) == [
        "GET /series?Modality=CT&StudyDate=20200101-20211231",
        "GET /series?Modality=MG&StudyDate=20200101-20211231",
    ]
    assert step.date_range == ("20200101", "20211231")


def test_search_strategy_never_uses_qido_and_qido_forces_it() -> None:
    query = Query(DS).where(PatientName="DOE^JANE")
    assert query.using("search").compile().qido is None
    assert query.using("search").compile().access != "qido"
    pinned = Query(DS).where(PatientID="P1", PatientName="DOE^JANE")
    assert pinned.compile().qido is None  # an ID already pins the search
    assert pinned.using("qido").compile().qido is not None
    early = Query(DS).where(PatientName="DOE^JANE").sort_by("createdAt").limit(5)
    assert early.compile().qido is None  # one sorted search that stops early is cheap
    assert early.using("qido").compile().qido is not None
    with pytest.raises(QueryValidationError, match="strategy"):
        Query(DS).where(PatientSex="F").using("qido").compile()


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda q: q.contains("StudyDescription", "CT HEAD"), "*CT HEAD*"),
        (lambda q: q.contains("PatientName", "123", case=False), "*123*"),
        (lambda q: q.matches("StudyDescription", "^MAMMO"), "MAMMO*"),
        (lambda q: q.matches("StudyDescription", r"W/O CONTRAST$"), "*W/O CONTRAST*"),
        (lambda q: q.matches("StudyDescription", r"XR\.1"), "*XR.1*"),
        (lambda q: q.where(PatientBirthDate="19500101"), "19500101"),
        (lambda q: q.where(SeriesNumber=3), "3"),
    ],
)
def test_sound_wildcards(build: Any, expected: str) -> None:
    step = step_of(build(Query(DS)))
    assert step is not None
    ((_, value),) = step.searches[0].match
    assert value == expected


@pytest.mark.parametrize(
    "build",
    [
        lambda q: q.contains("StudyDescription", "ct head", case=False),  # QIDO is case-sensitive
        lambda q: q.matches("StudyDescription", "^CT.*HEAD"),  # not a plain literal
        lambda q: q.matches("StudyDescription", r"\d+"),
        lambda q: q.where(PatientBirthDate="1950"),  # a partial date: DA matching differs
        lambda q: q.between("PatientBirthDate", "19400101", "19600101"),  # raw strings: "1950"
        lambda q: q.where(PatientName="YAMADA^TARO=山田^太郎"),  # which name group: undocumented
        lambda q: q.where(PatientName="A\\B"),  # value multiplicity
        lambda q: q.where_not(Modality="CT"),
        lambda q: q.contains("StudyDescription", "**"),  # universal matching: nothing gained
    ],
)
def test_unsound_conditions_stay_on_the_client(build: Any) -> None:
    assert step_of(build(Query(DS))) is None


def test_in_lists_multiply_into_searches_up_to_a_cap() -> None:
    names = [f"N{i}^X" for i in range(8)]
    step = step_of(Query(DS).where(PatientName=names, Modality=["CT", "MR"]))
    assert len(step.searches) == 2 * 8
    assert step.level == "series"
    many = step_of(Query(DS).where(PatientName=names, Modality=["CT", "MR", "US"]))
    assert len(many.searches) == 3  # the 8 names stay on the client only
    assert all(dict(s.match).keys() == {"Modality"} for s in many.searches)


def test_qido_plan_is_pure_and_deterministic() -> None:
    query = Query(DS).where(StudyDescription="CT HEAD").between("StudyDateTime", "2020", "2021")
    now = datetime(2026, 1, 1)
    assert query.compile(now=now) == query.compile(now=now)


# -- against the local service -----------------------------------------------------------------


@contextmanager
def qido_cap(cap: int | None) -> Iterator[None]:
    """The engine's QIDO-RS client, told the record cap the local service applies."""
    previous = qido_plan.CLIENT_FACTORY

    def factory(client: Any, max_tps: float | None) -> QidoClient:
        made = make_qido_client(client, max_tps=max_tps)
        if cap is not None:
            made.record_cap = cap
        return made

    qido_plan.CLIENT_FACTORY = factory
    try:
        yield
    finally:
        qido_plan.CLIENT_FACTORY = previous


def chosen(query: Query, service: LocalService) -> Plan:
    run = engine.prepare(service.client(), progress=False, max_tps=None)
    with service.dicomweb_environment():  # QIDO-RS is on the service's own DICOMweb address
        return engine.choose(lambda stats: query.compile(stats=stats), run)


def ids(query: Query, service: LocalService) -> list[str]:
    with service.dicomweb_environment():
        frame = query.to_dataframe(client=service.client(), progress=False, max_tps=None)
    got = list(frame["imageSetId"])
    assert len(got) == len(set(got))
    return got


@pytest.fixture(scope="module")
def qido_service() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=2500, seed=11) as service, service.dicomweb_environment():
        yield service


def test_patient_name_on_the_small_datastore_is_exact(qido_service: LocalService) -> None:
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    names = Counter(flat_row(r)["PatientName"] for r in records)
    name = max((n for n in names if n), key=lambda n: (names[n], n))
    query = Query(qido_service.datastore_id).where(PatientName=name)
    qido_service.reset_stats()
    assert ids(query, qido_service) == brute_force(records, query)
    operations = qido_service.stats.by_operation
    assert operations.get("SearchDICOMStudies") == 1
    assert 0 < operations["SearchImageSets"] < math.ceil(len(records) / 50)


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.005, 0.05], ids=["non-primary-0.5%", "non-primary-5%"])
def test_patient_name_on_100k_image_sets_takes_under_1_percent_of_a_scan(share: float) -> None:
    with LocalService.seeded(image_sets=100_000, seed=2, non_primary=share) as service:
        records = service.backend.image_sets(service.datastore_id)
        names = Counter(flat_row(r)["PatientName"] for r in records)
        name = min((n for n in names if n), key=lambda n: (names[n], n))
        full_scan = math.ceil(len(records) / 50)  # a full scan sends at least this many
        non_primary = sum(not r["isPrimary"] for r in records)
        primary = Query(service.datastore_id).where(PatientName=name, isPrimary=True)
        service.reset_stats()
        assert ids(primary, service) == brute_force(records, primary)
        assert service.stats.requests <= full_scan / 100, service.stats.requests
        # Without isPrimary=True, the non-primary image sets are swept too: QIDO-RS cannot see
        # them, and a conflicting copy may hold the very name asked for. The sweep is sized
        # with one request and, when small, read as one chain of full pages.
        query = Query(service.datastore_id).where(PatientName=name)
        service.reset_stats()
        assert ids(query, service) == brute_force(records, query)
        sweep_pages = math.ceil(non_primary / 50)
        if share < 0.01:  # a realistic share: the target holds
            assert service.stats.requests <= full_scan / 100, service.stats.requests
            assert service.stats.requests <= sweep_pages + 5
        else:  # 5%: the sweep alone is 5% of a scan; the target cannot hold
            assert service.stats.requests <= sweep_pages * 1.3 + 4, service.stats.requests


def test_the_sweep_is_sized_by_its_first_page_and_read_as_one_chain(
    qido_service: LocalService,
) -> None:
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    non_primary = sum(not r["isPrimary"] for r in records)
    names = Counter(flat_row(r)["PatientName"] for r in records)
    name = min((n for n in names if n), key=lambda n: (names[n], n))
    query = Query(qido_service.datastore_id).where(PatientName=name)
    plan = chosen(query, qido_service)
    sweep = [c for c in plan.chains if {"isPrimary": False} in c.criteria()["filters"][0]["values"]]
    assert len(sweep) == 1
    assert sweep[0].window is None
    assert "non-primary sweep" in plan.explain()
    qido_service.reset_stats()
    assert ids(query, qido_service) == brute_force(records, query)
    # QIDO-RS 1, the size probe 1 or 2, the patient's chain(s), the sweep's full pages
    assert qido_service.stats.requests <= 1 + 2 + 4 + math.ceil(non_primary / 50)


def test_a_study_datetime_scan_is_sized_by_its_first_page(qido_service: LocalService) -> None:
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    dated = sorted(flat_row(r)["StudyDateTime"] for r in records if flat_row(r)["StudyDateTime"])
    day = dated[len(dated) // 2].date().isoformat()
    query = (
        Query(qido_service.datastore_id)
        .where(Modality="CT")
        .between("StudyDateTime", f"{day}T00:00:00", f"{day}T23:59:59")
    )
    plan = chosen(query, qido_service)
    # a one-page scan: QIDO-RS (and its sweep) cannot be cheaper
    assert "QIDO-RS not sent" in (plan.note or ""), plan.note
    qido_service.reset_stats()
    assert ids(query, qido_service) == brute_force(records, query)
    assert not any("DICOM" in k for k in qido_service.stats.by_operation)


def test_a_sweep_as_dear_as_the_scan_sends_no_qido_request(qido_service: LocalService) -> None:
    from healthimaging_df.engine import statistics

    client = qido_service.client()
    assert qido_service.datastore_id is not None
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    query = Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER")
    everything = DatastoreStats(len(records), source="given", non_primary=len(records))
    try:
        # pure: with statistics saying every image set is non-primary, the scan is chosen
        planned = query.compile(stats=everything)
        assert planned.qido is None
        assert planned.access == "search"
        assert "non-primary image sets (about" in planned.explain()
        few = DatastoreStats(len(records), source="given", non_primary=10)
        assert query.compile(stats=few).qido is not None
        # at run time, from the cached statistics: no QIDO-RS request at all
        statistics.remember(client, qido_service.datastore_id, everything)
        plan = chosen(query, qido_service)
        assert "QIDO-RS not sent" in (plan.note or "")
        qido_service.reset_stats()
        assert ids(query, qido_service) == []
        assert not any("DICOM" in k for k in qido_service.stats.by_operation)
    finally:
        statistics.remember(client, qido_service.datastore_id, DatastoreStats(len(records)))


def mg_datastore(keep_mg_studies: int | None) -> LocalService:
    """2,000 generated image sets; MG studies beyond the first *keep_mg_studies* become CR.

    With None, CR, DX and US series become MG instead: MG is then a third of the datastore.
    """
    records = copy.deepcopy(generate_image_sets(2000, seed=21))
    if keep_mg_studies is None:
        for record in records:
            tags = record["DICOMTags"]
            if tags.get("DICOMSeriesModality") in ("CR", "DX", "US"):
                tags["DICOMSeriesModality"] = "MG"
    else:
        kept: list[str] = []
        for record in records:
            tags = record["DICOMTags"]
            if tags.get("DICOMSeriesModality") not in ("MG", "SR"):
                continue
            study = tags["DICOMStudyInstanceUID"]
            if study not in kept and len(kept) < keep_mg_studies:
                kept.append(study)
            if study not in kept:
                tags["DICOMSeriesModality"] = "CR"
    backend = Backend()
    datastore_id = backend.create_datastore("mg")
    backend.add_image_sets(datastore_id, records)
    service = LocalService(backend)
    service.datastore_id = datastore_id
    return service


@pytest.mark.parametrize(
    ("keep", "expect_qido"), [(4, True), (None, False)], ids=["mg-rare", "mg-common"]
)
def test_modality_and_study_dates_pick_the_cheaper_path(
    keep: int | None, expect_qido: bool
) -> None:
    with mg_datastore(keep) as service:
        records = service.backend.image_sets(service.datastore_id)
        query = (
            Query(service.datastore_id)
            .where(Modality="MG")
            .between("StudyDateTime", "1990-01-01", "2030-12-31")
        )
        plan = chosen(query, service)
        assert plan.access == "qido"
        assert ("resolved by" in (plan.note or "")) is expect_qido, plan.note
        expected = brute_force(records, query)
        assert expected  # the cohort is not empty
        service.reset_stats()
        assert ids(query, service) == expected
        scan_pages = math.ceil(len(records) / 50)
        if expect_qido:
            assert service.stats.requests < scan_pages / 2
        assert ids(query.using("search"), service) == expected


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, 40], ids=["no-cap", "cap-40"])
def test_truncation_splits_by_study_date_or_falls_back(
    qido_service: LocalService, cap: int | None
) -> None:
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    query = Query(qido_service.datastore_id).where(Modality="CT")
    dated = query.between("StudyDateTime", "2000-01-01", "2025-12-31")
    qido_service.qido.record_cap = cap
    try:
        with qido_cap(cap):
            plan = chosen(query, qido_service)
            if cap is not None:
                assert "abandoned" in (plan.note or "")  # no StudyDate range: cannot split
            assert ids(query, qido_service) == brute_force(records, query)
            assert ids(dated, qido_service) == brute_force(records, dated)
            forced = Query(qido_service.datastore_id).where(Modality="CT").using("qido")
            if cap is not None:
                from healthimaging_df.errors import DICOMwebTruncatedError

                with pytest.raises(DICOMwebTruncatedError):
                    chosen(forced, qido_service)
    finally:
        qido_service.reset_faults()


@st.composite
def qido_queries(draw: st.DrawFn, records: list[dict[str, Any]], datastore_id: str) -> Query:
    rows = [flat_row(r) for r in records]
    pick = lambda column: draw(st.sampled_from([r[column] for r in rows if r[column]]))  # noqa: E731
    query = Query(datastore_id)
    for step in draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)):
        if step == 0:
            query = query.where(PatientName=pick("PatientName"))
        elif step == 1:
            query = query.where(Modality=draw(st.sampled_from(["MG", "PT", "NM", "US", "SR"])))
        elif step == 2:
            query = query.where(StudyDescription=pick("StudyDescription"))
        elif step == 3:
            query = query.contains(
                "PatientName", draw(st.sampled_from(["Nov", "ü", "Ola", "李"])), case=True
            )
        elif step == 4:
            query = query.matches("StudyDescription", draw(st.sampled_from(["^NM", "SCAN$"])))
        elif step == 5:
            a, b = sorted([pick("StudyDateTime"), pick("StudyDateTime")])
            query = query.between("StudyDateTime", a, b)
        elif step == 6:
            birth = pick("PatientBirthDate")
            query = query.where(PatientBirthDate=birth)
        else:
            query = query.where(SeriesNumber=draw(st.integers(1, 6)), Modality="CT")
    return query


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, 60], ids=["no-cap", "cap-60"])
def test_random_qido_queries_equal_brute_force(qido_service: LocalService, cap: int | None) -> None:
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    client = qido_service.client()

    @settings(
        max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(query=qido_queries(records, qido_service.datastore_id))
    def check(query: Query) -> None:
        frame = query.to_dataframe(client=client, progress=False, max_tps=None)
        assert list(frame["imageSetId"]) == brute_force(records, query)

    qido_service.qido.record_cap = cap
    try:
        with qido_cap(cap):
            check()
    finally:
        qido_service.reset_faults()


def test_an_empty_qido_answer_reads_only_non_primary_image_sets(
    qido_service: LocalService,
) -> None:
    query = Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER", isPrimary=True)
    qido_service.reset_stats()
    assert ids(query, qido_service) == []
    assert qido_service.stats.by_operation.get("SearchImageSets", 0) == 0
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    non_primary = sum(not r["isPrimary"] for r in records)
    plan = chosen(Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER"), qido_service)
    assert plan.chains
    assert all({"isPrimary": False} in c.criteria()["filters"][0]["values"] for c in plan.chains)
    qido_service.reset_stats()
    assert (
        ids(Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER"), qido_service) == []
    )
    assert qido_service.stats.by_operation["SearchImageSets"] < len(records) / 50
    assert non_primary > 0


def test_stats_decide_fan_out_against_scan(qido_service: LocalService) -> None:
    from healthimaging_df.engine import statistics

    client = qido_service.client()
    assert qido_service.datastore_id is not None
    statistics.remember(client, qido_service.datastore_id, DatastoreStats(50, source="given"))
    try:
        query = Query(qido_service.datastore_id).where(Modality="US")
        plan = chosen(query, qido_service)
        assert plan.access == "qido"
        assert "abandoned" not in (plan.note or "")
    finally:
        statistics.remember(client, qido_service.datastore_id, DatastoreStats(2500))


def test_study_date_ranges_split_in_halves_down_to_one_day() -> None:
    assert qido_plan._split("20200101-20200104") == ("20200101-20200102", "20200103-20200104")
    assert qido_plan._split("20200101-20200101") is None
    assert qido_plan._split("20200101") is None


def test_the_resolved_plan_keeps_the_compiled_windows() -> None:
    now = datetime(2026, 3, 4, 15, 0)
    plan = Query(DS).where(PatientName="A^B").compile(now=now)
    again = Query(DS).compile(now=qido_plan._now(plan))
    assert again.chains[0].window == plan.chains[0].window


class _Interrupt(Exception):
    """Raised from the progress callback: the export stops as a killed one would."""


def _cohort_datastore(name: str) -> tuple[LocalService, list[dict[str, Any]]]:
    """1,500 generated image sets; six patients (their every image set) renamed *name*."""
    records = copy.deepcopy(generate_image_sets(1500, seed=31))
    patients = sorted(
        {r["DICOMTags"]["DICOMPatientId"] for r in records if "DICOMPatientId" in r["DICOMTags"]}
    )
    chosen_ids = set(patients[100:106])
    for record in records:
        if record["DICOMTags"].get("DICOMPatientId") in chosen_ids:
            record["DICOMTags"]["DICOMPatientName"] = name
    backend = Backend()
    datastore_id = backend.create_datastore("cohort")
    backend.add_image_sets(datastore_id, records)
    service = LocalService(backend)
    service.datastore_id = datastore_id
    return service, records


def test_a_resumed_export_of_a_qido_plan_is_exact_when_qido_answers_otherwise(
    tmp_path: Any,
) -> None:
    import pandas as pd

    from healthimaging_df.snapshot import read_snapshot

    name = "COHORT^RESUME"
    service, records = _cohort_datastore(name)
    with service, service.dicomweb_environment():
        client = service.client()
        query = Query(service.datastore_id).where(PatientName=name)
        plan = chosen(query, service)
        assert "resolved by PatientID (6 value(s))" in (plan.note or ""), plan.note
        pages: list[int] = []

        def stop_at_third_page(count: int, _: int) -> None:
            pages.append(count)
            if count == 3:
                raise _Interrupt

        target = tmp_path / "cohort.parquet"
        options = {"max_tps": None, "max_concurrency": 1, "checkpoint_interval": 0}
        with pytest.raises(_Interrupt):
            query.to_parquet(str(target), client=client, progress=stop_at_third_page, **options)
        assert (tmp_path / "cohort.parquet.ahi-checkpoint" / "state.json").exists()

        # Between the runs a new patient of that name arrives, whose PatientID sorts first: the
        # resumed plan's chains are numbered otherwise (its chain 0 is that patient's).
        template = copy.deepcopy(
            next(r for r in records if r["DICOMTags"].get("DICOMPatientName") == name)
        )
        template["imageSetId"] = "f" * 32
        template["DICOMTags"]["DICOMPatientId"] = "0000-NEW"
        template["DICOMTags"]["DICOMStudyInstanceUID"] = "1.2.3.4.5.6.7"
        template["DICOMTags"]["DICOMSeriesInstanceUID"] = "1.2.3.4.5.6.7.1"
        template["isPrimary"] = True
        service.backend.add_image_sets(service.datastore_id, [template])
        now = service.backend.image_sets(service.datastore_id)

        resumed = query.to_parquet(str(target), client=client, progress=False, **options)
        assert resumed.resumed_tasks >= 2  # two finished chains were not read again
        fresh_path = tmp_path / "fresh.parquet"
        query.to_parquet(str(fresh_path), client=client, progress=False, **options)
        got, want = read_snapshot(target), read_snapshot(fresh_path)
        assert sorted(got["imageSetId"]) == sorted(brute_force(now, query))
        assert "f" * 32 in set(got["imageSetId"])
        got.attrs, want.attrs = {}, {}
        pd.testing.assert_frame_equal(got, want)


def test_probe_chain_counts_one_page_exactly_and_estimates_more(qido_service: LocalService) -> None:
    from healthimaging_df.engine import statistics

    client = qido_service.client()
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    non_primary = sum(not r["isPrimary"] for r in records)
    many = Query(qido_service.datastore_id).where(isPrimary=False).compile().chains[0]
    qido_service.reset_stats()
    count, exact = statistics.probe_chain(client, qido_service.datastore_id, many, None)
    assert qido_service.stats.requests == 2
    assert not exact
    assert 0.6 * non_primary <= count <= 1.5 * non_primary, (count, non_primary)
    pid = next(
        r["DICOMTags"]["DICOMPatientId"] for r in records if "DICOMPatientId" in r["DICOMTags"]
    )
    one = Query(qido_service.datastore_id).where(PatientID=pid).compile().chains[0]
    qido_service.reset_stats()
    count, exact = statistics.probe_chain(client, qido_service.datastore_id, one, None)
    assert exact
    assert count == sum(r["DICOMTags"].get("DICOMPatientId") == pid for r in records)
    assert qido_service.stats.requests == 1
