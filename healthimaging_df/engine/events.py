"""HealthImaging change events from an SQS queue: parse, coalesce, choose the fetch, receive.

An EventBridge rule delivers each ``aws.medical-imaging`` event to the queue as the message body,
verbatim. This module turns a batch of messages into what a sync must do (the IDs to delete, the
image sets to read again, the messages that are poison) and chooses how to read them: one
``updatedAt`` window (every image set changed since the oldest event, a page per 50) or one
chain per series the snapshot already holds (a request each), whichever the cost model says is
fewer requests. Nothing here reads GetImageSetMetadata.

Event shapes relied on (docs/snapshots.md cites them): ``detail-type`` ``Image Set Created /
Copied / Updated / Deleted`` (and the ``-ing`` and ``Failed`` ones), ``source``
``aws.medical-imaging``, ``time``, ``detail.datastoreId``, the ID as ``detail.imageSetId`` (the
EventBridge reference, the CDK schemas, AWS's sample consumer) or ``detail.imagesetId`` (the
developer guide's samples), and an optional ``detail.imageSetVersion`` (a string; the guide's
samples carry it, the reference does not).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import pyarrow as pa

from healthimaging_df.core import dates
from healthimaging_df.engine.fetch import PAGE_ROWS
from healthimaging_df.engine.prepared import Run
from healthimaging_df.engine.run import latest_matching
from healthimaging_df.plan import predicates

__all__ = [
    "Action",
    "Batch",
    "Event",
    "FetchChoice",
    "Message",
    "Poison",
    "choose_fetch",
    "coalesce",
    "fetch_series",
    "parse",
    "receive",
]

log = logging.getLogger(__name__)

SOURCE = "aws.medical-imaging"
ID_KEYS = ("imageSetId", "imagesetId")
_ID = re.compile(r"[0-9a-z]{32}")

Action = Literal["upsert", "delete", "touch", "none"]

# detail-type -> what a snapshot does about it. The -ing events precede a final one (the image set
# is LOCKED meanwhile); a Failed event leaves the image set as it was, but reading it again costs
# nothing extra in a batch and settles it.
ACTIONS: dict[str, Action] = {
    "Image Set Created": "upsert",
    "Image Set Copied": "upsert",
    "Image Set Updated": "upsert",
    "Image Set Copy Failed": "upsert",
    "Image Set Update Failed": "upsert",
    "Image Set Deleted": "delete",
    "Image Set Copying": "none",
    # the source of a copy is read (an access: lastAccessedAt and maybe storageTier move) at the
    # same version, so no updatedAt window finds it; a snapshot reads it again by its series
    "Image Set Copying With Read Only Access": "touch",
    "Image Set Updating": "none",
    "Image Set Deleting": "none",
}


@dataclass(frozen=True)
class Message:
    """One SQS message: its ID, receipt handle, body and how often it was received."""

    message_id: str
    receipt_handle: str = field(repr=False)
    body: str = field(repr=False)
    receive_count: int = 1


@dataclass(frozen=True)
class Event:
    """One image-set event, read from a message body."""

    image_set_id: str
    action: Action
    version: int | None
    time: datetime | None
    detail_type: str
    id_key: str


@dataclass(frozen=True)
class Poison:
    """A message that is not an image-set event of the snapshot's datastore, and why (no values)."""

    message_id: str
    reason: str


def parse(body: str, datastore_id: str) -> Event | str:
    """The event in *body*, or the reason it is poison (a sentence naming no value)."""
    try:
        event = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(event, dict):
        return "the body is not a JSON object"
    if event.get("source") != SOURCE:
        return f"source is not {SOURCE}"
    kind = event.get("detail-type")
    if not isinstance(kind, str):
        return "no detail-type"
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return "no detail object"
    action = ACTIONS.get(kind)
    if action is None:
        return "detail-type is not an image-set event this version knows"
    if detail.get("datastoreId") != datastore_id:
        return "the event is for another datastore"
    key = next((k for k in ID_KEYS if k in detail), None)
    if key is None:
        return "detail has no imageSetId (or imagesetId)"
    image_set_id = detail[key]
    if not isinstance(image_set_id, str) or not _ID.fullmatch(image_set_id):
        return f"detail.{key} is not an image set ID"
    version = detail.get("imageSetVersion")
    if version is not None:
        text = (
            str(version) if isinstance(version, int) and not isinstance(version, bool) else version
        )
        if not isinstance(text, str) or not text.isdigit():
            return "detail.imageSetVersion is not a whole number"
        version = int(text)
    when: datetime | None = None
    stamp = event.get("time")
    if stamp is not None:
        try:
            when = dates.read_iso(stamp if isinstance(stamp, str) else "")
        except dates.TimestampError:
            return "time is not an ISO 8601 timestamp"
    return Event(image_set_id, action, version, when, kind, key)


@dataclass
class Batch:
    """What a batch of messages asks of a snapshot.

    Attributes
    ----------
    deletes
        IDs with a Deleted event.
    upserts
        ID -> (oldest event time, highest version an event names) of the image sets to read.
    touched
        IDs read at the same version (the source of a copy): their access time and tier moved.
    conflicts
        IDs with a Deleted event and a Created, Copied or Updated one: read, and deleted only if
        the read does not find them.
    messages
        ID -> the messages that name it (a message is covered when its ID is settled).
    idle
        Messages that need nothing (transitional events): covered by any commit.
    poison
        Messages that are not events of this datastore.
    spellings
        How often each spelling of the ID key was seen.
    """

    deletes: set[str] = field(default_factory=set)
    upserts: dict[str, tuple[datetime | None, int | None]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    conflicts: set[str] = field(default_factory=set)
    messages: dict[str, list[Message]] = field(default_factory=dict)
    idle: list[Message] = field(default_factory=list)
    poison: list[tuple[Message, str]] = field(default_factory=list)
    spellings: dict[str, int] = field(default_factory=dict)


def coalesce(messages: Iterable[Message], datastore_id: str) -> Batch:
    """Group *messages* by image set: duplicates and reordering collapse to one action each."""
    batch = Batch()
    for message in messages:
        parsed = parse(message.body, datastore_id)
        if isinstance(parsed, str):
            batch.poison.append((message, parsed))
            continue
        batch.spellings[parsed.id_key] = batch.spellings.get(parsed.id_key, 0) + 1
        if parsed.action == "none":
            batch.idle.append(message)
            continue
        batch.messages.setdefault(parsed.image_set_id, []).append(message)
        if parsed.action == "delete":
            batch.deletes.add(parsed.image_set_id)
            continue
        if parsed.action == "touch":
            batch.touched.add(parsed.image_set_id)
            continue
        when, version = batch.upserts.get(parsed.image_set_id, (None, None))
        if parsed.time is not None and (when is None or parsed.time < when):
            when = parsed.time
        if parsed.version is not None and (version is None or parsed.version > version):
            version = parsed.version
        batch.upserts[parsed.image_set_id] = (when, version)
    # a Deleted event and another for the same ID in one batch (reordered): the read settles it
    # (an image set ID is not known to be reused, but nothing here relies on that)
    batch.conflicts = batch.deletes & batch.upserts.keys()
    batch.touched -= batch.deletes | batch.upserts.keys()
    return batch


@dataclass(frozen=True)
class FetchChoice:
    """How to read a batch's image sets: a window, series chains, or both; and the cost guessed."""

    since: datetime | None  # lower updatedAt bound of the window (None: no window)
    series: tuple[str, ...] = field(repr=False)  # SeriesInstanceUIDs read by chains (never logged)
    by_window: int  # image sets the window covers
    by_series: int  # image sets the series chains cover
    requests: int  # the requests the model expects


def choose_fetch(
    wanted: dict[str, datetime | None],
    series_of: dict[str, str],
    now: datetime,
    margin: timedelta,
) -> FetchChoice:
    """The cheapest way to read every image set in *wanted* (ID -> oldest event time).

    A window from ``t - margin`` reads every image set of the datastore changed since ``t``
    (a page per ``PAGE_ROWS``), not only the batch's: the batch's events are the datastore's
    change feed, so the rate of its most recent half estimates how many changed since ``t``
    (at least the batch's own events from ``t`` on). An image set the snapshot holds can be
    read by its series instead (``series_of``; a request per series), which wins for a few
    stragglers far older than the rest (a redelivered message, a backlog). Image sets without
    a known series or event time must be in the window. Splitting the batch at each event
    time, the choice with the fewest expected requests wins; pure and deterministic.
    """
    if not wanted:
        return FetchChoice(None, (), 0, 0, 0)
    floor = now - margin
    timed = sorted(
        ((when or floor) - margin, image_set_id) for image_set_id, when in wanted.items()
    )
    must_window = [
        i for i, (_, image_set_id) in enumerate(timed)
        if image_set_id not in series_of or wanted[image_set_id] is None
    ]  # fmt: skip
    # changes per second, from the most recent half of the batch
    recent = timed[len(timed) // 2 :]
    span = max((now - recent[0][0]).total_seconds(), 1.0)
    rate = len(recent) / span
    # a split k reads timed[:k] by series and timed[k:] by a window from timed[k][0]
    last_chainable = must_window[0] if must_window else len(timed)
    best: tuple[int, int] | None = None
    series_prefix: set[str] = set()
    for k in range(last_chainable + 1):
        if k:
            series_prefix.add(series_of[timed[k - 1][1]])
        window_rows = 0.0
        if k < len(timed):
            reach = (now - timed[k][0]).total_seconds()
            window_rows = max(len(timed) - k, rate * reach)
        window = math.ceil(window_rows / PAGE_ROWS) if window_rows else 0
        cost = len(series_prefix) + window
        if best is None or cost < best[0]:
            best = (cost, k)
    assert best is not None
    cost, k = best
    since = timed[k][0] if k < len(timed) else None
    series = tuple(sorted({series_of[image_set_id] for _, image_set_id in timed[:k]}))
    return FetchChoice(since, series, len(timed) - k, k, cost)


def fetch_series(datastore_id: str, series: Sequence[str], run: Run) -> pa.Table:
    """The latest version of every image set of *series* (SeriesInstanceUIDs), unfiltered."""
    if not series:
        return pa.table({})
    return latest_matching(datastore_id, predicates.build("SeriesInstanceUID", "in", series), run)


def receive(
    sqs: Any,
    queue_url: str,
    *,
    limit: int,
    wait_seconds: int,
    visibility_timeout: int,
) -> list[Message]:
    """Up to *limit* messages: the first call long-polls *wait_seconds*, the rest do not wait."""
    out: list[Message] = []
    wait = wait_seconds
    while len(out) < limit:
        answer = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=min(10, limit - len(out)),
            WaitTimeSeconds=wait,
            VisibilityTimeout=visibility_timeout,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        got = answer.get("Messages") or []
        if not got:
            break
        for item in got:
            count = (item.get("Attributes") or {}).get("ApproximateReceiveCount", "1")
            out.append(
                Message(
                    item["MessageId"],
                    item["ReceiptHandle"],
                    item.get("Body", ""),
                    int(count) if str(count).isdigit() else 1,
                )
            )
        wait = 0
    return out


def delete(sqs: Any, queue_url: str, messages: Sequence[Message]) -> int:
    """Delete *messages* from the queue, ten a call; how many the queue refused."""
    failed = 0
    for start in range(0, len(messages), 10):
        part = messages[start : start + 10]
        answer = sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(part)],
        )
        failed += len(answer.get("Failed") or [])
    if failed:
        log.warning("%d SQS message(s) could not be deleted; they will be delivered again", failed)
    return failed


def extend(sqs: Any, queue_url: str, messages: Sequence[Message], seconds: int) -> None:
    """Keep *messages* invisible for *seconds* more (a batch that outlives its timeout)."""
    for start in range(0, len(messages), 10):
        part = messages[start : start + 10]
        sqs.change_message_visibility_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": seconds}
                for i, m in enumerate(part)
            ],
        )
