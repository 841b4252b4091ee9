"""Write and read back: every column, both dtype backends, any partitioning, provenance per commit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from healthimaging_df import schema
from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.store import delta

from .conftest import PROVENANCE, by_id

PARTITIONINGS = {
    "none": [],
    "text": ["Modality"],
    "flag-and-int": ["isPrimary", "SeriesNumber"],
    "phi-text": ["PatientID"],
}


@pytest.mark.parametrize("layout", PARTITIONINGS)
def test_every_column_reads_back_exactly(
    tmp_path: Path, sample_table: pa.Table, layout: str
) -> None:
    parts = PARTITIONINGS[layout]
    info = delta.write_table(tmp_path / "t", sample_table, PROVENANCE, partition_by=parts)
    assert (info.version, info.rows, info.partition_by) == (0, sample_table.num_rows, tuple(parts))
    assert info.bytes == info.bytes_written > 0
    assert len(info.files) >= (1 if not parts else 2)

    back = delta.read_table(tmp_path / "t")
    assert back.table.schema == sample_table.schema  # the declared Arrow types, in order
    assert by_id(back.table).equals(by_id(sample_table))
    assert back.provenance == PROVENANCE
    assert back.version == 0
    for backend in schema.DTYPE_BACKENDS:
        got = schema.arrow_to_pandas(by_id(back.table), backend)
        want = schema.arrow_to_pandas(by_id(sample_table), backend)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert list(got.dtypes) == list(schema.pandas_dtypes(backend).values())

    scan = delta.dataset(tmp_path / "t")
    assert scan.schema == sample_table.schema
    assert scan.count_rows() == sample_table.num_rows


@pytest.mark.parametrize("column", ["StudyDateTime", "createdAt", "NumberOfStudyRelatedInstances"])
def test_only_text_integer_and_flag_columns_partition(
    tmp_path: Path, sample_table: pa.Table, column: str
) -> None:
    if column == "NumberOfStudyRelatedInstances":  # an integer: fine
        delta.write_table(tmp_path / "t", sample_table, PROVENANCE, partition_by=[column])
        return
    with pytest.raises(QueryValidationError, match="text, integers or flags"):
        delta.write_table(tmp_path / "t", sample_table, PROVENANCE, partition_by=[column])
    assert not (tmp_path / "t").exists()


def test_provenance_is_in_every_commit_for_other_engines(
    tmp_path: Path, sample_table: pa.Table
) -> None:
    delta.write_table(tmp_path / "t", sample_table, PROVENANCE, partition_by=["Modality"])
    table = DeltaTable(str(tmp_path / "t"))
    commit = table.history(1)[0]
    assert json.loads(commit["userMetadata"]) == PROVENANCE  # Spark: DESCRIBE HISTORY
    assert commit["healthimaging_df"]["format"] == delta.FORMAT
    assert json.loads(table.metadata().description)["format"] == delta.FORMAT
    assert table.metadata().partition_columns == ["Modality"]


def test_columns_filters_and_partition_pruning(tmp_path: Path, sample_table: pa.Table) -> None:
    delta.write_table(tmp_path / "t", sample_table, PROVENANCE, partition_by=["Modality"])
    got = delta.read_table(
        tmp_path / "t", columns=["imageSetId", "Modality"], filters=[("Modality", "==", "CT")]
    ).table
    want = sample_table.filter(pc.equal(sample_table.column("Modality"), "CT"))
    assert got.column_names == ["imageSetId", "Modality"]
    assert sorted(got.column("imageSetId").to_pylist()) == sorted(
        want.column("imageSetId").to_pylist()
    )
    assert 0 < got.num_rows < sample_table.num_rows
    expression = pc.field("version") > 1
    assert delta.read_table(tmp_path / "t", filters=expression).table.num_rows == (
        sample_table.filter(expression).num_rows
    )
    with pytest.raises(QueryValidationError, match="filters"):
        delta.read_table(tmp_path / "t", filters=[("Nope", "==", 1)])
    with pytest.raises(QueryValidationError, match="columns"):
        delta.read_table(tmp_path / "t", columns=["Nope"])


def test_overwrite_can_repartition_and_keeps_versions(
    tmp_path: Path, sample_table: pa.Table
) -> None:
    path = tmp_path / "t"
    delta.write_table(path, sample_table, PROVENANCE, partition_by=["Modality"])
    smaller = sample_table.slice(0, 50)
    info = delta.write_table(path, smaller, {**PROVENANCE, "n": 2}, partition_by=["isPrimary"])
    assert (info.version, info.partition_by) == (1, ("isPrimary",))
    kept = delta.write_table(path, smaller, {**PROVENANCE, "n": 3})  # None keeps the layout
    assert kept.partition_by == ("isPrimary",)
    assert by_id(delta.read_table(path).table).equals(by_id(smaller))
    assert by_id(delta.read_table(path, version=0).table).equals(by_id(sample_table))
    with pytest.raises(SnapshotError, match="mode='error'"):
        delta.write_table(path, smaller, PROVENANCE, mode="error")


def test_empty_table_round_trips(tmp_path: Path) -> None:
    empty = schema.arrow_schema().empty_table()
    delta.write_table(tmp_path / "t", empty, PROVENANCE, partition_by=["Modality"])
    back = delta.read_table(tmp_path / "t")
    assert back.table.num_rows == 0
    assert back.table.schema == empty.schema


def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, sample_table: pa.Table
) -> None:
    path = tmp_path / "t"
    cases = [
        ({"table": sample_table.to_pandas()}, "table", "pyarrow.Table"),
        ({"provenance": {"x": float("nan")}}, "provenance", "JSON"),
        ({"provenance": {"x": object()}}, "provenance", "JSON"),
        ({"partition_by": "Modality"}, "partition_by", "not one string"),
        ({"partition_by": ["Nope"]}, "partition_by", "not in the table"),
        ({"partition_by": ["Modality", "Modality"]}, "partition_by", "repeated"),
        ({"mode": "append"}, "mode", "overwrite"),
        ({"expected_version": -1}, "version", "non-negative"),
    ]
    for override, field, rule in cases:
        kwargs = {"table": sample_table, "provenance": PROVENANCE, **override}
        with pytest.raises(QueryValidationError, match=rule) as caught:
            delta.write_table(path, **kwargs)  # type: ignore[arg-type]
        assert caught.value.field == field
        assert not path.exists()
    with pytest.raises(QueryValidationError, match="s3://bucket/prefix"):
        delta.write_table("gs://bucket/x", sample_table, PROVENANCE)
    with pytest.raises(QueryValidationError, match="version or as_of"):
        delta.read_table(path, version=0, as_of=pd.Timestamp.now(tz="UTC").to_pydatetime())
