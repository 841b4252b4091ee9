"""Directory snapshots as Delta tables, through the public API: concurrent writers, time travel,
history, vacuum, scans, chunked reads, damage, Glue, and no private file beside a redacted export."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from healthimaging_df import Query
from healthimaging_df.engine.statistics import cache_dir
from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import (
    read_snapshot,
    scan_snapshot,
    snapshot_history,
    snapshot_provenance,
    vacuum_snapshot,
    write_snapshot,
)
from healthimaging_df.store.redact import RedactionPolicy, generate_key

from .conftest import S3, typed_frame

FAST: dict[str, Any] = {"progress": False, "max_tps": None}

_WRITER = """
import sys
from healthimaging_df import schema
from healthimaging_df.store.delta import retry_on_conflict
from healthimaging_df.snapshot import read_snapshot, write_snapshot
sys.path.insert(0, sys.argv[3])
from conftest import typed_frame
frame = typed_frame(200, seed=int(sys.argv[2]))
for _ in range(20):
    retry_on_conflict(lambda: write_snapshot(frame, sys.argv[1], partition_cols=["Modality"]),
                      attempts=50, base_delay=0.01, max_delay=0.2)
"""


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out


@pytest.mark.slow  # 40 commits by two processes and a reader on 2 cores: about 25 s
def test_two_processes_writing_one_table_never_leave_it_unreadable_or_mixed(
    tmp_path: Path,
) -> None:
    target = tmp_path / "shared"
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), here])}
    frames = {seed: typed_frame(200, seed=seed) for seed in (1, 2)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target), str(seed), here],
            env=env,
            stderr=subprocess.PIPE,
        )
        for seed in frames
    ]
    wholes = {seed: frozenset(f["imageSetId"]) for seed, f in frames.items()}
    failures: list[str] = []
    reads = 0
    while any(child.poll() is None for child in children):
        try:
            seen = frozenset(read_snapshot(target)["imageSetId"])
        except SnapshotError as exc:  # only before the first commit
            failures.append(str(exc))
            continue
        assert seen in wholes.values()  # a whole version of one writer, never a mix
        reads += 1
    for child in children:
        _, err = child.communicate()
        assert child.returncode == 0, err.decode()[-2000:]
    history = snapshot_history(target)
    assert sorted(history["version"]) == list(range(40))  # every write committed, none lost
    for version in history["version"]:
        got = read_snapshot(target, version=int(version))
        assert any(got["imageSetId"].equals(f["imageSetId"]) for f in frames.values())
    assert reads > 0
    assert all("no snapshot" in text for text in failures)  # unreadable only before version 0


def test_time_travel_reads_every_version_back_as_written(tmp_path: Path) -> None:
    target = tmp_path / "cohort"
    written = []
    for seed, parts in ((1, ["Modality"]), (2, None), (3, ["Modality"]), (4, ["StudyYear"])):
        frame = typed_frame(120, seed=seed)
        frame.attrs["healthimaging_df"]["query"] = json.dumps(
            {"datastore_id": "f" * 32, "predicates": [], "seed": seed}
        )
        info = write_snapshot(frame, target, partition_cols=parts)
        written.append((info.version, frame))
    history = snapshot_history(target)
    assert history["version"].tolist() == [3, 2, 1, 0]
    assert history["operation"].tolist() == ["WRITE"] * 4
    assert history["rows_added"].tolist() == [len(f) for _, f in reversed(written)]
    for (version, frame), moment in zip(
        written, reversed(history["timestamp"].tolist()), strict=True
    ):
        for got in (
            read_snapshot(target, version=version),
            read_snapshot(target, as_of=moment.to_pydatetime()),
        ):
            pd.testing.assert_frame_equal(_plain(got), _plain(frame))
            assert (
                got.attrs["healthimaging_df"]["query"] == frame.attrs["healthimaging_df"]["query"]
            )
        assert snapshot_provenance(target, version=version)["row_count"] == len(frame)
        assert scan_snapshot(target, version=version).count_rows() == len(frame)
    with pytest.raises(SnapshotError, match="no such version"):
        read_snapshot(target, version=9)
    with pytest.raises(QueryValidationError) as caught:
        read_snapshot(target, version=1, as_of=history["timestamp"][0])
    assert caught.value.field == "version"
    with pytest.raises(QueryValidationError, match="directory"):
        read_snapshot(tmp_path / "x.parquet", version=0)
    with pytest.raises(SnapshotError, match="partitioned by StudyYear"):  # delta-rs cannot drop it
        write_snapshot(typed_frame(10, seed=5), target, partition_cols=[])
    assert snapshot_history(target)["version"].iloc[0] == 3  # nothing committed
    kept = write_snapshot(typed_frame(10, seed=5), target)  # None keeps the partitioning
    assert "StudyYear" in kept.partition_cols


def test_chunked_reads_are_typed_and_complete(tmp_path: Path) -> None:
    frame = typed_frame(500, seed=7)
    for path, parts in ((tmp_path / "dir", ["Modality"]), (tmp_path / "one.parquet", None)):
        write_snapshot(frame, path, partition_cols=parts)
        whole = read_snapshot(path)
        chunks = list(read_snapshot(path, chunk_rows=64))
        assert all(0 < len(c) <= 64 for c in chunks)
        assert all(c.dtypes.equals(whole.dtypes) for c in chunks)
        assert chunks[0].attrs["healthimaging_df"]["row_count"] == len(frame)
        joined = pd.concat(chunks).sort_values("imageSetId").reset_index(drop=True)
        pd.testing.assert_frame_equal(
            _plain(joined), _plain(whole.sort_values("imageSetId").reset_index(drop=True))
        )
        ct = pd.concat(read_snapshot(path, chunk_rows=50, filters=[("Modality", "==", "CT")]))
        assert set(ct["Modality"]) == {"CT"}
        assert len(ct) == int((frame["Modality"] == "CT").sum())
    with pytest.raises(QueryValidationError, match="chunk_rows"):
        read_snapshot(tmp_path / "dir", chunk_rows=0)


def test_vacuum_trades_old_versions_for_space(tmp_path: Path) -> None:
    target = tmp_path / "cohort"
    first, second = typed_frame(100, seed=1), typed_frame(100, seed=2)
    write_snapshot(first, target, partition_cols=["Modality"])
    write_snapshot(second, target, partition_cols=["Modality"])
    assert vacuum_snapshot(target, retain=timedelta(days=1)) == 0  # all recent: nothing goes
    files = sorted(target.rglob("*.parquet"))
    would = vacuum_snapshot(target, retain=timedelta(0), dry_run=True)
    assert would == first["Modality"].nunique(dropna=False)
    assert sorted(target.rglob("*.parquet")) == files
    assert vacuum_snapshot(target, retain=timedelta(0), dry_run=False) == would
    pd.testing.assert_frame_equal(_plain(read_snapshot(target)), _plain(second))
    with pytest.raises(SnapshotError, match="missing") as caught:
        read_snapshot(target, version=0)  # its files are gone
    assert "Modality=" not in str(caught.value)
    assert snapshot_history(target)["operation"].iloc[0] == "VACUUM END"
    with pytest.raises(QueryValidationError, match="retain"):
        vacuum_snapshot(target, retain=3)  # type: ignore[arg-type]


def _phi_free(message: str, values: list[str]) -> None:
    assert "PatientID=" not in message
    assert not any(v in message for v in values)


def test_damaged_or_foreign_snapshots_raise_snapshot_error_without_paths(tmp_path: Path) -> None:
    from deltalake import write_deltalake

    frame = typed_frame(60, seed=4)
    patients = [str(v) for v in frame["PatientID"].dropna().unique()]

    def fresh(name: str) -> Path:
        path = tmp_path / name
        write_snapshot(frame, path, partition_cols=["PatientID"])
        return path

    deleted = fresh("deleted")
    next(deleted.rglob("*.parquet")).unlink()
    truncated = fresh("truncated")
    victim = next(truncated.rglob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:40])
    corrupt = fresh("corrupt")
    (corrupt / "_delta_log" / f"{0:020d}.json").write_text('{"commitInfo": [')
    plain = tmp_path / "plain"
    plain.mkdir()
    frame.to_parquet(plain / "part.0.parquet")
    foreign = tmp_path / "foreign"
    write_deltalake(
        str(foreign),
        pa.table({"PatientID": patients, "n": list(range(len(patients)))}),
        partition_by=["PatientID"],
    )
    cases = {
        deleted: "missing",
        truncated: "damaged or truncated",
        corrupt: "log is damaged",
        plain: "no Delta log",
        foreign: "not written by healthimaging_df",
    }
    for path, reason in cases.items():
        for action in (
            lambda p=path: read_snapshot(p),
            lambda p=path: list(read_snapshot(p, chunk_rows=10)),
            lambda p=path: scan_snapshot(p).to_table(),
        ):
            with pytest.raises(SnapshotError, match=reason) as caught:
                action()
            _phi_free(str(caught.value), patients)
    with pytest.raises(SnapshotError, match="no Delta log"):
        write_snapshot(frame, plain)
    assert sorted(p.name for p in plain.iterdir()) == ["part.0.parquet"]  # left alone


_REDACTED_CHILD = """
import json, sys
from healthimaging_df import Query
from healthimaging_df.store.redact import RedactionPolicy
query = Query.from_dict(json.loads(sys.argv[1]))
query.to_delta(sys.argv[2], progress=False, max_concurrency=2, max_tps=None,
               checkpoint_interval=0, partition_cols=["Modality"],
               redact=RedactionPolicy(key=sys.argv[3]))
"""


def _files_holding(folder: Path, values: set[str], skip: Path) -> list[str]:
    """Files below *folder* (not below *skip*) whose bytes or Parquet values contain any value."""
    hits = []
    for path in folder.rglob("*"):
        if not path.is_file() or skip in path.parents:
            continue
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".parquet":
            with contextlib.suppress(OSError, pa.ArrowException):
                texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
        if any(v in text for v in values for text in texts):
            hits.append(path.name)
    return hits


def test_nothing_private_beside_an_interrupted_redacted_export(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=1500, seed=33, latency_ms=100)
    patients = {
        str(s["DICOMTags"]["DICOMPatientId"])
        for s in service.backend.image_sets(service.datastore_id)
        if s.get("DICOMTags", {}).get("DICOMPatientId")
    }
    key = generate_key()
    query = Query(service.datastore_id).where_not(Modality="SR")
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "redacted"
    private = cache_dir() / "checkpoints"
    env = {**os.environ, **service.env(), "CI": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _REDACTED_CHILD, json.dumps(query.to_dict()), str(target), key],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(private.glob("*/state.json")):
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert _files_holding(shared, patients, private) == []  # during the export
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert _files_holding(shared, patients, private) == []  # after it died
    assert not list(shared.iterdir())  # nothing at all beside the target
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert _files_holding(private, patients, shared)  # the raw rows are in the private folder

    service.set_faults(latency_ms=0)
    info = query.to_delta(
        str(target),
        client=service.client(),
        partition_cols=["Modality"],
        redact=RedactionPolicy(key=key),
        **FAST,
    )
    assert info.resumed_tasks > 0  # the private checkpoint was used
    assert not list(private.glob("*/state.json"))  # and deleted once written
    assert _files_holding(shared, patients, private) == []


def test_glue_registration_with_the_write(moto_s3: S3) -> None:
    bucket = moto_s3.bucket()
    path = f"s3://{bucket}/cohorts/ct"
    frame = typed_frame(50, seed=9)
    info = write_snapshot(
        frame, path, partition_cols=["Modality"], glue_table="imaging.ct", **moto_s3.options()
    )
    assert info.glue == "created"
    again = write_snapshot(
        frame, path, partition_cols=["Modality"], glue_table="imaging.ct", **moto_s3.options()
    )
    assert again.glue == "updated"
    glue = moto_s3.session.client("glue", endpoint_url=moto_s3.endpoint_url)
    table = glue.get_table(DatabaseName="imaging", Name="ct")["Table"]
    assert table["Parameters"]["table_type"] == "DELTA"
    assert table["StorageDescriptor"]["Location"] == path
    assert [k["Name"] for k in table["PartitionKeys"]] == ["Modality"]
    for bad, where in (("nodot", path), ("a.b", "/tmp/local"), ("a.b", f"{path}.parquet")):
        with pytest.raises(QueryValidationError) as caught:
            write_snapshot(frame, where, glue_table=bad, **moto_s3.options())
        assert caught.value.field == "glue_table"


def test_a_refresh_that_loses_a_race_reads_the_winner_and_merges_again(
    ahi_service_factory: Callable[..., LocalService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from healthimaging_df.errors import SnapshotConflictError
    from healthimaging_df.refresh import refresh_snapshot
    from healthimaging_df.store import delta

    service = ahi_service_factory(image_sets=200, seed=14)
    client = service.client()
    query = Query(service.datastore_id).where(isPrimary=True)
    path = tmp_path / "cohort"
    query.to_delta(str(path), client=client, partition_cols=["Modality"], **FAST)
    victim = next(
        s["imageSetId"]
        for s in service.backend.image_sets(service.datastore_id)
        if s.get("isPrimary") is not False
    )
    service.backend.update_image_set(service.datastore_id, victim, is_primary=False)

    real = delta.DeltaFormat.merge
    calls: list[int | None] = []

    def raced(self: delta.DeltaFormat, *args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("expected_version"))  # type: ignore[arg-type]
        if len(calls) == 1:  # another writer commits the same rows first: ours must lose
            write_snapshot(read_snapshot(path), path, partition_cols=["Modality"])
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta.DeltaFormat, "merge", raced)
    report = refresh_snapshot(path, client=client, **FAST)
    assert calls == [0, 1]  # the retry was based on the version that won
    assert report.removed == (victim,)
    history = snapshot_history(path)
    assert history["operation"].tolist() == ["MERGE", "WRITE", "WRITE"]
    fresh = query.to_dataframe(client=client, **FAST)
    pd.testing.assert_frame_equal(_plain(read_snapshot(path)), _plain(fresh))

    def always(self: delta.DeltaFormat, *args: object, **kwargs: object) -> object:
        raise SnapshotConflictError("lost")

    monkeypatch.setattr(delta.DeltaFormat, "merge", always)
    service.backend.update_image_set(service.datastore_id, victim, is_primary=True)
    with pytest.raises(SnapshotConflictError):
        refresh_snapshot(path, client=client, attempts=2, **FAST)


def test_a_refresh_with_another_query_is_refused_before_any_commit(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    from healthimaging_df.refresh import refresh_snapshot

    service = ahi_service_factory(image_sets=150, seed=15)
    client = service.client()
    mr, ct = (Query(service.datastore_id).where(Modality=m) for m in ("MR", "CT"))
    policy = RedactionPolicy(key=generate_key())
    plain, redacted = tmp_path / "plain", tmp_path / "redacted"
    mr.to_delta(str(plain), client=client, partition_cols=["Modality"], **FAST)
    mr.to_delta(str(redacted), client=client, redact=policy, **FAST)
    for path, extra in ((plain, {}), (redacted, {"redact": policy})):
        service.reset_stats()
        with pytest.raises(SnapshotError, match="not the query") as caught:
            refresh_snapshot(path, client=client, query=ct, **extra, **FAST)
        assert "CT" not in str(caught.value)
        assert service.stats.requests == 0  # refused before any request
        assert snapshot_history(path)["version"].tolist() == [0]  # and before any commit
