"""Image-set events, EventBridge-shaped, delivered to a real SQS queue on moto's server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from healthimaging_df.local import Backend, LocalService, generate_image_sets
from healthimaging_df.local.events import DETAIL_TYPES, EventFaults, EventOptions
from healthimaging_df.local.pytest_plugin import SqsQueue

pytest.importorskip("moto.server")


def make(queue: SqsQueue, image_sets: int = 40, **options: Any) -> LocalService:
    backend = Backend()
    datastore_id = backend.create_datastore("events")
    backend.add_image_sets(datastore_id, generate_image_sets(image_sets, seed=9))
    service = LocalService(
        backend, events_queue_url=queue.url, sqs_endpoint_url=queue.endpoint_url, **options
    )
    service.datastore_id = datastore_id
    return service


def update(
    service: LocalService, record: dict[str, Any], description: str, client: Any = None
) -> dict[str, Any]:
    document = {"SchemaVersion": 1.1, "Study": {"DICOM": {"StudyDescription": description}}}
    client = client or service.client()
    return dict(
        client.update_image_set_metadata(
            datastoreId=service.datastore_id,
            imageSetId=record["imageSetId"],
            latestVersionId=str(record["version"]),
            updateImageSetMetadataUpdates={
                "DICOMUpdates": {"updatableAttributes": json.dumps(document).encode()}
            },
        )
    )


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["detail-type"], e["detail"]["imageSetId"]) for e in events]


def test_every_write_is_an_eventbridge_event_on_the_queue(ahi_sqs_queue: SqsQueue) -> None:
    with make(ahi_sqs_queue) as service:
        ds = str(service.datastore_id)
        assert ahi_sqs_queue.receive() == []  # seeding before the service: no events
        records = service.backend.image_sets(ds)
        first, second = records[0], records[1]
        update(service, first, "CHANGED")
        service.client().delete_image_set(datastoreId=ds, imageSetId=second["imageSetId"])
        copied = service.client().copy_image_set(
            datastoreId=ds,
            sourceImageSetId=records[2]["imageSetId"],
            copyImageSetInformation={
                "sourceImageSet": {"latestVersionId": str(records[2]["version"])}
            },
        )["destinationImageSetProperties"]["imageSetId"]
        new = dict(records[3], imageSetId="e" * 32, version=1)
        service.backend.add_image_sets(ds, [new])
        assert service.flush_events()
        events = ahi_sqs_queue.receive()
    assert kinds(events) == [
        ("Image Set Updating", first["imageSetId"]),
        ("Image Set Updated", first["imageSetId"]),
        ("Image Set Deleting", second["imageSetId"]),
        ("Image Set Deleted", second["imageSetId"]),
        ("Image Set Copying With Read Only Access", records[2]["imageSetId"]),
        ("Image Set Copying", copied),
        ("Image Set Copied", copied),
        ("Image Set Created", "e" * 32),
    ]
    for event in events:
        assert set(event) == {
            "version", "id", "detail-type", "source", "account", "time", "region", "resources",
            "detail",
        }  # fmt: skip
        assert event["source"] == "aws.medical-imaging"
        assert event["version"] == "0"
        detail = event["detail"]
        assert detail["datastoreId"] == ds
        assert event["resources"] == [
            f"arn:aws:medical-imaging:us-east-1:123456789012:datastore/{ds}/imageset/"
            f"{detail['imageSetId']}"
        ]
        state, status = DETAIL_TYPES[event["detail-type"]]
        assert (detail["imageSetState"], detail["imageSetWorkflowStatus"]) == (state, status)
        assert detail["imagingVersion"] == "1.0"
        assert isinstance(detail["imageSetVersion"], str)
        assert isinstance(detail["isPrimary"], bool)
    updated = events[1]["detail"]
    assert (events[0]["detail"]["imageSetVersion"], updated["imageSetVersion"]) == (
        str(first["version"]),
        str(first["version"] + 1),
    )
    assert events[5]["detail"]["sourceImageSetArn"].endswith(
        f"/imageset/{records[2]['imageSetId']}"
    )
    assert len({e["id"] for e in events}) == len(events)
    stats = service.stats
    assert (stats.events_emitted, stats.events_delivered) == (8, 8)


def test_include_study_emits_one_update_per_image_set(ahi_sqs_queue: SqsQueue) -> None:
    options = EventOptions(transitional=False, image_set_id_key="imagesetId")
    with make(ahi_sqs_queue, image_sets=60, event_options=options) as service:
        records = [
            r for r in service.backend.image_sets(str(service.datastore_id)) if r["isPrimary"]
        ]
        study = Counter(r["DICOMTags"]["DICOMStudyInstanceUID"] for r in records).most_common(1)
        uid, size = study[0]
        record = next(r for r in records if r["DICOMTags"]["DICOMStudyInstanceUID"] == uid)
        document = {"SchemaVersion": 1.1, "Study": {"DICOM": {"StudyDescription": "ALL"}}}
        service.client().update_image_set_metadata(
            datastoreId=service.datastore_id,
            imageSetId=record["imageSetId"],
            latestVersionId=str(record["version"]),
            includeStudyImageSets=True,
            updateImageSetMetadataUpdates={
                "DICOMUpdates": {"updatableAttributes": json.dumps(document).encode()}
            },
        )
        service.flush_events()
        events = ahi_sqs_queue.receive()
    assert [e["detail-type"] for e in events] == ["Image Set Updated"] * size
    assert "imageSetId" not in events[0]["detail"]  # the developer guide's spelling instead
    assert len({e["detail"]["imagesetId"] for e in events}) == size


def _delivered(queue: SqsQueue, faults: EventFaults, updates: int = 30) -> list[str]:
    """Ids of the events delivered for ``updates`` serial updates (final events only)."""
    with make(queue, image_sets=updates, event_faults=faults,
              event_options=EventOptions(transitional=False)) as service:  # fmt: skip
        client = service.client()
        for record in service.backend.image_sets(str(service.datastore_id)):
            update(service, record, "X", client)
        assert service.flush_events()
        stats = service.stats
        events = queue.receive()
    assert stats.events_delivered == len(events)
    assert stats.events_emitted - stats.events_lost + stats.events_duplicated == len(events)
    return [e["detail"]["imageSetId"] for e in events]


def test_delivery_faults_are_seeded_and_deterministic(ahi_sqs_queue: SqsQueue) -> None:
    clean = _delivered(ahi_sqs_queue, EventFaults())
    assert len(clean) == len(set(clean)) == 30
    faults = EventFaults(loss_rate=0.2, duplicate_rate=0.2, reorder_window=5, seed=4)
    once = _delivered(ahi_sqs_queue, faults)
    assert once == _delivered(ahi_sqs_queue, faults)  # same seed, same messages, same order
    counts = Counter(once)
    assert set(counts) < set(clean)  # some lost
    assert max(counts.values()) == 2  # some duplicated
    assert once != sorted(once, key=clean.index)  # some reordered
    assert _delivered(ahi_sqs_queue, EventFaults(loss_rate=0.2, seed=5)) != _delivered(
        ahi_sqs_queue, EventFaults(loss_rate=0.2, seed=6)
    )


def test_delay_holds_messages_back(ahi_sqs_queue: SqsQueue) -> None:
    with make(ahi_sqs_queue, event_faults=EventFaults(delay_ms=700)) as service:
        record = service.backend.image_sets(str(service.datastore_id))[0]
        started = time.monotonic()
        update(service, record, "LATER")
        assert ahi_sqs_queue.receive() == []
        service.flush_events()
        assert time.monotonic() - started >= 0.7
        assert len(ahi_sqs_queue.receive()) == 2


def test_event_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="loss_rate"):
        EventFaults(loss_rate=1.5)
    with pytest.raises(ValueError, match="reorder_window"):
        EventFaults(reorder_window=0)
    with pytest.raises(ValueError, match="image_set_id_key"):
        EventOptions(image_set_id_key="ImageSetID")
    with pytest.raises(ValueError, match="events_queue_url"):
        LocalService(event_faults=EventFaults())
    with pytest.raises(ValueError, match="queue URL"):
        LocalService(events_queue_url="not a url")


def test_local_serve_sends_events(ahi_sqs_queue: SqsQueue) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthimaging_df", "local", "serve", "--image-sets", "10",
         "--events-queue-url", ahi_sqs_queue.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().split()[-1]
        datastore_id = proc.stdout.readline().split()[1]
        client = _client_for(endpoint)
        record = client.search_image_sets(datastoreId=datastore_id, maxResults=1)[
            "imageSetsMetadataSummaries"
        ][0]
        client.delete_image_set(datastoreId=datastore_id, imageSetId=record["imageSetId"])
        events = ahi_sqs_queue.receive(wait_seconds=5)
        while len(events) < 2:
            more = ahi_sqs_queue.receive(wait_seconds=5)
            assert more, events
            events += more
        assert [e["detail-type"] for e in events] == ["Image Set Deleting", "Image Set Deleted"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _client_for(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    from healthimaging_df.local.server import ACCESS_KEY_ID, SECRET_ACCESS_KEY

    return boto3.client(
        "medical-imaging",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=Config(inject_host_prefix=False),
    )
