"""Two processes writing one table: never unreadable or mixed; losers get SnapshotConflictError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from healthimaging_df.errors import SnapshotConflictError, SnapshotError
from healthimaging_df.store import delta

from .conftest import PROVENANCE, Moto

ROUNDS = int(os.environ.get("HIDF_DELTA_ROUNDS", "20"))

# Each round writes a table whose every row says (writer, round), with a row count unique to the
# pair: a mixed version would show two pairs or the wrong count.
WRITER = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from healthimaging_df.store import delta
    from healthimaging_df.errors import SnapshotConflictError

    uri, writer, rounds, options = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    options = json.loads(options) or None
    done, lost = [], 0
    for number in range(rounds):
        rows = 10 + writer * 100 + number
        table = pa.table({
            "imageSetId": [f"{writer}-{number}-{i}" for i in range(rows)],
            "writer": [writer] * rows,
            "round": [number] * rows,
        })
        try:
            info = delta.write_table(uri, table, {"writer": writer, "round": number},
                                     partition_by=["writer"], storage_options=options)
            done.append([number, info.version])
        except SnapshotConflictError as exc:
            assert "another writer committed" in str(exc)
            lost += 1
    print(json.dumps({"done": done, "lost": lost}))
    """
)


def _race(uri: str, options: dict[str, str] | None, reads: list[Any]) -> list[dict[str, Any]]:
    """Run two writer processes on *uri*; read the table in this process while they run."""
    env_path = str(Path(__file__).resolve().parents[2])
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, str(w), str(ROUNDS), json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        )
        for w in (1, 2)
    ]
    failures: list[str] = []
    try:
        while any(p.poll() is None for p in processes):
            try:
                reads.append(delta.read_table(uri, storage_options=options))
            except SnapshotError as exc:  # only "no table yet", before the first commit
                if "no snapshot there" not in str(exc):
                    failures.append(str(exc))
            time.sleep(0.01)
    finally:
        outputs = [p.communicate(timeout=300) for p in processes]
    assert not failures
    results = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _check(
    uri: str, options: dict[str, str] | None, results: list[dict[str, Any]], reads: list[Any]
) -> None:
    committed = {
        version: (w, number)
        for w, r in zip((1, 2), results, strict=True)
        for number, version in r["done"]
    }
    attempts = sum(len(r["done"]) + r["lost"] for r in results)
    assert attempts == 2 * ROUNDS
    assert sum(r["lost"] for r in results) == 2 * ROUNDS - len(committed)
    history = delta.history(uri, storage_options=options)
    assert sorted(history["version"]) == sorted(committed)  # every commit is one reported success
    for version, (writer, number) in committed.items():
        _assert_whole(
            delta.read_table(uri, version=version, storage_options=options), writer, number
        )
    for read in reads:  # what a reader saw mid-race was one whole version too
        writer, number = read.provenance["writer"], read.provenance["round"]
        _assert_whole(read, writer, number)
    latest = delta.read_table(uri, storage_options=options)
    assert latest.version == max(committed)


def _assert_whole(read: Any, writer: int, number: int) -> None:
    table = read.table
    assert read.provenance == {"writer": writer, "round": number}
    assert table.num_rows == 10 + writer * 100 + number
    assert pc.all(pc.equal(table.column("writer"), writer)).as_py()
    assert pc.all(pc.equal(table.column("round"), number)).as_py()


@pytest.mark.slow
def test_two_processes_on_local_disk(tmp_path: Path) -> None:
    uri = str(tmp_path / "shared")
    reads: list[Any] = []
    results = _race(uri, None, reads)
    _check(uri, None, results, reads)
    assert reads


@pytest.mark.slow
def test_two_processes_on_moto_s3(moto: Moto) -> None:
    uri = f"s3://{moto.bucket()}/shared"
    options = moto.options()
    reads: list[Any] = []
    results = _race(uri, options, reads)
    _check(uri, options, results, reads)


def test_a_stale_writer_loses_and_the_winner_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "t"
    one = pa.table(
        {"imageSetId": ["a", "b"], "version": [1, 1], "updatedAt": pa.array([1, 1], pa.int64())}
    )
    delta.write_table(path, one, PROVENANCE)
    read = delta.read_table(path)
    delta.write_table(path, one.slice(0, 1), {"winner": True})  # someone else, meanwhile
    for action in (
        lambda: delta.write_table(path, one, PROVENANCE, expected_version=read.version),
        lambda: delta.merge_table(
            path, one.slice(1), ["a"], PROVENANCE, expected_version=read.version
        ),
    ):
        with pytest.raises(SnapshotConflictError, match="Read it again and redo") as caught:
            action()
        assert isinstance(caught.value, SnapshotError)
    latest = delta.read_table(path)
    assert (latest.version, latest.provenance, latest.table.num_rows) == (1, {"winner": True}, 1)


def test_retry_on_conflict_rereads_and_redoes(tmp_path: Path) -> None:
    path = tmp_path / "t"
    base = pa.table({"imageSetId": ["a"], "version": [1], "updatedAt": pa.array([1], pa.int64())})
    delta.write_table(path, base, {"n": 0})
    calls: list[int] = []

    def add_one() -> delta.MergeResult:
        current = delta.read_table(path)
        calls.append(current.version)
        if len(calls) == 1:  # another writer sneaks in between our read and our commit
            delta.write_table(path, current.table, {"n": "other"})
        row = pa.table(
            {
                "imageSetId": [f"x{len(calls)}"],
                "version": [1],
                "updatedAt": pa.array([1], pa.int64()),
            }
        )
        return delta.merge_table(path, row, [], {"n": len(calls)}, expected_version=current.version)

    result = delta.retry_on_conflict(add_one, base_delay=0)
    assert calls == [0, 1]
    assert result.added == 1
    assert sorted(delta.read_table(path).table.column("imageSetId").to_pylist()) == ["a", "x2"]

    def always_loses() -> None:
        raise SnapshotConflictError("lost")

    with pytest.raises(SnapshotConflictError):
        delta.retry_on_conflict(always_loses, attempts=3, base_delay=0)
