"""Damaged data files of a table partitioned by PatientID: typed errors that name no value.

A file is overwritten in place at the same size (its footer kept), so every check against the
table's log passes and the damage shows only when the pages are decoded, inside pyarrow, whose
errors quote the file's path: ``PatientID=<value>/...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from healthimaging_df.errors import SnapshotError
from healthimaging_df.snapshot import read_snapshot, scan_snapshot, write_snapshot

from .conftest import typed_frame


def _damage_pages(path: Path) -> None:
    """Overwrite the data pages of a Parquet file, keeping its size and its footer."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4 : len(data) - footer] = b"\xa5" * (len(data) - footer - 4)
    path.write_bytes(bytes(data))
    assert pq.ParquetFile(path).metadata.num_rows > 0  # the footer still reads


def _assert_typed_without_phi(action: Any, patients: list[str]) -> None:
    with pytest.raises(SnapshotError) as caught:
        action()
    text = str(caught.value) + repr(caught.value)
    assert "PatientID=" not in text
    assert ".parquet" not in text
    assert not any(p in text for p in patients)
    assert caught.value.__cause__ is None


def _cases(where: dict[str, Any]) -> list[Any]:
    return [
        lambda: read_snapshot(**where),
        lambda: list(read_snapshot(chunk_rows=10, **where)),
        lambda: scan_snapshot(**where).to_table(),
        lambda: scan_snapshot(**where).to_table(columns=["PatientID", "imageSetId"]),
        lambda: list(scan_snapshot(**where).to_batches()),
        lambda: scan_snapshot(**where).head(1000),
    ]


def test_a_damaged_file_of_a_patient_partitioned_delta_table_names_no_patient(
    tmp_path: Path,
) -> None:
    frame = typed_frame(60, seed=4)
    patients = [str(v) for v in frame["PatientID"].dropna().unique()]
    table = tmp_path / "delta"
    write_snapshot(frame, table, partition_cols=["PatientID"])
    victims = [p for p in table.rglob("*.parquet") if "PatientID=" in str(p)]
    for victim in victims:
        _damage_pages(victim)
    for action in _cases({"path": table}):
        _assert_typed_without_phi(action, patients)


def test_a_damaged_file_of_a_patient_partitioned_iceberg_table_names_no_patient(
    tmp_path: Path,
) -> None:
    pytest.importorskip("pyiceberg")
    frame = typed_frame(60, seed=4)
    patients = [str(v) for v in frame["PatientID"].dropna().unique()]
    where = {
        "iceberg_table": "cohorts.ct",
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "warehouse": str(tmp_path / "wh"),
    }
    write_snapshot(frame, partition_cols=["PatientID"], **where)
    victims = [p for p in (tmp_path / "wh").rglob("*.parquet") if "PatientID=" in str(p)]
    assert victims
    for victim in victims:
        _damage_pages(victim)
    for action in _cases(where):
        _assert_typed_without_phi(action, patients)
