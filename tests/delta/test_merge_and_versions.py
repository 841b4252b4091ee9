"""MERGE refresh equals a fresh write; every version reads back; history; vacuum's trade-off."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.store import delta

from .conftest import PROVENANCE, by_id, typed_table


def _bump(table: pa.Table, **columns: object) -> pa.Table:
    """*table* with a newer state: version + 1, updatedAt + 1 h, and the given columns set."""
    out = table.set_column(
        table.schema.get_field_index("version"), "version", pc.add(table.column("version"), 1)
    )
    later = pc.add(out.column("updatedAt"), pa.scalar(timedelta(hours=1)))
    out = out.set_column(out.schema.get_field_index("updatedAt"), "updatedAt", later)
    for name, value in columns.items():
        index = out.schema.get_field_index(name)
        out = out.set_column(
            index, name, pa.array([value] * out.num_rows, out.schema.field(name).type)
        )
    return out


def _without(table: pa.Table, ids: list[str]) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column("imageSetId"), pa.array(ids))))


def test_merge_equals_a_fresh_write_and_rewrites_less(tmp_path: Path) -> None:
    # a cohort of primary image sets, in many files (sorted by createdAt, small target files)
    base = typed_table(6000, seed=5)
    base = base.filter(pc.fill_null(base.column("isPrimary"), True)).sort_by("createdAt")
    path = tmp_path / "t"
    first = delta.write_table(path, base, PROVENANCE, target_file_size=64 * 1024)
    assert len(first.files) >= 5

    recent = base.slice(base.num_rows - 40)  # changes concentrate on recent image sets
    ids = recent.column("imageSetId").to_pylist()
    updated = _bump(recent.slice(0, 20), Modality="XA")
    flipped = _bump(recent.slice(20, 5), isPrimary=False)  # left the cohort: a leaver
    leavers = ids[20:25] + ids[25:30]
    added = typed_table(15, seed=77).slice(0, 15)
    stale = recent.slice(30, 5)
    stale = stale.set_column(
        stale.schema.get_field_index("version"), "version", pc.subtract(stale.column("version"), 1)
    )
    stale = stale.set_column(
        stale.schema.get_field_index("Modality"), "Modality", pa.array(["OLD"] * 5)
    )
    incoming = pa.concat_tables([updated, added, stale])
    result = delta.merge_table(path, incoming, leavers, {**PROVENANCE, "refresh": 1})

    expected = pa.concat_tables([_without(base, ids[:30]), updated, added])
    assert by_id(delta.read_table(path).table).equals(by_id(expected))
    assert (result.added, result.updated, result.removed) == (15, 20, 10)
    assert result.rows == expected.num_rows
    assert flipped.num_rows == 5
    fresh = delta.write_table(tmp_path / "fresh", expected, PROVENANCE, target_file_size=64 * 1024)
    assert by_id(delta.read_table(tmp_path / "fresh").table).equals(by_id(expected))
    assert result.bytes_written * 2 < fresh.bytes_written  # only the touched files
    assert result.files_removed < len(first.files) / 2

    again = delta.merge_table(path, pa.concat_tables([updated, added]), [], PROVENANCE)
    assert (again.version, again.added, again.updated) == (None, 0, 0)  # same state: untouched


def test_merge_refuses_bad_input_before_writing(tmp_path: Path, sample_table: pa.Table) -> None:
    path = tmp_path / "t"
    delta.write_table(path, sample_table, PROVENANCE)
    one = sample_table.slice(0, 1)
    ident = one.column("imageSetId")[0].as_py()
    cases = [
        (pa.concat_tables([one, one]), [], "incoming", "repeated"),
        (one.drop_columns(["Modality"]), [], "incoming", "exactly the table's columns"),
        (one, [ident], "removed_ids", "also in incoming"),
        (one, "abc", "removed_ids", "not one string"),
        (one, [1], "removed_ids", "strings"),
    ]
    for incoming, removed, field, rule in cases:
        with pytest.raises(QueryValidationError, match=rule) as caught:
            delta.merge_table(path, incoming, removed, PROVENANCE)
        assert caught.value.field == field
    assert delta.read_table(path).version == 0
    with pytest.raises(SnapshotError, match="no snapshot"):
        delta.merge_table(tmp_path / "missing", one, [], PROVENANCE)


def test_time_travel_reads_every_version_as_written(tmp_path: Path) -> None:
    path = tmp_path / "t"
    written: list[tuple[int, pa.Table, dict[str, object]]] = []
    table = typed_table(120, seed=2)
    for round_number in range(3):
        prov = {**PROVENANCE, "round": round_number}
        info = delta.write_table(path, table, prov, partition_by=["Modality"])
        written.append((info.version, table, prov))
        time.sleep(0.01)  # distinct commit timestamps (milliseconds)
        table = pa.concat_tables([table.slice(20), typed_table(10, seed=100 + round_number)])
        table = table.slice(0, table.num_rows - 2)
    changed = _bump(table.slice(0, 10), StudyDescription="after merge")
    merge = delta.merge_table(
        path, changed, table.column("imageSetId").to_pylist()[10:13], {"m": 1}
    )
    assert merge.version is not None
    current = delta.read_table(path).table
    written.append((merge.version, current, {"m": 1}))

    for version, content, prov in written:
        got = delta.read_table(path, version=version)
        assert by_id(got.table).equals(by_id(content))
        assert (got.provenance, got.version) == (prov, version)
        at = delta.read_table(path, as_of=got.timestamp)  # the version in force at that moment
        assert (at.version, at.provenance) == (version, prov)
        assert by_id(at.table).equals(by_id(content))
        assert delta.dataset(path, version=version).count_rows() == content.num_rows
    first_moment = delta.read_table(path, version=0).timestamp
    with pytest.raises(SnapshotError, match="no such version"):
        delta.read_table(path, as_of=first_moment - timedelta(days=1))
    with pytest.raises(SnapshotError, match="no such version"):
        delta.read_table(path, version=99)

    frame = delta.history(path)
    assert frame["version"].tolist() == [3, 2, 1, 0]
    assert frame["operation"].tolist() == ["MERGE", "WRITE", "WRITE", "WRITE"]
    assert frame.loc[0, ["rows_added", "rows_updated", "rows_removed"]].tolist() == [0, 10, 3]
    assert frame.loc[3, ["rows_added", "rows_removed"]].tolist() == [122, 0]
    assert frame.loc[2, ["rows_added", "rows_removed"]].tolist() == [written[1][1].num_rows, 122]
    assert [p.get("round") for p in frame["provenance"]] == [None, 2, 1, 0]
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"


def test_vacuum_trades_old_versions_for_space(tmp_path: Path) -> None:
    path = tmp_path / "t"
    table = typed_table(200, seed=3)
    delta.write_table(path, table, {"v": 0}, partition_by=["Modality"])
    delta.write_table(path, table.slice(0, 100), {"v": 1}, partition_by=["Modality"])
    with pytest.raises(QueryValidationError, match="retain"):
        delta.vacuum(path, retain=-timedelta(hours=1))
    assert delta.vacuum(path, retain=timedelta(days=7)) == 0  # the old files are recent
    would = delta.vacuum(path, retain=timedelta(0), dry_run=True)
    assert would > 0
    assert delta.read_table(path, version=0).table.num_rows == 202  # dry run deleted nothing
    assert delta.vacuum(path, retain=timedelta(0), dry_run=False) == would
    assert delta.read_table(path).table.num_rows == 100
    assert delta.read_table(path).provenance == {"v": 1}  # vacuum commits keep the provenance
    with pytest.raises(SnapshotError, match="missing"):
        delta.read_table(path, version=0)
    assert delta.history(path)["operation"].tolist()[:2] == ["VACUUM END", "VACUUM START"]
