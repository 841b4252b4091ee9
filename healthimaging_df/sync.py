"""Keep a snapshot current from HealthImaging's change events (EventBridge to an SQS queue).

:func:`sync_snapshot` reads a batch of messages, reads the changed image sets again with the
fewest SearchImageSets requests (``engine.events`` chooses a window or series chains), deletes
the deleted ones by ID, and commits all of it at once; only then are the batch's messages deleted
from the queue. A crash at any point leaves them in the queue, and a rerun converges: applying
an event twice, or an older one after a newer one, changes nothing (states are compared by
version). Events are best effort: ``refresh_snapshot(..., reconcile=True)`` (or
``reconcile_every=``) is the backstop for the ones that never arrive.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import engine, schema
from healthimaging_df.aws import session as aws_session
from healthimaging_df.aws.errors import aws_errors, failure, service_error
from healthimaging_df.core import checks, dates
from healthimaging_df.engine import events, frame
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.options import WriteLocation, keywords, subset
from healthimaging_df.query import Query
from healthimaging_df.refresh import (
    RefreshReport,
    RefreshSnapshotOptions,
    SyncOptions,
    apply_fetched,
    checked_query,
    refresh_snapshot,
    tiers_observed_at,
)
from healthimaging_df.snapshot import Location, commit_rows, locate, read_table
from healthimaging_df.store.redact import RedactionPolicy
from healthimaging_df.store.table_format import retry_on_conflict

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from healthimaging_df.core.progress import Progress

__all__ = ["SyncReport", "sync_snapshot"]

log = logging.getLogger(__name__)

# provenance keys a sync leaves as they were: its reads cover the events' image sets only, so a
# later incremental refresh must still start from the last full or incremental read
_KEPT = ("fetched_at", "fetch_started_at", "refreshed_since")


@dataclass
class _Counts:
    """What a sync, or one batch of it, changed and spent (see :class:`SyncReport`)."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    requests: int = 0
    retried: int = 0
    unresolved: int = 0


@dataclass
class SyncReport(_Counts):
    """What a sync did (counts only; no image set ID or value).

    Attributes
    ----------
    batches, commits
        Batches processed, and commits they made (a batch with nothing to change makes none).
    messages
        Messages received (duplicates included).
    deleted_messages
        Messages deleted from the queue after the commit that covers them.
    added, updated, removed
        Rows inserted, replaced by a newer state, deleted (by a Deleted event, a vanished image
        set, or one that stopped matching the query).
    requests
        SearchImageSets requests the batches' fetches expected (the cost model's count), and
        GetImageSet look-ups of image sets a search did not return.
    retried
        Messages left in the queue because the service did not yet show their change.
    unresolved
        Messages given up after ``max_receives`` deliveries (a reconcile settles them).
    poison
        ``(message ID, reason)`` of messages that are not events of the snapshot's datastore;
        they are deleted from the queue.
    id_keys
        How often each spelling of the event's ID key was seen (``imageSetId``, ``imagesetId``).
    reconciles
        Reconciling refreshes run (``reconcile_every``), and their reports.
    stopped
        ``"drained"`` (``once=True``: the queue was empty), ``"signal"`` (SIGTERM or Ctrl-C),
        ``"stop"`` (the ``stop`` event), or ``"batches"`` (``max_batches`` reached).
    """

    batches: int = 0
    commits: int = 0
    messages: int = 0
    deleted_messages: int = 0
    poison: list[tuple[str, str]] = field(default_factory=list)
    id_keys: dict[str, int] = field(default_factory=dict)
    reconciles: list[RefreshReport] = field(default_factory=list)
    stopped: str = ""

    def __str__(self) -> str:
        return (
            f"{self.messages} message(s) in {self.batches} batch(es), {self.commits} commit(s): "
            f"{self.added} added, {self.updated} updated, {self.removed} removed; "
            f"{self.requests} request(s); {len(self.poison)} poison, {self.retried} retried, "
            f"{self.unresolved} unresolved, {len(self.reconciles)} reconcile(s); "
            f"stopped: {self.stopped or 'running'}"
        )


@dataclass(frozen=True)
class _Settings:
    query: Query | None
    redact: RedactionPolicy | None
    margin: timedelta
    max_receives: int
    run: engine.Run


@dataclass
class _Outcome(_Counts):
    """One batch's result: the messages to delete, and counts for the report."""

    done: list[events.Message] = field(default_factory=list)
    committed: bool = False


@keywords(SyncOptions, refresh_snapshot)
def sync_snapshot(
    path: str | os.PathLike[str] | None = None,
    *,
    queue_url: str,
    sqs_client: Any = None,
    once: bool = False,
    progress: Progress = True,
    reconcile_every: timedelta | None = None,
    batch_size: int = 1000,
    wait_seconds: int = 20,
    visibility_timeout: int = 300,
    max_receives: int = 5,
    max_batches: int | None = None,
    sqs_endpoint_url: str | None = None,
    attempts: int = 5,
    stop: threading.Event | None = None,
    **options: Unpack[SyncOptions],
) -> SyncReport:
    """Apply the HealthImaging events waiting in an SQS queue to the snapshot at *path*.

    The queue receives the events of one datastore from an EventBridge rule (docs/snapshots.md
    has the rule, the queue policy and the IAM actions). Each batch of up to *batch_size*
    messages becomes one commit: Deleted events remove rows by ID; the image sets of Created,
    Copied and Updated events are read again by SearchImageSets (never GetImageSetMetadata),
    matching ones upserted by version, those that stopped matching removed. Messages are deleted
    from the queue after that commit; messages that are not events of the snapshot's datastore
    are reported in ``poison`` and deleted.

    Parameters
    ----------
    path
        A snapshot made by ``write_snapshot`` / ``to_delta`` (a Delta folder, or one file,
        rewritten whole).
    iceberg_table, catalog, warehouse, catalog_properties
        An Iceberg table instead of *path*, named as for ``refresh_snapshot``.
    queue_url
        The SQS queue the EventBridge rule delivers to.
    client, boto3_session, max_concurrency, max_tps
        As in ``Query.to_dataframe``.
    sqs_client
        A boto3 SQS client; by default one from *boto3_session* (the queue URL's region, or
        *region*; *sqs_endpoint_url* for a non-AWS endpoint).
    query, redact
        As in ``refresh_snapshot`` (a redacted snapshot needs both).
    once
        Drain the messages waiting and return (cron, Lambda); otherwise long-poll until SIGTERM
        or Ctrl-C (in the main thread) or *stop* is set, stopping between batches.
    progress
        A line per batch on stderr (True), a callable given ``(messages, rows changed)``, or
        nothing (False or None).
    reconcile_every
        Run a reconciling refresh when the last one (or the export) is older than this.
    batch_size
        Messages per batch (one commit each).
    wait_seconds
        Long-poll wait of a receive (0-20).
    visibility_timeout
        Seconds a received message stays hidden from other consumers (extended while a long
        batch runs); a message of a crashed sync comes back after it.
    max_receives
        Deliveries after which a message whose change the service does not show is given up
        (``unresolved``; a reconcile settles it).
    max_batches
        Stop after this many batches (tests, benches).
    margin
        Clock-skew margin below an event's time for the ``updatedAt`` window.
    region, s3_endpoint_url, kms_key_id, attempts
        As in ``refresh_snapshot``; *attempts* bounds the retries of a commit that lost a race.
    stop
        A ``threading.Event`` that ends the loop between batches.

    Returns
    -------
    SyncReport
    """
    _check_arguments(
        queue_url,
        once=once,
        batch_size=batch_size,
        max_receives=max_receives,
        max_batches=max_batches,
        wait_seconds=wait_seconds,
        visibility_timeout=visibility_timeout,
        reconcile_every=reconcile_every,
        margin=options["margin"],
        progress=progress,
        stop=stop,
    )
    target = locate(path, **subset(options, WriteLocation))
    session = options["boto3_session"]
    sqs = sqs_client or _sqs_client(queue_url, session, options["region"], sqs_endpoint_url)
    run = engine.prepare(
        options["client"], session, False, options["max_concurrency"], options["max_tps"]
    )
    settings = _Settings(options["query"], options["redact"], options["margin"], max_receives, run)
    report = SyncReport()
    halt = stop or threading.Event()
    # a reconcile runs as refresh_snapshot, on the same snapshot with the same client and pace
    reconcile: RefreshSnapshotOptions = {
        **options,
        "client": run.client,
        "progress": False,
        "reconcile": True,
    }
    with _signals(halt, enabled=not once) as idle:
        while not halt.is_set():
            if reconcile_every is not None and _reconcile_due(target, reconcile_every):
                found = refresh_snapshot(path, **reconcile)
                report.reconciles.append(found)
                log.info("sync: reconciled: %s", found)
            try:
                idle.set()  # a signal now ends the long poll at once: nothing is held yet
                messages = events.receive(
                    sqs,
                    queue_url,
                    limit=batch_size,
                    wait_seconds=0 if once else wait_seconds,
                    visibility_timeout=visibility_timeout,
                )
            except _Interrupted:
                break  # what the interrupted call received comes back after its timeout
            finally:
                idle.clear()
            if not messages:
                if once:
                    report.stopped = "drained"
                    break
                continue
            received = time.monotonic()

            def keep(held: list[events.Message] = messages, since: float = received) -> None:
                # a long batch keeps its messages hidden until its commit is done
                if time.monotonic() - since > visibility_timeout / 2:
                    events.extend(sqs, queue_url, held, visibility_timeout)

            outcome = _apply_batch(target, messages, settings, report, attempts, keep)
            failed = events.delete(sqs, queue_url, outcome.done)
            _count(report, len(messages), outcome, failed)
            _progress(progress, report, len(messages), outcome)
            if max_batches is not None and report.batches >= max_batches:
                report.stopped = "batches"
                break
        else:
            report.stopped = "stop" if stop is not None and stop.is_set() else "signal"
        if not report.stopped:
            report.stopped = "signal"
    log.info("sync: %s", report)
    return report


def _check_arguments(
    queue_url: Any,
    *,
    once: Any,
    batch_size: Any,
    max_receives: Any,
    max_batches: Any,
    wait_seconds: Any,
    visibility_timeout: Any,
    reconcile_every: Any,
    margin: Any,
    progress: Any,
    stop: Any,
) -> None:
    """``sync_snapshot``'s argument checks, before any request is sent."""
    if not isinstance(queue_url, str) or urlsplit(queue_url).scheme not in ("http", "https"):
        raise QueryValidationError("queue_url", "must be an http(s) SQS queue URL")
    checks.flag("once", once)
    checks.positive_int("batch_size", batch_size)
    checks.positive_int("max_receives", max_receives)
    checks.optional_positive_int("max_batches", max_batches)
    checks.integer("wait_seconds", wait_seconds, minimum=0, maximum=20)
    checks.integer("visibility_timeout", visibility_timeout, minimum=1, maximum=43200)
    if reconcile_every is not None and (
        not isinstance(reconcile_every, timedelta) or reconcile_every <= timedelta(0)
    ):
        raise QueryValidationError("reconcile_every", "must be a positive timedelta or None")
    if not isinstance(margin, timedelta) or margin < timedelta(0):
        raise QueryValidationError("margin", "must be a timedelta of zero or more")
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise QueryValidationError("progress", "must be True, False, None or a callable")
    if stop is not None and not isinstance(stop, threading.Event):
        raise QueryValidationError("stop", "must be a threading.Event or None")


def _count(report: SyncReport, received: int, outcome: _Outcome, failed: int) -> None:
    """Add one batch's *outcome* to *report* (*failed*: messages whose delete failed)."""
    report.batches += 1
    report.messages += received
    report.deleted_messages += len(outcome.done) - failed
    report.commits += outcome.committed
    for counted in fields(_Counts):
        name = counted.name
        setattr(report, name, getattr(report, name) + getattr(outcome, name))


def _apply_batch(
    target: Location,
    messages: list[events.Message],
    settings: _Settings,
    report: SyncReport,
    attempts: int,
    keep: Callable[[], None],
) -> _Outcome:
    """Read the snapshot, apply *messages* in one commit (retried after a lost race)."""

    def once() -> _Outcome:
        table, meta = read_table(target, None, None)
        prov = dict(meta["provenance"])
        query = checked_query(table, prov, settings.query, settings.redact, settings.margin)
        batch = events.coalesce(messages, query.datastore_id)
        outcome, result, incoming, removed, new_prov = _plan_batch(
            table, prov, query, batch, settings
        )
        keep()
        if result is not None:
            commit_rows(target, meta, result, incoming, removed, new_prov)
            outcome.committed = True
        # recorded once per batch, after the commit (a retried attempt records nothing twice)
        report.poison.extend((m.message_id, reason) for m, reason in batch.poison)
        for key, count in batch.spellings.items():
            report.id_keys[key] = report.id_keys.get(key, 0) + count
        return outcome

    return retry_on_conflict(once, attempts=attempts)


def _plan_batch(
    table: pa.Table,
    prov: dict[str, Any],
    query: Query,
    batch: events.Batch,
    settings: _Settings,
) -> tuple[_Outcome, pa.Table | None, pa.Table, list[str], dict[str, Any]]:
    """What one batch changes: the outcome, the new table (None: no commit), rows, removals."""
    run = settings.run
    datastore_id = query.datastore_id
    stored = _versions(table)
    wanted, required = _wanted(stored, batch)
    started = datetime.now(timezone.utc)
    fetched, since, requests = _fetch_wanted(table, prov, query, wanted, started, settings)
    found = _versions(fetched)
    gone, behind, asked = _unsettled(run.client, datastore_id, required, found)
    requests += asked
    earlier = [u for u in behind.values() if u is not None and (since is None or u < since)]
    if earlier:
        since = min(earlier) - timedelta(seconds=1)
        requests += 1
        extra = engine.changes(datastore_id, since, started + timedelta(days=2), run)
        fetched = _latest([p for p in (fetched, extra) if p.num_rows], table)
        found = _versions(fetched)
        for image_set_id in list(behind):
            if _settled(found.get(image_set_id), required[image_set_id]):
                del behind[image_set_id]
    # a Deleted event stands unless the read found the image set (an ID reused; never seen)
    deletes = ((batch.deletes - (batch.conflicts & found.keys())) | gone) - behind.keys()
    fetched = _without(fetched, sorted(deletes))
    change = apply_fetched(
        table, prov, query, settings.redact, fetched, run.client, started, since or started
    )
    patches, asked = _retiered(run.client, datastore_id, stored, batch, deletes, wanted)
    requests += asked
    if patches:
        change = _patched(change, patches)
    event_removed = sorted(i for i in deletes if i in stored)
    removed = sorted(set(change.report.removed) | set(event_removed))
    result = _without(change.result, event_removed)
    done, retried, unresolved = _settle_messages(batch, behind, settings.max_receives)
    outcome = _Outcome(
        done=done,
        added=len(change.report.added),
        updated=len(change.report.updated),
        removed=len(removed),
        requests=requests,
        retried=retried,
        unresolved=unresolved,
    )
    new_prov = _next_provenance(change.provenance, prov, started, result.num_rows)
    if not (change.report.changed or removed or change.incoming.num_rows):
        return outcome, None, change.incoming, removed, new_prov
    return outcome, result, change.incoming, removed, new_prov


def _versions(table: pa.Table) -> dict[str, Any]:
    """Each image set's version in *table*."""
    return dict(
        zip(
            table.column("imageSetId").to_pylist(),
            table.column("version").to_pylist(),
            strict=True,
        )
    )


def _settled(have: Any, need: int | None) -> bool:
    """Whether a held version *have* is at least the event's version *need* (None: any)."""
    return have is not None and (need is None or have >= need)


def _without(table: pa.Table, image_set_ids: list[str]) -> pa.Table:
    """*table* without the rows of *image_set_ids*."""
    value_set = pa.array(image_set_ids, pa.string())
    return table.filter(pc.invert(pc.is_in(table.column("imageSetId"), value_set=value_set)))


def _wanted(
    stored: dict[str, Any], batch: events.Batch
) -> tuple[dict[str, datetime | None], dict[str, int | None]]:
    """The upserts to read (their event times) and the version each must reach.

    An event whose version the snapshot already holds (or passed) needs no read.
    """
    wanted: dict[str, datetime | None] = {}
    required: dict[str, int | None] = {}
    for image_set_id, (when, version) in batch.upserts.items():
        held = stored.get(image_set_id)
        settled = version is not None and held is not None and held >= version
        if settled and image_set_id not in batch.conflicts:
            continue
        wanted[image_set_id] = when
        required[image_set_id] = version
    return wanted, required


def _series_of(
    table: pa.Table, prov: dict[str, Any], wanted: dict[str, datetime | None]
) -> dict[str, str]:
    """The SeriesInstanceUID the snapshot holds for each wanted image set (none if redacted)."""
    if prov.get("redaction") or "SeriesInstanceUID" not in table.column_names:
        return {}
    ids = table.column("imageSetId").to_pylist()
    series = table.column("SeriesInstanceUID").to_pylist()
    return {i: s for i, s in zip(ids, series, strict=True) if i in wanted and isinstance(s, str)}


def _fetch_wanted(
    table: pa.Table,
    prov: dict[str, Any],
    query: Query,
    wanted: dict[str, datetime | None],
    started: datetime,
    settings: _Settings,
) -> tuple[pa.Table, datetime | None, int]:
    """Read the wanted image sets by series and/or an updatedAt window: rows, window, requests."""
    run, datastore_id = settings.run, query.datastore_id
    choice = events.choose_fetch(wanted, _series_of(table, prov, wanted), started, settings.margin)
    requests = choice.requests
    parts: list[pa.Table] = []
    since = choice.since
    if choice.series:
        by_series = events.fetch_series(datastore_id, list(choice.series), run)
        parts.append(by_series)
        got = set(by_series.column("imageSetId").to_pylist())
        # a series read that missed its image set (a forced update can change a series UID)
        # falls back to the window
        window_start = since
        for image_set_id, when in wanted.items():
            in_window = (
                window_start is not None
                and when is not None
                and when - settings.margin >= window_start
            )
            if image_set_id not in got and not in_window:
                floor = (when or started) - settings.margin
                since = floor if since is None else min(since, floor)
        if since != choice.since:
            requests += 1
    if since is not None:
        parts.append(engine.changes(datastore_id, since, started + timedelta(days=2), run))
    return _latest([p for p in parts if p.num_rows], table), since, requests


def _unsettled(
    client: Any, datastore_id: str, required: dict[str, int | None], found: dict[str, Any]
) -> tuple[set[str], dict[str, datetime | None], int]:
    """The wanted image sets the read missed: gone, behind (their updatedAt), requests spent.

    An image set the search did not return (or returned older than its event) was deleted
    since, is outside the window (its updatedAt older than its event's time), or the search
    index is behind the write; GetImageSet (not an access) tells which.
    """
    gone: set[str] = set()
    behind: dict[str, datetime | None] = {}
    requests = 0
    for image_set_id, need in required.items():
        if _settled(found.get(image_set_id), need):
            continue
        requests += 1
        try:
            behind[image_set_id] = _current_state(client, datastore_id, image_set_id)
        except _Gone:
            gone.add(image_set_id)
    return gone, behind, requests


def _retiered(
    client: Any,
    datastore_id: str,
    stored: dict[str, Any],
    batch: events.Batch,
    deletes: set[str],
    wanted: dict[str, datetime | None],
) -> tuple[dict[str, tuple[Any, Any]], int]:
    """New storageTier and lastAccessedAt of the touched image sets; adds the gone to *deletes*.

    A copy's source was read (an access) at the same version: GetImageSet (not an access)
    gives its storageTier and lastAccessedAt, which no updatedAt window would find.
    """
    patches: dict[str, tuple[Any, Any]] = {}
    requests = 0
    for image_set_id in sorted(batch.touched - deletes - wanted.keys()):
        if image_set_id not in stored:
            continue
        requests += 1
        try:
            answer = _get_image_set(client, datastore_id, image_set_id)
        except _Gone:
            deletes.add(image_set_id)
            continue
        if str(answer.get("versionId")) == str(stored[image_set_id]):
            patches[image_set_id] = (answer.get("storageTier"), answer.get("lastAccessedAt"))
    return patches, requests


def _settle_messages(
    batch: events.Batch, behind: dict[str, datetime | None], max_receives: int
) -> tuple[list[events.Message], int, int]:
    """The messages done with, and how many were retried and given up on unresolved."""
    done = list(batch.idle) + [m for m, _ in batch.poison]
    retried = unresolved = 0
    for image_set_id, messages in batch.messages.items():
        if image_set_id not in behind:
            done.extend(messages)
            continue
        for message in messages:
            if message.receive_count >= max_receives:
                done.append(message)
                unresolved += 1
            else:
                retried += 1
    return done, retried, unresolved


def _next_provenance(
    changed: dict[str, Any], prov: dict[str, Any], started: datetime, row_count: int
) -> dict[str, Any]:
    """The provenance after a sync: the change's, with the kept keys of the one before."""
    new_prov = dict(changed)
    for key in _KEPT:
        if key in prov:
            new_prov[key] = prov[key]
        else:
            new_prov.pop(key, None)
    new_prov["tiers_observed_at"] = tiers_observed_at(prov)
    new_prov["synced_at"] = started.isoformat()
    new_prov["row_count"] = row_count
    return new_prov


def _latest(parts: list[pa.Table], like: pa.Table) -> pa.Table:
    """The fetched parts as one table, each image set once at its latest state."""
    if not parts:
        return schema.arrow_schema().empty_table()
    joined = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return frame.latest_rows(joined)


class _Gone(Exception):
    """The image set no longer exists."""


def _current_state(client: Any, datastore_id: str, image_set_id: str) -> datetime | None:
    """GetImageSet (not an access): the image set's ``updatedAt``; raises ``_Gone`` if deleted."""
    updated = _get_image_set(client, datastore_id, image_set_id).get("updatedAt")
    return updated if isinstance(updated, datetime) else None


def _get_image_set(client: Any, datastore_id: str, image_set_id: str) -> dict[str, Any]:
    """GetImageSet's answer (not an access); raises ``_Gone`` if the image set was deleted."""
    try:
        response = client.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
    except aws_errors() as exc:
        found = failure(exc)
        if found.code == "ResourceNotFoundException":
            raise _Gone from None
        raise service_error("GetImageSet", 0, found) from None
    if response.get("imageSetState") == "DELETED":
        raise _Gone
    return dict(response)


def _patched(change: Any, patches: dict[str, tuple[Any, Any]]) -> Any:
    """*change* with the rows of *patches* at their new storageTier and lastAccessedAt, in place."""
    result = change.result
    ids = result.column("imageSetId").to_pylist()
    positions = [n for n, i in enumerate(ids) if i in patches]
    before = {
        name: result.column(name).to_pylist()
        for name in ("storageTier", "lastAccessedAt")
        if name in result.column_names
    }
    moved = [
        n
        for n in positions
        if any(before[name][n] != patches[ids[n]][k] for k, name in enumerate(before))
    ]
    if not moved:
        return change
    for k, name in enumerate(("storageTier", "lastAccessedAt")):
        if name not in before:
            continue
        values = before[name]
        for n in moved:
            values[n] = patches[ids[n]][k]
        index = result.schema.get_field_index(name)
        field_ = result.schema.field(name)
        result = result.set_column(index, field_, pa.array(values, field_.type))
    touched = [ids[n] for n in moved]
    incoming = change.incoming
    if incoming.num_rows:
        incoming = _without(incoming, touched)
    rows = result.take(pa.array(moved, pa.int64()))
    incoming = pa.concat_tables([incoming, rows.cast(incoming.schema)])
    report = replace(
        change.report, retiered=tuple(sorted(set(change.report.retiered) | set(touched)))
    )
    return replace(change, result=result, incoming=incoming, report=report)


def _reconcile_due(target: Location, every: timedelta) -> bool:
    """Whether the snapshot's last full read (reconcile or export) is older than *every*."""
    prov = read_table(target, [], None)[1]["provenance"]
    last = prov.get("reconciled_at") or tiers_observed_at(prov)
    try:
        moment = dates.read_iso_or_none(last)
    except dates.TimestampError:
        moment = None
    return moment is None or datetime.now(timezone.utc) - moment >= every


def _progress(progress: Progress, report: SyncReport, received: int, outcome: _Outcome) -> None:
    changed = outcome.added + outcome.updated + outcome.removed
    if callable(progress) and not isinstance(progress, bool):
        progress(received, changed)
    elif progress:
        print(
            f"sync: batch {report.batches}: {received} message(s), {outcome.added} added, "
            f"{outcome.updated} updated, {outcome.removed} removed, {outcome.requests} "
            f"request(s); {report.messages} message(s) so far",
            file=sys.stderr,
            flush=True,
        )


def _sqs_client(
    queue_url: str, boto3_session: Any, region: str | None, endpoint_url: str | None
) -> Any:
    """An SQS client for *queue_url*: its region from the AWS host name unless *region* says."""
    host = urlsplit(queue_url).hostname or ""
    pieces = host.split(".")
    if region is None and len(pieces) >= 4 and pieces[0] == "sqs":
        region = pieces[1]
    return aws_session.client("sqs", boto3_session, region=region, endpoint_url=endpoint_url)


class _Interrupted(BaseException):
    """A signal during an idle long poll (a BaseException: botocore does not swallow it)."""


@contextmanager
def _signals(halt: threading.Event, *, enabled: bool) -> Iterator[threading.Event]:
    """SIGTERM and SIGINT set *halt*: the loop stops between batches, or at once while idle.

    Yields the *idle* flag the loop sets around a long poll, when nothing is held that a stop
    could lose; the handlers are restored afterwards.
    """
    idle = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield idle
        return

    def handler(signum: int, frame_: Any) -> None:
        log.info("sync: signal %d: stopping", signum)
        halt.set()
        if idle.is_set():
            idle.clear()
            raise _Interrupted

    previous: Mapping[int, Any] = {
        sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield idle
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
