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


def _assert_typed_without_path(action: Any, *fragments: str) -> SnapshotError:
    with pytest.raises(SnapshotError) as caught:
        action()
    text = str(caught.value)
    assert not any(f in text for f in fragments), text
    return caught.value


def _reads(path: Path) -> list[Any]:
    return [
        lambda: read_snapshot(path),
        lambda: read_snapshot(path, columns=["imageSetId", "PatientID"]),
        lambda: list(read_snapshot(path, chunk_rows=10)),
        lambda: scan_snapshot(path).to_table(),
    ]


def test_read_snapshot_refuses_data_files_that_do_not_match_the_log(tmp_path: Path) -> None:
    """A replaced data file, or a log entry pointing outside the table, is never read as rows."""
    import json

    frame = typed_frame(300, seed=5)
    other = typed_frame(300, seed=6)

    replaced = tmp_path / "replaced"
    write_snapshot(frame, replaced, partition_cols=["Modality"])
    donor = tmp_path / "donor"
    write_snapshot(other, donor, partition_cols=["Modality"])
    victim = max(replaced.rglob("*.parquet"), key=lambda p: p.stat().st_size)
    substitute = max(donor.rglob("*.parquet"), key=lambda p: p.stat().st_size)
    victim.write_bytes(substitute.read_bytes())  # another file of another size

    outside = tmp_path / "outside"
    write_snapshot(frame, outside)
    log = outside / "_delta_log" / f"{0:020d}.json"
    stray = tmp_path / "stray.parquet"
    stray.write_bytes(next(outside.rglob("part-*.parquet")).read_bytes())
    lines = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if "add" in entry:
            entry["add"]["path"] = "../stray.parquet"
        lines.append(json.dumps(entry))
    log.write_text("\n".join(lines) + "\n")

    cases = [replaced, outside]
    for path in cases:
        for action in _reads(path):
            _assert_typed_without_path(action, str(tmp_path), "Modality=")


def test_a_single_file_of_another_schema_with_our_metadata_is_refused(tmp_path: Path) -> None:
    ours = tmp_path / "ours.parquet"
    write_snapshot(typed_frame(20, seed=1), ours)
    metadata = pq.read_schema(ours).metadata
    import pyarrow as pa

    for columns in ({"x": [1, 2, 3]}, {"imageSetId": ["a"], "x": [1]}):
        foreign = tmp_path / f"foreign-{len(columns)}.parquet"
        pq.write_table(pa.table(columns).replace_schema_metadata(metadata), foreign)
        for action in _reads(foreign)[:2] + _reads(foreign)[3:]:
            error = _assert_typed_without_path(action, str(tmp_path))
            assert "not a snapshot of this library" in str(error)


def _flips(size: int) -> list[int]:
    """Byte offsets to damage: the magic, page headers, the middle, the footer and its length."""
    return sorted({0, 4, 5, 8, 16, size // 4, size // 3, size // 2, size - 9, size - 8, size - 5})


def test_damaged_single_file_snapshots_raise_typed_errors_without_the_path(
    tmp_path: Path,
) -> None:
    frame = typed_frame(200, seed=7)
    good = tmp_path / "good.parquet"
    write_snapshot(frame, good)
    body = good.read_bytes()
    variants: dict[str, bytes] = {
        "zero-byte": b"",
        "magic only": body[:4],
        "truncated half": body[: len(body) // 2],
        "truncated footer": body[:-3],
        "no head": body[100:],
    }
    for offset in _flips(len(body)):
        flipped = bytearray(body)
        flipped[offset] ^= 0xFF
        variants[f"flipped at {offset}"] = bytes(flipped)
    want = read_snapshot(good)
    want.attrs = {}
    silent = []
    leaks: list[bool] = []
    for name, data in variants.items():
        path = tmp_path / "patient-12345.parquet"  # a path a caller may have named after PHI
        path.write_bytes(data)
        for action in _reads(path):
            try:
                got = action()
            except SnapshotError as error:
                text = str(error)
            else:
                text = ""
            if text:
                leaks += ["patient-12345" in text or str(tmp_path) in text]
                continue
            if isinstance(got, list) or not hasattr(got, "attrs"):
                continue  # chunks or an Arrow table: counted below by the frame reads
            got.attrs = {}
            if not got.equals(want.loc[:, list(got.columns)]):
                silent.append(name)
    assert not silent, f"damage read as other rows: {silent}"
    assert leaks
    assert not any(leaks)
