"""The translator against the installed Polars: predicates captured from a real IO source.

Run by the normal suite against the installed Polars, and by ``make polars-matrix`` against
every supported version (1.26, 1.33, 1.39, 1.44, 2.1): the serialised form differs between them,
the translations must not.
"""

from __future__ import annotations

import logging
import warnings
from datetime import date, datetime, timedelta, timezone
from typing import Any

import polars as pl
import pytest

from healthimaging_df.polars import scan_image_sets, translate

from .conftest import capture

DS = "0" * 32
UTC = timezone.utc
T1 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
T2 = datetime(2024, 2, 1, tzinfo=UTC)
NOW = datetime(2025, 6, 1, 15, 30, tzinfo=UTC)


def conditions(build: Any, engine: str = "auto") -> tuple[set[tuple[Any, ...]], Any]:
    """The query's predicates (as comparable tuples) for what Polars hands the source."""
    received = capture(build, engine)
    translation = translate(DS, received.predicate, received.n_rows, now=NOW)
    query = translation.query
    found = {(p.column, p.op, p.values) for p in query.predicates if not query.parts}
    return found, translation


def test_equality_in_and_between_are_pushed() -> None:
    found, t = conditions(
        lambda lf: lf.filter(
            (pl.col("PatientID") == "P1")
            & pl.col("Modality").is_in(["CT", "MR"])
            & pl.col("createdAt").is_between(T1, T2)
        )
    )
    assert found == {
        ("PatientID", "eq", ("P1",)),
        ("Modality", "in", ("CT", "MR")),
        ("createdAt", "between", (T1, T2)),
    }
    assert t.kept == []
    assert t.query.plan()[0]["searchCriteria"]["filters"][0]["values"] == [{"DICOMPatientId": "P1"}]


@pytest.mark.parametrize("engine", ["in-memory", "streaming"])
def test_both_engines_hand_over_the_same_predicate(engine: str) -> None:
    found, _ = conditions(lambda lf: lf.filter(pl.col("PatientID") == "P1"), engine)
    assert found == {("PatientID", "eq", ("P1",))}


def test_literal_on_the_left_is_flipped() -> None:
    found, _ = conditions(lambda lf: lf.filter(pl.lit(5) < pl.col("SeriesNumber")))
    assert found == {("SeriesNumber", "between", (6, 2**63 - 1))}  # > 5 is >= 6 for integers


def test_one_sided_timestamps_take_the_planners_bounds() -> None:
    found, _ = conditions(lambda lf: lf.filter(pl.col("updatedAt") >= T1))
    ahead = datetime(2025, 6, 3, tzinfo=UTC)  # two days after NOW, at midnight
    assert found == {("updatedAt", "between", (T1, ahead))}
    found, _ = conditions(lambda lf: lf.filter(pl.col("createdAt") < T2))
    assert found == {
        ("createdAt", "between", (datetime(1970, 1, 1, tzinfo=UTC), T2 - timedelta(microseconds=1)))
    }


def test_one_sided_study_datetime_is_not_pushed_but_both_ends_are() -> None:
    low, high = datetime(2024, 1, 2), datetime(2024, 1, 15)
    found, t = conditions(lambda lf: lf.filter(pl.col("StudyDateTime") >= low))
    assert found == set()
    assert len(t.kept) == 1
    found, t = conditions(
        lambda lf: lf.filter((pl.col("StudyDateTime") >= low) & (pl.col("StudyDateTime") <= high))
    )
    assert found == {("StudyDateTime", "between", (low, high))}
    assert t.kept == []


def test_sql_between_in_like_and_group_by() -> None:
    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return pl.SQLContext(frames={"image_sets": lf}).execute(
            "SELECT Modality, count(*) AS n FROM image_sets WHERE StudyDateTime BETWEEN "
            "'2024-01-02' AND '2024-01-15' AND Modality IN ('CT', 'MR') AND PatientID LIKE 'P1%' "
            "GROUP BY Modality",
            eager=False,
        )

    found, t = conditions(build)
    assert ("Modality", "in", ("CT", "MR")) in found
    assert ("StudyDateTime", "between", (datetime(2024, 1, 2), datetime(2024, 1, 15))) in found
    assert ("PatientID", "regex", ("^P1",)) in found  # LIKE 'P1%': starts_with, or its regex
    assert t.kept == []


def test_or_of_translatable_parts_is_a_union() -> None:
    received = capture(
        lambda lf: lf.filter(
            ((pl.col("PatientID") == "P1") | (pl.col("PatientID") == "P2"))
            & (pl.col("Modality") == "CT")
        )
    )
    t = translate(DS, received.predicate, received.n_rows)
    assert len(t.query.parts) == 2
    assert {
        tuple((p.column, p.op, p.values) for p in part.predicates) for part in t.query.parts
    } == {
        (("PatientID", "eq", ("P1",)), ("Modality", "eq", ("CT",))),
        (("PatientID", "eq", ("P2",)), ("Modality", "eq", ("CT",))),
    }
    assert len(t.query.plan()) == 2  # a chain per patient
    assert t.kept == []


def test_or_with_an_untranslatable_side_is_not_pushed() -> None:
    found, t = conditions(
        lambda lf: lf.filter((pl.col("PatientID") == "P1") | (pl.col("SeriesNumber") % 2 == 0))
    )
    assert found == set()
    assert len(t.kept) == 1


def test_udf_conjunct_is_kept_and_the_rest_pushed(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Polars' advice to use a native expression
        udf = pl.col("SeriesNumber").map_elements(lambda v: v > 1, return_dtype=pl.Boolean)
    found, t = conditions(lambda lf: lf.filter(udf & (pl.col("PatientID") == "P1")))
    assert found == {("PatientID", "eq", ("P1",))}
    assert len(t.kept) == 1
    assert "P1" not in " ".join(t.describe())


def test_text_null_and_negation_shapes() -> None:
    found, t = conditions(
        lambda lf: lf.filter(
            pl.col("StudyDescription").str.contains("CHEST", literal=True)
            & pl.col("PatientName").str.starts_with("DOE")
            & pl.col("AccessionNumber").is_null()
            & pl.col("BodyPartExamined").is_not_null()
            & ~pl.col("Modality").is_in(["SR"])
            & pl.col("isPrimary")
        )
    )
    assert found == {
        ("StudyDescription", "contains", ("CHEST",)),
        ("PatientName", "regex", ("^DOE",)),
        ("AccessionNumber", "is_null", ()),
        ("BodyPartExamined", "not_null", ()),
        ("Modality", "ne", ("SR",)),
        ("isPrimary", "eq", (True,)),
    }
    assert t.kept == []


def test_regex_contains_is_pushed_only_when_literal() -> None:
    found, _ = conditions(lambda lf: lf.filter(pl.col("StudyDescription").str.contains("CHEST")))
    assert found == {("StudyDescription", "contains", ("CHEST",))}
    found, t = conditions(lambda lf: lf.filter(pl.col("StudyDescription").str.contains("CH.ST")))
    assert found == set()
    assert len(t.kept) == 1


def test_values_the_query_refuses_are_kept_not_raised() -> None:
    found, t = conditions(
        lambda lf: lf.filter((pl.col("Modality") == "ct") & (pl.col("PatientID") == "P1"))
    )
    assert found == {("PatientID", "eq", ("P1",))}  # 'ct' is no DICOM code string
    assert len(t.kept) == 1


def test_naive_datetime_against_a_utc_column_is_not_pushed() -> None:
    t = translate(DS, pl.col("createdAt") >= datetime(2024, 1, 1), None)
    assert t.query.predicates == ()
    assert len(t.kept) == 1


def test_head_alone_is_a_limit() -> None:
    received = capture(lambda lf: lf.head(7))
    assert received.n_rows == 7
    t = translate(DS, received.predicate, received.n_rows)
    assert t.query.row_limit == 7
    assert t.predicate is None


def test_head_then_filter_slices_first_and_filters_after() -> None:
    received = capture(lambda lf: lf.head(2).filter(pl.col("PatientID") == "P1"))
    t = translate(DS, received.predicate, received.n_rows)
    if received.predicate is None:  # Polars < 1.39 filters itself after the slice
        assert t.query.row_limit == 2
        return
    assert received.n_rows == 2
    assert t.query.predicates == ()  # the first 2 rows of the unfiltered scan
    assert t.query.row_limit == 2
    assert t.predicate is not None
    assert len(t.kept) == 1


def test_filter_then_head_pushes_the_filter_and_no_limit() -> None:
    received = capture(lambda lf: lf.filter(pl.col("PatientID") == "P1").head(2))
    assert received.n_rows is None  # Polars applies this head itself
    t = translate(DS, received.predicate, received.n_rows)
    assert {(p.column, p.op) for p in t.query.predicates} == {("PatientID", "eq")}
    assert t.query.row_limit is None


def test_sort_head_top_k_hint_is_stripped() -> None:
    received = capture(
        lambda lf: lf.filter(pl.col("PatientID") == "P1").sort("createdAt", descending=True).head(3)
    )
    t = translate(DS, received.predicate, received.n_rows)
    assert {(p.column, p.op) for p in t.query.predicates} == {("PatientID", "eq")}
    assert t.predicate is not None
    frame = pl.DataFrame(schema=_schema())
    assert frame.filter(t.predicate).height == 0  # evaluable: no dynamic_pred node left


def test_projection_reaches_the_source() -> None:
    received = capture(lambda lf: lf.select("PatientID", "Modality"), engine="streaming")
    assert received.calls[0][0] == ["PatientID", "Modality"]


def test_log_names_what_was_not_pushed_without_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="healthimaging_df.polars")
    lf = scan_image_sets(DS, client=object())
    from healthimaging_df.polars import explain

    text = explain(
        lf.filter(
            (pl.col("PatientID") == "SECRET-ID-42")
            & (pl.col("PatientName").str.to_lowercase() == "secret name")
        )
    )
    assert "NOT pushed" in text
    assert 'col("PatientName")' in text
    for value in ("SECRET-ID-42", "secret name"):
        assert value not in text
        assert value not in caplog.text
    assert "NOT pushed" in caplog.text


def test_dates_are_whole_days_and_supersets() -> None:
    t = translate(DS, pl.col("createdAt") <= pl.lit(date(2024, 1, 1)), None)
    # a date against a timestamp: Polars compares the cast midnight; the query's end of day
    # is a superset either way, and the source re-applies the predicate exactly
    values = [p.values for p in t.query.predicates]
    assert values
    assert values[0][1] >= datetime(2024, 1, 1, tzinfo=UTC)


def _schema() -> dict[str, Any]:
    from healthimaging_df.polars import polars_schema

    return polars_schema()
