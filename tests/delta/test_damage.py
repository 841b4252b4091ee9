"""Damaged and foreign tables raise SnapshotError, and no message quotes a path inside the table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from healthimaging_df.errors import SnapshotConflictError, SnapshotError
from healthimaging_df.store import delta
from healthimaging_df.store.delta import encoding

from .conftest import PROVENANCE


def _phi_table(sample_table: pa.Table) -> pa.Table:
    return sample_table.filter(pa.compute.is_valid(sample_table.column("PatientID")))


def _patients(table: pa.Table) -> list[str]:
    return sorted(set(table.column("PatientID").to_pylist()))


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if "_delta_log" not in p.parts)


def _delete_a_file(path: Path) -> None:
    _data_files(path)[0].unlink()


def _truncate_a_file(path: Path) -> None:
    victim = _data_files(path)[0]
    victim.write_bytes(victim.read_bytes()[:100])


def _corrupt_the_log(path: Path) -> None:
    (path / "_delta_log" / "00000000000000000000.json").write_text('{"commitInfo": {"tim')


def _garbage_log(path: Path) -> None:
    (path / "_delta_log" / "00000000000000000000.json").write_bytes(b"\x00\xff not json at all")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "deleted data file": _delete_a_file,
    "truncated data file": _truncate_a_file,
    "cut-off log entry": _corrupt_the_log,
    "garbage log entry": _garbage_log,
}


EXPECTED = {
    "deleted data file": "missing",
    "truncated data file": "damaged or truncated",
    "cut-off log entry": "log is damaged",
    "garbage log entry": "log is damaged",
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_table_raises_without_phi(
    tmp_path: Path, sample_table: pa.Table, damage: str
) -> None:
    table = _phi_table(sample_table)
    path = tmp_path / "cohort"
    delta.write_table(path, table, PROVENANCE, partition_by=["PatientID"])
    DAMAGE[damage](path)
    with pytest.raises(SnapshotError, match=EXPECTED[damage]) as caught:
        delta.read_table(path)
    _assert_no_phi(caught.value, table, path)
    if "log" in damage:
        for action in (
            lambda: delta.history(path),
            lambda: delta.write_table(path, table, PROVENANCE),
            lambda: delta.merge_table(path, table.slice(0, 1), [], PROVENANCE),
        ):
            with pytest.raises(SnapshotError) as caught:
                action()
            _assert_no_phi(caught.value, table, path)


def _assert_no_phi(error: BaseException, table: pa.Table, path: Path) -> None:
    text = str(error)
    assert not isinstance(error, SnapshotConflictError)
    assert str(path) not in text
    assert "PatientID=" not in text
    assert ".parquet" not in text
    for patient in _patients(table):
        assert patient not in text
    assert (
        error.__context__ is None or error.__suppress_context__
    )  # the library's text (with paths) stays out of tracebacks


def test_foreign_tables_and_files_are_refused(tmp_path: Path, sample_table: pa.Table) -> None:
    table = _phi_table(sample_table)
    foreign = tmp_path / "foreign"
    write_deltalake(str(foreign), table, partition_by=["PatientID"])
    for action in (
        lambda: delta.read_table(foreign),
        lambda: delta.dataset(foreign),
        lambda: delta.write_table(foreign, table, PROVENANCE),
        lambda: delta.merge_table(foreign, table.slice(0, 1), [], PROVENANCE),
    ):
        with pytest.raises(SnapshotError, match="not written by healthimaging_df") as caught:
            action()
        _assert_no_phi(caught.value, table, foreign)

    ours = tmp_path / "ours"
    delta.write_table(ours, table, PROVENANCE)
    stored = encoding.table_schema(DeltaTable(str(ours)).schema())
    appended = encoding.to_storage(table.slice(0, 3), stored)
    write_deltalake(str(ours), appended, mode="append")  # another tool appended
    with pytest.raises(SnapshotError, match="not written by healthimaging_df"):
        delta.read_table(ours)
    assert delta.read_table(ours, version=0).table.num_rows == table.num_rows
    listed = delta.history(ours)  # shows what happened, without inventing provenance
    assert listed["provenance"].tolist() == [None, PROVENANCE]
    with pytest.raises(SnapshotError, match="not written by healthimaging_df"):
        delta.history(foreign)

    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain)
    with pytest.raises(SnapshotError, match="a file, not a Delta table"):
        delta.read_table(plain)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    for action in (
        lambda: delta.read_table(folder),
        lambda: delta.write_table(folder, table, PROVENANCE),
    ):
        with pytest.raises(SnapshotError, match=r"no Delta log|no snapshot there"):
            action()
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]  # left alone
    with pytest.raises(SnapshotError, match="no snapshot there"):
        delta.read_table(tmp_path / "nothing")
