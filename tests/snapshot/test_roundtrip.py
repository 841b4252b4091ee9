"""Write and read back: identical frames, provenance, layouts, readers other than ours, atomicity."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from healthimaging_df import schema
from healthimaging_df.core.derived import study_year
from healthimaging_df.engine import flatten
from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.local import generate_image_sets
from healthimaging_df.snapshot import (
    read_snapshot,
    scan_snapshot,
    vacuum_snapshot,
    write_snapshot,
)
from healthimaging_df.store.delta import encoding

from .conftest import typed_frame

LAYOUTS = {
    "file": ("snap.parquet", None),
    "directory": ("snap", None),
    "by-modality": ("snap", ["Modality"]),
    "by-year-and-flag": ("snap", ["StudyYear", "isPrimary"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_backend", schema.DTYPE_BACKENDS)
def test_round_trip_is_identical(
    tmp_path: Path, layout: str, dtype_backend: schema.DtypeBackend
) -> None:
    df = typed_frame(dtype_backend=dtype_backend)
    name, parts = LAYOUTS[layout]
    info = write_snapshot(df, tmp_path / name, partition_cols=parts)
    back = read_snapshot(tmp_path / name, dtype_backend=dtype_backend)

    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert list(back.dtypes) == list(df.dtypes)
    assert info.rows == len(df)
    prov = back.attrs["healthimaging_df"]
    for key, value in df.attrs["healthimaging_df"].items():
        assert prov[key] == value
    assert prov["row_count"] == len(df)
    assert prov["watermark"] == df["updatedAt"].max().isoformat()
    assert prov["redaction"] is None


def test_every_commit_carries_provenance_and_files_the_declared_schema(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    info = write_snapshot(sample_frame, tmp_path / "snap", partition_cols=["Modality"])
    assert info.version == 0
    assert len(info.files) == sample_frame["Modality"].nunique(dropna=False)
    # the declared types, but StudyDateTime (naive) labelled UTC: reader 1 / writer 2
    stored = encoding.storage_schema(schema.arrow_schema())
    assert stored.field("StudyDateTime").type == pa.timestamp("us", tz="UTC")
    for path in info.files:
        file_schema = pq.read_schema(path)
        expected = [f for f in stored if f.name != "Modality"]
        assert [(f.name, f.type) for f in file_schema] == [(f.name, f.type) for f in expected]
    log = (tmp_path / "snap" / "_delta_log" / f"{0:020d}.json").read_text(encoding="utf-8")
    commit = next(json.loads(line) for line in log.splitlines() if "commitInfo" in line)
    prov = json.loads(commit["commitInfo"]["userMetadata"])
    assert prov["datastore_id"] == "f" * 32
    assert prov["row_count"] == len(sample_frame)
    assert commit["commitInfo"]["healthimaging_df"]["partition_by"] == ["Modality"]


def test_other_readers_see_the_same_rows(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    write_snapshot(sample_frame, tmp_path / "snap", partition_cols=["Modality"])
    write_snapshot(sample_frame, tmp_path / "one.parquet")

    dataset = pads.dataset(tmp_path / "snap", format="parquet", partitioning="hive")
    assert dataset.count_rows() == len(sample_frame)
    plain = pd.read_parquet(tmp_path / "one.parquet")
    assert sorted(plain["imageSetId"]) == sorted(sample_frame["imageSetId"])
    counts = duckdb.sql(
        f"SELECT Modality, count(*) AS n FROM read_parquet('{tmp_path}/snap/*/*.parquet', "
        "hive_partitioning = true) GROUP BY Modality"
    ).df()
    counts["Modality"] = counts["Modality"].fillna("<null>")
    expected = sample_frame["Modality"].fillna("<null>").value_counts()
    assert dict(zip(counts["Modality"], counts["n"], strict=True)) == expected.to_dict()
    assert expected["<null>"] == 1  # DuckDB read the null partition as a null


def test_duckdb_group_by_on_100k_partitioned_matches_pandas(tmp_path: Path) -> None:
    table = flatten.summaries_to_table(generate_image_sets(100_000, seed=5))
    df = schema.arrow_to_pandas(table)
    write_snapshot(df, tmp_path / "big", partition_cols=["Modality"])
    got = duckdb.sql(
        f"SELECT Modality, count(*) AS n, sum(NumberOfStudyRelatedInstances) AS instances, "
        f"count(DISTINCT PatientID) AS patients, sum(CASE WHEN isPrimary THEN 0 ELSE 1 END) AS "
        f"conflicts FROM read_parquet('{tmp_path}/big/*/*.parquet', hive_partitioning = true) "
        "GROUP BY Modality ORDER BY Modality"
    ).df()
    want = (
        df.groupby("Modality")
        .agg(
            n=("imageSetId", "size"),
            instances=("NumberOfStudyRelatedInstances", "sum"),
            patients=("PatientID", "nunique"),
            conflicts=("isPrimary", lambda s: int((~s).sum())),
        )
        .reset_index()
        .sort_values("Modality")
    )
    assert len(got) == 9
    assert got["Modality"].tolist() == want["Modality"].tolist()
    for column in ("n", "instances", "patients", "conflicts"):
        assert got[column].astype("int64").tolist() == want[column].astype("int64").tolist()


def test_columns_and_filters(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    write_snapshot(sample_frame, tmp_path / "snap", partition_cols=["StudyYear"])
    subset = read_snapshot(tmp_path / "snap", columns=["PatientID", "imageSetId", "StudyYear"])
    assert list(subset.columns) == ["PatientID", "imageSetId", "StudyYear"]
    assert str(subset["StudyYear"].dtype) == "Int64"
    years = study_year(sample_frame)  # the year of StudyDate, as where(StudyYear=...) means it
    assert subset["StudyYear"].value_counts().to_dict() == years.value_counts().to_dict()

    ct = read_snapshot(
        tmp_path / "snap", filters=[("Modality", "==", "CT"), ("StudyYear", ">=", 2020)]
    )
    want = sample_frame[(sample_frame["Modality"] == "CT") & (years >= 2020)].reset_index(drop=True)
    assert len(ct) == len(want) > 0
    assert sorted(ct["imageSetId"]) == sorted(want["imageSetId"])
    assert "StudyYear" not in ct.columns

    with pytest.raises(SnapshotError, match="not in the snapshot"):
        read_snapshot(tmp_path / "snap", columns=["Nope"])


def test_empty_frames_round_trip(tmp_path: Path) -> None:
    empty = schema.empty_frame()
    for name, parts in LAYOUTS.values():
        target = tmp_path / (name + "-" + "-".join(parts or []))
        if name.endswith(".parquet"):
            target = tmp_path / name
        write_snapshot(empty, target, partition_cols=parts)
        back = read_snapshot(target)
        pd.testing.assert_frame_equal(back, empty)
        assert back.attrs["healthimaging_df"]["watermark"] is None


def test_overwrite_replaces_the_previous_version(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    target = tmp_path / "snap"
    write_snapshot(sample_frame, target, partition_cols=["Modality"])
    smaller = sample_frame[sample_frame["Modality"] == "CT"].reset_index(drop=True)
    smaller.attrs = sample_frame.attrs
    info = write_snapshot(smaller, target, partition_cols=["Modality"])
    assert info.version == 1
    current = sorted(str(p) for p in DeltaTable(str(target)).file_uris())
    assert current == sorted(info.files)  # the new version holds only its own files
    pd.testing.assert_frame_equal(read_snapshot(target), smaller)
    # the previous version stays readable until a vacuum
    pd.testing.assert_frame_equal(read_snapshot(target, version=0), sample_frame)
    assert vacuum_snapshot(target, retain=timedelta(0), dry_run=False) > 0
    assert sorted(str(p) for p in target.rglob("*.parquet")) == current
    pd.testing.assert_frame_equal(read_snapshot(target), smaller)


def _debris_of_a_crashed_write(tmp_path: Path, target: Path, frame: pd.DataFrame) -> int:
    """Data files a writer killed before its commit leaves: delta-rs files, no log entry."""
    scratch = tmp_path / "scratch"
    write_snapshot(frame, scratch, partition_cols=["Modality"])
    moved = 0
    for path in scratch.rglob("*.parquet"):
        destination = target / path.relative_to(scratch)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        moved += 1
    shutil.rmtree(scratch)
    return moved


def test_a_crashed_write_leaves_the_previous_snapshot(
    tmp_path: Path, sample_frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "snap"
    write_snapshot(sample_frame, target, partition_cols=["Modality"])
    single = tmp_path / "one.parquet"
    write_snapshot(sample_frame, single)
    other = typed_frame(300, seed=3)

    import deltalake

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deltalake, "write_deltalake", full_disk)
    with pytest.raises(SnapshotError, match="no space left") as caught:
        write_snapshot(other, target, partition_cols=["Modality"])
    assert str(target) not in str(caught.value)
    monkeypatch.undo()
    from healthimaging_df.store import single as single_module

    def half_written(sink: Any, *args: object) -> None:
        sink.write(b"PAR1 half a file")  # the disk fills up in the middle of the stream
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(single_module, "write_parquet", half_written)
    with pytest.raises(SnapshotError, match="no space left") as caught:
        write_snapshot(other, single)
    assert str(tmp_path) not in str(caught.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".one")) == []

    # a writer killed after its data files, before its commit: readers do not see them
    debris = _debris_of_a_crashed_write(tmp_path, target, other)
    pd.testing.assert_frame_equal(read_snapshot(target), sample_frame)
    pd.testing.assert_frame_equal(read_snapshot(single), sample_frame)
    assert scan_snapshot(target).count_rows() == len(sample_frame)
    assert len(list(target.rglob("part-*.parquet"))) == debris + len(
        DeltaTable(str(target)).file_uris()
    )
    info = write_snapshot(other, target, partition_cols=["Modality"])
    assert vacuum_snapshot(target, retain=timedelta(0), dry_run=False) >= debris
    assert sorted(str(p) for p in target.rglob("*.parquet")) == sorted(info.files)


def test_a_temporary_file_is_never_visible(
    tmp_path: Path, sample_frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = tmp_path / "one.parquet"
    write_snapshot(sample_frame, single)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(SnapshotError, match="writing the snapshot failed") as caught:
        write_snapshot(typed_frame(50, seed=2), single)
    assert str(tmp_path) not in str(caught.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["one.parquet"]
    pd.testing.assert_frame_equal(read_snapshot(single), sample_frame)


def test_readers_during_rewrites_see_whole_versions(tmp_path: Path) -> None:
    versions = [typed_frame(400, seed=s) for s in (1, 2)]
    target = tmp_path / "snap"
    write_snapshot(versions[0], target, partition_cols=["Modality"])
    ids = [frozenset(v["imageSetId"]) for v in versions]
    seen: list[frozenset[str]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(frozenset(read_snapshot(target)["imageSetId"]))
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(12):
            write_snapshot(versions[round_ % 2], target, partition_cols=["Modality"])
    finally:
        done.set()
        thread.join()
    assert not errors
    assert seen
    assert all(s in ids for s in seen)


def test_refuses_bad_layouts(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    with pytest.raises(QueryValidationError, match="directory path"):
        write_snapshot(sample_frame, tmp_path / "x.parquet", partition_cols=["Modality"])
    with pytest.raises(SnapshotError, match="not in the frame"):
        write_snapshot(sample_frame, tmp_path / "x", partition_cols=["Nope"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SnapshotError, match="no Delta log") as caught:
        write_snapshot(sample_frame, foreign)
    assert str(foreign) not in str(caught.value)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(SnapshotError, match="no snapshot"):
        read_snapshot(tmp_path / "missing")
    with pytest.raises(SnapshotError, match="no snapshot"):
        read_snapshot(tmp_path / "missing.parquet")


def test_extra_columns_round_trip(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    df = sample_frame.copy()
    df["score"] = pd.array(range(len(df)), dtype="Float64")
    write_snapshot(df, tmp_path / "x.parquet")
    back = read_snapshot(tmp_path / "x.parquet")
    assert list(back.columns) == list(df.columns)
    assert back["score"].astype("float64").tolist() == df["score"].astype("float64").tolist()


def test_plain_pandas_reads_the_declared_dtypes(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    """No library needed to get Int64, boolean and string columns back (pandas' own metadata)."""
    write_snapshot(sample_frame, str(tmp_path / "one.parquet"))
    plain = pd.read_parquet(tmp_path / "one.parquet")
    assert plain.dtypes.to_dict() == schema.pandas_dtypes()
    # a directory snapshot is a Delta table: deltalake alone reads it with the declared types,
    # but for StudyDateTime, a wall-clock time stored labelled UTC (and marked so in the log)
    write_snapshot(sample_frame, str(tmp_path / "parts"), partition_cols=["Modality"])
    parts = DeltaTable(str(tmp_path / "parts")).to_pyarrow_table()
    declared = {f.name: f.type for f in schema.arrow_schema()}
    declared["StudyDateTime"] = pa.timestamp("us", tz="UTC")
    assert {f.name: f.type for f in parts.schema} == declared
    assert parts.num_rows == len(sample_frame)


def _delta_counts(target: Path) -> tuple[int, int]:
    """Rows as other Delta readers count them: deltalake's dataset and DuckDB over its scan."""
    scan = DeltaTable(str(target)).to_pyarrow_dataset()
    relation = duckdb.sql("SELECT count(*) FROM scan")
    assert relation is not None
    rows = relation.fetchall()
    return scan.count_rows(), int(rows[0][0])


def test_a_crashed_write_is_invisible_to_delta_readers(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    target = tmp_path / "snap"
    write_snapshot(sample_frame, target, partition_cols=["Modality"])
    other = typed_frame(300, seed=3)
    debris = _debris_of_a_crashed_write(tmp_path, target, other)
    assert debris == other["Modality"].nunique(dropna=False)  # the new files are there...
    assert _delta_counts(target) == (len(sample_frame), len(sample_frame))  # ...but not seen
    pd.testing.assert_frame_equal(read_snapshot(target), sample_frame)

    write_snapshot(other, target, partition_cols=["Modality"])
    assert _delta_counts(target) == (len(other), len(other))


def test_a_write_leaves_nothing_but_the_log_and_data(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    target = tmp_path / "snap"
    for parts in (["Modality"], ["StudyYear", "isPrimary"], None):
        info = write_snapshot(
            sample_frame, target / "-".join(parts or ["flat"]), partition_cols=parts
        )
        folder = Path(info.files[0]).parent
        while folder.parent != target:
            folder = folder.parent
        assert sorted(
            p.name for p in folder.iterdir() if not p.name.startswith(tuple(parts or ["part-"]))
        ) == ["_delta_log"]


def test_a_crashed_first_write_does_not_block_the_next(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    target = tmp_path / "snap"
    target.mkdir()
    _debris_of_a_crashed_write(tmp_path, target, sample_frame)
    with pytest.raises(SnapshotError, match="no snapshot"):
        read_snapshot(target)
    info = write_snapshot(sample_frame, target, partition_cols=["Modality"])
    assert info.version == 0
    pd.testing.assert_frame_equal(read_snapshot(target), sample_frame)
    vacuum_snapshot(target, retain=timedelta(0), dry_run=False)
    assert sorted(str(p) for p in target.rglob("*.parquet")) == sorted(info.files)


def test_bad_arguments_are_query_validation_errors(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    from healthimaging_df.errors import QueryValidationError
    from healthimaging_df.refresh import refresh_frame

    write_snapshot(sample_frame, tmp_path / "snap", partition_cols=["Modality"])
    write_snapshot(sample_frame, tmp_path / "one.parquet")
    for path in (tmp_path / "snap", tmp_path / "one.parquet"):
        with pytest.raises(QueryValidationError, match="dtype_backend") as caught:
            read_snapshot(path, dtype_backend="numpy")  # type: ignore[arg-type]
        assert isinstance(caught.value, ValueError)  # `except ValueError` keeps working
        with pytest.raises(QueryValidationError, match="not one string"):
            read_snapshot(path, columns="PatientID")
        with pytest.raises(QueryValidationError) as caught:
            read_snapshot(path, filters=[("Nope", "==", "PAT-SECRET-1")])
        assert caught.value.field == "filters"
        assert "PAT-SECRET-1" not in str(caught.value)
        with pytest.raises(QueryValidationError, match="filters"):
            read_snapshot(path, filters=[("PatientID", "~", "PAT-SECRET-1")])
    with pytest.raises(QueryValidationError, match="not one string"):
        write_snapshot(sample_frame, tmp_path / "x", partition_cols="Modality")
    with pytest.raises(QueryValidationError, match="compression"):
        write_snapshot(sample_frame, tmp_path / "y.parquet", compression="zip")
    with pytest.raises(QueryValidationError, match="RedactionPolicy"):
        write_snapshot(sample_frame, tmp_path / "y.parquet", redact="yes")  # type: ignore[arg-type]
    with pytest.raises(QueryValidationError, match="DataFrame"):
        write_snapshot(sample_frame.to_dict(), tmp_path / "y.parquet")  # type: ignore[arg-type]
    with pytest.raises(QueryValidationError, match="margin"):
        refresh_frame(sample_frame, margin=5)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y.parquet").exists()


def test_damaged_metadata_is_a_snapshot_error(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    write_snapshot(sample_frame, tmp_path / "snap", partition_cols=["Modality"])
    (tmp_path / "snap" / "_delta_log" / f"{0:020d}.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="log is damaged") as caught:
        read_snapshot(tmp_path / "snap")
    assert "Modality=" not in str(caught.value)
