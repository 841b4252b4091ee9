"""Series- and instance-level DICOM attributes from GetImageSetMetadata, as a long frame.

SearchImageSets summarizes an image set with a handful of tags; GetImageSetMetadata returns its whole
DICOM header tree as gzip JSON (``Patient``, ``Study``, ``Study.Series[uid].Instances[uid]``, each
with a ``DICOM`` object keyed by keyword). ``fetch_metadata`` calls it once per image set, from a
pool of threads paced by the same rate limiter the search uses, and flattens the series (or
instances) into rows keyed by ``imageSetId``, ``version``, ``SeriesInstanceUID`` (and
``SOPInstanceUID``), with one column per DICOM keyword found. Each document is parsed (orjson)
and flattened column-wise in its worker as it arrives, with the cyclic garbage collector paused
(``_CollectorPause``), and dropped: memory follows the output rows, CPU stays well under the
quota's needs for series of hundreds of instances.

Each call is an *access*: it moves an ARCHIVE_INSTANT_ACCESS image set back to the frequent (more
expensive) tier. The archive guard therefore knows every image set's tier before the first call:

- the frame's ``storageTier`` is used when it is *current*: the frame's provenance says it was
  fetched (``fetch_started_at``, else ``fetched_at``) at most ``TIER_MAX_AGE`` (15 minutes) ago
  and it is no refreshed snapshot (a refresh re-reads changed rows only, so the others keep the
  tier of an older fetch). A row shown ARCHIVE_INSTANT_ACCESS counts as archived at any age;
- every other tier (no ``storageTier`` column, a missing value, or a FREQUENT_ACCESS that is not
  current) is *stale* and is looked up first with GetImageSet, which returns ``storageTier`` and is
  not an access, paced under its own quota (25 calls/s);
- archived image sets the frame showed make ``fetch_metadata`` warn once and go on (the caller
  could see them); archived image sets it did not show make it refuse, before any
  GetImageSetMetadata call, unless ``allow_archive_access=True`` (which skips the look-ups and
  reads everything); ``allow_archive_access=False`` refuses any archived image set.

``dry_run=True`` counts the calls and the look-ups without sending any.
"""

from __future__ import annotations

import gc
import gzip
import itertools
import json
import logging
import operator
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar, overload

import orjson
import pandas as pd
import pyarrow as pa

from healthimaging_df import aws, schema
from healthimaging_df.aws import limiter_for, make_client
from healthimaging_df.core import checks, dates
from healthimaging_df.core.frames import (
    provenance_datastore,
    provenance_of,
    require,
    with_attrs,
)
from healthimaging_df.core.progress import Progress, ProgressReporter
from healthimaging_df.engine.fetch import FetchOptions
from healthimaging_df.errors import (
    ArchiveAccessWarning,
    MetadataFetchError,
    QueryValidationError,
)

__all__ = [
    "ARCHIVED",
    "ERROR_COLUMN",
    "TIER_MAX_AGE",
    "ArchiveAccessWarning",
    "MetadataPlan",
    "fetch_metadata",
    "flatten_document",
]

log = logging.getLogger(__name__)

ARCHIVED = "ARCHIVE_INSTANT_ACCESS"
FREQUENT = "FREQUENT_ACCESS"
ERROR_COLUMN = "metadataError"
OPERATION = "GetImageSetMetadata"
TIER_OPERATION = "GetImageSet"  # returns storageTier and is not an access
TIER_TPS = aws.GET_IMAGE_SET_TPS  # its own bucket, apart from GetImageSetMetadata's
TIER_MAX_AGE = timedelta(minutes=15)  # a frame's storageTier is current for this long after a fetch
_CLOCK_SKEW = timedelta(minutes=1)  # a fetch time this far in the future still counts as now
Level = Literal["series", "instance"]
OnError = Literal["raise", "report"]
MetadataProgress = Progress  # a callable gets (done, total)


@dataclass(frozen=True)
class MetadataPlan:
    """What ``fetch_metadata`` would do: the answer of ``dry_run=True`` (nothing is sent).

    Attributes
    ----------
    calls
        GetImageSetMetadata calls (one per distinct imageSetId and version).
    archived
        How many of those image sets the frame shows ARCHIVE_INSTANT_ACCESS (each call moves one
        back to the frequent tier).
    max_tps
        The client-side rate limit the calls would run under.
    stale
        Image sets whose tier the frame does not tell (no ``storageTier``, or not current): a
        real run looks them up with GetImageSet first (``lookups``), unless
        ``allow_archive_access=True``.
    lookups
        GetImageSet calls a real run makes first (not accesses), at up to 25/s.
    """

    calls: int
    archived: int
    max_tps: float
    stale: int = 0
    lookups: int = 0

    @property
    def estimated_seconds(self) -> float:
        """Lower bound of the run time at ``max_tps`` (look-ups at up to 25/s included)."""
        return self.calls / self.max_tps + self.lookups / min(TIER_TPS, self.max_tps)

    def __str__(self) -> str:
        text = (
            f"fetch_metadata would make {self.calls} {OPERATION} call(s) at up to "
            f"{self.max_tps:g}/s (at least {self.estimated_seconds:.1f} s); {self.archived} "
            "archived image set(s) would move to FREQUENT_ACCESS"
        )
        if self.lookups:
            text += (
                f"; {self.lookups} image set(s) without a current storageTier would first be "
                f"looked up with {TIER_OPERATION} (not an access), and the run refused if any is "
                "archived"
            )
        elif self.stale:
            text += (
                f"; {self.stale} image set(s) without a current storageTier would be read "
                "unchecked (allow_archive_access=True): any archived one would move too"
            )
        return text


@dataclass(frozen=True)
class _Target:
    position: int
    image_set_id: str
    version: int | None
    tier: str | None = None  # the frame's storageTier (None: no column, or no value)


def _targets(frame: pd.DataFrame) -> list[_Target]:
    """The distinct (imageSetId, version) pairs in frame order, with the frame's tier of each."""
    columns = ["imageSetId"] + (["version"] if "version" in frame.columns else [])
    rows = frame[frame["imageSetId"].notna()]
    first = ~rows[columns].duplicated().to_numpy()  # by position: index labels may repeat
    pairs = rows[columns][first]
    versions = (
        pairs["version"].astype("Int64").tolist() if "version" in pairs else [None] * len(pairs)
    )
    tiers: list[Any] = [None] * len(pairs)
    if "storageTier" in rows.columns:
        tiers = rows["storageTier"][first].astype(object).tolist()
    return [
        _Target(
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

    A refreshed snapshot re-read only the rows that changed, so its other rows' tiers are as old as
    its first export: None then, as for a frame without provenance.
    """
    provenance = provenance_of(frame)
    if provenance is None or provenance.get("refreshed_since"):
        return None
    for key in ("fetch_started_at", "fetched_at"):
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


def _stale(targets: list[_Target], current: bool) -> list[_Target]:
    """Targets whose tier is unknown: not shown archived, and no current FREQUENT_ACCESS."""
    return [t for t in targets if t.tier != ARCHIVED and not (current and t.tier == FREQUENT)]


def _fetch_options(max_concurrency: int, max_tps: float | None) -> FetchOptions:
    """Validate the pacing options as the search does (``QueryValidationError`` if bad)."""
    return FetchOptions(max_concurrency=max_concurrency, max_tps=max_tps)


def _datastore_id(frame: pd.DataFrame, datastore_id: str | None) -> str:
    if datastore_id is not None:
        return datastore_id
    found = provenance_datastore(frame)
    if not found:
        raise QueryValidationError(
            "datastore_id",
            "the frame's attrs carry none (it did not come from Query.to_dataframe or a "
            "snapshot): pass datastore_id=...",
        )
    return str(found)


# -- flattening --------------------------------------------------------------------------------


def _scalar_attributes(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """Attributes every instance has, with the same value in each."""
    if not instances:
        return {}
    common = dict(instances[0])
    for dicom in instances[1:]:
        for keyword in list(common):
            if keyword not in dicom or dicom[keyword] != common[keyword]:
                del common[keyword]
    return common


def flatten_document(document: dict[str, Any], level: Level = "series") -> Iterator[dict[str, Any]]:
    """Rows of one GetImageSetMetadata document: one per series, or per instance.

    A series row holds the series' ``DICOM`` attributes, every instance attribute that all its
    instances share (SOPClassUID, SliceThickness, Rows...), and
    ``NumberOfSeriesRelatedInstances``. An instance row holds the series attributes and the
    instance's own, plus ``SeriesInstanceUID`` and ``SOPInstanceUID`` from the document's keys.

    >>> doc = {"Study": {"Series": {"1.2": {"DICOM": {"Modality": "CT"}, "Instances": {
    ...     "1.2.1": {"DICOM": {"Rows": 512, "InstanceNumber": 1}},
    ...     "1.2.2": {"DICOM": {"Rows": 512, "InstanceNumber": 2}}}}}}}
    >>> list(flatten_document(doc))
    [{'SeriesInstanceUID': '1.2', 'Modality': 'CT', 'Rows': 512, 'NumberOfSeriesRelatedInstances': 2}]
    >>> [row["InstanceNumber"] for row in flatten_document(doc, "instance")]
    [1, 2]
    """
    series_map = (document.get("Study") or {}).get("Series") or {}
    for series_uid, series in series_map.items():
        series_dicom = dict(series.get("DICOM") or {})
        instances = series.get("Instances") or {}
        if level == "instance":
            for sop_uid, instance in instances.items():
                row: dict[str, Any] = {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
                for keyword, value in series_dicom.items():
                    row.setdefault(keyword, value)
                for keyword, value in (instance.get("DICOM") or {}).items():
                    row.setdefault(keyword, value)
                yield row
            continue
        row = {"SeriesInstanceUID": series_uid}
        for keyword, value in series_dicom.items():
            row.setdefault(keyword, value)
        shared = _scalar_attributes([i.get("DICOM") or {} for i in instances.values()])
        shared.pop("SOPInstanceUID", None)
        shared.pop("InstanceNumber", None)
        for keyword, value in shared.items():
            row.setdefault(keyword, value)
        row["NumberOfSeriesRelatedInstances"] = len(instances)
        yield row


@dataclass
class _Block:
    """One document's rows, column by column: ``columns[keyword]`` holds ``rows`` values."""

    rows: int
    columns: dict[str, list[Any]]


def _shared(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """``_scalar_attributes`` column-wise, in C.

    The second instance rules out the keywords that vary (position, number, UID...); one
    ``itemgetter`` call per instance and one ``list.count`` of the first instance's tuple then
    check the rest at once, column by column only if some instance disagrees. No Python loop
    over every (instance, keyword) pair.
    """
    if not instances or not instances[0]:
        return {}
    first = instances[0]
    missing = object()
    if len(instances) > 1:
        second = instances[1]
        keys = [k for k, v in first.items() if second.get(k, missing) == v]
    else:
        keys = list(first)
    if not keys:
        return {}
    try:
        rows = list(map(operator.itemgetter(*keys), instances))
    except KeyError:  # some instance lacks a keyword: compare keyword by keyword
        return {k: first[k] for k in keys if all(d.get(k, missing) == first[k] for d in instances)}
    if rows.count(rows[0]) == len(rows):  # every candidate shared by every instance
        return {k: first[k] for k in keys}
    columns = [rows] if len(keys) == 1 else list(zip(*rows, strict=True))
    return {
        k: first[k]
        for k, column in zip(keys, columns, strict=True)
        if column.count(column[0]) == len(column)
    }


def _flatten_columns(document: dict[str, Any], level: Level) -> _Block:
    """What ``flatten_document`` yields, built as columns (same values, same column order)."""
    series_map = (document.get("Study") or {}).get("Series") or {}
    parts: list[_Block] = []
    for series_uid, series in series_map.items():
        series_dicom = series.get("DICOM") or {}
        instances = series.get("Instances") or {}
        if level == "instance":
            sop_uids = list(instances)
            dicoms = [i.get("DICOM") or {} for i in instances.values()]
            n = len(dicoms)
            columns: dict[str, list[Any]] = {
                "SeriesInstanceUID": [series_uid] * n,
                "SOPInstanceUID": sop_uids,
            }
            for keyword, value in series_dicom.items():
                columns.setdefault(keyword, [value] * n)
            for keyword in dict.fromkeys(itertools.chain.from_iterable(dicoms)):
                if keyword not in columns:
                    columns[keyword] = [d.get(keyword) for d in dicoms]
            if n:  # a series without instances has no instance rows
                parts.append(_Block(n, columns))
            continue
        row: dict[str, Any] = {"SeriesInstanceUID": series_uid}
        for keyword, value in series_dicom.items():
            row.setdefault(keyword, value)
        shared = _shared([i.get("DICOM") or {} for i in instances.values()])
        shared.pop("SOPInstanceUID", None)
        shared.pop("InstanceNumber", None)
        for keyword, value in shared.items():
            row.setdefault(keyword, value)
        row["NumberOfSeriesRelatedInstances"] = len(instances)
        parts.append(_Block(1, {k: [v] for k, v in row.items()}))
    if len(parts) == 1:
        return parts[0]
    return _concat(parts) if parts else _Block(0, {})


def _concat(blocks: list[_Block]) -> _Block:
    """Blocks one after another; a column a block lacks is None there."""
    names = dict.fromkeys(itertools.chain.from_iterable(b.columns for b in blocks))
    columns: dict[str, list[Any]] = {}
    for name in names:
        values: list[Any] = []
        for block in blocks:
            values.extend(block.columns.get(name) or [None] * block.rows)
        columns[name] = values
    return _Block(sum(b.rows for b in blocks), columns)


def _blocks_to_frame(blocks: list[_Block], keys: list[str]) -> pd.DataFrame:
    """The frame of blocks in order: ``keys`` first, then columns in order of first appearance."""
    blocks = [b for b in blocks if b.rows]
    names = list(dict.fromkeys(itertools.chain(keys, *(b.columns for b in blocks))))
    arrays = []
    for name in names:
        values: list[Any] = []
        for block in blocks:
            column = block.columns.get(name)
            values.extend(column if column is not None else [None] * block.rows)
        arrays.append(_column(values))
    table = pa.Table.from_arrays(arrays, names=names)
    frame: pd.DataFrame = table.to_pandas(types_mapper=schema.pandas_type)
    if "version" in frame.columns:
        frame["version"] = frame["version"].astype("Int64")
    return frame


def _column(values: list[Any]) -> pa.Array:
    """An Arrow array of one attribute; values of mixed or unusual types become JSON text."""
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = None
    if array is None:
        text = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]
        return pa.array(text, type=pa.string())
    if pa.types.is_null(array.type):  # every value missing
        return array.cast(pa.string())
    return array


# -- calling -------------------------------------------------------------------------------------


class _Failure(Exception):
    def __init__(self, code: str, fatal: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.fatal = fatal


def _loads(blob: bytes) -> Any:
    """orjson, falling back to the stdlib for what it refuses and json reads (NaN, huge ints)."""
    try:
        return orjson.loads(blob)
    except orjson.JSONDecodeError:
        return json.loads(blob)


def _get_blob(client: Any, datastore_id: str, target: _Target) -> bytes:
    """The document's JSON bytes, gunzipped (zlib releases the GIL while it inflates)."""
    kwargs: dict[str, Any] = {"datastoreId": datastore_id, "imageSetId": target.image_set_id}
    if target.version is not None:
        kwargs["versionId"] = str(target.version)
    try:
        response = client.get_image_set_metadata(**kwargs)
        blob: bytes = response["imageSetMetadataBlob"].read()
    except aws.aws_errors() as exc:  # botocore's text can quote request values: the code only
        found = aws.failure(exc)
        raise _Failure(found.code, found.fatal) from None
    try:
        if blob[:2] == b"\x1f\x8b" or response.get("contentEncoding") == "gzip":
            blob = gzip.decompress(blob)
    except (OSError, EOFError, ValueError):
        raise _Failure("InvalidMetadataDocument") from None
    return blob


def _document(blob: bytes) -> dict[str, Any]:
    """The parsed document (``_Failure`` if it is not a JSON object)."""
    try:
        document = _loads(blob)
    except ValueError:
        raise _Failure("InvalidMetadataDocument") from None
    if not isinstance(document, dict):
        raise _Failure("InvalidMetadataDocument")
    return document


def _blob_block(blob: bytes, level: Level) -> _Block:
    """Parse and flatten one document; the document is freed on return, the block kept.

    Called inside ``_collector_paused()``: the parsed tree (thousands of dicts and lists for a
    series of hundreds of instances) dies by reference counting before the cyclic collector
    could walk it.
    """
    return _flatten_columns(_document(blob), level)


class _CollectorPause:
    """Defers Python's cyclic garbage collector while any thread parses a document.

    A parsed JSON document holds no reference cycles, so the collector can never free any of
    it; but its thousands of containers trigger young collections that walk it, promote it,
    and then full collections that walk the whole heap again (measured: more than half of the
    CPU of a 500-instance document). Pausing while a document is alive lets reference counting
    free it first. Collection is only deferred: the allocation counts carry on and the first
    allocation after the pause collects whatever other threads made meanwhile. A collector
    the process had disabled stays disabled (one disabled by another thread during a pause is
    enabled again at its end).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                if self._resume:
                    gc.disable()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


_collector_paused = _CollectorPause()


def _get_tier(client: Any, datastore_id: str, target: _Target) -> str | None:
    """The image set's storageTier from GetImageSet (not an access); None if there is no such set."""
    try:
        response = client.get_image_set(datastoreId=datastore_id, imageSetId=target.image_set_id)
    except aws.aws_errors() as exc:
        found = aws.failure(exc)
        if found.code == "ResourceNotFoundException":  # nothing to access; its metadata call too
            return None
        raise aws.service_error(
            TIER_OPERATION,
            target.position,
            found,
            detail="the storage tier could not be checked (allow_archive_access=True skips the "
            "check, and reads archived image sets too)",
        ) from None
    tier = response.get("storageTier")
    if not isinstance(tier, str):
        raise QueryValidationError(
            "allow_archive_access",
            f"{TIER_OPERATION} answered without storageTier (a botocore older than the service "
            "model of 2025-11 drops it), so the tier cannot be checked: upgrade botocore, give a "
            "frame with a current storageTier, or pass allow_archive_access=True",
        )
    return tier


def _lookup_tiers(
    client: Any,
    datastore_id: str,
    targets: list[_Target],
    max_tps: float | None,
    max_concurrency: int,
    progress: ProgressReporter,
) -> dict[int, str | None]:
    """Each target's tier by GetImageSet, paced at its quota (or *max_tps* if lower)."""
    limiter = limiter_for(client, TIER_OPERATION, min(TIER_TPS, max_tps) if max_tps else TIER_TPS)
    started = time.monotonic()

    def one(target: _Target) -> str | None:
        with aws.paced(client, limiter):  # every attempt, botocore's retries included
            return _get_tier(client, datastore_id, target)

    tiers: dict[int, str | None] = {}
    pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ahi-tier")
    try:
        for target, future in _windowed(pool, one, targets, 2 * max_concurrency):
            tiers[target.position] = future.result()
            progress.update(len(tiers), len(targets))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    log.info(
        "%s: %d tier look-up(s), %.1f s", TIER_OPERATION, len(targets), time.monotonic() - started
    )
    return tiers


def _archive_guard(
    client: Any,
    datastore_id: str,
    targets: list[_Target],
    stale: list[_Target],
    allow: bool | None,
    max_tps: float | None,
    max_concurrency: int,
    progress: MetadataProgress,
) -> str | None:
    """Refuse, or return the warning to give (None: nothing archived), before any access."""
    shown = sum(t.tier == ARCHIVED for t in targets)
    total = len(targets)
    if allow is True:  # the caller accepts accesses: no look-ups, a warning of what may move
        parts = [f"{shown} of {total} image sets are ARCHIVE_INSTANT_ACCESS"] if shown else []
        if stale:
            parts.append(
                f"{len(stale)} of {total} have no current storageTier (unchecked: "
                "allow_archive_access=True)"
            )
        return _archive_warning("; ".join(parts)) if parts else None
    if allow is False and shown:
        raise QueryValidationError(
            "allow_archive_access",
            f"{shown} of {total} image sets are ARCHIVE_INSTANT_ACCESS and "
            f"allow_archive_access=False refuses any: each {OPERATION} call would move one back "
            "to FREQUENT_ACCESS; filter on storageTier first",
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
        raise QueryValidationError(
            "allow_archive_access",
            f"{found} of {total} image sets are archived (ARCHIVE_INSTANT_ACCESS per "
            f"{TIER_OPERATION}) although the frame does not show it (its storageTier is missing, "
            f"or from a fetch more than {TIER_MAX_AGE.seconds // 60} minutes old or refreshed): "
            f"each {OPERATION} call would move one back to FREQUENT_ACCESS. Nothing was "
            "accessed. Fetch the frame again and filter on storageTier, or pass "
            "allow_archive_access=True (command line: --allow-archive-access) to read them",
        )
    return (
        _archive_warning(f"{shown} of {total} image sets are ARCHIVE_INSTANT_ACCESS")
        if shown
        else None
    )


def _archive_warning(counts: str) -> str:
    return (
        f"{counts}: each {OPERATION} call is an access that moves an archived image set back to "
        "FREQUENT_ACCESS (billed at the frequent-access rate). dry_run=True counts the calls; "
        "filter on storageTier to skip them."
    )


_T = TypeVar("_T")


def _windowed(
    pool: ThreadPoolExecutor,
    work: Callable[[_Target], _T],
    targets: Iterable[_Target],
    window: int,
) -> Iterator[tuple[_Target, Future[_T]]]:
    """``(target, finished future)`` as *work* finishes, at most *window* queued at once.

    Waiting on every target's future at once made each completion cost O(targets) (quadratic in
    the frame's size); the window is refilled after the caller has handled each finished batch.
    """
    queued = iter(targets)
    pending: dict[Future[_T], _Target] = {
        pool.submit(work, t): t for t in itertools.islice(queued, window)
    }
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            yield pending.pop(future), future
        for t in itertools.islice(queued, window - len(pending)):
            pending[pool.submit(work, t)] = t


@overload
def fetch_metadata(
    frame: pd.DataFrame,
    *,
    client: Any = ...,
    boto3_session: Any = ...,
    level: Level = ...,
    max_tps: float | None = ...,
    max_concurrency: int = ...,
    progress: MetadataProgress = ...,
    dry_run: Literal[False] = ...,
    on_error: OnError = ...,
    datastore_id: str | None = ...,
    allow_archive_access: bool | None = ...,
) -> pd.DataFrame: ...


@overload
def fetch_metadata(
    frame: pd.DataFrame,
    *,
    client: Any = ...,
    boto3_session: Any = ...,
    level: Level = ...,
    max_tps: float | None = ...,
    max_concurrency: int = ...,
    progress: MetadataProgress = ...,
    dry_run: Literal[True],
    on_error: OnError = ...,
    datastore_id: str | None = ...,
    allow_archive_access: bool | None = ...,
) -> MetadataPlan: ...


def fetch_metadata(
    frame: pd.DataFrame,
    *,
    client: Any = None,
    boto3_session: Any = None,
    level: Level = "series",
    max_tps: float | None = aws.METADATA_TPS,
    max_concurrency: int = 8,
    progress: MetadataProgress = None,
    dry_run: bool = False,
    on_error: OnError = "raise",
    datastore_id: str | None = None,
    allow_archive_access: bool | None = None,
) -> pd.DataFrame | MetadataPlan:
    """Call GetImageSetMetadata for each image set of *frame* and return its DICOM attributes.

    Parameters
    ----------
    frame
        Image sets (``imageSetId``, and ``version`` to read that version; ``storageTier``, with
        the provenance of a fetch less than 15 minutes old, spares the tier look-ups). One call
        per distinct (imageSetId, version).
    client, boto3_session
        As in ``Query.to_dataframe``.
    level
        ``"series"``: one row per series (series attributes, the instance attributes all its
        instances share, ``NumberOfSeriesRelatedInstances``); ``"instance"``: one row per
        instance, keyed by ``SOPInstanceUID`` too.
    max_tps
        Calls per second across all threads (the service's default quota is 50); None for no
        client-side limit.
    max_concurrency
        Calls in flight at once.
    progress
        True for a tqdm bar, False for none, a callable ``(done, total)``, or None for a bar
        in a terminal or notebook outside CI.
    dry_run
        Send nothing; return a :class:`MetadataPlan` saying how many calls would be made.
    on_error
        ``"raise"``: after every call has finished, raise ``MetadataFetchError`` listing the
        image sets that failed (imageSetId -> error code). ``"report"``: return them as rows
        with the error code in a ``metadataError`` column (NA on rows that succeeded).
    datastore_id
        Defaults to the one in the frame's provenance (``attrs``).
    allow_archive_access
        The archive guard (module docstring). None (default): image sets without a current
        ``storageTier`` are looked up with GetImageSet (not an access, up to 25/s) first; archived
        ones the frame shows are read with a warning, archived ones it does not show make the call
        refuse. True: no look-ups, every image set is read (with a warning). False: refuse if any
        image set is archived.

    Returns
    -------
    DataFrame
        Keyed by ``imageSetId``, ``version``, ``SeriesInstanceUID`` (and ``SOPInstanceUID``),
        one column per DICOM keyword present, in frame order; ``attrs`` copied from *frame*.

    Raises
    ------
    QueryValidationError
        A bad option, a frame without ``imageSetId``, or no datastore_id to be found; raised
        before any call (also with ``dry_run=True``). Also (field ``allow_archive_access``)
        when the guard refuses: archived image sets the frame did not show, before any
        GetImageSetMetadata call.
    MetadataFetchError
        Some image sets failed and ``on_error="raise"``.
    SearchError
        A failure that concerns every call (access denied, no credentials, throttled after
        every retry): the fetch stops at once. A GetImageSet look-up that fails (other than
        for an image set that does not exist) raises one too, before any access.

    Warns
    -----
    ArchiveAccessWarning
        Once, when archived image sets are about to be read (each call moves one to the
        frequent tier), or unchecked ones with ``allow_archive_access=True``.
    """
    checks.one_of("level", level, ("series", "instance"))
    checks.one_of("on_error", on_error, ("raise", "report"))
    _fetch_options(max_concurrency, max_tps)
    checks.flag("dry_run", dry_run)
    checks.optional_flag("allow_archive_access", allow_archive_access)
    require(frame, ("imageSetId",), "fetch_metadata()")
    targets = _targets(frame)
    stale = _stale(targets, tier_is_current(frame))
    if dry_run:
        return MetadataPlan(
            calls=len(targets),
            archived=sum(t.tier == ARCHIVED for t in targets),
            max_tps=max_tps or float("inf"),
            stale=len(stale),
            lookups=0 if allow_archive_access is True else len(stale),
        )
    store = _datastore_id(frame, datastore_id)
    client = make_client(client, boto3_session, max_concurrency)
    with aws.pacing(client):  # our botocore handlers stay on the client for this call only
        warning = _archive_guard(
            client, store, targets, stale, allow_archive_access, max_tps, max_concurrency, progress
        )
        if warning is not None:
            warnings.warn(warning, ArchiveAccessWarning, stacklevel=3)
        blocks, failures = _fetch_all(
            client,
            store,
            targets,
            level,
            max_tps,
            max_concurrency,
            ProgressReporter(progress, OPERATION, " image sets", total=len(targets)),
        )
    if failures and on_error == "raise":
        raise MetadataFetchError({targets[p].image_set_id: code for p, code in failures.items()})
    keys = ["imageSetId", "version", "SeriesInstanceUID"]
    keys += ["SOPInstanceUID"] if level == "instance" else []
    keys += [ERROR_COLUMN] if on_error == "report" else []
    ordered: list[_Block] = []
    for target in targets:
        if target.position in failures:
            ordered.append(
                _Block(
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
    return with_attrs(_blocks_to_frame(ordered, keys), frame)


def _fetch_all(
    client: Any,
    datastore_id: str,
    targets: list[_Target],
    level: Level,
    max_tps: float | None,
    max_concurrency: int,
    progress: ProgressReporter,
) -> tuple[dict[int, _Block], dict[int, str]]:
    """Flattened documents and error codes, by target position.

    Each document is flattened in the worker as it arrives and dropped: memory follows the
    output rows, not the documents.
    """
    limiter = limiter_for(client, OPERATION, max_tps)
    blocks: dict[int, _Block] = {}
    failures: dict[int, str] = {}
    stop = threading.Event()
    started = time.monotonic()

    def one(target: _Target) -> _Block | None:
        if stop.is_set():
            return None
        with aws.paced(client, limiter):  # every attempt, botocore's retries included
            blob = _get_blob(client, datastore_id, target)
        with _collector_paused:
            block = _blob_block(blob, level)
        del blob
        head: dict[str, list[Any]] = {
            "imageSetId": [target.image_set_id] * block.rows,
            "version": [target.version] * block.rows,
        }
        return _Block(block.rows, head | block.columns)

    pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ahi-metadata")
    try:
        finished = _windowed(pool, one, targets, 2 * max_concurrency)
        for done_count, (target, future) in enumerate(finished, start=1):
            try:
                block = future.result()
            except _Failure as failure:
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
