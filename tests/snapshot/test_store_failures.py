"""A full disk and an S3 outage on the write paths: typed errors naming no path or key, and the
previous snapshot intact."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.errors import SnapshotError
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import export_query, read_snapshot, write_snapshot

from .conftest import S3, typed_frame

FAST: dict[str, Any] = {"progress": False, "max_tps": None}


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real full disk (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill *disk* up to *leave* free bytes."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.attrs = {}
    return out


def test_a_full_disk_is_a_typed_error_and_keeps_the_previous_snapshot(
    tiny_disk: Path, ahi_local: LocalService, ahi_client: Any
) -> None:
    small = typed_frame(30, seed=1)
    big = typed_frame(3000, seed=2)
    table = tiny_disk / "PatientID-table"
    single = tiny_disk / "patient-1.parquet"
    write_snapshot(small, table, partition_cols=["Modality"])
    write_snapshot(small, single)
    _fill(tiny_disk, 16 * 1024)
    query = Query(ahi_local.datastore_id)
    writes: dict[str, Callable[[], object]] = {
        "delta overwrite": lambda: write_snapshot(big, table, partition_cols=["Modality"]),
        "single file": lambda: write_snapshot(big, single),
        "new delta table": lambda: write_snapshot(big, tiny_disk / "fresh"),
        "export to delta": lambda: export_query(
            query, table, client=ahi_client, checkpoint_interval=0, **FAST
        ),
        "export to a file": lambda: export_query(
            query, single, client=ahi_client, checkpoint_interval=0, **FAST
        ),
    }
    for name, write in writes.items():
        with pytest.raises(SnapshotError, match="no space left") as caught:
            write()
        assert str(tiny_disk) not in str(caught.value), name
        assert "patient-1" not in str(caught.value), name
        pd.testing.assert_frame_equal(_plain(read_snapshot(table)), _plain(small))
        pd.testing.assert_frame_equal(_plain(read_snapshot(single)), _plain(small))


def test_an_s3_outage_mid_export_is_a_typed_error_naming_no_key(
    ahi_service_factory: Callable[..., LocalService],
) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3(f"http://{host}:{port}")
    bucket = s3.bucket()
    service = ahi_service_factory(image_sets=1500, seed=3, latency_ms=60)
    query = Query(service.datastore_id)
    path = f"s3://{bucket}/PatientID=secret/cohort"
    stopped = threading.Event()

    def stop_once_checkpointed() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = s3.client.list_objects_v2(Bucket=bucket).get("Contents", [])
            if any("ahi-checkpoint" in o["Key"] for o in listed):
                server.stop()
                stopped.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_once_checkpointed, daemon=True)
    watcher.start()
    try:
        with pytest.raises(SnapshotError) as caught:
            export_query(
                query,
                path,
                client=service.client(),
                checkpoint_interval=0,
                max_concurrency=2,
                **FAST,
                **s3.options(),
            )
    finally:
        watcher.join(timeout=60)
        if not stopped.is_set():
            server.stop()
    assert stopped.is_set(), "the export finished before S3 went away"
    text = str(caught.value)
    assert "secret" not in text
    assert bucket not in text
    assert str(port) not in text
    assert "did not answer" in text
