"""A randomized run: writes of every kind interleaved with syncs under delivery faults and a kill.

Creates, updates (in and out of the cohort), copies (some promoted into a primary image set) and
deletes are interleaved with ``sync --once`` runs; events are duplicated, reordered and (in one
case) lost; one sync is a ``healthimaging-df sync`` subprocess killed with SIGKILL while it holds
messages, then run again. Without loss the snapshot equals a fresh export row for row; a final
reconcile makes it equal either way.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.local.events import EventFaults
from healthimaging_df.local.pytest_plugin import SqsQueue
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import read_snapshot
from healthimaging_df.sync import sync_snapshot

pytest.importorskip("moto.server")

FAST = {"progress": False, "max_tps": None}
VISIBILITY = 2  # seconds a killed sync's messages stay hidden


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out.reset_index(drop=True)


def _writes(service: LocalService, rng: random.Random, serial: list[int]) -> None:
    """A random mix of writes through the API and the backend (which emit the same events)."""
    ds = str(service.datastore_id)
    client = service.client()
    backend = service.backend
    for _ in range(rng.randint(6, 14)):
        records = backend.image_sets(ds)
        record = rng.choice(records)
        kind = rng.choice(["create", "update", "flip", "retag", "copy", "promote", "delete"])
        image_set_id = record["imageSetId"]
        if kind == "create":
            serial[0] += 1
            new = generate_image_sets(rng.randint(1, 4), seed=50_000 + serial[0])
            now = datetime.now(timezone.utc)
            for item in new:
                item.update(createdAt=now, updatedAt=now, lastAccessedAt=now, version=1)
            backend.add_image_sets(ds, new)
        elif kind == "update":
            backend.update_image_set(ds, image_set_id, tags={"DICOMStudyDescription": f"d{_}"})
        elif kind == "flip":
            backend.update_image_set(ds, image_set_id, is_primary=not record["isPrimary"])
        elif kind == "retag":
            modality = rng.choice(["SR", "CT", "MR"])
            backend.update_image_set(ds, image_set_id, tags={"DICOMSeriesModality": modality})
        elif kind in ("copy", "promote"):
            client.copy_image_set(
                datastoreId=ds,
                sourceImageSetId=image_set_id,
                copyImageSetInformation={
                    "sourceImageSet": {"latestVersionId": str(record["version"])}
                },
                promoteToPrimary=kind == "promote",
            )
        else:
            client.delete_image_set(datastoreId=ds, imageSetId=image_set_id)


def _sync(service: LocalService, queue: SqsQueue, path: Path) -> Any:
    return sync_snapshot(
        path,
        queue_url=queue.url,
        client=service.client(),
        sqs_client=queue.client,
        once=True,
        visibility_timeout=VISIBILITY,
        **FAST,
    )


def _killed_sync(service: LocalService, queue: SqsQueue, path: Path, tmp: Path) -> bool:
    """``healthimaging-df sync --once`` killed (SIGKILL) once it holds messages; whether it did."""
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=service.access_key_id,
        AWS_SECRET_ACCESS_KEY=service.secret_access_key,
        AWS_DEFAULT_REGION="us-east-1",
        HEALTHIMAGING_DF_CACHE=str(tmp / "cache"),
    )
    command = [
        sys.executable, "-m", "healthimaging_df", "-q", "sync", str(path),
        "--queue-url", queue.url, "--once", "--endpoint-url", service.endpoint_url,
        "--sqs-endpoint-url", queue.endpoint_url, "--region", "us-east-1",
        "--visibility-timeout", str(VISIBILITY), "--max-tps", "1000",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    held = False
    deadline = time.monotonic() + 30
    try:
        while process.poll() is None and time.monotonic() < deadline:
            attributes = queue.client.get_queue_attributes(
                QueueUrl=queue.url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
            )["Attributes"]
            if int(attributes["ApproximateNumberOfMessagesNotVisible"]) > 0:
                held = True
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    return held


@pytest.mark.parametrize(
    ("seed", "loss"),
    [(1, 0.0), (2, 0.0), (3, 0.2)],
)
def test_random_writes_and_syncs_converge(
    ahi_service_factory: Callable[..., LocalService],
    ahi_sqs_queue: SqsQueue,
    tmp_path: Path,
    seed: int,
    loss: float,
) -> None:
    faults = EventFaults(loss_rate=loss, duplicate_rate=0.25, reorder_window=7, seed=seed)
    service = ahi_service_factory(
        image_sets=250,
        seed=30 + seed,
        events_queue_url=ahi_sqs_queue.url,
        sqs_endpoint_url=ahi_sqs_queue.endpoint_url,
        event_faults=faults,
    )
    client = service.client()
    query = Query(service.datastore_id).where(isPrimary=True).where_not(Modality="SR")
    path = tmp_path / "snap"
    query.to_delta(str(path), client=client, partition_cols=["Modality"], **FAST)
    rng = random.Random(seed)
    serial = [seed * 1000]
    kill_round = rng.randint(1, 3)
    killed_holding = False
    for round_ in range(5):
        _writes(service, rng, serial)
        if rng.random() < 0.5:  # some events wait for a later round (and a later sync)
            assert service.flush_events()
        if round_ == kill_round:
            assert service.flush_events()
            killed_holding = _killed_sync(service, ahi_sqs_queue, path, tmp_path)
            time.sleep(VISIBILITY + 0.5)  # what it held comes back
        _sync(service, ahi_sqs_queue, path)
    assert service.flush_events()
    report = _sync(service, ahi_sqs_queue, path)
    assert report.poison == []
    fresh = query.to_dataframe(client=client, **FAST)
    if loss == 0.0:
        assert report.unresolved == 0
        pd.testing.assert_frame_equal(_plain(read_snapshot(path)), _plain(fresh))
    reconciled = refresh_snapshot(path, client=client, reconcile=True, **FAST)
    pd.testing.assert_frame_equal(_plain(read_snapshot(path)), _plain(fresh))
    if loss == 0.0:
        assert not reconciled.changed  # the events had already made it exact
    assert ahi_sqs_queue.receive() == []
    assert killed_holding  # the kill did land between receiving messages and deleting them
