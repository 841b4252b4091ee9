"""QIDO-RS as an access path: pure planning, and runs against the local service vs brute force.

PatientName and StudyDescription are study- and patient-level: QIDO-RS matches them only with
``assume_consistent_studies=True`` (see ``plan/qido.py``), which most tests here use to exercise
the QIDO-RS machinery; Modality and SeriesNumber go to QIDO-RS by default.
"""

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
from healthimaging_df.dicomweb import QidoClient
from healthimaging_df.engine import qido as qido_plan
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.local import LocalService
from healthimaging_df.local.backend import Backend
from healthimaging_df.local.generate import generate_image_sets
from healthimaging_df.plan import DatastoreStats, Plan

from .conftest import brute_force, flat_row, update_metadata

DS = "0" * 32


def trusted(query: Query) -> Query:
    """*query* with study- and patient-level conditions allowed to go to QIDO-RS."""
    return query.using(query.strategy, assume_consistent_studies=True)


def dicomweb_url(service: LocalService) -> str:
    """Where the service answers QIDO-RS (its own DICOMweb address, when it has one)."""
    return str(getattr(service, "dicomweb_endpoint_url", service.endpoint_url))


def step_of(query: Query) -> Any:
    plan = query.compile()
    return plan.qido


# -- pure planning ---------------------------------------------------------------------------


def test_patient_name_goes_to_qido_only_on_the_callers_word() -> None:
    plan = Query(DS).where(PatientName="DOE^JANE").compile()
    assert plan.qido is None  # one value per study: AWS does not say a study's image sets agree
    text = plan.explain()
    assert "PatientName (patient-level)" in text
    assert "assume_consistent_studies=True" in text
    assert "DOE" not in text
    series = Query(DS).where(PatientName="DOE^JANE", Modality="CT").compile()
    assert series.qido is not None
    assert [k for s in series.qido.searches for k, _ in s.match] == ["Modality"]


def test_patient_name_becomes_a_qido_study_search_with_values_hidden() -> None:
    plan = trusted(Query(DS).where(PatientName="DOE^JANE")).compile()
    assert plan.access == "qido"
    assert plan.qido is not None
    assert [s.describe(True) for s in plan.qido.searches] == ["GET /studies?PatientName=DOE^JANE"]
    text = plan.explain()
    assert "QIDO-RS step" in text
    assert "assume_consistent_studies=True in force" in text
    assert "GET /studies?PatientName=<value>" in text
    assert "DOE" not in text
    assert "DOE^JANE" in plan.explain(show_values=True)
    assert "DOE" not in repr(plan.qido.searches[0])
    assert plan.chains
    assert plan.chains[0].window is not None


def test_modality_goes_to_series_and_study_datetime_narrows_by_study_date() -> None:
    query = Query(DS).where(Modality=["MG", "CT"]).between("StudyDateTime", "2020", "2021")
    plain = step_of(query)
    assert sorted(s.describe(True) for s in plain.searches) == [
        "GET /series?Modality=CT",
        "GET /series?Modality=MG",
    ]  # StudyDate is a study-level attribute: not matched by QIDO-RS by default
    step = step_of(trusted(query))
    assert step.level == "series"
    assert sorted(s.describe(True) for s in step.searches) == [
        "GET /series?Modality=CT&StudyDate=20200101-20211231",
        "GET /series?Modality=MG&StudyDate=20200101-20211231",
    ]
    assert step.date_range == ("20200101", "20211231")


def test_search_strategy_never_uses_qido_and_qido_forces_it() -> None:
    query = trusted(Query(DS).where(PatientName="DOE^JANE"))
    assert query.using("search").compile().qido is None
    assert query.using("search").compile().access != "qido"
    pinned = trusted(Query(DS).where(PatientID="P1", PatientName="DOE^JANE"))
    assert pinned.compile().qido is None  # an ID already pins the search
    assert pinned.using("qido").compile().qido is not None
    early = trusted(Query(DS).where(PatientName="DOE^JANE").sort_by("createdAt").limit(5))
    assert early.compile().qido is None  # one sorted search that stops early is cheap
    assert early.using("qido").compile().qido is not None
    with pytest.raises(QueryValidationError, match="strategy"):
        Query(DS).where(PatientSex="F").using("qido").compile()
    with pytest.raises(QueryValidationError, match="assume_consistent_studies"):
        Query(DS).where(PatientName="DOE^JANE").using("qido").compile()


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
    step = step_of(trusted(build(Query(DS))))
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
    assert step_of(trusted(build(Query(DS)))) is None


def test_in_lists_multiply_into_searches_up_to_a_cap() -> None:
    names = [f"N{i}^X" for i in range(8)]
    step = step_of(trusted(Query(DS).where(PatientName=names, Modality=["CT", "MR"])))
    assert len(step.searches) == 2 * 8
    assert step.level == "series"
    many = step_of(trusted(Query(DS).where(PatientName=names, Modality=["CT", "MR", "US"])))
    assert len(many.searches) == 3  # the 8 names stay on the client only
    assert all(dict(s.match).keys() == {"Modality"} for s in many.searches)


def test_a_union_says_it_runs_no_qido_step() -> None:
    union = Query(DS).where(Modality="MG") | Query(DS).where(Modality="NM")
    plan = union.compile()
    assert plan.qido is None
    assert all(part.qido is None for part in plan.parts)
    text = plan.explain()
    assert "QIDO-RS step" not in text
    assert "QIDO-RS is not used inside a union" in text


def test_qido_plan_is_pure_and_deterministic() -> None:
    query = trusted(Query(DS).where(StudyDescription="CT HEAD")).between(
        "StudyDateTime", "2020", "2021"
    )
    now = datetime(2026, 1, 1)
    assert query.compile(now=now) == query.compile(now=now)


# -- against the local service -----------------------------------------------------------------


@contextmanager
def qido_cap(cap: int | None) -> Iterator[None]:
    """The engine's QIDO-RS client, told the record cap the local service applies."""
    previous = qido_plan.CLIENT_FACTORY

    def factory(run: Any) -> QidoClient:
        made = previous(run)
        if cap is not None:
            made.record_cap = cap
        return made

    qido_plan.CLIENT_FACTORY = factory
    try:
        yield
    finally:
        qido_plan.CLIENT_FACTORY = previous


def chosen(query: Query, service: LocalService) -> Plan:
    run = engine.prepare(
        service.client(), progress=False, max_tps=None, dicomweb_endpoint_url=dicomweb_url(service)
    )
    return engine.choose(query.spec(), run)


def ids(query: Query, service: LocalService, max_concurrency: int | None = None) -> list[str]:
    frame = query.to_dataframe(
        client=service.client(),
        progress=False,
        max_tps=None,
        max_concurrency=max_concurrency,
        dicomweb_endpoint_url=dicomweb_url(service),
    )
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
    query = trusted(Query(qido_service.datastore_id).where(PatientName=name))
    qido_service.reset_stats()
    assert ids(query, qido_service) == brute_force(records, query)
    operations = qido_service.stats.by_operation
    assert operations.get("SearchDICOMStudies") == 2  # its page, and the empty page ending it
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
        primary = trusted(Query(service.datastore_id).where(PatientName=name, isPrimary=True))
        service.reset_stats()
        assert ids(primary, service) == brute_force(records, primary)
        assert service.stats.requests <= full_scan / 100, service.stats.requests
        # Without isPrimary=True, the non-primary image sets are swept too: QIDO-RS cannot see
        # them, and a conflicting copy may hold the very name asked for. The sweep is sized
        # with one request and, when small, read as one chain of full pages.
        query = trusted(Query(service.datastore_id).where(PatientName=name))
        service.reset_stats()
        assert ids(query, service) == brute_force(records, query)
        sweep_pages = math.ceil(non_primary / 50)
        if share < 0.01:  # a realistic share: the target holds
            assert service.stats.requests <= full_scan / 100, service.stats.requests
            assert service.stats.requests <= sweep_pages + 6
        else:  # 5%: the sweep alone is 5% of a scan; the target cannot hold
            assert service.stats.requests <= sweep_pages * 1.3 + 5, service.stats.requests


def test_the_sweep_is_sized_by_its_first_page_and_read_as_one_chain(
    qido_service: LocalService,
) -> None:
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    non_primary = sum(not r["isPrimary"] for r in records)
    names = Counter(flat_row(r)["PatientName"] for r in records)
    name = min((n for n in names if n), key=lambda n: (names[n], n))
    query = trusted(Query(qido_service.datastore_id).where(PatientName=name))
    plan = chosen(query, qido_service)
    sweep = [c for c in plan.chains if {"isPrimary": False} in c.criteria()["filters"][0]["values"]]
    assert len(sweep) == 1
    assert sweep[0].window is None
    assert "non-primary sweep" in plan.explain()
    qido_service.reset_stats()
    assert ids(query, qido_service) == brute_force(records, query)
    # QIDO-RS 2, the size probe 1 or 2, the patient's chain(s), the sweep's full pages
    assert qido_service.stats.requests <= 2 + 2 + 4 + math.ceil(non_primary / 50)


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
    assert "QIDO-RS not sent" in plan.explain(), plan.explain()
    qido_service.reset_stats()
    assert ids(query, qido_service) == brute_force(records, query)
    assert not any("DICOM" in k for k in qido_service.stats.by_operation)


def test_a_sweep_as_dear_as_the_scan_sends_no_qido_request(qido_service: LocalService) -> None:
    from healthimaging_df.engine import statistics

    client = qido_service.client()
    assert qido_service.datastore_id is not None
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    query = trusted(Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER"))
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
        assert "QIDO-RS not sent" in plan.explain()
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
    dated = trusted(query.between("StudyDateTime", "2000-01-01", "2025-12-31"))
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
        for how in (query, trusted(query)):
            frame = how.to_dataframe(
                client=client,
                progress=False,
                max_tps=None,
                dicomweb_endpoint_url=dicomweb_url(qido_service),
            )
            assert list(frame["imageSetId"]) == brute_force(records, how)

    qido_service.qido.record_cap = cap
    try:
        with qido_cap(cap):
            check()
    finally:
        qido_service.reset_faults()


def test_an_empty_qido_answer_reads_only_non_primary_image_sets(
    qido_service: LocalService,
) -> None:
    query = trusted(
        Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER", isPrimary=True)
    )
    qido_service.reset_stats()
    assert ids(query, qido_service) == []
    assert qido_service.stats.by_operation.get("SearchImageSets", 0) == 0
    records = qido_service.backend.image_sets(qido_service.datastore_id)
    non_primary = sum(not r["isPrimary"] for r in records)
    nobody = trusted(Query(qido_service.datastore_id).where(PatientName="NOBODY^NEVER"))
    plan = chosen(nobody, qido_service)
    assert plan.chains
    assert all({"isPrimary": False} in c.criteria()["filters"][0]["values"] for c in plan.chains)
    qido_service.reset_stats()
    assert ids(nobody, qido_service) == []
    assert qido_service.stats.by_operation["SearchImageSets"] < len(records) / 50
    assert non_primary > 0


def test_statistics_of_a_one_page_datastore_send_no_qido_request(
    qido_service: LocalService,
) -> None:
    """QIDO-RS is priced against the plan it replaces: a scan of about one page beats its
    searches, the empty page ending each, the sweep and a chain, whatever the query matches."""
    from healthimaging_df.engine import statistics

    client = qido_service.client()
    assert qido_service.datastore_id is not None
    statistics.remember(client, qido_service.datastore_id, DatastoreStats(50, source="given"))
    try:
        query = Query(qido_service.datastore_id).where(Modality="US")
        plan = chosen(query, qido_service)
        assert plan.access == "search"
        assert plan.qido is None
        assert "QIDO-RS not sent" in plan.explain()
        qido_service.reset_stats()
        ids(query, qido_service)
        assert not any("DICOM" in k for k in qido_service.stats.by_operation)
    finally:
        statistics.remember(client, qido_service.datastore_id, DatastoreStats(2500))


def test_study_date_ranges_split_in_halves_down_to_one_day() -> None:
    assert qido_plan._split("20200101-20200104") == ("20200101-20200102", "20200103-20200104")
    assert qido_plan._split("20200101-20200101") is None
    assert qido_plan._split("20200101") is None


def test_the_resolved_plan_keeps_the_compiled_windows() -> None:
    from healthimaging_df.plan import fall_back, resolve

    now = datetime(2026, 3, 4, 15, 0)
    plan = trusted(Query(DS).where(PatientName="A^B")).compile(now=now)
    assert plan.qido is not None
    assert fall_back(plan, "test").chains[0].window == plan.chains[0].window
    record = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00100020": {"vr": "LO", "Value": ["P1"]},
    }
    resolved = resolve(plan, [record], 2).plan
    assert resolved is not None
    sweep = [c for c in resolved.chains if c.window is not None]
    assert all(c.window == plan.chains[0].window for c in sweep)


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
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    from healthimaging_df.snapshot import read_snapshot

    name = "COHORT^RESUME"
    service, records = _cohort_datastore(name)
    with service, service.dicomweb_environment():
        client = service.client()
        query = trusted(Query(service.datastore_id).where(PatientName=name))
        plan = chosen(query, service)
        assert "resolved by PatientID (6 value(s))" in (plan.note or ""), plan.note
        pages: list[int] = []

        def stop_at_third_page(count: int, _: int) -> None:
            pages.append(count)
            if count == 3:
                raise _Interrupt

        target = tmp_path / "cohort.parquet"
        options = {"max_tps": None, "max_concurrency": 1, "checkpoint_interval": 0}
        monkeypatch.setenv("AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING", dicomweb_url(service))
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


# -- what was seen on a real account (issue 25), each a test that failed before ------------------


def _quiet(query: Query, service: LocalService, dicomweb: str) -> tuple[list[str], list[str]]:
    """The query's ids and the warnings it gave, DICOMweb looked for at *dicomweb*."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = query.to_dataframe(
            client=service.client(), progress=False, max_tps=None, dicomweb_endpoint_url=dicomweb
        )
    return list(frame["imageSetId"]), [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.fixture
def quick_qido(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's QIDO-RS client backs off in milliseconds (a refused path is retried)."""
    monkeypatch.setattr(qido_plan, "RETRY_BASE", 0.01)


@pytest.mark.parametrize("where", ["absent", "refused"])
def test_dicomweb_absent_or_unreachable_falls_back_once_and_forced_qido_raises(
    qido_service: LocalService, quick_qido: None, where: str
) -> None:
    """Item 1: a 404 (no DICOMweb here) or a refused connection ran into DICOMwebError."""
    from healthimaging_df.errors import DICOMwebError, DICOMwebUnavailableWarning

    records = qido_service.backend.image_sets(qido_service.datastore_id)
    query = Query(qido_service.datastore_id).where(Modality="NM")
    url = (
        f"{qido_service.endpoint_url}/no-dicomweb-here"
        if where == "absent"
        else "http://127.0.0.1:9"
    )
    got, said = _quiet(query, qido_service, url)
    assert got == brute_force(records, query)
    assert len(said) == 1
    assert said[0].startswith("DICOMwebUnavailableWarning: QIDO-RS unavailable")
    assert "HTTP 404" in said[0] if where == "absent" else "ConnectionError" in said[0]
    # remembered: the next query sends no DICOMweb request and says nothing more
    qido_service.reset_stats()
    again, said_again = _quiet(query, qido_service, url)
    assert again == got
    assert said_again == []
    assert not any("DICOM" in k for k in qido_service.stats.by_operation)
    text = query.explain(client=qido_service.client(), dicomweb_endpoint_url=url)
    assert "QIDO-RS not weighed: unavailable here" in text
    with pytest.raises(DICOMwebError):  # forced: the typed error, not a silent fallback
        query.using("qido").to_dataframe(
            client=qido_service.client(), progress=False, max_tps=None, dicomweb_endpoint_url=url
        )
    assert issubclass(DICOMwebUnavailableWarning, Warning)


def test_an_unknown_dicomweb_endpoint_leaves_qido_out_silently(
    qido_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A custom endpoint_url says nothing of where DICOMweb is: not weighed, no warning."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING", raising=False)
    from healthimaging_df.errors import DICOMwebUnavailableError

    records = qido_service.backend.image_sets(qido_service.datastore_id)
    query = Query(qido_service.datastore_id).where(Modality="NM")
    frame = query.to_dataframe(client=qido_service.client(), progress=False, max_tps=None)
    assert list(frame["imageSetId"]) == brute_force(records, query)
    text = query.explain(client=qido_service.client())
    assert "QIDO-RS not weighed: a custom endpoint_url gives no DICOMweb address" in text
    with pytest.raises(DICOMwebUnavailableError):
        query.using("qido").to_dataframe(client=qido_service.client(), progress=False)


def test_a_study_whose_image_sets_disagree_is_exact_by_default(ahi_service_factory: Any) -> None:
    """Item 2: one UpdateImageSetMetadata, no includeStudyImageSets: rows went missing."""
    service = ahi_service_factory(image_sets=400, seed=12)
    client = service.client()
    ds = service.datastore_id
    records = service.backend.image_sets(ds)
    studies = Counter(
        r["DICOMTags"]["DICOMStudyInstanceUID"]
        for r in records
        if r["isPrimary"] and r["DICOMTags"].get("DICOMStudyDescription")
    )
    study = max(studies, key=lambda s: (studies[s], s))
    members = [
        r
        for r in records
        if r["DICOMTags"].get("DICOMStudyInstanceUID") == study and r["isPrimary"]
    ]
    assert len(members) >= 3
    old = members[0]["DICOMTags"]["DICOMStudyDescription"]
    changed = members[len(members) // 2]
    update_metadata(
        client, ds, changed, Study={"StudyDescription": "REVISED X"}
    )  # one image set only: the study's image sets now disagree, as AWS allows
    now = service.backend.image_sets(ds)
    url = dicomweb_url(service)
    for value in (old, "REVISED X"):
        query = Query(ds).where(StudyDescription=value)
        expected = brute_force(now, query)
        assert expected
        got, said = _quiet(query, service, url)
        assert got == expected, value  # sound by default: not matched by QIDO-RS per study
        assert said == []
        assert "StudyDescription (study-level)" in query.explain(
            client=client, dicomweb_endpoint_url=url
        )
    trusted_query = trusted(Query(ds).where(StudyDescription=old))
    assert "assume_consistent_studies=True in force" in trusted_query.explain()


def test_a_rare_modality_in_two_years_is_priced_against_the_date_range_scan() -> None:
    """Item 4: QIDO-RS plus the sweep (52 requests) were chosen over the date-range scan (30)."""
    import warnings

    records = copy.deepcopy(generate_image_sets(10_000, seed=4))
    backend = Backend()
    ds = backend.create_datastore("rare")
    backend.add_image_sets(ds, records)
    service = LocalService(backend)
    service.datastore_id = ds
    with service:
        client = service.client()
        Query(ds).to_dataframe(client=client, progress=False, max_tps=None)  # exact statistics
        for years in (("2015-01-01", "2016-12-31"), ("2010-01-01", "2011-12-31")):
            query = Query(ds).where(Modality="CR").between("StudyDateTime", *years)
            expected = brute_force(records, query)
            counts = []
            for how in (query, query.using("search"), query.using("qido")):
                service.reset_stats()
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    # one reader: the paths' requests compared, not a split's part-empty page
                    assert ids(how, service, max_concurrency=1) == expected
                counts.append(service.stats.requests)
            auto, search, forced = counts
            assert auto <= 1.2 * min(search, forced), (years, counts)


# -- done when: auto is exact, or a typed error, whatever DICOMweb does --------------------------

CONDITIONS = ("denied", "absent", "disagree", "malformed", "short-pages", "cap-on", "cap-off")


def _disagreeing(service: LocalService, studies: int = 12) -> None:
    """UpdateImageSetMetadata on one image set of each of *studies* studies (no
    includeStudyImageSets): their image sets now disagree on StudyDescription and PatientName."""
    client = service.client()
    records = service.backend.image_sets(service.datastore_id)
    by_study: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        uid = record["DICOMTags"].get("DICOMStudyInstanceUID")
        if uid and record["isPrimary"]:
            by_study.setdefault(uid, []).append(record)
    chosen = [members for members in by_study.values() if len(members) >= 2][:studies]
    for number, members in enumerate(chosen):
        target = members[-1]
        update_metadata(
            client,
            service.datastore_id,
            target,
            Patient={"PatientName": f"CHANGED^{number}"},
            Study={"StudyDescription": f"CHANGED {number}"},
        )


@contextmanager
def dicomweb_condition(condition: str) -> Iterator[tuple[LocalService, str]]:
    """A strict local service in *condition*, and where the library is told DICOMweb lives."""
    options: dict[str, Any] = {}
    if condition == "denied":
        options["deny"] = [
            "medical-imaging:SearchDICOMStudies",
            "medical-imaging:SearchDICOMSeries",
            "medical-imaging:SearchDICOMInstances",
        ]
    with LocalService.seeded(image_sets=1_500, seed=23, **options) as service:
        url = dicomweb_url(service)
        if condition == "absent":
            url = service.endpoint_url  # the API address: 404 for DICOMweb paths, as on AWS
        elif condition == "disagree":
            _disagreeing(service)
        elif condition == "malformed":
            service.set_faults(qido_malformed_rate=0.3, seed=5)
        elif condition == "short-pages":
            service.set_faults(qido_short_rate=0.5, qido_page_cap=7, seed=5)
        elif condition == "cap-on":
            service.qido.record_cap = 60
        elif condition == "cap-off":
            service.qido.record_cap = None
        yield service, url


@pytest.mark.slow
@pytest.mark.parametrize("condition", CONDITIONS)
def test_auto_is_exact_or_a_typed_error_whatever_dicomweb_does(
    condition: str, quick_qido: None
) -> None:
    import warnings

    from healthimaging_df.errors import DICOMwebUnavailableWarning, HealthImagingDFError

    with (
        dicomweb_condition(condition) as (service, url),
        qido_cap(60 if condition == "cap-on" else None),
    ):
        records = service.backend.image_sets(service.datastore_id)
        client = service.client()
        outcomes: Counter[str] = Counter()

        @settings(
            max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(query=qido_queries(records, service.datastore_id))
        def check(query: Query) -> None:
            current = service.backend.image_sets(service.datastore_id)
            # the caller's word that studies agree holds here unless they were made to disagree
            for how in (query,) if condition == "disagree" else (query, trusted(query)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DICOMwebUnavailableWarning)
                    try:
                        frame = how.to_dataframe(
                            client=client, progress=False, max_tps=None, dicomweb_endpoint_url=url
                        )
                    except HealthImagingDFError as error:  # typed: allowed, counted
                        outcomes[type(error).__name__] += 1
                        continue
                assert list(frame["imageSetId"]) == brute_force(current, how)
                outcomes["exact"] += 1

        service.reset_stats()
        check()
        assert outcomes["exact"] >= 1, outcomes
        qido_requests = sum(v for k, v in service.stats.by_operation.items() if "DICOM" in k)
        if condition in ("disagree", "malformed", "short-pages", "cap-on", "cap-off"):
            assert qido_requests > 0  # QIDO-RS did take part: its answers were checked


@pytest.mark.parametrize("condition", ["denied", "absent", "malformed"])
def test_forced_qido_raises_a_typed_error_where_auto_falls_back(
    condition: str, quick_qido: None
) -> None:
    import warnings

    from healthimaging_df.errors import DICOMwebError, DICOMwebUnavailableWarning

    with dicomweb_condition(condition) as (service, url):
        if condition == "malformed":
            service.set_faults(qido_malformed_rate=1.0)
        records = service.backend.image_sets(service.datastore_id)
        query = Query(service.datastore_id).where(Modality="NM")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            frame = query.to_dataframe(
                client=service.client(), progress=False, max_tps=None, dicomweb_endpoint_url=url
            )
        assert list(frame["imageSetId"]) == brute_force(records, query)
        assert [w.category for w in said] == [DICOMwebUnavailableWarning]
        with pytest.raises(DICOMwebError):
            query.using("qido").to_dataframe(
                client=service.client(), progress=False, max_tps=None, dicomweb_endpoint_url=url
            )


def test_search_command_with_dicomweb_absent_exits_0_with_the_exact_rows(
    qido_service: LocalService, tmp_path: Any
) -> None:
    """Item 1 on the command line: ``search --where Modality=CT`` exited 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    records = qido_service.backend.image_sets(qido_service.datastore_id)
    query = Query(qido_service.datastore_id).where(Modality="CT")
    out = tmp_path / "ct.csv"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, **qido_service.env(), "PYTHONPATH": str(root)}
    env.pop("AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "healthimaging_df",
            "search",
            "--datastore-id",
            str(qido_service.datastore_id),
            "--where",
            "Modality=CT",
            "--dicomweb-endpoint-url",
            f"{qido_service.endpoint_url}/no-dicomweb-here",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DICOMwebUnavailableWarning" in done.stderr
    assert sorted(pd.read_csv(out)["imageSetId"]) == sorted(brute_force(records, query))
