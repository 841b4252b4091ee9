"""scan_image_sets against the local service: the lazy result is the query's, request for request.

For random conjunctions of filters written as Polars expressions (hypothesis), the lazy scan's
result equals ``Query.to_dataframe`` of the same query written with ``Query``, converted, and the
requests sent are the same (each run starts from empty statistics, so both probe alike). Parts
that cannot be translated are still exact: the oracle is Polars filtering the whole datastore.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthimaging_df import Query, schema
from healthimaging_df.errors import QueryValidationError, SearchError
from healthimaging_df.local import LocalService
from healthimaging_df.polars import scan_image_sets
from healthimaging_df.polars import sql as ahi_sql

from .conftest import FreshStatistics

Atom = tuple[pl.Expr, Callable[[Query], Query]]
# requests are compared with one worker each: a windowed scan's splits depend on timing when
# several readers compete (a loaded machine splits one window more or less)
ONE = 1
SLOW = settings(
    max_examples=int(os.environ.get("AHI_POLARS_EXAMPLES", "25")),  # make polars-matrix: fewer
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def everything(polars_service: LocalService) -> pl.DataFrame:
    """The whole datastore, read once (the oracle filters it with Polars)."""
    table = Query(polars_service.datastore_id).to_arrow(
        client=polars_service.client(), progress=False
    )
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def converted(frame: pd.DataFrame) -> pl.DataFrame:
    table = pa.Table.from_pandas(frame, schema=schema.arrow_schema(), preserve_index=False)
    out = pl.from_arrow(table)
    assert isinstance(out, pl.DataFrame)
    return out.sort("imageSetId")


def values(frame: pl.DataFrame, column: str) -> list[Any]:
    return sorted(frame[column].drop_nulls().unique().to_list())


def open_end() -> datetime:
    """What an open upper end of a timestamp range is: two days ahead, at midnight UTC."""
    ahead = datetime.now(timezone.utc) + timedelta(days=2)
    return ahead.replace(hour=0, minute=0, second=0, microsecond=0)


@st.composite
def atoms(draw: st.DrawFn, data: pl.DataFrame) -> Atom:
    """One translatable filter: a Polars expression and the same condition stated with Query."""
    kind = draw(
        st.sampled_from(["eq", "in", "flag", "between", "ge", "le", "null", "contains", "starts"])
    )
    if kind == "eq":
        column = draw(
            st.sampled_from(["PatientID", "StudyInstanceUID", "AccessionNumber", "Modality"])
        )
        value = draw(st.sampled_from(values(data, column)))
        return pl.col(column) == value, lambda q: q.where(**{column: value})
    if kind == "in":
        column = draw(st.sampled_from(["PatientID", "Modality"]))
        chosen = draw(
            st.lists(st.sampled_from(values(data, column)), min_size=1, max_size=4, unique=True)
        )
        return pl.col(column).is_in(chosen), lambda q: q.where(**{column: chosen})
    if kind == "flag":
        flag = draw(st.booleans())
        return pl.col("isPrimary") == flag, lambda q: q.where(isPrimary=flag)
    if kind in ("between", "ge", "le"):
        column = draw(
            st.sampled_from(
                ["createdAt", "updatedAt", "StudyDateTime"]
                if kind == "between"
                else ["createdAt", "updatedAt"]
            )
        )
        low, high = sorted(
            draw(st.lists(st.sampled_from(values(data, column)), min_size=2, max_size=2))
        )
        if kind == "between":
            return pl.col(column).is_between(low, high), lambda q: q.between(column, low, high)
        if kind == "ge":
            return pl.col(column) >= low, lambda q: q.between(column, low, open_end())
        floor = datetime(1970, 1, 1, tzinfo=timezone.utc)
        return pl.col(column) <= high, lambda q: q.between(column, floor, high)
    if kind == "null":
        column = draw(st.sampled_from(["AccessionNumber", "BodyPartExamined", "StudyDescription"]))
        if draw(st.booleans()):
            return pl.col(column).is_null(), lambda q: q.is_null(column)
        return pl.col(column).is_not_null(), lambda q: q.not_null(column)
    if kind == "contains":
        text = draw(st.sampled_from(values(data, "StudyDescription")))
        start = draw(st.integers(0, max(len(text) - 2, 0)))
        part = text[start : start + draw(st.integers(1, 6))]
        return (
            pl.col("StudyDescription").str.contains(part, literal=True),
            lambda q: q.contains("StudyDescription", part),
        )
    text = draw(st.sampled_from(values(data, "PatientID")))
    prefix = text[: draw(st.integers(1, 4))]
    return (
        pl.col("PatientID").str.starts_with(prefix),
        lambda q: q.matches("PatientID", "^" + re.escape(prefix)),
    )


@st.composite
def queries(draw: st.DrawFn, data: pl.DataFrame, datastore_id: str) -> tuple[pl.Expr, Query]:
    """A conjunction of 1-3 atoms, sometimes with an OR of two patients in front."""
    parts = draw(st.lists(atoms(data), min_size=1, max_size=3))
    expr = parts[0][0]
    for e, _ in parts[1:]:
        expr = expr & e
    if draw(st.booleans()):
        a, b = draw(
            st.lists(
                st.sampled_from(values(data, "PatientID")), min_size=2, max_size=2, unique=True
            )
        )
        expr = ((pl.col("PatientID") == a) | (pl.col("PatientID") == b)) & expr
        query = Query(datastore_id).where(PatientID=a) | Query(datastore_id).where(PatientID=b)
    else:
        query = Query(datastore_id)
    for _, apply in parts:
        query = apply(query)
    return expr, query


def run_both(service: LocalService, expr: pl.Expr, query: Query, engine: str = "auto") -> None:
    client = service.client()
    with FreshStatistics():
        service.reset_stats()
        try:
            expected = converted(
                query.to_dataframe(client=client, progress=False, max_concurrency=ONE)
            )
        except QueryValidationError:
            return  # the Query refuses the combination (empty range...): nothing to compare
        sent_by_query = service.stats.by_operation
    with FreshStatistics():
        service.reset_stats()
        lf = scan_image_sets(service.datastore_id, client=client, max_concurrency=ONE)
        lf = lf.filter(expr)
        got = lf.collect(**({} if engine == "auto" else {"engine": engine})).sort("imageSetId")
        sent_by_scan = service.stats.by_operation
    assert got.equals(expected), (len(got), len(expected))
    assert sent_by_scan == sent_by_query


@SLOW
@given(data=st.data())
def test_translatable_filters_match_the_query_and_its_requests(
    service: LocalService, everything: pl.DataFrame, data: st.DataObject
) -> None:
    expr, query = data.draw(queries(everything, service.datastore_id))
    run_both(service, expr, query)


def test_streaming_engine_too(service: LocalService, everything: pl.DataFrame) -> None:
    patient = values(everything, "PatientID")[3]
    query = Query(service.datastore_id).where(
        PatientID=patient, Modality=values(everything, "Modality")[:3]
    )
    expr = (pl.col("PatientID") == patient) & pl.col("Modality").is_in(
        values(everything, "Modality")[:3]
    )
    run_both(service, expr, query, engine="streaming")


def untranslatable(data: pl.DataFrame) -> st.SearchStrategy[pl.Expr]:
    """Filters the translator leaves to the source, alone or beside translatable ones."""
    patient = st.sampled_from(values(data, "PatientID"))
    modality = st.sampled_from(values(data, "Modality"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        udf = pl.col("SeriesNumber").map_elements(lambda v: v % 2 == 0, return_dtype=pl.Boolean)
    return st.one_of(
        patient.map(lambda p: pl.col("PatientID").str.to_lowercase() == p.lower()),
        modality.map(lambda m: pl.col("Modality") != m),  # Polars drops nulls; the query keeps them
        st.just(pl.col("NumberOfStudyRelatedSeries") > pl.col("SeriesNumber")),
        st.just(udf),
        patient.map(lambda p: (pl.col("PatientID") == p) | (pl.col("SeriesNumber") % 3 == 0)),
        st.just(pl.col("StudyDescription").str.contains("C.*T")),
        st.just(pl.col("StudyDateTime") >= datetime(2020, 1, 1)),  # one-sided: not pushed
    )


@SLOW
@given(data=st.data())
def test_untranslatable_parts_are_still_exact(
    service: LocalService, everything: pl.DataFrame, data: st.DataObject
) -> None:
    parts = data.draw(st.lists(untranslatable(everything), min_size=1, max_size=2))
    if data.draw(st.booleans()):
        expr, _ = data.draw(atoms(everything))
        parts.append(expr)
    expr = parts[0]
    for e in parts[1:]:
        expr = expr & e
    lf = scan_image_sets(service.datastore_id, client=service.client())
    got = lf.filter(expr).collect().sort("imageSetId")
    assert got.equals(everything.filter(expr).sort("imageSetId"))


def test_projection_and_column_order(service: LocalService, everything: pl.DataFrame) -> None:
    lf = scan_image_sets(service.datastore_id, client=service.client())
    got = lf.filter(pl.col("Modality") == "CT").select("PatientID", "imageSetId").collect()
    assert got.columns == ["PatientID", "imageSetId"]
    want = everything.filter(pl.col("Modality") == "CT").select("PatientID", "imageSetId")
    assert got.sort("imageSetId").equals(want.sort("imageSetId"))


def test_head_is_the_newest_and_one_chain_stops_early(
    service: LocalService, everything: pl.DataFrame
) -> None:
    lf = scan_image_sets(service.datastore_id, client=service.client())
    got = lf.head(5).collect()
    want = everything.sort(["updatedAt", "imageSetId"], descending=[True, False]).head(5)
    assert got["imageSetId"].to_list() == want["imageSetId"].to_list()
    assert service.stats.by_operation == {"SearchImageSets": 1}


def test_head_then_filter_is_the_slice_then_the_filter(
    service: LocalService, everything: pl.DataFrame
) -> None:
    lf = scan_image_sets(service.datastore_id, client=service.client())
    got = lf.head(40).filter(pl.col("isPrimary")).collect()
    newest = everything.sort(["updatedAt", "imageSetId"], descending=[True, False]).head(40)
    assert sorted(got["imageSetId"]) == sorted(newest.filter(pl.col("isPrimary"))["imageSetId"])


def test_sort_head_is_exact(service: LocalService, everything: pl.DataFrame) -> None:
    lf = scan_image_sets(service.datastore_id, client=service.client())
    got = lf.filter(pl.col("isPrimary")).sort("createdAt", descending=True).head(3).collect()
    want = everything.filter(pl.col("isPrimary")).sort("createdAt", descending=True).head(3)
    assert got["imageSetId"].to_list() == want["imageSetId"].to_list()


def test_pushed_filter_sends_fewer_requests_than_polars_alone(
    service: LocalService, everything: pl.DataFrame
) -> None:
    patient = values(everything, "PatientID")[0]
    lf = scan_image_sets(service.datastore_id, client=service.client())
    lf.filter(pl.col("PatientID") == patient).collect()
    pushed = service.stats.by_operation["SearchImageSets"]
    assert pushed == 1
    service.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lf.filter(
            pl.col("PatientID").map_elements(lambda p: p == patient, return_dtype=pl.Boolean)
        ).collect()
    assert service.stats.by_operation["SearchImageSets"] > 10 * pushed


def test_errors_are_typed_and_run_options_checked_before_any_request(service: LocalService) -> None:
    with pytest.raises(QueryValidationError, match=r"max_concurrency|max_tps|positive"):
        scan_image_sets(service.datastore_id, client=service.client(), max_concurrency=0)
    with pytest.raises(QueryValidationError, match="datastore_id"):
        scan_image_sets("nope", client=service.client())
    assert service.stats.requests == 0
    lf = scan_image_sets("f" * 32, client=service.client())
    if int(pl.__version__.split(".")[0]) >= 2:
        with pytest.raises(SearchError):
            lf.filter(pl.col("PatientID") == "P1").collect()
    else:  # Polars 1.x wraps a source's exception, naming it
        with pytest.raises(pl.exceptions.ComputeError, match="SearchError"):
            lf.filter(pl.col("PatientID") == "P1").collect()
    with pytest.raises(SearchError):  # sql() unwraps it on every version
        ahi_sql(
            "SELECT * FROM image_sets WHERE PatientID = 'P1'",
            datastore_id="f" * 32,
            client=service.client(),
        )
