"""sync_snapshot: HealthImaging events on a real SQS queue (moto's server) keep a snapshot exact."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.local.events import EventFaults, EventOptions
from healthimaging_df.local.pytest_plugin import SqsQueue
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import read_snapshot, snapshot_history
from healthimaging_df.store.redact import RedactionPolicy
from healthimaging_df.sync import sync_snapshot

pytest.importorskip("moto.server")

FAST = {"progress": False, "max_tps": None}
KEY = b"sync-test-key-0123456789-abcdefghijkl"


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out.reset_index(drop=True)


def _service(
    factory: Callable[..., LocalService], queue: SqsQueue, image_sets: int = 300, **options: Any
) -> LocalService:
    return factory(
        image_sets=image_sets,
        seed=21,
        events_queue_url=queue.url,
        sqs_endpoint_url=queue.endpoint_url,
        **options,
    )


def _query(service: LocalService) -> Query:
    return Query(service.datastore_id).where(isPrimary=True).where_not(Modality="SR")


def _sync(service: LocalService, queue: SqsQueue, path: Path, **options: Any) -> Any:
    assert service.flush_events()
    return sync_snapshot(
        path,
        queue_url=queue.url,
        client=service.client(),
        sqs_client=queue.client,
        once=True,
        **{**FAST, **options},
    )


def _mutate(service: LocalService, seed: int = 0) -> dict[str, set[str]]:
    """Through the API: an update out of the cohort, one in, deletes, a copy; new image sets."""
    ds = str(service.datastore_id)
    client = service.client()
    backend = service.backend
    records = sorted(backend.image_sets(ds), key=lambda r: r["imageSetId"])
    primary = [
        r for r in records if r["isPrimary"] and r["DICOMTags"].get("DICOMSeriesModality") != "SR"
    ]
    secondary = [r for r in records if not r["isPrimary"]]
    backend.update_image_set(ds, primary[0]["imageSetId"], tags={"DICOMSeriesModality": "SR"})
    backend.update_image_set(ds, primary[1]["imageSetId"], tags={"DICOMStudyDescription": "Ré ✓"})
    backend.update_image_set(ds, secondary[0]["imageSetId"], is_primary=True)
    for record in primary[2:5]:
        client.delete_image_set(datastoreId=ds, imageSetId=record["imageSetId"])
    copied = client.copy_image_set(
        datastoreId=ds,
        sourceImageSetId=primary[5]["imageSetId"],
        copyImageSetInformation={"sourceImageSet": {"latestVersionId": str(primary[5]["version"])}},
        promoteToPrimary=False,
    )["destinationImageSetProperties"]["imageSetId"]
    new = generate_image_sets(12, seed=9000 + seed)
    now = datetime.now(timezone.utc)
    for record in new:  # as the service stamps a new image set
        record.update(createdAt=now, updatedAt=now, lastAccessedAt=now, version=1)
    backend.add_image_sets(ds, new)
    return {
        "deleted": {r["imageSetId"] for r in primary[2:5]},
        "copied": {copied},
        "new": {r["imageSetId"] for r in new},
    }


def test_sync_once_equals_a_fresh_export_and_is_idempotent(
    ahi_service_factory: Callable[..., LocalService],
    ahi_sqs_queue: SqsQueue,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = _service(ahi_service_factory, ahi_sqs_queue)
    client = service.client()
    query = _query(service)
    path = tmp_path / "snap"
    query.to_delta(str(path), client=client, partition_cols=["Modality"], **FAST)
    changed = _mutate(service)
    # every event twice: duplicates change nothing
    assert service.flush_events()
    bodies = list(ahi_sqs_queue.receive())
    for body in bodies + bodies[::-1]:
        ahi_sqs_queue.client.send_message(QueueUrl=ahi_sqs_queue.url, MessageBody=json.dumps(body))
    service.reset_stats()
    caplog.set_level(logging.DEBUG, logger="healthimaging_df")
    report = _sync(service, ahi_sqs_queue, path, progress=True)
    assert report.stopped == "drained"
    # the log and the progress line carry counts, never a value of the data
    said = caplog.text + capsys.readouterr().err + str(report) + repr(report)
    assert "sync: batch 1:" in said
    for record in service.backend.image_sets(str(service.datastore_id)):
        tags = record["DICOMTags"]
        for key in ("DICOMPatientId", "DICOMSeriesInstanceUID", "DICOMStudyInstanceUID"):
            assert not tags.get(key) or tags[key] not in said
    assert report.messages == 2 * len(bodies)
    assert report.deleted_messages == report.messages
    assert report.poison == []
    assert report.commits == 1
    assert service.stats.by_operation.get("GetImageSetMetadata", 0) == 0
    assert service.stats.by_operation["SearchImageSets"] <= 2
    got = read_snapshot(path)
    fresh = query.to_dataframe(client=client, **FAST)
    pd.testing.assert_frame_equal(_plain(got), _plain(fresh))
    assert not changed["deleted"] & set(got["imageSetId"])
    assert report.removed >= len(changed["deleted"]) + 1  # the deletes and the leaver

    # the same events again, older ones last: no commit, nothing changes
    for body in bodies[::-1]:
        ahi_sqs_queue.client.send_message(QueueUrl=ahi_sqs_queue.url, MessageBody=json.dumps(body))
    versions = len(snapshot_history(path))
    again = _sync(service, ahi_sqs_queue, path)
    assert (again.commits, again.added, again.updated, again.removed) == (0, 0, 0, 0)
    assert len(snapshot_history(path)) == versions
    pd.testing.assert_frame_equal(_plain(read_snapshot(path)), _plain(fresh))


def test_poison_is_reported_and_deleted(
    ahi_service_factory: Callable[..., LocalService], ahi_sqs_queue: SqsQueue, tmp_path: Path
) -> None:
    service = _service(ahi_service_factory, ahi_sqs_queue, image_sets=60)
    query = _query(service)
    path = tmp_path / "snap"
    query.to_delta(str(path), client=service.client(), partition_cols=["Modality"], **FAST)
    send = ahi_sqs_queue.client.send_message
    url = ahi_sqs_queue.url
    other = {
        "source": "aws.medical-imaging",
        "detail-type": "Image Set Deleted",
        "time": "2024-01-01T00:00:00Z",
        "detail": {"datastoreId": "f" * 32, "imageSetId": "a" * 32},
    }
    send(QueueUrl=url, MessageBody="not json")
    send(QueueUrl=url, MessageBody=json.dumps(other))
    send(QueueUrl=url, MessageBody=json.dumps({**other, "detail-type": "Import Job Completed"}))
    send(QueueUrl=url, MessageBody=json.dumps({**other, "source": "aws.s3"}))
    report = _sync(service, ahi_sqs_queue, path)
    reasons = sorted(reason for _, reason in report.poison)
    assert reasons == [
        "detail-type is not an image-set event this version knows",
        "source is not aws.medical-imaging",
        "the body is not JSON",
        "the event is for another datastore",
    ]
    assert report.deleted_messages == 4
    assert report.commits == 0
    assert ahi_sqs_queue.receive() == []


def test_guide_spelling_and_redacted_snapshot(
    ahi_service_factory: Callable[..., LocalService], ahi_sqs_queue: SqsQueue, tmp_path: Path
) -> None:
    service = _service(
        ahi_service_factory,
        ahi_sqs_queue,
        event_options=EventOptions(image_set_id_key="imagesetId"),
        event_faults=EventFaults(reorder_window=8, duplicate_rate=0.3, seed=3),
    )
    client = service.client()
    policy = RedactionPolicy(key=KEY)
    query = _query(service)
    path = tmp_path / "red"
    query.to_delta(str(path), client=client, redact=policy, partition_cols=["Modality"], **FAST)
    _mutate(service, seed=1)
    report = _sync(service, ahi_sqs_queue, path, query=query, redact=policy)
    assert report.id_keys.keys() == {"imagesetId"}
    got = read_snapshot(path)
    other = tmp_path / "fresh"
    query.to_delta(str(other), client=client, redact=policy, partition_cols=["Modality"], **FAST)
    cols = list(got.columns)
    pd.testing.assert_frame_equal(_plain(got)[cols], _plain(read_snapshot(other))[cols])


def test_reconcile_removes_vanished_rows_and_updates_tiers(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=300, seed=22)
    client = service.client()
    ds = str(service.datastore_id)
    query = _query(service)
    path = tmp_path / "snap"
    query.to_delta(str(path), client=client, partition_cols=["Modality"], **FAST)
    before = read_snapshot(path)
    archived = before[before["storageTier"] == "ARCHIVE_INSTANT_ACCESS"]["imageSetId"].tolist()
    assert archived
    service.backend.get_image_set_metadata(ds, archived[0])  # an access: back to FREQUENT
    gone = before["imageSetId"].iloc[0]
    service.backend.delete_image_set(ds, gone)
    plain = refresh_snapshot(path, client=client, **FAST)  # incremental: sees neither
    assert not plain.changed
    report = refresh_snapshot(path, client=client, reconcile=True, **FAST)
    assert report.reconciled
    assert report.removed == (gone,)
    assert report.retiered == (archived[0],)
    got = read_snapshot(path)
    fresh = query.to_dataframe(client=client, **FAST)
    pd.testing.assert_frame_equal(_plain(got), _plain(fresh))
    prov = got.attrs["healthimaging_df"]
    assert prov["tiers_observed_at"] == prov["reconciled_at"]
    assert "re-tiered" in str(report)


def test_long_poll_applies_events_as_they_come_and_stops_between_batches(
    ahi_service_factory: Callable[..., LocalService], ahi_sqs_queue: SqsQueue, tmp_path: Path
) -> None:
    service = _service(ahi_service_factory, ahi_sqs_queue, image_sets=80)
    client = service.client()
    query = _query(service)
    path = tmp_path / "snap"
    query.to_delta(str(path), client=client, partition_cols=["Modality"], **FAST)
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    found: dict[str, Any] = {}

    def run() -> None:
        found["report"] = sync_snapshot(
            path,
            queue_url=ahi_sqs_queue.url,
            client=client,
            sqs_client=ahi_sqs_queue.client,
            wait_seconds=1,
            stop=stop,
            progress=lambda messages, changed: seen.append((messages, changed)),
            max_tps=None,
        )

    worker = threading.Thread(target=run)
    worker.start()
    try:
        _mutate(service, seed=2)
        assert service.flush_events()
        deadline = time.monotonic() + 30
        fresh = query.to_dataframe(client=client, **FAST)
        while time.monotonic() < deadline:
            got = read_snapshot(path)
            if set(got["imageSetId"]) == set(fresh["imageSetId"]):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    report = found["report"]
    assert report.stopped == "stop"
    assert seen
    assert report.messages == sum(m for m, _ in seen)
    pd.testing.assert_frame_equal(_plain(read_snapshot(path)), _plain(fresh))


def test_cli_sync_stops_on_sigterm_while_polling(
    ahi_service_factory: Callable[..., LocalService], ahi_sqs_queue: SqsQueue, tmp_path: Path
) -> None:
    service = _service(ahi_service_factory, ahi_sqs_queue, image_sets=60)
    query = _query(service)
    path = tmp_path / "snap"
    query.to_delta(str(path), client=service.client(), partition_cols=["Modality"], **FAST)
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=service.access_key_id,
        AWS_SECRET_ACCESS_KEY=service.secret_access_key,
        HEALTHIMAGING_DF_CACHE=str(tmp_path / "cache"),
    )
    command = [
        sys.executable, "-m", "healthimaging_df", "sync", str(path),
        "--queue-url", ahi_sqs_queue.url, "--endpoint-url", service.endpoint_url,
        "--sqs-endpoint-url", ahi_sqs_queue.endpoint_url, "--region", "us-east-1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _mutate(service, seed=3)
        assert service.flush_events()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the queue is drained: the sync is polling
            attributes = ahi_sqs_queue.client.get_queue_attributes(
                QueueUrl=ahi_sqs_queue.url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            if not any(int(v) for v in attributes.values()):
                break
            time.sleep(0.1)
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert time.monotonic() - started < 5  # not the rest of a 20 s long poll
    assert "stopped: signal" in out
    assert "sync: batch 1:" in err  # the progress line: counts only
    fresh = query.to_dataframe(client=service.client(), **FAST)
    pd.testing.assert_frame_equal(_plain(read_snapshot(path)), _plain(fresh))


def test_reconcile_every_settles_a_lost_event(
    ahi_service_factory: Callable[..., LocalService], ahi_sqs_queue: SqsQueue, tmp_path: Path
) -> None:
    service = _service(ahi_service_factory, ahi_sqs_queue, image_sets=120)
    client = service.client()
    query = _query(service)
    path = tmp_path / "snap"
    query.to_delta(str(path), client=client, partition_cols=["Modality"], **FAST)
    gone = str(read_snapshot(path)["imageSetId"].iloc[0])
    client.delete_image_set(datastoreId=service.datastore_id, imageSetId=gone)
    assert service.flush_events()
    assert ahi_sqs_queue.receive()  # the Deleted event is lost
    report = _sync(service, ahi_sqs_queue, path, reconcile_every=timedelta(microseconds=1))
    assert [r.removed for r in report.reconciles] == [(gone,)]
    assert gone not in set(read_snapshot(path)["imageSetId"])
    again = _sync(service, ahi_sqs_queue, path, reconcile_every=timedelta(hours=1))
    assert again.reconciles == []  # the last full read is a few seconds old


def test_sync_an_iceberg_table(
    ahi_service_factory: Callable[..., LocalService], ahi_sqs_queue: SqsQueue, tmp_path: Path
) -> None:
    pytest.importorskip("pyiceberg")
    service = _service(ahi_service_factory, ahi_sqs_queue, image_sets=150)
    client = service.client()
    query = _query(service)
    where = {
        "iceberg_table": "cohorts.synced",
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "warehouse": str(tmp_path / "wh"),
    }
    query.to_iceberg(**where, client=client, partition_cols=["Modality"], **FAST)
    changed = _mutate(service, seed=4)
    assert service.flush_events()
    report = sync_snapshot(
        **where,
        queue_url=ahi_sqs_queue.url,
        client=client,
        sqs_client=ahi_sqs_queue.client,
        once=True,
        **FAST,
    )
    assert report.commits == 1
    got = read_snapshot(**where)
    assert not changed["deleted"] & set(got["imageSetId"])
    fresh = query.to_dataframe(client=client, **FAST)
    pd.testing.assert_frame_equal(_plain(got), _plain(fresh))
    reconciled = refresh_snapshot(**where, client=client, reconcile=True, **FAST)
    assert not reconciled.changed
