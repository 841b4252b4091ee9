"""Image-set change events, shaped as EventBridge delivers them, sent to an SQS queue.

HealthImaging sends ``Image Set Created / Updating / Updated / Copying / Copied / Deleting /
Deleted ...`` events (``source: aws.medical-imaging``) to EventBridge; a rule whose target is an
SQS queue delivers each as the message body, verbatim (``aws-facts.md`` §3). The local service
does the same for every write its backend makes (:class:`~healthimaging_df.local.changes.Change`),
through a real boto3 SQS client (moto's server in tests), with the faults EventBridge's "best
effort" delivery allows: loss, duplicates, reordering and delay, each seeded.

``detail`` carries ``imagingVersion``, ``isPrimary``, ``imageSetVersion`` (a string),
``datastoreId``, ``imageSetId``, ``imageSetState``, ``imageSetWorkflowStatus`` (and
``sourceImageSetArn`` on a copy's destination). The developer guide's samples spell the id
``imagesetId``; the CDK schemas and AWS's own sample consumer read ``imageSetId``, which is the
default here (``EventOptions(image_set_id_key="imagesetId")`` sends the guide's spelling).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from healthimaging_df.local.changes import Change
from healthimaging_df.local.values import ACCOUNT, REGION

__all__ = ["DETAIL_TYPES", "EventFaults", "EventOptions", "EventSink", "events_for"]

log = logging.getLogger(__name__)

SOURCE = "aws.medical-imaging"
IMAGING_VERSION = "1.0"

# detail-type: (imageSetState, imageSetWorkflowStatus), from the developer guide's samples.
DETAIL_TYPES: dict[str, tuple[str, str]] = {
    "Image Set Created": ("ACTIVE", "CREATED"),
    "Image Set Copying": ("LOCKED", "COPYING"),
    "Image Set Copying With Read Only Access": ("LOCKED", "COPYING_WITH_READ_ONLY_ACCESS"),
    "Image Set Copied": ("ACTIVE", "COPIED"),
    "Image Set Copy Failed": ("ACTIVE", "COPY_FAILED"),
    "Image Set Updating": ("LOCKED", "UPDATING"),
    "Image Set Updated": ("ACTIVE", "UPDATED"),
    "Image Set Update Failed": ("ACTIVE", "UPDATE_FAILED"),
    "Image Set Deleting": ("LOCKED", "DELETING"),
    "Image Set Deleted": ("DELETED", "DELETED"),
}
_ID_KEYS = ("imageSetId", "imagesetId")


@dataclass(frozen=True)
class EventOptions:
    """What the events look like.

    Attributes
    ----------
    image_set_id_key
        ``"imageSetId"`` (default: CDK schemas, AWS's sample consumer) or ``"imagesetId"``
        (the developer guide's samples).
    transitional
        Also send the ``-ing`` events (Updating, Copying, Copying With Read Only Access,
        Deleting) before the final one, as AWS documents them; False sends final events only.
    """

    image_set_id_key: str = "imageSetId"
    transitional: bool = True

    def __post_init__(self) -> None:
        if self.image_set_id_key not in _ID_KEYS:
            raise ValueError(f"image_set_id_key must be one of {_ID_KEYS}")


@dataclass(frozen=True)
class EventFaults:
    """Delivery faults, all drawn from generators seeded by ``seed`` (one per fault).

    A serial client gets the same messages in the same order on every run.

    Attributes
    ----------
    loss_rate
        Fraction (0..1) of events never delivered.
    duplicate_rate
        Fraction (0..1) of delivered events sent twice.
    reorder_window
        Events are released in batches of this many, each batch in a seeded shuffle
        (1: in order). :meth:`EventSink.flush` releases a partial batch.
    delay_ms
        Every message waits this long after its event before it is sent.
    seed
        Seed of the generators.
    """

    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_window: int = 1
    delay_ms: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("loss_rate", "duplicate_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if (
            isinstance(self.reorder_window, bool)
            or not isinstance(self.reorder_window, int)
            or self.reorder_window < 1
        ):
            raise ValueError("reorder_window must be an int >= 1")
        if not self.delay_ms >= 0.0:
            raise ValueError("delay_ms must be >= 0")


def _arn(datastore_id: str, image_set_id: str | None = None) -> str:
    arn = f"arn:aws:medical-imaging:{REGION}:{ACCOUNT}:datastore/{datastore_id}"
    return f"{arn}/imageset/{image_set_id}" if image_set_id else arn


def _event(
    detail_type: str,
    change: Change,
    version: int,
    options: EventOptions,
    rng: random.Random,
    when: datetime,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    state, status = DETAIL_TYPES[detail_type]
    detail: dict[str, Any] = {
        "imagingVersion": IMAGING_VERSION,
        "isPrimary": change.is_primary,
        "imageSetVersion": str(version),
        "datastoreId": change.datastore_id,
        options.image_set_id_key: change.image_set_id,
        "imageSetState": state,
        "imageSetWorkflowStatus": status,
    }
    detail.update(extra or {})
    return {
        "version": "0",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "detail-type": detail_type,
        "source": SOURCE,
        "account": ACCOUNT,
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [_arn(change.datastore_id, change.image_set_id)],
        "detail": detail,
    }


def events_for(
    change: Change,
    options: EventOptions,
    rng: random.Random,
    when: datetime | None = None,
) -> list[dict[str, Any]]:
    """The EventBridge events AWS documents for one change, in the order they happen."""
    when = when or datetime.now(timezone.utc)
    before = change.previous_version if change.previous_version is not None else change.version
    steps: list[tuple[str, int, dict[str, Any] | None]]
    if change.kind == "created":
        steps = [("Image Set Created", change.version, None)]
    elif change.kind == "updated":
        steps = [("Image Set Updating", before, None), ("Image Set Updated", change.version, None)]
    elif change.kind == "copy_source":
        steps = [("Image Set Copying With Read Only Access", change.version, None)]
    elif change.kind == "copied":
        source = {"sourceImageSetArn": _arn(change.datastore_id, change.source_image_set_id)}
        steps = [("Image Set Copying", before, source), ("Image Set Copied", change.version, None)]
    elif change.kind == "deleted":
        steps = [
            ("Image Set Deleting", change.version, None),
            ("Image Set Deleted", change.version, None),
        ]
    else:
        raise ValueError(f"unknown change kind {change.kind!r}")
    if not options.transitional:
        steps = [step for step in steps if DETAIL_TYPES[step[0]][0] != "LOCKED"]
    return [
        _event(name, change, version, options, rng, when, extra) for name, version, extra in steps
    ]


def _sqs_client(
    queue_url: str, endpoint_url: str | None, credentials: tuple[str, str] | None
) -> Any:
    """A boto3 SQS client for ``queue_url`` (its own endpoint unless ``endpoint_url`` is given)."""
    import boto3

    parts = urlsplit(queue_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("events_queue_url must be an http(s) SQS queue URL")
    host = parts.hostname or ""
    region = REGION
    pieces = host.split(".")
    if (
        len(pieces) >= 4
        and pieces[0] == "sqs"
        and host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
    ):
        region = pieces[1]
    endpoint = endpoint_url or f"{parts.scheme}://{parts.netloc}"
    endpoint_host = urlsplit(endpoint).hostname or ""
    loopback = endpoint_host in ("127.0.0.1", "localhost", "::1")
    session = boto3.session.Session(region_name=region)
    if credentials is None and (loopback or session.get_credentials() is None):
        # A loopback SQS stand-in (moto) accepts any credentials; asking boto3's chain would
        # only risk a wait on the instance-metadata endpoint.
        credentials = ("local", "local")
    key, secret = credentials if credentials is not None else (None, None)
    return session.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


@dataclass
class _Pending:
    due: float
    body: str


class EventSink:
    """Deliver events to one SQS queue from a background thread, with seeded faults.

    Parameters
    ----------
    queue_url
        The queue (``http://127.0.0.1:PORT/123456789012/name`` on moto's server).
    sqs_endpoint_url
        The SQS endpoint; by default the queue URL's scheme and host.
    faults
        Loss, duplicates, reordering and delay.
    options
        The events' shape.
    credentials
        ``(access key id, secret)`` for SQS; by default a dummy pair for a loopback endpoint
        (moto accepts any), else boto3's chain (a dummy pair if it finds none).
    record
        Called with counter increments (``emitted=``, ``lost=``, ...); the service's stats.
    client
        An SQS client to use instead of building one (tests).
    """

    def __init__(
        self,
        queue_url: str,
        *,
        sqs_endpoint_url: str | None = None,
        faults: EventFaults | None = None,
        options: EventOptions | None = None,
        credentials: tuple[str, str] | None = None,
        record: Callable[..., None] | None = None,
        client: Any = None,
    ) -> None:
        self.queue_url = queue_url
        self.faults = faults or EventFaults()
        self.options = options or EventOptions()
        self._client = (
            client if client is not None else _sqs_client(queue_url, sqs_endpoint_url, credentials)
        )
        self._record = record or (lambda **counts: None)
        self._lock = threading.Condition()
        self._loss = random.Random(f"{self.faults.seed}:loss")
        self._duplicates = random.Random(f"{self.faults.seed}:duplicates")
        self._shuffle = random.Random(f"{self.faults.seed}:reorder")
        self._ids = random.Random(f"{self.faults.seed}:ids")
        self._window: list[str] = []
        self._ready: list[_Pending] = []
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="healthimaging-local-events", daemon=True
        )
        self._thread.start()

    # -- producer side ----------------------------------------------------------------------

    def __call__(self, changes: list[Change]) -> None:
        """Backend listener: turn changes into events and queue them for delivery."""
        faults = self.faults
        with self._lock:
            if self._closed:
                return
            for change in changes:
                for event in events_for(change, self.options, self._ids):
                    self._record(emitted=1)
                    if faults.loss_rate and self._loss.random() < faults.loss_rate:
                        self._record(lost=1)
                        continue
                    body = json.dumps(event, separators=(",", ":"))
                    self._window.append(body)
                    if faults.duplicate_rate and self._duplicates.random() < faults.duplicate_rate:
                        self._record(duplicated=1)
                        self._window.append(body)
                    if len(self._window) >= faults.reorder_window:
                        self._release()
            self._lock.notify_all()

    def _release(self) -> None:
        window, self._window = self._window, []
        if self.faults.reorder_window > 1:
            self._shuffle.shuffle(window)
        due = time.monotonic() + self.faults.delay_ms / 1000.0
        self._ready.extend(_Pending(due, body) for body in window)

    def flush(self, timeout: float = 30.0) -> bool:
        """Release a partial reorder batch and wait until every queued message was sent.

        Returns False if ``timeout`` seconds passed first.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._window:
                self._release()
                self._lock.notify_all()
            while self._ready or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (within ``timeout``), then stop the thread."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5)

    # -- delivery thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (
                    not self._ready or self._ready[0].due > time.monotonic()
                ):
                    wait = (
                        None if not self._ready else max(0.0, self._ready[0].due - time.monotonic())
                    )
                    self._lock.wait(wait if wait is not None else 0.5)
                if self._closed and not self._ready:
                    return
                item = self._ready.pop(0)
                self._busy = True
            try:
                self._send(item.body)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def _send(self, body: str) -> None:
        for attempt in range(3):
            try:
                self._client.send_message(QueueUrl=self.queue_url, MessageBody=body)
                self._record(delivered=1)
                return
            except Exception as error:  # an unreachable or refusing queue: retry, then count
                log.debug("event delivery attempt %d failed: %s", attempt + 1, type(error).__name__)
                time.sleep(0.05 * (2**attempt))
        self._record(failed=1)
        log.warning("an image-set event could not be delivered to the SQS queue")
