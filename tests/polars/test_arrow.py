"""Arrow out: to_arrow, iter_batches, to_polars and a reader that runs once per consumption."""

from __future__ import annotations

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from healthimaging_df import Query, schema
from healthimaging_df.errors import QueryValidationError, SearchError
from healthimaging_df.local import LocalService

from .conftest import FreshStatistics


def query_of(service: LocalService) -> Query:
    return Query(service.datastore_id).where(Modality=["CT", "MR"], isPrimary=True)


def baseline(service: LocalService, query: Query) -> tuple[pd.DataFrame, dict[str, int]]:
    """The query's frame and requests; one worker, so a windowed scan splits the same each run."""
    with FreshStatistics():
        service.reset_stats()
        frame = query.to_dataframe(client=service.client(), progress=False, max_concurrency=1)
        return frame, service.stats.by_operation


def test_to_arrow_is_to_dataframe_with_the_declared_schema(service: LocalService) -> None:
    query = query_of(service)
    frame, sent = baseline(service, query)
    with FreshStatistics():
        service.reset_stats()
        table = query.to_arrow(client=service.client(), progress=False, max_concurrency=1)
        assert service.stats.by_operation == sent
    assert table.schema.equals(schema.arrow_schema())  # metadata aside
    assert b"healthimaging_df" in table.schema.metadata
    expected = pa.Table.from_pandas(frame, schema=schema.arrow_schema(), preserve_index=False)
    assert table.equals(expected)  # same rows, same order


def test_to_polars(service: LocalService) -> None:
    query = query_of(service)
    frame, _ = baseline(service, query)
    got = query.to_polars(client=service.client(), progress=False)
    assert isinstance(got, pl.DataFrame)
    assert got["imageSetId"].to_list() == frame["imageSetId"].tolist()


def test_iter_batches_each_image_set_once_in_bounded_batches(service: LocalService) -> None:
    query = Query(service.datastore_id)
    batches = list(query.iter_batches(chunk_rows=200, client=service.client(), progress=False))
    assert all(isinstance(b, pa.RecordBatch) for b in batches)
    assert all(b.schema.equals(schema.arrow_schema()) for b in batches)
    assert max(b.num_rows for b in batches) < 200 + 50  # a chunk closes within a page of it
    ids = [i for b in batches for i in b.column("imageSetId").to_pylist()]
    assert len(ids) == len(set(ids)) == 1200


def test_iter_batches_of_nothing_is_one_empty_batch(service: LocalService) -> None:
    query = Query(service.datastore_id).where(PatientID="NO-SUCH-PATIENT")
    batches = list(query.iter_batches(client=service.client(), progress=False))
    assert [b.num_rows for b in batches] == [0]
    assert batches[0].schema.equals(schema.arrow_schema())


def test_iter_batches_checks_arguments_before_any_request(service: LocalService) -> None:
    with pytest.raises(QueryValidationError, match="chunk_rows"):
        Query(service.datastore_id).iter_batches(chunk_rows=0, client=service.client())
    assert service.stats.requests == 0


@pytest.mark.parametrize(
    "consume",
    [
        pytest.param(lambda r: pa.table(r).num_rows, id="pa.table"),
        pytest.param(lambda r: pl.DataFrame(r).height, id="pl.DataFrame"),
        pytest.param(lambda r: len(pl.from_arrow(r)), id="pl.from_arrow"),
        pytest.param(
            lambda r: duckdb.sql("SELECT count(*) FROM r WHERE imageSetId IS NOT NULL").fetchall()[
                0
            ][0],
            id="duckdb",
        ),
        pytest.param(
            lambda r: len(
                duckdb.sql("SELECT a.imageSetId FROM r a JOIN r b USING (imageSetId)").fetchall()
            ),
            id="duckdb-self-join",
        ),
    ],
)
def test_a_reader_runs_the_query_once_per_consumption(service: LocalService, consume) -> None:  # type: ignore[no-untyped-def]
    query = query_of(service)
    frame, sent = baseline(service, query)
    with FreshStatistics():
        reader = query.reader(client=service.client(), progress=False, max_concurrency=1)
        reader.__arrow_c_schema__()  # answered from the schema
        service.reset_stats()
        rows = consume(reader)
        got = service.stats.by_operation
    assert rows == len(frame)
    if reader.runs == 1:
        assert got == sent
    else:  # DuckDB scans a self-joined object once per side: each is one run
        assert reader.runs == 2
        assert got == {k: 2 * v for k, v in sent.items()}


def test_reader_schema_sends_nothing_and_checks_options_first(service: LocalService) -> None:
    reader = query_of(service).reader(client=service.client())
    assert pa.schema(reader).equals(schema.arrow_schema())
    assert service.stats.requests == 0
    with pytest.raises(QueryValidationError):
        query_of(service).reader(client=service.client(), max_tps=-1)


def test_a_reader_that_cannot_start_raises_the_typed_error(service: LocalService) -> None:
    reader = Query("f" * 32).where(PatientID="P1").reader(client=service.client())
    with pytest.raises(SearchError):
        pa.table(reader)
    with pytest.raises(SearchError):
        pl.DataFrame(reader)
