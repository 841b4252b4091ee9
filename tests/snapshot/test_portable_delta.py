"""Delta snapshots every engine reads: reader 1 / writer 2, a wall clock other readers show, a
layout merges keep, old reader-3 tables still served and downgraded once, and one StudyYear.
"""

from __future__ import annotations

import itertools
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable, write_deltalake

from healthimaging_df import Query, schema
from healthimaging_df.core.derived import study_year
from healthimaging_df.engine import flatten
from healthimaging_df.local import generate_image_sets
from healthimaging_df.snapshot import (
    downgrade_snapshot,
    optimize_snapshot,
    read_snapshot,
    snapshot_history,
    snapshot_info,
    write_snapshot,
)
from healthimaging_df.store import delta
from healthimaging_df.store.delta.log import commit_properties, schema_b64
from healthimaging_df.store.tables import frame_to_table

from .conftest import typed_frame

PROTOCOL_1_2 = {"min_reader_version": 1, "min_writer_version": 2}


def _log_protocol(path: Path) -> dict[str, object]:
    """The protocol action of the table's first commit, as other engines read it."""
    first = (path / "_delta_log" / f"{0:020d}.json").read_text(encoding="utf-8")
    return next(json.loads(line)["protocol"] for line in first.splitlines() if "protocol" in line)


def _wall_clock(series: pd.Series) -> pd.Series:
    """A UTC-labelled column as the naive wall clock it stores."""
    out = series.dt.tz_convert("UTC").dt.tz_localize(None) if series.dt.tz else series
    return out.astype("datetime64[us]")


def test_reader_1_writer_2_and_every_reader_sees_the_same_rows(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    target = tmp_path / "snap"
    write_snapshot(sample_frame, target)
    assert _log_protocol(target) == {"minReaderVersion": 1, "minWriterVersion": 2}
    info = snapshot_info(target)
    assert (info.protocol, info.features) == (PROTOCOL_1_2, ())
    # the marker our reader uses sits in the log's schema, which merges keep
    field = pa.schema(DeltaTable(str(target)).schema().to_arrow()).field("StudyDateTime")
    assert field.type == pa.timestamp("us", tz="UTC")
    assert field.metadata == {b"healthimaging_df.naive": b"true"}

    ours = read_snapshot(target).sort_values("imageSetId").reset_index(drop=True)
    assert str(ours["StudyDateTime"].dtype) == "datetime64[us]"  # naive, as fetched
    files = [str(f) for f in DeltaTable(str(target)).file_uris()]  # the log's active files
    readers = {
        "pandas": pd.concat([pd.read_parquet(f) for f in files]),
        "pyarrow": pads.dataset(files, format="parquet").to_table().to_pandas(),
        "duckdb": duckdb.sql(f"SELECT * FROM read_parquet({files!r})").df(),
    }
    try:  # Polars is an optional extra: read with it when it is installed
        import polars

        readers["polars"] = polars.read_parquet(files).to_pandas()
    except ImportError:
        pass
    want = ours.copy()
    for name, frame in readers.items():
        got = frame.sort_values("imageSetId").reset_index(drop=True)
        assert len(got) == len(want), name
        assert got["imageSetId"].tolist() == want["imageSetId"].tolist(), name
        # every reader shows the study's wall-clock digits (labelled UTC where it keeps zones)
        wall = _wall_clock(pd.to_datetime(got["StudyDateTime"]))
        assert wall.tolist() == want["StudyDateTime"].tolist(), name
        for column in ("PatientID", "Modality", "SeriesNumber", "isPrimary"):
            left = got[column].astype(object).where(got[column].notna(), None).tolist()
            right = want[column].astype(object).where(want[column].notna(), None).tolist()
            assert left == right, (name, column)


def test_every_write_path_keeps_the_protocol(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    target = tmp_path / "snap"
    table = frame_to_table(sample_frame)
    delta.write_table(target, table, {"n": 1}, partition_by=["Modality"])
    changed = table.slice(0, 20)
    changed = changed.set_column(1, "version", pc.add(changed["version"], 1))
    delta.merge_table(target, changed, [table["imageSetId"][30].as_py()], {"n": 2})
    delta.write_table(target, table.slice(0, 100), {"n": 3})  # overwrite, partitioning kept
    delta.optimize(target)
    delta.vacuum(target, retain=timedelta(0), dry_run=False)
    assert delta.info(target).protocol == PROTOCOL_1_2
    assert delta.info(target).features == ()
    assert DeltaTable(str(target)).protocol().min_reader_version == 1


def _legacy_table(path: Path, frame: pd.DataFrame, parts: list[str]) -> None:
    """A snapshot as the previous version wrote it: a naive column, so reader 3 / writer 7."""
    table = frame_to_table(frame)
    meta = {
        "operation": "write",
        "arrow_schema": schema_b64(table.schema),
        "partition_by": parts,
        "rows": table.num_rows,
        "added": table.num_rows,
        "updated": 0,
        "removed": 0,
    }
    prov = dict(frame.attrs["healthimaging_df"])
    write_deltalake(
        str(path), table, partition_by=parts, commit_properties=commit_properties(prov, meta)
    )


def test_a_reader_3_table_still_reads_refreshes_and_downgrades_once(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    target = tmp_path / "old"
    _legacy_table(target, sample_frame, ["Modality"])
    assert snapshot_info(target).protocol == {"min_reader_version": 3, "min_writer_version": 7}
    assert snapshot_info(target).features == ("timestampNtz",)
    pd.testing.assert_frame_equal(read_snapshot(target), sample_frame)

    table = frame_to_table(sample_frame)
    changed = table.slice(0, 5).set_column(1, "version", pc.add(table.slice(0, 5)["version"], 1))
    merged = delta.merge_table(target, changed, [], {"refresh": 1})  # naive into naive: fine
    assert merged.updated == 5
    assert snapshot_info(target).protocol["min_reader_version"] == 3  # until downgraded
    before = read_snapshot(target)

    assert downgrade_snapshot(target) == PROTOCOL_1_2
    info = snapshot_info(target)
    assert (info.protocol, info.features) == (PROTOCOL_1_2, ())
    pd.testing.assert_frame_equal(read_snapshot(target), before)
    assert snapshot_history(target)["operation"].tolist()[:2] == [
        "WRITE",
        "CREATE OR REPLACE TABLE",
    ]
    pd.testing.assert_frame_equal(read_snapshot(target, version=0), sample_frame)  # the past
    assert downgrade_snapshot(target) == PROTOCOL_1_2  # a second run changes nothing
    assert snapshot_history(target)["version"].iloc[0] == 3
    delta.merge_table(target, changed.slice(0, 1), [], {"refresh": 2})
    assert snapshot_info(target).protocol == PROTOCOL_1_2


def _ordered_table(n: int) -> pa.Table:
    table = flatten.summaries_to_table(generate_image_sets(n, seed=8))
    return table.sort_by([("createdAt", "ascending"), ("imageSetId", "ascending")])


def _edited(rows: pa.Table) -> pa.Table:
    bumped = pc.add(rows["version"], 1)
    later = pc.add(rows["updatedAt"], pa.scalar(timedelta(days=1), pa.duration("us")))
    rows = rows.set_column(rows.schema.get_field_index("version"), "version", bumped)
    return rows.set_column(rows.schema.get_field_index("updatedAt"), "updatedAt", later)


def test_merges_rewrite_only_the_files_they_touch_and_keep_the_layout(tmp_path: Path) -> None:
    target = tmp_path / "t"
    table = _ordered_table(20_000)
    size = 128 * 1024
    delta.write_table(target, table, {"n": 0}, target_file_size=size)
    files = len(DeltaTable(str(target)).file_uris())
    assert files >= 8

    newest = _edited(table.slice(table.num_rows - 200))  # 1% among the newest
    merged = delta.merge_table(target, newest, [], {"n": 1}, target_file_size=size)
    assert merged.updated == 200
    assert merged.files_removed <= 2  # not the whole table
    assert merged.bytes_written < delta.info(target).bytes / 4

    rng = random.Random(3)
    picks = sorted(rng.sample(range(table.num_rows - 200), 200))  # 1% at random, not yet edited
    merged = delta.merge_table(
        target, _edited(table.take(pa.array(picks))), [], {"n": 2}, target_file_size=size
    )
    assert merged.updated == 200
    after = pa.table(DeltaTable(str(target)).get_add_actions(flatten=True))
    assert after.num_rows >= files - 2  # not collapsed into one file
    spans = sorted(
        zip(after["min.createdAt"].to_pylist(), after["max.createdAt"].to_pylist(), strict=True)
    )
    assert all(a[1] <= b[0] for a, b in itertools_pairs(spans))  # files still in createdAt order

    version = DeltaTable(str(target)).version()
    nothing = delta.merge_table(target, newest, [], {"n": 3})  # the same rows again
    assert nothing.version is None
    assert DeltaTable(str(target)).version() == version  # no commit, no file

    back = delta.read_table(target).table.sort_by("imageSetId")
    want = table.sort_by("imageSetId")
    ids = want["imageSetId"].to_pylist()
    assert back["imageSetId"].to_pylist() == ids
    assert optimize_snapshot(target) is not None
    assert delta.read_table(target).table.sort_by("imageSetId").equals(back)


def itertools_pairs(items: list[tuple[datetime, datetime]]) -> list[tuple[tuple, tuple]]:
    return list(itertools.pairwise(items))


def test_study_year_partitions_mean_what_the_filter_means(tmp_path: Path) -> None:
    frame = typed_frame(40, seed=6)
    frame.loc[0, "StudyDate"] = "20210101"  # the study's date says 2021...
    frame.loc[0, "StudyDateTime"] = pd.Timestamp("2020-12-31 23:30")  # ...its date-time 2020
    frame.loc[1, "StudyDate"] = "2021"  # a partial date: year known, no date-time
    frame.loc[1, "StudyDateTime"] = pd.NaT
    write_snapshot(frame, tmp_path / "snap", partition_cols=["StudyYear"])
    in_2021 = read_snapshot(tmp_path / "snap", filters=[("StudyYear", "==", 2021)])
    ids = set(in_2021["imageSetId"])
    assert frame.loc[0, "imageSetId"] in ids
    assert frame.loc[1, "imageSetId"] in ids
    expected = set(frame.loc[(study_year(frame) == 2021).fillna(False), "imageSetId"])
    assert ids == expected  # the rows Query(...).where(StudyYear=2021) keeps
    table = frame_to_table(frame)
    from healthimaging_df.engine import frame as engine_frame

    matched = engine_frame.apply_predicates(table, Query("0" * 32).where(StudyYear=2021).predicates)
    assert set(matched["imageSetId"].to_pylist()) == expected


def test_no_timestamp_ntz_whatever_the_frame(tmp_path: Path) -> None:
    frame = typed_frame(30, seed=2)
    frame["StudyDateTime"] = frame["StudyDateTime"].astype("datetime64[ns]")  # pandas default
    write_snapshot(frame, tmp_path / "snap")
    assert snapshot_info(tmp_path / "snap").protocol == PROTOCOL_1_2
    again = typed_frame(30, seed=3)
    write_snapshot(again, tmp_path / "snap")  # overwrite with naive data: still cast
    assert snapshot_info(tmp_path / "snap").protocol == PROTOCOL_1_2
    got = read_snapshot(tmp_path / "snap").sort_values("imageSetId")["StudyDateTime"]
    want = again.sort_values("imageSetId")["StudyDateTime"]
    pd.testing.assert_series_equal(got.reset_index(drop=True), want.reset_index(drop=True))


def test_declared_schema_is_unchanged() -> None:
    assert schema.arrow_schema().field("StudyDateTime").type == pa.timestamp("us")
