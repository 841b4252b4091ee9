"""In Python, Ctrl-C during a checkpointed export raises KeyboardInterrupt once the pages in
flight are checkpointed; the same call then resumes exactly.

The export runs in a subprocess of its own: Python delivers signals to the main thread, which a
pytest-xdist worker's test does not run on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot

SCRIPT = """
import signal, sys
from healthimaging_df import Query
before = signal.getsignal(signal.SIGINT)
try:
    Query(sys.argv[1]).to_parquet(
        "cohort.parquet", progress=False, max_tps=4.0, checkpoint_interval=1.0
    )
except KeyboardInterrupt as exc:
    assert signal.getsignal(signal.SIGINT) is before, "the handlers are put back"
    print(f"KeyboardInterrupt: {exc}")
    sys.exit(130)
print("done")
"""


def _rows(folder: Path) -> int | None:
    state = folder / "cohort.parquet.ahi-checkpoint" / "state.json"
    try:
        return int(json.loads(state.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return None


def test_keyboard_interrupt_comes_after_the_checkpoint_is_written(tmp_path: Path) -> None:
    with LocalService.seeded(image_sets=1_500, seed=17, latency_ms=60) as service:
        env = {**service.env(), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        argv = [sys.executable, "-c", SCRIPT, str(service.datastore_id)]
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 60
            while _rows(tmp_path) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            before = _rows(tmp_path)
            assert before is not None, "no checkpoint was saved in time"
            time.sleep(1.0)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 130, stderr
        assert "KeyboardInterrupt: SIGINT: stopped after the pages in flight" in stdout
        after = _rows(tmp_path)
        assert after is not None
        assert after > before
        assert not (tmp_path / "cohort.parquet").exists()
        resumed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert resumed.stdout.strip() == "done", resumed.stderr
        records = service.backend.image_sets(str(service.datastore_id))
    got = read_snapshot(tmp_path / "cohort.parquet")
    assert sorted(got["imageSetId"]) == sorted(r["imageSetId"] for r in records)
