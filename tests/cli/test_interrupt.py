"""Ctrl-C or SIGTERM during a checkpointed export: the pages in flight finish, the checkpoint is
written, the command exits 130, and the same command then resumes with little left to redo."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot

from .conftest import ENTRY_POINT, clean_env

IMAGE_SETS = 2_000
MAX_TPS = "3"  # 40 pages at 3 a second: the first save (at 5 s) comes well before the end


@pytest.fixture
def slow() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=IMAGE_SETS, seed=13, latency_ms=60) as svc:
        yield svc


def _state(folder: Path) -> dict[str, int] | None:
    found = list(folder.glob("*.ahi-checkpoint/state.json"))
    if not found:
        return None
    try:
        state = json.loads(found[0].read_text())
    except (OSError, ValueError):  # being replaced: read it again
        return None
    return {"tasks": int(state["tasks"]), "rows": int(state["rows"])}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_writes_the_checkpoint_and_the_resume_is_exact(
    slow: LocalService, tmp_path: Path, signum: int
) -> None:
    argv = [
        str(ENTRY_POINT), "snapshot", "cohort.parquet", "--datastore-id", str(slow.datastore_id),
        "--max-tps", MAX_TPS, "-q",
    ]  # fmt: skip
    env = clean_env(slow.env())
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        before = None
        while before is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
            before = _state(tmp_path)
        assert before is not None, "no checkpoint was saved in time"
        time.sleep(1.5)  # more pages read since that save
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "checkpoint holds" in stderr
    assert "Traceback" not in stderr
    after = _state(tmp_path)
    assert after is not None
    assert after["tasks"] > before["tasks"]
    assert after["rows"] > before["rows"]
    assert not (tmp_path / "cohort.parquet").exists()
    interrupted_requests = slow.stats.by_operation["SearchImageSets"]

    slow.reset_stats()
    resumed = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    got = read_snapshot(tmp_path / "cohort.parquet")
    records = slow.backend.image_sets(str(slow.datastore_id))
    assert sorted(got["imageSetId"]) == sorted(r["imageSetId"] for r in records)
    assert got["imageSetId"].is_unique
    # little is redone: the resume reads about what the interrupted run had not
    pages = IMAGE_SETS / 50
    resumed_requests = slow.stats.by_operation["SearchImageSets"]
    assert resumed_requests < pages - after["rows"] / 50 + 25, (
        interrupted_requests,
        resumed_requests,
        after,
    )
