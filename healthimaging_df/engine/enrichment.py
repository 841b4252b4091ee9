"""The enrichment run behind ``fetch_metadata``: targets, the archive guard, the paced pool.

(Enrichment reads GetImageSetMetadata for a frame's image sets; the *provenance* of a result, the
metadata about how it was fetched, is ``engine.provenance``.) The public face, its options and its
dry run are ``healthimaging_df.metadata``; the calls and parsing of documents are
``aws.documents``; documents to rows, ``engine.document_rows``.

The archive guard knows every image set's tier before the first access: the frame's
``storageTier`` when it is current (``tier_is_current``), else a GetImageSet look-up (not an
access), paced under GetImageSet's own quota.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar

import pandas as pd

from healthimaging_df import aws
from healthimaging_df.aws.documents import (
    DOCUMENT_OPERATION,
    TIER_OPERATION,
    DocumentError,
    collector_paused,
    get_document_blob,
    get_tier,
)
from healthimaging_df.core import checks, dates
from healthimaging_df.core.frames import provenance_datastore, provenance_of
from healthimaging_df.core.progress import Progress, ProgressReporter
from healthimaging_df.engine.document_rows import Block, Level, blob_block, blocks_to_frame
from healthimaging_df.errors import ArchiveAccessError, QueryValidationError

__all__ = [
    "ARCHIVED",
    "ERROR_COLUMN",
    "FREQUENT",
    "OPERATION",
    "TIER_MAX_AGE",
    "TIER_OPERATION",
    "TIER_TPS",
    "OnError",
    "Target",
    "archive_guard",
    "datastore_of",
    "describe_age",
    "fetch_all",
    "result_frame",
    "stale_targets",
    "targets_of",
    "tier_age",
    "tier_is_current",
]

log = logging.getLogger("healthimaging_df.metadata")

ARCHIVED = "ARCHIVE_INSTANT_ACCESS"
FREQUENT = "FREQUENT_ACCESS"
ERROR_COLUMN = "metadataError"
OPERATION = DOCUMENT_OPERATION
TIER_TPS = aws.GET_IMAGE_SET_TPS  # its own bucket, apart from GetImageSetMetadata's
TIER_MAX_AGE = timedelta(minutes=15)  # a frame's storageTier is current for this long after a fetch
_CLOCK_SKEW = timedelta(minutes=1)  # a fetch time this far in the future still counts as now
OnError = Literal["raise", "report"]


@dataclass(frozen=True)
class Target:
    """One call to make: the *position*-th distinct (imageSetId, version) of the frame."""

    position: int
    image_set_id: str
    version: int | None
    tier: str | None = None  # the frame's storageTier (None: no column, or no value)


def targets_of(frame: pd.DataFrame) -> list[Target]:
    """The distinct (imageSetId, version) pairs in frame order, with the frame's tier of each.

    Each imageSetId must be an ID (``QueryValidationError`` naming its position otherwise), so a
    bad one fails before any request.
    """
    columns = ["imageSetId"] + (["version"] if "version" in frame.columns else [])
    rows = frame[frame["imageSetId"].notna()]
    first = ~rows[columns].duplicated().to_numpy()  # by position: index labels may repeat
    pairs = rows[columns][first]
    checks.resource_ids("imageSetId", pairs["imageSetId"].tolist())
    versions = (
        pairs["version"].astype("Int64").tolist() if "version" in pairs else [None] * len(pairs)
    )
    tiers: list[Any] = [None] * len(pairs)
    if "storageTier" in rows.columns:
        tiers = rows["storageTier"][first].astype(object).tolist()
    return [
        Target(
            i,
            str(image_set_id),
            None if v is None or v is pd.NA else int(v),
            tier if isinstance(tier, str) else None,
        )
        for i, (image_set_id, v, tier) in enumerate(
            zip(pairs["imageSetId"].tolist(), versions, tiers, strict=True)
        )
    ]


def _observed_at(frame: pd.DataFrame) -> datetime | None:
    """When the frame's tiers were read: the fetch's start (else end) time; None if unknown.

    A refreshed or synced snapshot re-read only the rows that changed, so its other rows' tiers
    are as old as its last full read (export or reconcile), which it records as
    ``tiers_observed_at``; without that record (a refresh by an older version), None, as for a
    frame without provenance.
    """
    provenance = provenance_of(frame)
    if provenance is None:
        return None
    keys: tuple[str, ...] = ("tiers_observed_at",)
    if not provenance.get("refreshed_since"):
        keys += ("fetch_started_at", "fetched_at")
    for key in keys:
        value = provenance.get(key)
        if isinstance(value, str):
            try:
                return dates.read_iso(value)
            except dates.TimestampError:  # damaged provenance: the tiers' age is unknown
                return None
    return None


def tier_is_current(frame: pd.DataFrame, now: datetime | None = None) -> bool:
    """Whether *frame*'s ``storageTier`` values may be trusted as the service's tiers *now*.

    True when its provenance says it was fetched at most ``TIER_MAX_AGE`` ago (and it is not a
    refreshed snapshot). An image set left unaccessed for 30 days moves to the archive tier at
    any moment, so an older frame's FREQUENT_ACCESS may no longer hold.
    """
    observed = _observed_at(frame)
    if observed is None:
        return False
    age = (now or datetime.now(timezone.utc)) - observed
    return -_CLOCK_SKEW <= age <= TIER_MAX_AGE


def tier_age(frame: pd.DataFrame, now: datetime | None = None) -> timedelta | None:
    """How long ago *frame*'s oldest ``storageTier`` was read; None if unknown."""
    observed = _observed_at(frame)
    if observed is None:
        return None
    return (now or datetime.now(timezone.utc)) - observed


def describe_age(age: timedelta | None) -> str:
    """``"read 3 h 5 min ago"`` (or ``"of unknown age"``): what the guard says of the tiers."""
    if age is None:
        return "of unknown age"
    minutes = max(0, int(age.total_seconds() // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{days} d"] * bool(days) + [f"{hours} h"] * bool(hours) + [f"{minutes} min"]
    return f"read {' '.join(parts)} ago"


def stale_targets(targets: list[Target], current: bool) -> list[Target]:
    """Targets whose tier is unknown: not shown archived, and no current FREQUENT_ACCESS."""
    return [t for t in targets if t.tier != ARCHIVED and not (current and t.tier == FREQUENT)]


def datastore_of(frame: pd.DataFrame, datastore_id: str | None) -> str:
    """*datastore_id*, else the frame's provenance's; a typed error for a bogus or missing one."""
    if datastore_id is not None:
        return checks.resource_id("datastore_id", datastore_id)
    found = provenance_datastore(frame)
    if not found:
        raise QueryValidationError(
            "datastore_id",
            "the frame's attrs carry none (it did not come from Query.to_dataframe or a "
            "snapshot): pass datastore_id=...",
        )
    return checks.resource_id("datastore_id", found)


T = TypeVar("T")


def workers_for(max_concurrency: int | None, limiter: aws.RateLimiter | None) -> int:
    """Calls in flight: explicit, else the limiter's rate x the round trip it measured (+2)."""
    if max_concurrency is not None:
        return max_concurrency
    return limiter.concurrency() if limiter is not None else aws.MAX_CONCURRENCY


def _timed(limiter: aws.RateLimiter | None, call: Callable[..., T], *args: Any) -> T:
    """*call*, its round trip from the slot's grant told to *limiter* (the next call sizes by it)."""
    result = call(*args)
    if limiter is not None:
        granted = aws.sent_at()
        if granted is not None:
            limiter.observe(time.monotonic() - granted)
    return result


def _lookup_tiers(
    client: Any,
    datastore_id: str,
    targets: list[Target],
    max_tps: float | None,
    max_concurrency: int | None,
    progress: ProgressReporter,
) -> dict[int, str | None]:
    """Each target's tier by GetImageSet, paced at its quota (or *max_tps* if lower)."""
    limiter = aws.limiter_for(
        client, TIER_OPERATION, min(TIER_TPS, max_tps) if max_tps else TIER_TPS
    )
    started = time.monotonic()

    def one(target: Target) -> str | None:
        with aws.paced(client, limiter):  # every attempt, botocore's retries included
            return _timed(
                limiter, get_tier, client, datastore_id, target.image_set_id, target.position
            )

    tiers: dict[int, str | None] = {}
    workers = workers_for(max_concurrency, limiter)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ahi-tier")
    try:
        for target, future in _windowed(pool, one, targets, 2 * workers):
            tiers[target.position] = future.result()
            progress.update(len(tiers), len(targets))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    log.info(
        "%s: %d tier look-up(s), %.1f s", TIER_OPERATION, len(targets), time.monotonic() - started
    )
    return tiers


def archive_guard(
    client: Any,
    datastore_id: str,
    targets: list[Target],
    stale: list[Target],
    allow: bool,
    max_tps: float | None,
    max_concurrency: int | None,
    progress: Progress,
    *,
    age: timedelta | None = None,
) -> str | None:
    """Refuse archived image sets unless *allow*; return the warning to give (None: none).

    Without *allow*, image sets the frame shows archived are refused at once, and those whose
    tier it does not tell are looked up first (GetImageSet, not an access): nothing archived is
    ever read. With *allow*, no look-ups, and a warning of what may move.

    *age* is how old the frame's tiers are (:func:`tier_age`); the messages say it.
    """
    shown = sum(t.tier == ARCHIVED for t in targets)
    total = len(targets)
    if allow:  # the caller accepts accesses: no look-ups, a warning of what may move
        parts = [f"{shown} of {total} image sets are ARCHIVE_INSTANT_ACCESS"] if shown else []
        if stale:
            parts.append(
                f"{len(stale)} of {total} have no current storageTier (the frame's tiers are "
                f"{describe_age(age)}; unchecked: allow_archive_access=True)"
            )
        return _archive_warning("; ".join(parts)) if parts else None
    if shown:
        unknown = (
            f" ({len(stale)} more have no current storageTier and were not looked up)"
            if stale
            else ""
        )
        raise ArchiveAccessError(
            shown,
            f"{shown} of {total} image sets are ARCHIVE_INSTANT_ACCESS{unknown}: each "
            f"{OPERATION} call would move one back to FREQUENT_ACCESS (billed at the "
            "frequent-access rate). Nothing was accessed. Filter on storageTier first, or pass "
            "allow_archive_access=True (command line: --allow-archive-access) to read them; "
            "dry_run=True counts what it would move",
        )
    found = 0
    if stale:
        reporter = ProgressReporter(
            False if callable(progress) else progress,  # a callable counts GetImageSetMetadata
            TIER_OPERATION,
            " image sets",
            total=len(stale),
        )
        tiers = _lookup_tiers(client, datastore_id, stale, max_tps, max_concurrency, reporter)
        found = sum(tier is not None and tier != FREQUENT for tier in tiers.values())
    if found:
        raise ArchiveAccessError(
            found,
            f"{found} of {total} image sets are archived (ARCHIVE_INSTANT_ACCESS per "
            f"{TIER_OPERATION}) although the frame does not show it (its storageTier is missing, "
            f"or from a fetch more than {TIER_MAX_AGE.seconds // 60} minutes old or refreshed; "
            f"the frame's tiers are {describe_age(age)}): "
            f"each {OPERATION} call would move one back to FREQUENT_ACCESS. Nothing was "
            "accessed. Fetch the frame again and filter on storageTier, or pass "
            "allow_archive_access=True (command line: --allow-archive-access) to read them",
        )
    return None


def _archive_warning(counts: str) -> str:
    return (
        f"{counts}: each {OPERATION} call is an access that moves an archived image set back to "
        "FREQUENT_ACCESS (billed at the frequent-access rate). dry_run=True counts the calls; "
        "filter on storageTier to skip them."
    )


_T = TypeVar("_T")


def _windowed(
    pool: ThreadPoolExecutor,
    work: Callable[[Target], _T],
    targets: Iterable[Target],
    window: int,
) -> Iterator[tuple[Target, Future[_T]]]:
    """``(target, finished future)`` as *work* finishes, at most *window* queued at once.

    Waiting on every target's future at once made each completion cost O(targets) (quadratic in
    the frame's size); the window is refilled after the caller has handled each finished batch.
    """
    queued = iter(targets)
    pending: dict[Future[_T], Target] = {
        pool.submit(work, t): t for t in itertools.islice(queued, window)
    }
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            yield pending.pop(future), future
        for t in itertools.islice(queued, window - len(pending)):
            pending[pool.submit(work, t)] = t


def fetch_all(
    client: Any,
    datastore_id: str,
    targets: list[Target],
    level: Level,
    max_tps: float | None,
    max_concurrency: int | None,
    progress: ProgressReporter,
) -> tuple[dict[int, Block], dict[int, str]]:
    """Flattened documents and error codes, by target position.

    Each document is flattened in the worker as it arrives and dropped: memory follows the
    output rows, not the documents.
    """
    limiter = aws.limiter_for(client, OPERATION, max_tps)
    blocks: dict[int, Block] = {}
    failures: dict[int, str] = {}
    stop = threading.Event()
    started = time.monotonic()

    def one(target: Target) -> Block | None:
        if stop.is_set():
            return None
        with aws.paced(client, limiter):  # every attempt, botocore's retries included
            blob = _timed(
                limiter,
                get_document_blob,
                client,
                datastore_id,
                target.image_set_id,
                target.version,
            )
        with collector_paused:
            block = blob_block(blob, level)
        del blob
        head: dict[str, list[Any]] = {
            "imageSetId": [target.image_set_id] * block.rows,
            "version": [target.version] * block.rows,
        }
        return Block(block.rows, head | block.columns)

    workers = workers_for(max_concurrency, limiter)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ahi-metadata")
    try:
        finished = _windowed(pool, one, targets, 2 * workers)
        for done_count, (target, future) in enumerate(finished, start=1):
            try:
                block = future.result()
            except DocumentError as failure:
                if failure.fatal:
                    stop.set()
                    raise aws.service_error(
                        OPERATION,
                        target.position,
                        aws.Failure(failure.code),
                        detail="stopped: this error concerns every call, not one image set",
                    ) from None
                failures[target.position] = failure.code
                log.debug(
                    "%s failed for image set #%d: %s", OPERATION, target.position, failure.code
                )
            else:
                if block is not None:
                    blocks[target.position] = block
            progress.update(done_count, len(targets))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    log.info(
        "%s: %d call(s), %d failed, %.1f s",
        OPERATION,
        len(targets),
        len(failures),
        time.monotonic() - started,
    )
    return blocks, failures


def result_frame(
    targets: list[Target],
    blocks: dict[int, Block],
    failures: dict[int, str],
    level: Level,
    on_error: OnError,
) -> pd.DataFrame:
    """The enrichment's frame in target order: each target's rows, or (report) its error row."""
    keys = ["imageSetId", "version", "SeriesInstanceUID"]
    keys += ["SOPInstanceUID"] if level == "instance" else []
    keys += [ERROR_COLUMN] if on_error == "report" else []
    ordered: list[Block] = []
    for target in targets:
        if target.position in failures:
            ordered.append(
                Block(
                    1,
                    {
                        "imageSetId": [target.image_set_id],
                        "version": [target.version],
                        ERROR_COLUMN: [failures[target.position]],
                    },
                )
            )
        elif target.position in blocks:
            ordered.append(blocks.pop(target.position))
    return blocks_to_frame(ordered, keys)
