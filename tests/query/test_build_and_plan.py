"""Building, validating and planning queries: pure, no request sent."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.errors import QueryValidationError

DS = "0123456789abcdef0123456789abcdef"
UID = "1.2.840.99999999.84710745.943275268089"


def filters(query: Query) -> list[list[dict]]:
    return [r.get("searchCriteria", {}).get("filters", []) for r in query.plan()]


# -- the documented example requests ------------------------------------------------------


def test_documented_patient_id_request() -> None:
    # the documented filter, paged in an order no update can change (createdAt ascending)
    assert Query(DS).where(PatientID="SUBJECT08701").plan() == [
        {
            "datastoreId": DS,
            "searchCriteria": {
                "filters": [{"operator": "EQUAL", "values": [{"DICOMPatientId": "SUBJECT08701"}]}],
                "sort": {"sortField": "createdAt", "sortOrder": "ASC"},
            },
        }
    ]


def test_every_chain_without_a_limit_pages_by_created_at_ascending() -> None:
    stable = {"sortField": "createdAt", "sortOrder": "ASC"}
    queries = [
        Query(DS).between("StudyDateTime", datetime(2020, 1, 1), datetime(2021, 1, 1)),
        Query(DS).between("updatedAt", datetime(2020, 1, 1), datetime(2021, 1, 1)),
        Query(DS).where(PatientID=["A", "B"]).sort_by("StudyDateTime"),
        Query(DS).sort_by("updatedAt", ascending=False),
        Query(DS),
    ]
    for query in queries:
        for chain in query.compile().chains:
            assert chain.criteria()["sort"] == stable


def test_documented_study_date_time_request() -> None:
    q = Query(DS).between("StudyDateTime", datetime(1990, 1, 1), datetime(2023, 1, 1))
    [criteria] = [r["searchCriteria"] for r in q.plan()]
    assert criteria["filters"] == [
        {
            "operator": "BETWEEN",
            "values": [
                {
                    "DICOMStudyDateAndTime": {
                        "DICOMStudyDate": "19900101",
                        "DICOMStudyTime": "000000",
                    }
                },
                {
                    "DICOMStudyDateAndTime": {
                        "DICOMStudyDate": "20230101",
                        "DICOMStudyTime": "000000",
                    }
                },
            ],
        }
    ]


def test_documented_created_at_request_is_widened_to_whole_seconds() -> None:
    q = Query(DS).between("createdAt", "1985-04-12T23:20:50.52Z", "2022-04-12T23:20:50.52Z")
    [[between]] = filters(q)
    low, high = (v["createdAt"] for v in between["values"])
    assert low == datetime(1985, 4, 12, 23, 20, 50, tzinfo=timezone.utc)
    assert high == datetime(2022, 4, 12, 23, 20, 51, tzinfo=timezone.utc)
    # the exact bounds stay as a client-side predicate
    [pred] = q.compile().predicates
    assert pred.values[0].microsecond == 520000


def test_documented_series_uid_and_updated_at_sorted_ascending() -> None:
    q = (
        Query(DS)
        .between(
            "updatedAt", "2024-03-11T15:00:05.074000-07:00", "2024-03-11T16:00:05.074000-07:00"
        )
        .where(SeriesInstanceUID=UID)
        .sort_by("updatedAt", ascending=True)
        .limit(100)  # only a limit pushes the query's own sort down (to stop early)
    )
    [request] = q.plan()
    criteria = request["searchCriteria"]
    assert criteria["sort"] == {"sortField": "updatedAt", "sortOrder": "ASC"}
    equal, between = criteria["filters"]
    assert equal == {"operator": "EQUAL", "values": [{"DICOMSeriesInstanceUID": UID}]}
    assert [v["updatedAt"] for v in between["values"]] == [
        datetime(2024, 3, 11, 22, 0, 5, tzinfo=timezone.utc),
        datetime(2024, 3, 11, 23, 0, 6, tzinfo=timezone.utc),
    ]


# -- planner rules -----------------------------------------------------------------------


def test_no_filter_sends_no_search_criteria_but_a_createdat_window() -> None:
    plan = Query(DS).compile(now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert plan.windowed
    [request] = plan.requests()
    [between] = request["searchCriteria"]["filters"]
    assert [v["createdAt"] for v in between["values"]] == [
        datetime(1970, 1, 1, tzinfo=timezone.utc),
        datetime(2026, 1, 3, tzinfo=timezone.utc),
    ]
    assert request["searchCriteria"]["sort"] == {"sortField": "createdAt", "sortOrder": "ASC"}


def test_most_selective_id_is_pushed_and_in_list_fans_out() -> None:
    q = Query(DS).where(PatientID="P1", StudyInstanceUID=["1.2.3", "1.2.4", "1.2.5"])
    plan = q.compile()
    assert len(plan.chains) == 3
    keys = [f[0]["values"][0] for f in filters(q)]
    assert keys == [{"DICOMStudyInstanceUID": u} for u in ("1.2.3", "1.2.4", "1.2.5")]
    assert not plan.windowed
    assert {p.column for p in plan.pushed} == {"StudyInstanceUID"}
    assert {p.column for p in plan.predicates} == {"PatientID", "StudyInstanceUID"}


def test_is_primary_pushed_only_without_an_id() -> None:
    assert filters(Query(DS).where(isPrimary=True, PatientID="P"))[0] == [
        {"operator": "EQUAL", "values": [{"DICOMPatientId": "P"}]}
    ]
    [[equal, _window]] = filters(Query(DS).where(isPrimary=False))
    assert equal == {"operator": "EQUAL", "values": [{"isPrimary": False}]}


def test_client_side_columns_are_never_sent() -> None:
    q = Query(DS).where(Modality="CT", PatientSex="F").contains("StudyDescription", "CHEST")
    sent = str(q.plan())
    assert "CT" not in sent
    assert "CHEST" not in sent


def test_date_only_upper_bound_covers_the_whole_day() -> None:
    q = Query(DS).between("StudyDateTime", "2020-01-01", "2020-12-31")
    [[between]] = filters(q)
    assert between["values"][1]["DICOMStudyDateAndTime"] == {
        "DICOMStudyDate": "20201231",
        "DICOMStudyTime": "235959.999999",
    }
    pred = q.compile().predicates[0]
    assert pred.values[1] == datetime(2020, 12, 31, 23, 59, 59, 999999)


def test_year_and_month_bounds_cover_the_period() -> None:
    pred = Query(DS).between("createdAt", "2021", "2022-02").predicates[0]
    assert pred.values == (
        datetime(2021, 1, 1, tzinfo=timezone.utc),
        datetime(2022, 2, 28, 23, 59, 59, 999999, tzinfo=timezone.utc),
    )


def test_naive_is_utc_and_aware_is_converted() -> None:
    q = Query(DS).between("createdAt", datetime(2024, 1, 1, 9), "2024-01-01T12:00:00+02:00")
    assert q.predicates[0].values == (
        datetime(2024, 1, 1, 9, tzinfo=timezone.utc),
        datetime(2024, 1, 1, 10, tzinfo=timezone.utc),
    )
    with pytest.raises(QueryValidationError, match="lower bound is after"):
        Query(DS).between("createdAt", datetime(2024, 1, 1, 12), "2024-01-01T12:00:00+02:00")


def test_dates_and_timestamps_accepted() -> None:
    import pandas as pd

    q = Query(DS).between("updatedAt", date(2024, 1, 1), pd.Timestamp("2024-02-01", tz="UTC"))
    assert q.predicates[0].values[0] == datetime(2024, 1, 1, tzinfo=timezone.utc)


def test_contradictions_send_nothing() -> None:
    plan = Query(DS).where(PatientID="A").where(PatientID="B").compile()
    assert plan.chains == ()
    assert "cannot all hold" in plan.explain()
    plan = (
        Query(DS)
        .between("createdAt", "2020-01-01", "2020-02-01")
        .between("createdAt", "2021-01-01", "2021-02-01")
        .compile()
    )
    assert plan.chains == ()


def test_repeated_ranges_intersect() -> None:
    q = (
        Query(DS)
        .between("createdAt", "2020-01-01", "2020-12-31")
        .between("createdAt", "2020-06-01", "2021-06-01")
    )
    [[between, *_]] = filters(q)
    assert between["values"][0]["createdAt"] == datetime(2020, 6, 1, tzinfo=timezone.utc)
    assert between["values"][1]["createdAt"] == datetime(2021, 1, 1, tzinfo=timezone.utc)


def test_limit_with_api_sort_is_a_single_sorted_chain_that_stops_early() -> None:
    plan = Query(DS).sort_by("createdAt", ascending=True).limit(10).compile()
    assert not plan.windowed
    assert plan.stops_early
    assert plan.requests() == [
        {
            "datastoreId": DS,
            "searchCriteria": {"sort": {"sortField": "createdAt", "sortOrder": "ASC"}},
        }
    ]
    assert not Query(DS).sort_by("Modality").limit(10).compile().stops_early


def test_query_is_immutable() -> None:
    base = Query(DS)
    narrowed = base.where(PatientID="P").limit(5)
    assert base.predicates == ()
    assert base.row_limit is None
    assert narrowed is not base
    with pytest.raises(AttributeError):
        narrowed.row_limit = 3  # type: ignore[misc]


def test_round_trip_through_dict() -> None:
    q = (
        Query(DS)
        .where(PatientID=["P1", "P2"], isPrimary=True)
        .where_not(Modality="SR")
        .between("StudyDateTime", "2020", "2021")
        .matches("StudyDescription", "^CT", case=False)
        .not_null("Modality")
        .sort_by("createdAt", ascending=True)
        .limit(7)
    )
    assert Query.from_dict(q.to_dict()) == q


# -- validation: clear errors that name the field and rule, never the value ----------------


@pytest.mark.parametrize(
    ("build", "field", "rule"),
    [
        (lambda q: q.where(PatientNmae="x"), "PatientNmae", "valid columns: imageSetId"),
        (lambda q: q.where(PatientID=[]), "PatientID", "empty"),
        (lambda q: q.between("createdAt", "2021-01-02", "2021-01-01"), "createdAt", "after"),
        (lambda q: q.where(SeriesInstanceUID=["1.2.3", "1.2.x9"]), "SeriesInstanceUID", "UID"),
        (lambda q: q.where(StudyInstanceUID=".1.2"), "StudyInstanceUID", "UID"),
        (lambda q: q.where(PatientID="P" * 513), "PatientID", "512"),
        (lambda q: q.limit(0), "limit", "positive"),
        (lambda q: q.limit(True), "limit", "positive"),
        (lambda q: q.where(isPrimary="yes"), "isPrimary", "True or False"),
        (lambda q: q.where(SeriesNumber="3"), "SeriesNumber", "integer"),
        (lambda q: q.where(PatientID=12345), "PatientID", "text"),
        (lambda q: q.where(PatientID=None), "PatientID", "is_null"),
        (lambda q: q.matches("PatientName", "(unclosed"), "PatientName", "regular expression"),
        (lambda q: q.contains("SeriesNumber", "1"), "SeriesNumber", "text column"),
        (lambda q: q.between("isPrimary", False, True), "isPrimary", "ordered"),
        (lambda q: q.between("createdAt", "not a date", "2020"), "createdAt", "dateutil"),
        (
            lambda q: q.between("StudyDateTime", "2020-01-01T00:00Z", "2021"),
            "StudyDateTime",
            "naive",
        ),
        (lambda q: q.sort_by("Nope"), "Nope", "unknown column"),
    ],
)
def test_bad_input_is_refused_before_any_request(build, field: str, rule: str) -> None:
    with pytest.raises(QueryValidationError) as info:
        build(Query(DS))
    assert info.value.field == field
    assert rule in str(info.value)


def test_error_names_position_not_value() -> None:
    secret = "1.2.x.SECRET"
    with pytest.raises(QueryValidationError) as info:
        Query(DS).where(SeriesInstanceUID=["1.2.3", "1.2.4", secret])
    assert info.value.position == 2
    assert "#3" in str(info.value)  # positions count from 1 in messages
    assert secret not in str(info.value)


def test_bad_datastore_id() -> None:
    with pytest.raises(QueryValidationError, match="datastore_id"):
        Query("not-a-datastore")


def test_repr_and_explain_hide_values() -> None:
    q = Query(DS).where(PatientID="SMITH^JOHN-123").contains("PatientName", "SMITH")
    assert "SMITH" not in repr(q)
    assert "SMITH" not in q.explain()
    assert "SMITH^JOHN-123" in q.explain(show_values=True)


def test_explain_states_chains_pushdown_and_client_side_work() -> None:
    text = (
        Query(DS)
        .where(PatientID=["a", "b", "c"], Modality="CT")
        .between("StudyDateTime", "2020", "2020")
        .limit(5)
        .explain()
    )
    assert "request chains: 3" in text
    assert "PatientID in <3 values>" in text
    assert "Modality == <1 value>" in text.split("applied on the client")[1]
    assert "first 5 rows" in text


def test_unbounded_window_upper_bound_moves_with_now() -> None:
    now = datetime(2030, 5, 5, 13, 0, tzinfo=timezone.utc)
    plan = Query(DS).compile(now=now)
    assert plan.chains[0].window is not None
    assert plan.chains[0].window[1] - now < timedelta(days=2)


def test_study_dates_before_year_1000_keep_eight_digits() -> None:
    q = Query(DS).between("StudyDateTime", datetime(999, 1, 2), datetime(999, 12, 31, 1, 2, 3))
    [[between]] = filters(q)
    assert [v["DICOMStudyDateAndTime"] for v in between["values"]] == [
        {"DICOMStudyDate": "09990102", "DICOMStudyTime": "000000"},
        {"DICOMStudyDate": "09991231", "DICOMStudyTime": "010203"},
    ]


def test_equality_takes_exactly_one_value() -> None:
    from healthimaging_df.plan import predicates

    with pytest.raises(QueryValidationError, match="exactly one value"):
        predicates.build("PatientID", "eq", ())
    with pytest.raises(QueryValidationError, match="exactly one value"):
        predicates.build("PatientID", "ne", ("a", "b"))


def test_a_redacted_query_cannot_be_rebuilt_into_an_empty_one() -> None:
    from healthimaging_df.store.redact import redact_query_json

    data = json.loads(redact_query_json(json.dumps(Query(DS).where(PatientID="P").to_dict())))
    with pytest.raises(QueryValidationError, match="redacted"):
        Query.from_dict(data)


# -- input that could never match, or would be read wrongly, is refused when built ---------


@pytest.mark.parametrize(
    ("build", "field", "rule"),
    [
        (lambda q: q.where(PatientID=""), "PatientID", "empty"),
        (lambda q: q.where(PatientID=["P1", ""]), "PatientID", "empty"),
        (lambda q: q.where_not(Modality=""), "Modality", "empty"),
        (lambda q: q.where(Modality="ct"), "Modality", "case=False"),
        (lambda q: q.where(Modality="CT,MR"), "Modality", "uppercase"),
        (lambda q: q.where(Modality="=CT"), "Modality", "code string"),
        (lambda q: q.where(Modality=" CT"), "Modality", "code string"),
        (lambda q: q.where(BodyPartExamined="chest"), "BodyPartExamined", "case=False"),
        (lambda q: q.where_not(PatientSex="m"), "PatientSex", "code string"),
        (lambda q: q.between("StudyDateTime", "March", "2021"), "StudyDateTime", "year"),
        (lambda q: q.between("createdAt", "2020", "12"), "createdAt", "year"),
        (lambda q: q.between("createdAt", "10:00", "2021"), "createdAt", "year"),
        (lambda q: q.between("StudyDateTime", "01/02/2021", "2022"), "StudyDateTime", "ambiguous"),
        (lambda q: q.between("StudyDateTime", pd.NaT, "2022"), "StudyDateTime", "NaT"),
        (lambda q: q.between("createdAt", "2020", pd.NaT), "createdAt", "NaT"),
        (lambda q: q.where(createdAt=pd.NaT), "createdAt", "NaT"),
        (lambda q: q.between("createdAt", "2020", "9999"), "createdAt", "9998"),
        (lambda q: q.between("StudyDateTime", "2020", "9999-12-31"), "StudyDateTime", "9998"),
        (lambda q: q.between("createdAt", "2020-01-01T00:00+25:00", "2021"), "createdAt", "24"),
    ],
)
def test_values_that_can_never_match_are_refused(build, field: str, rule: str) -> None:
    with pytest.raises(QueryValidationError) as info:
        build(Query(DS))
    assert info.value.field == field
    assert rule in str(info.value)


def test_code_strings_keep_exact_uppercase_values_and_ids_stay_exact() -> None:
    q = Query(DS).where(Modality=["CT", "MR"], BodyPartExamined="HEAD_NECK", PatientSex="O")
    assert [p.op for p in q.predicates] == ["in", "eq", "eq"]
    assert Query(DS).where(PatientID=" p1 ").predicates[0].values == (" p1 ",)
    assert Query(DS).contains("Modality", "ct", case=False).predicates[0].op == "contains"


def test_day_first_or_month_first_is_unambiguous_when_the_day_is_over_12() -> None:
    q = Query(DS).between("StudyDateTime", "13/02/2021", "2021-12-31")
    assert q.predicates[0].values[0] == datetime(2021, 2, 13)
    assert Query(DS).between("StudyDateTime", "2021-01-02", "2021").predicates[0].values[0] == (
        datetime(2021, 1, 2)
    )


def test_where_on_a_date_means_that_whole_day() -> None:
    for day in (date(2021, 3, 4), "2021-03-04"):
        q = Query(DS).where(StudyDateTime=day)
        (p,) = q.predicates
        assert p.op == "between"
        assert p.values == (datetime(2021, 3, 4), datetime(2021, 3, 4, 23, 59, 59, 999999))
        assert "DICOMStudyDateAndTime" in json.dumps(q.plan())
    instant = Query(DS).where(StudyDateTime=datetime(2021, 3, 4, 10, 30))
    assert instant.predicates[0].op == "eq"
    with pytest.raises(QueryValidationError, match="between"):
        Query(DS).where(StudyDateTime=[date(2021, 3, 4), date(2021, 3, 5)])


# -- derived values: filtered exactly on the client, never pushed down --------------------


def test_derived_values_are_client_side_and_explained() -> None:
    q = Query(DS).where(PatientID="P1", StudyYear=[2020, 2021]).between("ageAtStudy", 40, 60)
    plan = q.compile()
    assert [p.column for p in plan.pushed] == ["PatientID"]
    sent = json.dumps(q.plan(), default=str)
    assert "2020" not in sent
    assert "ageAtStudy" not in sent
    text = q.explain()
    client_side = text.split("applied on the client")[1]
    assert "ageAtStudy between <2 values> (derived from PatientBirthDate, StudyDate" in client_side
    assert "StudyYear in <2 values>" in client_side
    assert Query.from_dict(q.to_dict()) == q


@pytest.mark.parametrize(
    ("build", "rule"),
    [
        (lambda q: q.between("ageAtStudy", "40", 60), "integer"),
        (lambda q: q.contains("StudyYear", "20"), "number"),
        (lambda q: q.sort_by("ageAtStudy"), "not sorting"),
        (lambda q: q.between("ageAtStudy", 60, 40), "after"),
    ],
)
def test_derived_values_are_validated(build, rule: str) -> None:
    with pytest.raises(QueryValidationError) as info:
        build(Query(DS))
    assert rule in str(info.value)


def test_derived_masks_match_the_accessor() -> None:
    import pyarrow as pa

    from healthimaging_df import cohort
    from healthimaging_df.plan import predicates

    table = pa.table(
        {
            "PatientBirthDate": ["19730515", "1973", "197305", None, "19800101", "bad"],
            "StudyDate": ["20240514", "20240606", "20240606", "20240101", "2024", "20240101"],
        }
    )
    ages = cohort.age_at_study(table.to_pandas()).tolist()
    assert ages[:3] == [50, pd.NA, 51]
    mask = predicates.build("ageAtStudy", "between", (50, 51)).mask(table).to_pylist()
    assert mask == [True, False, True, False, False, False]
    missing = predicates.build("ageAtStudy", "is_null").mask(table).to_pylist()
    assert missing == [a is pd.NA for a in ages]
    years = predicates.build("StudyYear", "eq", (2024,)).mask(table).to_pylist()
    assert years == [True] * 6


def test_a_pandas_series_or_index_is_an_in_list() -> None:
    ids = pd.Series(["P2", "P1", "P2"])
    assert Query(DS).where(PatientID=ids).predicates[0].values == ("P2", "P1")
    assert Query(DS).where(PatientID=pd.Index(["P1"])).predicates[0].op == "eq"
    assert Query(DS).where_not(PatientID=ids).predicates[0].op == "not_in"
