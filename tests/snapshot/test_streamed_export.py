"""A single-file export streams through spill files: exact under updates, resumable, leaves nothing.

Spills and checkpoint parts are forced small, so that a few thousand image sets cross many of
them; the file must still hold every image set once, in order, and no spill folder may remain
after a success, a failure, or a resume after a kill.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from healthimaging_df import Query
from healthimaging_df.engine import checkpoint, spill
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot
from healthimaging_df.store import single
from healthimaging_df.store.redact import RedactionPolicy, apply_redaction, generate_key

FAST = {"progress": False, "max_tps": None}


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out


def _spill_folders(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(f"{spill.SPILL_PREFIX}*")]


@pytest.fixture
def small_spills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill, "SPILL_ROWS", 37)
    monkeypatch.setattr(checkpoint, "PART_ROWS", 101)


def test_streamed_export_under_updates_holds_each_image_set_once_in_order(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path, small_spills: None
) -> None:
    service = ahi_service_factory(image_sets=1500, seed=4)
    service.set_faults(latency_ms=5.0)
    ids = [r["imageSetId"] for r in service.backend.image_sets(service.datastore_id)]
    stop = threading.Event()
    touched: list[str] = []

    def update() -> None:  # new versions, same tags: the same cohort
        rng = random.Random(3)
        while not stop.is_set():
            image_set = rng.choice(ids)
            service.backend.update_image_set(service.datastore_id, image_set)
            touched.append(image_set)
            stop.wait(0.002)

    query = Query(service.datastore_id).where_not(Modality="SR")
    worker = threading.Thread(target=update)
    worker.start()
    try:
        info = query.to_parquet(
            str(tmp_path / "x.parquet"), client=service.client(), checkpoint_interval=0, **FAST
        )
    finally:
        stop.set()
        worker.join()
    assert len(touched) > 50  # the datastore really changed while the export ran
    service.set_faults(latency_ms=0)
    got = read_snapshot(tmp_path / "x.parquet")
    want = query.to_dataframe(client=service.client(), **FAST)  # after the updates
    assert got["imageSetId"].is_unique
    assert info.rows == len(got) == len(want) > 1000
    # the default order is by updatedAt, which the updates moved: compare by image set
    got = got.sort_values("imageSetId", ignore_index=True)
    want = want.sort_values("imageSetId", ignore_index=True)
    moving = ["version", "updatedAt"]
    pd.testing.assert_frame_equal(
        _plain(got.drop(columns=moving)), _plain(want.drop(columns=moving))
    )
    assert (got["version"] <= want["version"]).all()
    assert not _spill_folders(tmp_path)


@pytest.mark.parametrize("redact", [False, True])
def test_streamed_export_equals_to_dataframe_and_leaves_no_spill(
    ahi_local: LocalService,
    ahi_client: Any,
    tmp_path: Path,
    small_spills: None,
    redact: bool,
) -> None:
    query = Query(ahi_local.datastore_id).where(isPrimary=True)
    path = tmp_path / "x.parquet"
    policy = RedactionPolicy(key=generate_key()) if redact else None
    query.to_parquet(str(path), client=ahi_client, redact=policy, **FAST)
    got = read_snapshot(path)
    want = query.to_dataframe(client=ahi_client, **FAST)
    if policy is not None:
        want = apply_redaction(want, policy)
    pd.testing.assert_frame_equal(_plain(got), _plain(want))
    groups = pq.ParquetFile(path).metadata
    assert groups.num_row_groups == 1
    assert groups.row_group(0).num_rows == len(want)
    assert got.attrs["healthimaging_df"]["watermark"] == want["updatedAt"].max().isoformat()
    assert got.attrs["healthimaging_df"]["row_count"] == len(want)
    assert not _spill_folders(tmp_path, Path(os.environ["HEALTHIMAGING_DF_CACHE"]))


def test_a_failed_write_removes_its_spill_folder(
    ahi_local: LocalService,
    ahi_client: Any,
    tmp_path: Path,
    small_spills: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Path] = []

    def fail(*args: Any, **kwargs: Any) -> Any:
        seen.extend(_spill_folders(tmp_path))
        raise OSError("disk full")

    monkeypatch.setattr(single, "write_file", fail)
    with pytest.raises(OSError, match="disk full"):
        Query(ahi_local.datastore_id).to_parquet(
            str(tmp_path / "x.parquet"), client=ahi_client, **FAST
        )
    assert seen  # the spill folder existed while the export ran
    assert not _spill_folders(tmp_path)
    assert not (tmp_path / "x.parquet").exists()


_CHILD = """
import json, sys
from healthimaging_df import Query
from healthimaging_df.engine import checkpoint, spill
spill.SPILL_ROWS, checkpoint.PART_ROWS = 37, 101
query = Query.from_dict(json.loads(sys.argv[1]))
query.to_parquet(sys.argv[2], progress=False, max_concurrency=2, max_tps=None,
                 checkpoint_interval=0)
"""


def test_killed_single_file_export_resumes_to_the_same_file(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=2000, seed=21, latency_ms=100)
    query = Query(service.datastore_id).where_not(Modality="SR")
    target = tmp_path / "snap.parquet"
    state = tmp_path / "snap.parquet.ahi-checkpoint" / "state.json"
    env = {**os.environ, **service.env(), "CI": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(query.to_dict()), str(target)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        done = 0
        while done < 4 and time.monotonic() < deadline:
            assert child.poll() is None, "the export finished before it could be interrupted"
            try:
                done = int(json.loads(state.read_text())["tasks"])
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.02)
        assert done >= 4, "no checkpoint appeared"
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()
    assert not target.exists()
    assert _spill_folders(tmp_path)  # a killed run cannot clean up: the next one does

    service.set_faults(latency_ms=0)
    client = service.client()
    resumed = query.to_parquet(str(target), client=client, **FAST)
    assert resumed.resumed_tasks >= 4
    fresh = query.to_parquet(str(tmp_path / "fresh.parquet"), client=client, **FAST)
    got, want = read_snapshot(target), read_snapshot(tmp_path / "fresh.parquet")
    assert got["imageSetId"].is_unique
    pd.testing.assert_frame_equal(_plain(got), _plain(want))
    assert resumed.rows == fresh.rows == len(got)
    assert not _spill_folders(tmp_path)
    assert not state.parent.exists()


@pytest.fixture
def no_whole_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """An export may not read its result whole: only the streamed paths are allowed."""

    def whole(self: spill.SortedRows) -> Any:
        raise AssertionError("the export read its whole result into memory")

    monkeypatch.setattr(spill.SortedRows, "table", whole)


@pytest.mark.parametrize(("redact", "parts"), [(False, None), (True, ["Modality"])])
def test_streamed_delta_export_equals_to_dataframe_in_file_order(
    ahi_local: LocalService,
    ahi_client: Any,
    tmp_path: Path,
    small_spills: None,
    no_whole_result: None,
    redact: bool,
    parts: list[str] | None,
) -> None:
    # sorted by another column: the table's files still keep rows in createdAt order
    query = Query(ahi_local.datastore_id).where(isPrimary=True).sort_by("PatientID")
    path = tmp_path / "snap"
    policy = RedactionPolicy(key=generate_key()) if redact else None
    info = query.to_delta(str(path), client=ahi_client, redact=policy, partition_cols=parts, **FAST)
    want = query.to_dataframe(client=ahi_client, **FAST)
    if policy is not None:
        want = apply_redaction(want, policy)
    got = read_snapshot(path)
    assert info.rows == len(got) == len(want) > 100
    by_id = ["imageSetId"]
    pd.testing.assert_frame_equal(
        _plain(got[want.columns].sort_values(by_id, ignore_index=True)),
        _plain(want.sort_values(by_id, ignore_index=True)),
    )
    files = DeltaTable(str(path)).file_uris()
    assert len(files) > 1
    for uri in files:
        created = pq.read_table(uri, columns=["createdAt"]).column("createdAt").to_pylist()
        assert created == sorted(created)
    attrs = got.attrs["healthimaging_df"]
    assert attrs["row_count"] == len(want)
    assert attrs["watermark"] == want["updatedAt"].max().isoformat()
    assert not _spill_folders(tmp_path, Path(os.environ["HEALTHIMAGING_DF_CACHE"]))


def test_an_empty_streamed_delta_export_is_a_typed_empty_table(
    ahi_local: LocalService, ahi_client: Any, tmp_path: Path, no_whole_result: None
) -> None:
    query = Query(ahi_local.datastore_id).where(PatientID="nobody-has-this-id")
    info = query.to_delta(str(tmp_path / "snap"), client=ahi_client, **FAST)
    got = read_snapshot(tmp_path / "snap")
    want = query.to_dataframe(client=ahi_client, **FAST)
    assert info.rows == len(got) == 0
    assert dict(got.dtypes) == dict(want.dtypes)
