"""Query.to_parquet against the local service: equality with to_dataframe, provenance, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.errors import SnapshotError
from healthimaging_df.local import LocalService
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import export_query, read_snapshot

FAST = {"progress": False, "max_tps": None}


def _without_attrs(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out


@pytest.mark.parametrize("partition_cols", [None, ["Modality"]])
def test_export_equals_to_dataframe(
    ahi_local: LocalService, ahi_client: Any, tmp_path: Path, partition_cols: list[str] | None
) -> None:
    query = Query(ahi_local.datastore_id).where(isPrimary=True).where_not(Modality="SR")
    path = tmp_path / ("snap" if partition_cols else "snap.parquet")
    export = query.to_delta if partition_cols else query.to_parquet
    info = export(str(path), client=ahi_client, partition_cols=partition_cols, **FAST)
    want = query.to_dataframe(client=ahi_client, **FAST)
    got = read_snapshot(path)
    pd.testing.assert_frame_equal(_without_attrs(got), _without_attrs(want))
    assert info.rows == len(want) > 1000
    assert not path.with_name(path.name + ".ahi-checkpoint").exists()

    prov = got.attrs["healthimaging_df"]
    assert prov["datastore_id"] == ahi_local.datastore_id
    assert prov["endpoint_url"] == ahi_local.endpoint_url
    assert prov["region"] == "us-east-1"
    assert Query.from_dict(json.loads(prov["query"])) == query
    assert json.loads(prov["plan"])[0]["datastoreId"] == ahi_local.datastore_id
    assert prov["watermark"] == want["updatedAt"].max().isoformat()
    assert prov["fetch_started_at"] <= prov["fetched_at"]
    assert prov["schema_version"] == "1"
    assert prov["row_count"] == len(want)


def test_limited_export_and_no_incremental_refresh(
    ahi_local: LocalService, ahi_client: Any, tmp_path: Path
) -> None:
    query = Query(ahi_local.datastore_id).where(Modality="CT").sort_by("createdAt").limit(7)
    query.to_parquet(str(tmp_path / "top.parquet"), client=ahi_client, **FAST)
    got = read_snapshot(tmp_path / "top.parquet")
    want = query.to_dataframe(client=ahi_client, **FAST)
    pd.testing.assert_frame_equal(_without_attrs(got), _without_attrs(want))
    with pytest.raises(SnapshotError, match="limit"):
        refresh_snapshot(tmp_path / "top.parquet", client=ahi_client, **FAST)


def test_checkpoint_of_another_query_is_ignored(
    ahi_local: LocalService, ahi_client: Any, tmp_path: Path
) -> None:
    stale = tmp_path / "snap.parquet.ahi-checkpoint"
    stale.mkdir()
    (stale / "state.json").write_text(json.dumps({"fingerprint": "other"}))
    query = Query(ahi_local.datastore_id).where(Modality="MR")
    info = export_query(query, tmp_path / "snap.parquet", client=ahi_client, **FAST)
    assert info.resumed_tasks == 0
    assert not stale.exists()
    assert info.rows == len(query.to_dataframe(client=ahi_client, **FAST))


_CHILD = """
import json, sys
from healthimaging_df import Query
query = Query.from_dict(json.loads(sys.argv[1]))
query.to_delta(sys.argv[2], progress=False, max_concurrency=2, max_tps=None,
               checkpoint_interval=0, partition_cols=["Modality"])
"""


def _wait_for_tasks(state: Path, tasks: int, child: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert child.poll() is None, "the export finished before it could be interrupted"
        try:
            done = int(json.loads(state.read_text())["tasks"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done = 0
        if done >= tasks:
            return done
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_killed_export_resumes_to_the_same_result(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=2000, seed=21, latency_ms=100)
    query = Query(service.datastore_id).where_not(Modality="SR")
    target = tmp_path / "snap"
    env = {**os.environ, **service.env(), "CI": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(query.to_dict()), str(target)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        checkpointed = _wait_for_tasks(
            target.with_name("snap.ahi-checkpoint") / "state.json", 4, child
        )
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()
    assert not (target / "_delta_log").exists()  # nothing committed

    service.set_faults(latency_ms=0)
    service.reset_stats()
    client = service.client()
    resumed = query.to_delta(str(target), client=client, partition_cols=["Modality"], **FAST)
    resumed_requests = service.stats.requests
    assert resumed.resumed_tasks >= checkpointed

    service.reset_stats()
    fresh = query.to_delta(str(tmp_path / "fresh"), client=client, **FAST)
    assert resumed_requests < service.stats.requests  # checkpointed windows were not fetched again
    got = read_snapshot(target)
    want = read_snapshot(tmp_path / "fresh")
    assert got["imageSetId"].is_unique
    pd.testing.assert_frame_equal(_without_attrs(got), _without_attrs(want))
    assert fresh.rows == resumed.rows == len(got)
    assert (
        got.attrs["healthimaging_df"]["fetch_started_at"]
        < want.attrs["healthimaging_df"]["fetch_started_at"]
    )
    assert not target.with_name("snap.ahi-checkpoint").exists()


class _Killed(BaseException):
    """The process dying: not an ``Exception``, so nothing on the way catches it."""


@pytest.mark.parametrize("single_file", [True, False])
def test_a_kill_while_a_finished_export_deletes_its_checkpoint_is_survived(
    ahi_local: LocalService,
    ahi_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    single_file: bool,
) -> None:
    from healthimaging_df.store import storage

    query = Query(ahi_local.datastore_id).where(Modality="MR")
    target = tmp_path / ("snap.parquet" if single_file else "snap")
    folder = target.with_name(target.name + ".ahi-checkpoint")
    real_delete = storage._LocalStore.delete
    armed = [True]

    def dying_delete(self: Any, rels: Any) -> None:
        rels = list(rels)
        if armed[0] and any(r.endswith("ahi-checkpoint/state.json") for r in rels):
            armed[0] = False
            real_delete(self, rels[:1])  # the first file goes, then the process dies
            raise _Killed
        real_delete(self, rels)

    monkeypatch.setattr(storage._LocalStore, "delete", dying_delete)
    with pytest.raises(_Killed):
        export_query(query, target, client=ahi_client, checkpoint_interval=0, **FAST)
    assert folder.exists()  # the kill left part of the checkpoint behind
    want = query.to_dataframe(client=ahi_client, **FAST)
    assert len(read_snapshot(target)) == len(want)  # the snapshot itself was complete

    info = export_query(query, target, client=ahi_client, **FAST)  # the next run: no error
    assert info.rows == len(want)
    pd.testing.assert_frame_equal(
        _without_attrs(read_snapshot(target)).sort_values("imageSetId").reset_index(drop=True),
        _without_attrs(want).sort_values("imageSetId").reset_index(drop=True),
    )
    assert not folder.exists()


def test_a_checkpoint_whose_parts_are_gone_is_ignored(
    ahi_local: LocalService, ahi_client: Any, tmp_path: Path
) -> None:
    """A kill under the old deletion order (parts first) left such a state file."""
    from healthimaging_df.engine.checkpoint import fingerprint

    query = Query(ahi_local.datastore_id).where(Modality="MR")
    folder = tmp_path / "snap.parquet.ahi-checkpoint"
    folder.mkdir()
    state = {
        "fingerprint": fingerprint(query.to_json()),
        "parts": ["part-00000.parquet"],
        "seen_parts": [],
        "now": "2026-01-01T00:00:00+00:00",
        "started_at": "2026-01-01T00:00:00+00:00",
        "tasks": 1,
        "rows": 5,
        "windows": {},
        "chains": [],
        "chain_keys": True,
    }
    (folder / "state.json").write_text(json.dumps(state))
    info = export_query(query, tmp_path / "snap.parquet", client=ahi_client, **FAST)
    assert info.resumed_tasks == 0
    assert info.rows == len(query.to_dataframe(client=ahi_client, **FAST))
    assert not folder.exists()
