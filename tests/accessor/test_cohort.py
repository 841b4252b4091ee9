"""Rollups checked against plain-Python computations written here, on a seeded datastore."""

from __future__ import annotations

import calendar
import re
from collections import Counter, defaultdict
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pytest

import healthimaging_df
from healthimaging_df import cohort
from healthimaging_df.accessor import AHIAccessor, SQLQueryError
from healthimaging_df.errors import HealthImagingDFError, QueryValidationError
from healthimaging_df.local import LocalService


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain dicts, missing values as None."""
    return [
        {k: (None if v is pd.NA or v is pd.NaT or v is None else v) for k, v in row.items()}
        for row in frame.astype(object).to_dict("records")
    ]


def _latest_value(rows: list[dict[str, Any]], column: str) -> Any:
    """The value of the most recently updated row that has one."""
    best: tuple[Any, Any] | None = None
    for row in rows:
        if row[column] is None:
            continue
        if best is None or row["updatedAt"] >= best[0]:
            best = (row["updatedAt"], row[column])
    return None if best is None else best[1]


def _value(x: Any) -> Any:
    if x is None or x is pd.NA or x is pd.NaT:
        return None
    if isinstance(x, float) and np.isnan(x):
        return None
    return x


# -- registration --------------------------------------------------------------------------------


def test_accessor_is_registered_on_import(frame: pd.DataFrame) -> None:
    assert healthimaging_df.__name__ == "healthimaging_df"
    assert isinstance(frame.ahi, AHIAccessor)
    assert frame.ahi is not frame.ahi  # pandas makes a new one each time: nothing cached on it


@pytest.mark.parametrize("dropped", ["imageSetId", "version", "PatientID", "StudyInstanceUID"])
def test_missing_key_column_raises_attribute_error_naming_it(
    frame: pd.DataFrame, dropped: str
) -> None:
    with pytest.raises(AttributeError, match=rf"missing column\(s\): {dropped}$"):
        _ = frame.drop(columns=dropped).ahi
    assert not hasattr(frame.drop(columns=dropped), "ahi")


def test_methods_never_mutate_and_carry_provenance(frame: pd.DataFrame) -> None:
    before = frame.copy(deep=True)
    attrs = frame.attrs["healthimaging_df"]
    assert attrs["datastore_id"]
    results = [
        frame.ahi.studies(),
        frame.ahi.patients(),
        frame.ahi.primary(),
        frame.ahi.latest(),
        frame.ahi.sql("SELECT imageSetId FROM image_sets"),
        *frame.ahi.summary().frames().values(),
    ]
    pd.testing.assert_frame_equal(frame, before)
    assert frame.attrs == before.attrs
    for result in results:
        assert result.attrs["healthimaging_df"] == attrs
        assert result.attrs["healthimaging_df"] is not attrs  # a copy, not shared
    results[2].loc[results[2].index[0], "PatientID"] = "changed"
    pd.testing.assert_frame_equal(frame, before)


# -- studies and patients ------------------------------------------------------------------------


def test_studies_match_a_plain_groupby(frame: pd.DataFrame) -> None:
    studies = frame.ahi.studies()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(frame):
        if row["StudyInstanceUID"] is not None:
            groups[row["StudyInstanceUID"]].append(row)
    assert len(studies) == len(groups) > 500
    assert studies["StudyInstanceUID"].is_unique
    seen = 0
    for study in _rows(studies):
        rows = groups[study["StudyInstanceUID"]]
        assert study["imageSetCount"] == len({r["imageSetId"] for r in rows})
        assert study["seriesCount"] == len(
            {r["SeriesInstanceUID"] for r in rows if r["SeriesInstanceUID"]}
        )
        assert list(study["modalities"]) == sorted({r["Modality"] for r in rows if r["Modality"]})
        assert study["firstUpdatedAt"] == min(r["updatedAt"] for r in rows)
        assert study["lastUpdatedAt"] == max(r["updatedAt"] for r in rows)
        declared = [r["NumberOfStudyRelatedInstances"] for r in rows]
        assert study["NumberOfStudyRelatedInstances"] == max(d for d in declared if d is not None)
        for column in ("PatientID", "PatientName", "StudyDateTime", "StudyDescription"):
            assert study[column] == _latest_value(rows, column), column
        seen += 1
    assert seen == len(groups)
    # Ordered by patient, then date.
    keys = list(zip(studies["PatientID"].fillna("~"), studies["StudyInstanceUID"], strict=True))
    by_patient = [k[0] for k in keys]
    assert by_patient == sorted(by_patient)


def test_studies_counts_agree_with_the_service_records(
    frame: pd.DataFrame, records: list[dict[str, Any]]
) -> None:
    per_study = Counter(r["DICOMTags"]["DICOMStudyInstanceUID"] for r in records)
    studies = frame.ahi.studies().set_index("StudyInstanceUID")
    assert studies["imageSetCount"].to_dict() == dict(per_study)


def test_patients_match_a_plain_groupby(frame: pd.DataFrame) -> None:
    patients = frame.ahi.patients()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(frame):
        if row["PatientID"] is not None:
            groups[row["PatientID"]].append(row)
    assert len(patients) == len(groups) > 150
    assert patients["PatientID"].tolist() == sorted(groups)
    for patient in _rows(patients):
        rows = groups[patient["PatientID"]]
        assert patient["studyCount"] == len({r["StudyInstanceUID"] for r in rows})
        assert patient["imageSetCount"] == len(rows)
        dated = [r["StudyDateTime"] for r in rows if r["StudyDateTime"] is not None]
        assert patient["firstStudyDateTime"] == (min(dated) if dated else None)
        assert patient["lastStudyDateTime"] == (max(dated) if dated else None)
        assert list(patient["modalities"]) == sorted({r["Modality"] for r in rows if r["Modality"]})
        for column in ("PatientSex", "PatientBirthDate", "PatientName"):
            assert patient[column] == _latest_value(rows, column), column


def test_rollups_of_an_empty_frame_are_empty_and_typed(frame: pd.DataFrame) -> None:
    empty = frame.iloc[:0]
    studies, patients = empty.ahi.studies(), empty.ahi.patients()
    assert len(studies) == len(patients) == 0
    assert {"StudyInstanceUID", "modalities", "imageSetCount"} <= set(studies.columns)
    assert str(studies["imageSetCount"].dtype) == "Int64"
    assert {"PatientID", "studyCount"} <= set(patients.columns)
    assert empty.ahi.summary().image_sets == 0


# -- primary and latest --------------------------------------------------------------------------


def test_primary_keeps_exactly_the_primary_image_sets(
    frame: pd.DataFrame, records: list[dict[str, Any]]
) -> None:
    primary = frame.ahi.primary()
    expected = {r["imageSetId"] for r in records if r["isPrimary"]}
    assert set(primary["imageSetId"]) == expected
    assert 0 < len(primary) < len(frame)
    assert primary.index.isin(frame.index).all()


def test_primary_counts_a_missing_flag_as_primary(frame: pd.DataFrame) -> None:
    old_botocore = frame.assign(isPrimary=pd.array([pd.NA] * len(frame), dtype="boolean"))
    assert len(old_botocore.ahi.primary()) == len(frame)


def test_latest_keeps_the_highest_version_after_updates() -> None:
    with LocalService.seeded(image_sets=80, seed=2) as service:
        assert service.datastore_id is not None
        before = healthimaging_df.Query(service.datastore_id).to_dataframe(
            client=service.client(), progress=False
        )
        updated = before["imageSetId"].iloc[::4].tolist()
        for image_set_id in updated:
            service.backend.update_image_set(
                service.datastore_id, image_set_id, tags={"DICOMStudyDescription": "AMENDED"}
            )
        after = healthimaging_df.Query(service.datastore_id).to_dataframe(
            client=service.client(), progress=False
        )
    history = pd.concat([after, before], ignore_index=True)  # newer rows first, then older
    latest = history.ahi.latest()
    assert latest["imageSetId"].is_unique
    assert len(latest) == len(before)
    expected = {r["imageSetId"]: r["version"] for r in _rows(history)}
    for row in _rows(history):
        expected[row["imageSetId"]] = max(expected[row["imageSetId"]], row["version"])
    assert dict(zip(latest["imageSetId"], latest["version"], strict=True)) == expected
    amended = latest[latest["imageSetId"].isin(updated)]
    assert (amended["StudyDescription"] == "AMENDED").all()
    assert len(amended) == len(updated)
    # Rows stay in the frame's order.
    assert latest.index.is_monotonic_increasing


# -- ages ----------------------------------------------------------------------------------------


def _span(text: Any) -> tuple[date, date] | None:
    """Every date a DICOM DA value can stand for, as (first, last); None when unreadable."""
    if not isinstance(text, str):
        return None
    text = text.strip().replace(".", "")
    if not re.fullmatch(r"\d{4}(\d{2}(\d{2})?)?", text):
        return None
    year = int(text[:4])
    try:
        if len(text) == 8:
            day = date(year, int(text[4:6]), int(text[6:]))
            return day, day
        if len(text) == 6:
            month = int(text[4:])
            return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])
        return date(year, 1, 1), date(year, 12, 31)
    except ValueError:
        return None


def _candidates(span: tuple[date, date]) -> list[date]:
    """First and last day of every month in the span (ages are monotone between them)."""
    out = []
    for year in range(span[0].year, span[1].year + 1):
        for month in range(1, 13):
            for day in (1, calendar.monthrange(year, month)[1]):
                moment = date(year, month, day)
                if span[0] <= moment <= span[1]:
                    out.append(moment)
    return out or [span[0]]


def _age_by_enumeration(birth: Any, study: Any) -> int | None:
    born, on = _span(birth), _span(study)
    if born is None or on is None:
        return None
    ages = set()
    for b in _candidates(born):
        for s in _candidates(on):
            ages.add(s.year - b.year - ((s.month, s.day) < (b.month, b.day)))
    if len(ages) != 1:
        return None
    (age,) = ages
    return age if age >= 0 else None


def test_age_at_study_matches_enumeration_on_the_seeded_frame(frame: pd.DataFrame) -> None:
    ages = frame.ahi.age_at_study()
    assert str(ages.dtype) == "Int64"
    assert ages.index.equals(frame.index)
    expected = [
        _age_by_enumeration(b, s)
        for b, s in zip(
            frame["PatientBirthDate"].astype(object),
            frame["StudyDate"].astype(object),
            strict=True,
        )
    ]
    assert [_value(a) for a in ages.astype(object)] == expected
    assert ages.notna().sum() > 1500
    assert ages.isna().sum() > 100


@pytest.mark.parametrize(
    ("birth", "study", "age"),
    [
        ("19730510", "20240509", 50),
        ("19730510", "20240510", 51),
        ("197305", "20240606", 51),
        ("197305", "20240515", None),
        ("1973", "20240606", None),
        ("19730230", "20240606", None),
        ("1973.05.10", "2024.05.10", 51),
        ("20000229", "20010228", 0),
        ("20000229", "20010301", 1),
        ("20250101", "20240101", None),
        ("19731305", "20240101", None),
        ("", "20240101", None),
        (None, "20240101", None),
        ("19800101", "2024", 44),
    ],
)
def test_age_at_study_edge_cases(
    frame: pd.DataFrame, birth: str | None, study: str, age: int | None
) -> None:
    one = frame.head(1).assign(
        PatientBirthDate=pd.array([birth], dtype="string"),
        StudyDate=pd.array([study], dtype="string"),
    )
    assert _value(one.ahi.age_at_study().iloc[0]) == age
    assert _age_by_enumeration(birth, study) == age


# -- summary and plot ----------------------------------------------------------------------------


def _expected_counts(rows: list[dict[str, Any]], key: Any) -> dict[Any, tuple[int, int, int]]:
    sets: dict[Any, tuple[set[Any], set[Any], set[Any]]] = defaultdict(
        lambda: (set(), set(), set())
    )
    for row in rows:
        a, b, c = sets[key(row)]
        a.add(row["imageSetId"])
        if row["StudyInstanceUID"] is not None:
            b.add(row["StudyInstanceUID"])
        if row["PatientID"] is not None:
            c.add(row["PatientID"])
    return {k: (len(a), len(b), len(c)) for k, (a, b, c) in sets.items()}


def _as_dict(counts: pd.DataFrame, column: str) -> dict[Any, tuple[int, int, int]]:
    return {
        _value(row[column]): (row["imageSetCount"], row["studyCount"], row["patientCount"])
        for row in counts.astype(object).to_dict("records")
    }


def _band(age: int | None) -> str | None:
    if age is None:
        return None
    low = min(age // 10 * 10, 90)
    return "90+" if low == 90 else f"{low}-{low + 9}"


def test_summary_counts_match_plain_python(frame: pd.DataFrame) -> None:
    summary = frame.ahi.summary()
    rows = _rows(frame)
    assert summary.image_sets == len(rows)
    assert summary.studies == len({r["StudyInstanceUID"] for r in rows})
    assert summary.patients == len({r["PatientID"] for r in rows if r["PatientID"]})
    checks = {
        "modality": ("Modality", lambda r: r["Modality"]),
        "body_part": ("BodyPartExamined", lambda r: r["BodyPartExamined"]),
        "sex": ("PatientSex", lambda r: r["PatientSex"]),
        "study_year": (
            "studyYear",
            lambda r: _span(r["StudyDate"])[0].year if _span(r["StudyDate"]) else None,
        ),
        "age_band": (
            "ageBand",
            lambda r: _band(_age_by_enumeration(r["PatientBirthDate"], r["StudyDate"])),
        ),
    }
    for name, (column, key) in checks.items():
        got = getattr(summary, name)
        assert _as_dict(got, column) == _expected_counts(rows, key), name
        assert got[column].isna().sum() <= 1
    assert summary.modality["imageSetCount"].is_monotonic_decreasing
    assert summary.sex["patientCount"].is_monotonic_decreasing
    years = summary.study_year["studyYear"].dropna()
    assert years.is_monotonic_increasing
    assert len(years) > 5
    assert summary.age_band["ageBand"].iloc[0] == "0-9"
    assert set(summary.frames()) == {"modality", "body_part", "sex", "study_year", "age_band"}


def test_plot_draws_the_summary_counts(frame: pd.DataFrame) -> None:
    import io

    from matplotlib.figure import Figure

    figure = frame.ahi.plot()
    assert isinstance(figure, Figure)
    panels = figure.axes
    assert len(panels) == 6
    modality = frame.ahi.summary().modality
    heights = [p.get_height() for p in panels[0].patches]
    assert heights == modality["imageSetCount"].astype(int).tolist()
    labels = [t.get_text() for t in panels[0].get_xticklabels()]
    assert labels == modality["Modality"].fillna("(missing)").tolist()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(
    frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "healthimaging-df\[plot\]"'):
        frame.ahi.plot()


# -- SQL -----------------------------------------------------------------------------------------


def test_sql_over_the_frame_matches_pandas(frame: pd.DataFrame) -> None:
    got = frame.ahi.sql(
        "SELECT Modality, count(*) AS n, count(DISTINCT PatientID) AS patients "
        "FROM image_sets WHERE isPrimary GROUP BY Modality ORDER BY Modality"
    )
    primary = [r for r in _rows(frame) if r["isPrimary"]]
    expected = _expected_counts(primary, lambda r: r["Modality"])
    assert got["Modality"].tolist() == sorted(k for k in expected if k is not None)
    assert got["n"].tolist() == [expected[m][0] for m in got["Modality"]]
    assert got["patients"].tolist() == [expected[m][2] for m in got["Modality"]]
    assert str(got["n"].dtype) == "Int64"
    assert str(got["Modality"].dtype) == "string"


def test_sql_sees_the_rollups_and_extra_frames(frame: pd.DataFrame) -> None:
    picked = frame[["PatientID"]].dropna().drop_duplicates().head(7)
    got = frame.ahi.sql(
        "SELECT p.PatientID, p.studyCount, count(s.StudyInstanceUID) AS studies_seen "
        "FROM patients p JOIN studies s USING (PatientID) JOIN picked USING (PatientID) "
        "GROUP BY ALL ORDER BY p.PatientID",
        picked=picked,
    )
    assert got["PatientID"].tolist() == sorted(picked["PatientID"])
    assert (got["studyCount"] == got["studies_seen"]).all()
    timestamps = frame.ahi.sql("SELECT max(updatedAt) AS last FROM image_sets")["last"]
    assert timestamps.iloc[0] == frame["updatedAt"].max()


def test_sql_modality_lists_are_queryable(frame: pd.DataFrame) -> None:
    got = frame.ahi.sql("SELECT count(*) AS n FROM studies WHERE list_contains(modalities, 'SR')")
    studies = frame.ahi.studies()
    expected = sum("SR" in list(m) for m in studies["modalities"])
    assert got["n"].iloc[0] == expected > 0


def test_sql_without_duckdb_names_the_extra(
    frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "duckdb", None)
    with pytest.raises(ImportError, match=r'pip install "healthimaging-df\[duckdb\]"'):
        frame.ahi.sql("SELECT 1")


def test_sql_errors_withhold_duckdb_message_and_its_values(frame: pd.DataFrame) -> None:
    patient = str(frame["PatientID"].dropna().iloc[0])
    assert not patient.isdigit()
    # DuckDB's own message would read: Could not convert string '<PatientID>' to INT32.
    query = "SELECT CAST(PatientID AS INTEGER) AS n FROM image_sets WHERE PatientID = ?"
    with pytest.raises(SQLQueryError) as raised:
        frame.ahi.sql(query.replace("?", f"'{patient}'"))
    error = raised.value
    assert isinstance(error, QueryValidationError)
    assert isinstance(error, HealthImagingDFError)
    assert error.kind == "ConversionException"
    assert patient in error.engine_message  # kept for whoever handles it...
    assert patient not in str(error)  # ...but never in the text that reaches a log
    assert patient not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert str(error).startswith("query: DuckDB raised ConversionException")


@pytest.mark.parametrize(
    ("method", "dropped"),
    [
        ("studies", "updatedAt"),
        ("patients", "StudyInstanceUID"),
        ("primary", "isPrimary"),
        ("age_at_study", "StudyDate"),
        ("summary", "Modality"),
    ],
)
def test_a_missing_column_is_a_validation_error_naming_only_columns(
    frame: pd.DataFrame, method: str, dropped: str
) -> None:
    slim = frame.drop(columns=dropped)
    if method == "patients":  # the accessor itself needs StudyInstanceUID: call the function
        call: Any = lambda: cohort.patients(slim)  # noqa: E731
    else:
        call = getattr(slim.ahi, method)
    with pytest.raises(QueryValidationError) as raised:
        call()
    assert raised.value.field == "frame"
    assert str(raised.value) == f"frame: {method}() needs column(s) the frame lacks: {dropped}"
    values = {str(v) for v in frame["PatientID"].dropna().head(50)}
    assert not any(v in str(raised.value) for v in values)


@pytest.mark.parametrize("width", [0, -10, 2.5, True])
def test_age_band_rejects_a_width_that_is_not_a_positive_integer(width: Any) -> None:
    ages = pd.Series([4, 45], dtype="Int64")
    with pytest.raises(QueryValidationError, match=r"^width: must be a positive integer$"):
        cohort.age_band(ages, width)
    assert cohort.age_band(ages, 5).tolist() == ["0-4", "45-49"]
