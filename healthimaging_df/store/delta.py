"""Delta Lake tables for directory snapshots: atomic commits, optimistic concurrency, time travel.

A directory snapshot is a Delta table written with ``deltalake`` (delta-rs); its transaction log
(``_delta_log/``) is the only commit point, and nothing here writes beside it by hand. This module
works on ``pyarrow.Table`` plus a provenance dict, beneath the snapshot and refresh code:

- :func:`write_table` creates or replaces the table's content (one commit);
- :func:`merge_table` upserts changed rows by ``imageSetId`` and deletes leavers (one MERGE
  commit, rewriting only the files that hold those rows);
- :func:`read_table`, :func:`dataset` read the latest version, ``version=N`` or ``as_of=datetime``;
- :func:`history` lists the versions; :func:`vacuum` deletes files no version within *retain* uses;
- :func:`retry_on_conflict` reruns a read-modify-write that lost a race
  (:class:`~healthimaging_df.errors.SnapshotConflictError`);
- :func:`s3_storage_options` and :func:`register_glue_table` for S3 and Athena.

Every commit carries the provenance: ``commitInfo.userMetadata`` holds it as JSON (Spark and
Databricks show it in ``DESCRIBE HISTORY``) and ``commitInfo.healthimaging_df`` holds the format
marker and the exact Arrow schema, so every version says where it came from and reads back with the
types it was written with. The table description (set when the table is created) names the format.
delta-rs 1.6 refuses table properties outside ``delta.*`` when a table is written, so the
provenance is not in the table properties.

Commits never retry by themselves: a writer whose base version is no longer the latest loses with
``SnapshotConflictError`` and the table keeps the winner's version, whole. On S3 commits are
conditional PUTs (``conditional_put: etag``); the DynamoDB lock of delta-rs is the alternative for
stores without conditional writes (see ``docs/snapshots.md``).

Error messages never quote a path inside the table: partition folders are named after values
(``PatientID=...`` is PHI), and delta-rs and pyarrow put such paths in their messages.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from healthimaging_df.errors import (
    HealthImagingDFError,
    QueryValidationError,
    SnapshotConflictError,
    SnapshotError,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable

__all__ = [
    "COMMIT_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "MergeResult",
    "TableVersion",
    "WriteResult",
    "dataset",
    "history",
    "merge_table",
    "read_table",
    "register_glue_table",
    "retry_on_conflict",
    "s3_storage_options",
    "vacuum",
    "write_table",
]

FORMAT = "healthimaging_df.store.delta-snapshot"
FORMAT_VERSION = 1
COMMIT_KEY = "healthimaging_df"
_DELETE_FLAG = "__healthimaging_df_delete"
# operations of other tools that change files but not rows: a table stays ours through them
_MAINTENANCE = frozenset({"VACUUM START", "VACUUM END", "OPTIMIZE", "SET TBLPROPERTIES"})
_CONFLICT_HELP = (
    "another writer committed to this snapshot first; nothing of this write was committed and "
    "the table holds the other writer's version. Read it again and redo the change"
)
T = TypeVar("T")


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_table` committed.

    Attributes
    ----------
    version
        The Delta version this commit created.
    rows
        Rows in that version.
    files
        Data files of that version (full paths or URIs: not for logs, they embed partition values).
    bytes
        Total size of those files.
    bytes_written
        Size of the files this commit wrote.
    partition_by
        Partition columns of the table.
    provenance
        The provenance stored with the commit.
    """

    version: int
    rows: int
    files: tuple[str, ...] = field(repr=False)
    bytes: int
    bytes_written: int
    partition_by: tuple[str, ...]
    provenance: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_table` committed (``version`` is None when nothing changed).

    Attributes
    ----------
    version
        The Delta version of the MERGE commit, or None if no row changed (no commit is made).
    added, updated, removed
        Rows inserted, replaced by a newer state, and deleted (leavers).
    rows
        Rows in the table after the merge.
    files_added, files_removed
        Data files the commit wrote and retired.
    bytes_written
        Size of the files the commit wrote.
    """

    version: int | None
    added: int
    updated: int
    removed: int
    rows: int
    files_added: int
    files_removed: int
    bytes_written: int


class TableVersion(NamedTuple):
    """One version of a table, as :func:`read_table` returns it."""

    table: pa.Table
    provenance: dict[str, Any]
    version: int
    timestamp: datetime
    partition_by: tuple[str, ...] = ()


# -- locations and options -------------------------------------------------------------------


def _location(uri: str | os.PathLike[str]) -> str:
    if not isinstance(uri, (str, os.PathLike)):
        raise QueryValidationError("uri", "must be a str or os.PathLike")
    text = os.fspath(uri)
    if not isinstance(text, str) or not text:
        raise QueryValidationError("uri", "must be a non-empty text path")
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc or not parsed.path.strip("/"):
            raise QueryValidationError("uri", "an S3 table needs a bucket and a prefix")
        return f"s3://{parsed.netloc}/{parsed.path.strip('/')}"
    if "://" in text:
        raise QueryValidationError("uri", "must be a local path or an s3://bucket/prefix URI")
    return os.path.abspath(text)


def s3_storage_options(
    boto3_session: Any = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    dynamodb_lock_table: str | None = None,
) -> dict[str, str]:
    """``storage_options`` for delta-rs from a boto3 session (the default session when None).

    Parameters
    ----------
    boto3_session
        Credentials and region come from it (frozen now: temporary credentials are not renewed
        during one call).
    endpoint_url
        An S3-compatible endpoint (moto, MinIO); else the client's endpoint when boto3 was pointed
        elsewhere (``AWS_ENDPOINT_URL_S3``), else AWS.
    region
        Overrides the session's region.
    dynamodb_lock_table
        Coordinate commits through this DynamoDB table (delta-rs' ``dynamodb`` locking provider)
        instead of conditional PUTs, for stores without ``If-None-Match``.

    Returns
    -------
    dict of str to str
    """
    import boto3

    session = boto3_session if boto3_session is not None else boto3.Session()
    client = session.client("s3", region_name=region, endpoint_url=endpoint_url)
    options: dict[str, str] = {"AWS_REGION": str(client.meta.region_name or "us-east-1")}
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        options["AWS_ACCESS_KEY_ID"] = str(frozen.access_key)
        options["AWS_SECRET_ACCESS_KEY"] = str(frozen.secret_key)
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = str(frozen.token)
    endpoint = str(client.meta.endpoint_url or "")
    host = urlparse(endpoint).hostname or ""
    if endpoint_url is not None or (endpoint and not host.endswith("amazonaws.com")):
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if dynamodb_lock_table is not None:
        options["AWS_S3_LOCKING_PROVIDER"] = "dynamodb"
        options["DELTA_DYNAMO_TABLE_NAME"] = dynamodb_lock_table
    else:
        options["conditional_put"] = "etag"
    return options


def _options(location: str, storage_options: Mapping[str, str] | None) -> dict[str, str] | None:
    if storage_options is not None:
        if not isinstance(storage_options, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in storage_options.items()
        ):
            raise QueryValidationError("storage_options", "must map option names to strings")
        return dict(storage_options)
    if location.startswith("s3://"):
        return s3_storage_options()
    return None


# -- errors -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn delta-rs, pyarrow and OS errors into ``SnapshotError`` without their text (paths)."""
    from deltalake.exceptions import CommitFailedError, DeltaProtocolError, TableNotFoundError

    try:
        yield
    except HealthImagingDFError:
        raise
    except CommitFailedError:
        raise SnapshotConflictError(f"{action}: {_CONFLICT_HELP}") from None
    except TableNotFoundError:
        raise SnapshotError(f"{action}: there is no Delta table there") from None
    except DeltaProtocolError:
        raise SnapshotError(
            f"{action}: the table needs Delta features this deltalake cannot handle; upgrade it"
        ) from None
    except Exception as exc:
        raise SnapshotError(f"{action} failed: {_kind(exc)}") from None


def _kind(exc: BaseException) -> str:
    """A description of *exc* that quotes nothing of its message but well-known causes."""
    text = str(exc).lower()
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "no space left" in text:
        return "no space left on the device"
    if "json" in text or "_delta_log" in text or "checkpoint" in text or "log segment" in text:
        return "the table's transaction log is damaged"
    damaged = ("magic bytes", "corrupt", "truncated", "out of specification", "eof")
    if isinstance(exc, pa.ArrowInvalid) or any(word in text for word in damaged):
        return "a data file of the table is damaged or truncated"
    if isinstance(exc, FileNotFoundError) or "not found" in text or "no such file" in text:
        return "a file of the table is missing (deleted by hand, or vacuumed away)"
    if isinstance(exc, PermissionError) or "access denied" in text or "forbidden" in text:
        return "access denied by the file system or S3"
    if "parquet" in text or isinstance(exc, pa.ArrowIOError):
        return "a data file of the table is damaged or truncated"
    if "timeout" in text or "connect" in text or "dns" in text or "503" in text:
        return "the storage did not answer (network or S3 outage); try again"
    return f"{type(exc).__name__} from the storage layer"


# -- the log ------------------------------------------------------------------------------------


def _log_fs(location: str, options: dict[str, str] | None) -> Any:
    """A pyarrow file system rooted at the table (pyarrow's own S3 client: it releases the GIL).

    delta-rs' Python file-system handler holds the GIL while it waits on S3, which stalls an S3
    stand-in served from the same process (moto in tests) and serializes pyarrow's reader threads.
    """
    from pyarrow import fs as pafs

    if not location.startswith("s3://"):
        return pafs.SubTreeFileSystem(location, pafs.LocalFileSystem())
    opts = {k.upper(): v for k, v in (options or {}).items()}
    endpoint = opts.get("AWS_ENDPOINT_URL") or opts.get("AWS_ENDPOINT")
    kwargs: dict[str, Any] = {"region": opts.get("AWS_REGION") or opts.get("AWS_DEFAULT_REGION")}
    if opts.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=opts["AWS_ACCESS_KEY_ID"],
            secret_key=opts.get("AWS_SECRET_ACCESS_KEY"),
            session_token=opts.get("AWS_SESSION_TOKEN"),
        )
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    with _translated("opening the S3 location"):
        s3 = pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    return pafs.SubTreeFileSystem(location[len("s3://") :], s3)


def _commit_info(log_fs: Any, version: int) -> dict[str, Any] | None:
    """The ``commitInfo`` of *version*, with ``_committed_at`` (None if its log file is gone).

    ``_committed_at`` is the log file's modification time: what delta-rs resolves ``as_of``
    against (the commitInfo timestamp is taken a moment before the file is written).
    """
    name = f"_delta_log/{version:020d}.json"
    try:
        with log_fs.open_input_stream(name) as handle:
            data = handle.read()
        mtime = log_fs.get_file_info(name).mtime
    except FileNotFoundError:
        return None
    info: dict[str, Any] = {}
    try:
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                action = json.loads(line)
                if isinstance(action, dict) and isinstance(action.get("commitInfo"), dict):
                    info = dict(action["commitInfo"])
                    break
    except ValueError:
        raise SnapshotError(
            "the table's transaction log is damaged (a commit is not JSON)"
        ) from None
    if isinstance(mtime, datetime):
        info["_committed_at"] = mtime if mtime.tzinfo else mtime.replace(tzinfo=timezone.utc)
    return info


def _ours(info: Mapping[str, Any]) -> dict[str, Any] | None:
    meta = info.get(COMMIT_KEY)
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        return meta
    return None


@dataclass(frozen=True)
class _State:
    """What our commits say about one version: marker, schema, partitioning, provenance."""

    version: int
    meta: dict[str, Any]
    provenance: dict[str, Any]
    timestamp: datetime

    @property
    def arrow_schema(self) -> pa.Schema:
        try:
            return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.meta["arrow_schema"])))
        except (KeyError, ValueError, TypeError, pa.ArrowException):
            raise SnapshotError("the table's commit metadata is damaged (schema)") from None


def _state(log_fs: Any, version: int) -> _State:
    """The provenance in force at *version*: its own commit, or ours before maintenance commits."""
    at = version
    timestamp: datetime | None = None
    while at >= 0:
        info = _commit_info(log_fs, at)
        if info is None:
            raise SnapshotError(
                "the log entry with this version's provenance was cleaned up "
                "(delta.logRetentionDuration); re-export to get a readable history"
            )
        if timestamp is None:
            timestamp = _timestamp(info)
        meta = _ours(info)
        if meta is not None:
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise SnapshotError("the table was written by a newer healthimaging_df; upgrade")
            return _State(version, meta, _provenance(info), timestamp)
        if str(info.get("operation", "")) not in _MAINTENANCE:
            break
        at -= 1
    raise SnapshotError(
        "this Delta table was not written by healthimaging_df (its commit has no provenance); "
        "read it with deltalake.DeltaTable, or write the snapshot to a new path"
    )


def _provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    try:
        prov = json.loads(info.get("userMetadata") or "{}")
    except (TypeError, ValueError):
        raise SnapshotError("the table's commit metadata is damaged (provenance)") from None
    if not isinstance(prov, dict):
        raise SnapshotError("the table's commit metadata is damaged (provenance)")
    return prov


def _timestamp(info: Mapping[str, Any]) -> datetime:
    moment = info.get("_committed_at")
    if isinstance(moment, datetime):
        return moment.astimezone(timezone.utc)
    millis = info.get("timestamp")
    if not isinstance(millis, int):
        return datetime.fromtimestamp(0, timezone.utc)
    return datetime.fromtimestamp(millis / 1000, timezone.utc)


_DELTA_PART = re.compile(r"part-[0-9]{5}-[0-9a-f-]{36}-c[0-9]{3}(\.[a-z0-9]+)?\.parquet")
_CREATION_GRACE = timedelta(minutes=10)


def _listing(location: str, options: dict[str, str] | None) -> list[Any]:
    """Every file below *location* (recursively); empty when nothing is there."""
    from pyarrow import fs as pafs

    if not location.startswith("s3://") and not os.path.isdir(location):
        return []
    selector = pafs.FileSelector("", recursive=True, allow_not_found=True)
    infos = _log_fs(location, options).get_file_info(selector)
    return [info for info in infos if info.type == pafs.FileType.File]


def _all_written_by_delta_rs(
    location: str, options: dict[str, str] | None, paths: Sequence[str]
) -> bool:
    """Whether every file is a whole Parquet file written by delta-rs (``created_by`` parquet-rs).

    Such a folder without a log is what a crashed (or a concurrent) first write leaves: writing
    the first version into it is safe, because version 0 is committed create-if-absent. Spark
    names its files alike but its footers say ``parquet-mr``: those folders are never written to.
    """
    table_fs = _log_fs(location, options)
    for path in paths:
        try:
            created_by = str(pq.read_metadata(path, filesystem=table_fs).created_by or "")
        except (OSError, pa.ArrowException):
            return False  # a file still being written, or not Parquet
        if not created_by.startswith("parquet-rs"):
            return False
    return True


def _classify(location: str, options: dict[str, str] | None) -> str:
    """What is at *location*: ``"empty"``, ``"table"``, ``"debris"``, ``"creating"``, ``"other"``.

    Debris: only whole delta-rs data files; creating: only fresh files with delta-rs names.
    """
    files = _listing(location, options)
    if not files:
        return "empty"
    paths = [info.path.replace("\\", "/") for info in files]
    if any(path.split("/")[-2:-1] == ["_delta_log"] for path in paths):
        return "table"
    if all(_DELTA_PART.fullmatch(path.rsplit("/", 1)[-1]) for path in paths):
        if _all_written_by_delta_rs(location, options, paths):
            return "debris"
        newest = max((info.mtime for info in files if info.mtime is not None), default=None)
        if newest is not None:
            moment = newest if newest.tzinfo else newest.replace(tzinfo=timezone.utc)
            if datetime.now(timezone.utc) - moment < _CREATION_GRACE:
                return "creating"
    return "other"


def _open(
    location: str,
    options: dict[str, str] | None,
    *,
    action: str,
    version: int | None = None,
    as_of: datetime | None = None,
    missing_ok: bool = False,
) -> DeltaTable | None:
    """The Delta table at *location* (at *version* / *as_of*), or None if nothing is there."""
    from deltalake import DeltaTable

    if not location.startswith("s3://") and os.path.isfile(location):
        raise SnapshotError(
            f"{action}: the path is a file, not a Delta table (a single-file snapshot or plain "
            "Parquet: read it with read_snapshot or pandas)"
        )
    with _translated(action):
        kind = _classify(location, options)
    if kind == "debris" and missing_ok:  # a crashed first write: version 0 is still free
        return None
    if kind == "creating" and missing_ok:  # a writer's first commit is under way
        raise SnapshotConflictError(f"{action}: {_CONFLICT_HELP}")
    if kind == "other" and missing_ok:
        raise SnapshotError(
            f"{action}: the folder holds files but no Delta log (another tool's output, or debris "
            "of a crashed first write); refusing to write into it: use a new path"
        )
    if kind != "table":
        if missing_ok:
            return None
        detail = "" if kind == "empty" else " (no Delta log: plain Parquet, or a first write)"
        raise SnapshotError(f"{action}: there is no snapshot there{detail}")
    with _translated(action):
        table = DeltaTable(location, storage_options=options)
    if version is not None or as_of is not None:
        try:
            table.load_as_version(version if version is not None else as_of)  # type: ignore[arg-type]
        except Exception:
            raise SnapshotError(
                f"{action}: no such version (before the first commit, beyond the latest, or "
                "its log was cleaned up)"
            ) from None
    return table


# -- validation ----------------------------------------------------------------------------------


def _check_table(argument: str, table: Any) -> pa.Table:
    if not isinstance(table, pa.Table):
        raise QueryValidationError(argument, "must be a pyarrow.Table")
    if len(set(table.column_names)) != len(table.column_names):
        raise QueryValidationError(argument, "has repeated column names")
    if any(name.startswith("__") for name in table.column_names):
        raise QueryValidationError(argument, "column names must not start with two underscores")
    return table


def _check_data(data: Any, num_rows: Any) -> tuple[pa.Table | pa.RecordBatchReader, int]:
    """*data* (a table, or a reader with its *num_rows*) and its row count, else a typed error."""
    if isinstance(data, pa.RecordBatchReader):
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise QueryValidationError("num_rows", "a reader needs its row count (an int >= 0)")
        _check_table("table", data.schema.empty_table())
        return data, num_rows
    table = _check_table("table", data)
    if num_rows is not None and num_rows != table.num_rows:
        raise QueryValidationError("num_rows", "must be None or the table's row count")
    return table, table.num_rows


def _check_provenance(provenance: Any) -> dict[str, Any]:
    if not isinstance(provenance, Mapping):
        raise QueryValidationError("provenance", "must be a dict")
    prov = dict(provenance)
    try:
        json.dumps(prov, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError):
        raise QueryValidationError(
            "provenance", "must be JSON-serializable (text keys; no NaN or objects)"
        ) from None
    return prov


def _check_names(argument: str, names: Any, table_schema: pa.Schema) -> list[str]:
    if isinstance(names, str):
        raise QueryValidationError(argument, "must be a list of column names, not one string")
    out = list(names)
    for position, name in enumerate(out):
        if not isinstance(name, str):
            raise QueryValidationError(argument, "column names must be strings", position)
        if name not in table_schema.names:
            raise QueryValidationError(argument, f"column {name!r} is not in the table", position)
    if len(set(out)) != len(out):
        raise QueryValidationError(argument, "has a repeated column")
    return out


def _check_version(version: Any, as_of: Any) -> None:
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 0
    ):
        raise QueryValidationError("version", "must be a non-negative integer")
    if as_of is not None and not isinstance(as_of, datetime):
        raise QueryValidationError("as_of", "must be a datetime (naive means UTC)")
    if version is not None and as_of is not None:
        raise QueryValidationError("as_of", "give version or as_of, not both")


def _schema_b64(table_schema: pa.Schema) -> str:
    return base64.b64encode(table_schema.remove_metadata().serialize().to_pybytes()).decode()


def _commit(prov: dict[str, Any], meta: dict[str, Any], *, retries: int | None = 0) -> Any:
    from deltalake import CommitProperties

    custom = {
        COMMIT_KEY: {"format": FORMAT, "format_version": FORMAT_VERSION, **meta},
        "userMetadata": json.dumps(prov, sort_keys=True, allow_nan=False),
    }
    return CommitProperties(custom_metadata=custom, max_commit_retries=retries)


def _writer_properties() -> Any:
    from deltalake import WriterProperties

    return WriterProperties(compression="ZSTD")


def _files(table: DeltaTable) -> dict[str, int]:
    actions = pa.table(table.get_add_actions(flatten=True))
    return dict(
        zip(
            actions.column("path").to_pylist(),
            actions.column("size_bytes").to_pylist(),
            strict=True,
        )
    )


def _row_count(table: DeltaTable) -> int:
    actions = pa.table(table.get_add_actions(flatten=True))
    if "num_records" not in actions.column_names or actions.num_rows == 0:
        return 0
    return int(pc.sum(actions.column("num_records")).as_py() or 0)


# -- write ----------------------------------------------------------------------------------------


def write_table(
    uri: str | os.PathLike[str],
    table: pa.Table | pa.RecordBatchReader,
    provenance: Mapping[str, Any],
    *,
    partition_by: Sequence[str] | None = None,
    storage_options: Mapping[str, str] | None = None,
    mode: Literal["overwrite", "error"] = "overwrite",
    expected_version: int | None = None,
    target_file_size: int | None = None,
    num_rows: int | None = None,
) -> WriteResult:
    """Create the Delta table at *uri*, or replace its content, in one commit.

    Parameters
    ----------
    uri
        Local folder or ``s3://bucket/prefix``. An existing folder must be empty or a table of
        this library.
    table
        The rows, with the Arrow types to keep (they read back exactly): a table, or a
        ``RecordBatchReader`` that delta-rs writes as it reads it (a result larger than memory),
        with its row count in *num_rows*.
    provenance
        JSON-ready dict stored with the commit.
    partition_by
        Partition columns (any columns of *table*); None keeps the table's partitioning (none
        for a new table).
    storage_options
        delta-rs options (see :func:`s3_storage_options`; built from the default boto3 session
        for ``s3://`` when None).
    mode
        ``"overwrite"`` replaces any previous content; ``"error"`` refuses an existing table.
    expected_version
        The version the caller based this write on: if the table has moved past it, the write
        raises ``SnapshotConflictError``. None means the latest version at call time.
    target_file_size
        Bytes at which a data file is closed and the next begun (delta-rs' default: 100 MiB).
        Smaller files, with rows in ``createdAt`` order, let a MERGE rewrite only the files that
        hold changed image sets.
    num_rows
        The rows a reader will yield (recorded in the commit before it is read); for a table,
        None or its row count.

    Returns
    -------
    WriteResult
    """
    from deltalake import write_deltalake

    location = _location(uri)
    table, rows = _check_data(table, num_rows)
    prov = _check_provenance(provenance)
    if mode not in ("overwrite", "error"):
        raise QueryValidationError("mode", "must be 'overwrite' or 'error'")
    _check_version(expected_version, None)
    parts = (
        None if partition_by is None else _check_names("partition_by", partition_by, table.schema)
    )
    if parts is not None and parts and len(parts) >= len(table.schema.names):
        raise QueryValidationError("partition_by", "cannot cover every column")
    options = _options(location, storage_options)
    action = "writing the snapshot"
    existing = _open(location, options, action=action, version=expected_version, missing_ok=True)
    meta = {"operation": "write", "arrow_schema": _schema_b64(table.schema), "rows": rows}
    if existing is None:
        if expected_version is not None:
            raise SnapshotError(f"{action}: there is no table at the expected version")
        parts = parts or []
        meta.update(partition_by=parts, added=rows, updated=0, removed=0)
        with _translated(action):
            try:
                write_deltalake(
                    location,
                    table,
                    partition_by=parts or None,
                    mode="error",
                    description=_description(),
                    storage_options=options,
                    target_file_size=target_file_size,
                    writer_properties=_writer_properties(),
                    commit_properties=_commit(prov, meta),
                )
            except Exception:
                if _open(location, options, action=action, missing_ok=True) is not None:
                    raise SnapshotConflictError(f"{action}: {_CONFLICT_HELP}") from None
                raise
        written = _open(location, options, action=action, version=0)
        assert written is not None
        before: dict[str, int] = {}
    else:
        if mode == "error":
            raise SnapshotError(f"{action}: a table exists there (mode='error')")
        _state(_log_fs(location, options), existing.version())  # refuses a foreign table
        old_parts = list(existing.metadata().partition_columns)
        if parts is None:
            parts = old_parts
            missing = [c for c in parts if c not in table.schema.names]
            if missing:
                raise QueryValidationError(
                    "table", f"lacks the table's partition columns: {', '.join(missing)}"
                )
        dropped = [c for c in old_parts if c not in table.schema.names]
        if dropped:  # delta-rs 1.6 cannot overwrite a table without its partition columns
            raise SnapshotError(
                f"{action}: the table is partitioned by {', '.join(dropped)}, which the new rows "
                "lack; write them to a new path"
            )
        before = _files(existing)
        old_rows = _row_count(existing)
        reshape = parts != old_parts or not _same_delta_schema(existing, table.schema)
        meta.update(partition_by=parts, added=rows, updated=0, removed=old_rows)
        with _translated(action):
            write_deltalake(
                existing,
                table,
                partition_by=parts or None,
                mode="overwrite",
                schema_mode="overwrite" if reshape else None,
                target_file_size=target_file_size,
                writer_properties=_writer_properties(),
                commit_properties=_commit(prov, meta),
            )
        written = existing
    files = _files(written)
    return WriteResult(
        version=written.version(),
        rows=rows,
        files=tuple(written.file_uris()),
        bytes=sum(files.values()),
        bytes_written=sum(size for path, size in files.items() if path not in before),
        partition_by=tuple(parts),
        provenance=prov,
    )


def _description() -> str:
    from healthimaging_df._version import __version__

    return json.dumps(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"healthimaging_df {__version__}",
            "provenance": "commitInfo.userMetadata of each version (JSON)",
        },
        sort_keys=True,
    )


def _same_delta_schema(existing: DeltaTable, arrow_schema: pa.Schema) -> bool:
    current = pa.schema(existing.schema().to_arrow())
    return [(f.name, str(f.type)) for f in current] == [(f.name, str(f.type)) for f in arrow_schema]


# -- merge ----------------------------------------------------------------------------------------


def merge_table(
    uri: str | os.PathLike[str],
    incoming: pa.Table,
    removed_ids: Sequence[str],
    provenance: Mapping[str, Any],
    *,
    key: str = "imageSetId",
    expected_version: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> MergeResult:
    """Upsert *incoming* by *key* and delete *removed_ids*, in one MERGE commit.

    A row of *incoming* replaces the table's row with the same key when its ``(version,
    updatedAt)`` is newer (nulls lowest), or equal with any other column different; an older state
    never replaces a newer one. Keys not in the table are inserted. Only the data files holding
    touched rows are rewritten.

    Parameters
    ----------
    uri
        An existing table of this library.
    incoming
        Rows to upsert, with exactly the table's columns (any order); keys unique and non-null.
    removed_ids
        Keys to delete (rows that left the cohort); none of them may be in *incoming*.
    provenance
        JSON-ready dict stored with the commit (the new version's provenance).
    key
        The key column.
    expected_version
        The version the caller read; a table that moved past it raises ``SnapshotConflictError``.
    storage_options
        As in :func:`write_table`.

    Returns
    -------
    MergeResult
    """
    location = _location(uri)
    incoming = _check_table("incoming", incoming)
    prov = _check_provenance(provenance)
    _check_version(expected_version, None)
    if isinstance(removed_ids, (str, bytes)):
        raise QueryValidationError("removed_ids", "must be a list of keys, not one string")
    removed = list(removed_ids)
    for position, value in enumerate(removed):
        if not isinstance(value, str):
            raise QueryValidationError("removed_ids", "keys must be strings", position)
    options = _options(location, storage_options)
    action = "merging into the snapshot"
    existing = _open(location, options, action=action, version=expected_version)
    assert existing is not None
    state = _state(_log_fs(location, options), existing.version())
    target_schema = state.arrow_schema
    if key not in target_schema.names:
        raise QueryValidationError("key", f"column {key!r} is not in the table")
    for needed in ("version", "updatedAt"):
        if needed not in target_schema.names:
            raise SnapshotError(f"{action}: the table has no {needed} column to rank states by")
    if set(incoming.column_names) != set(target_schema.names):
        raise QueryValidationError("incoming", "must have exactly the table's columns")
    try:
        incoming = incoming.select(target_schema.names).cast(target_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        raise QueryValidationError(
            "incoming", "a column cannot be cast to the table's type"
        ) from None
    keys = incoming.column(key)
    if keys.null_count:
        raise QueryValidationError("incoming", f"has rows without a {key}")
    if pc.count_distinct(keys).as_py() != incoming.num_rows:
        raise QueryValidationError("incoming", f"has repeated {key} values")
    if len(set(removed)) != len(removed):
        raise QueryValidationError("removed_ids", "has repeated keys")
    if removed and pc.any(pc.is_in(keys, value_set=pa.array(removed, pa.string()))).as_py():
        raise QueryValidationError("removed_ids", "names keys that are also in incoming")
    if incoming.num_rows == 0 and not removed:
        return MergeResult(None, 0, 0, 0, _row_count(existing), 0, 0, 0)

    source = incoming.append_column(_DELETE_FLAG, pa.array([False] * incoming.num_rows, pa.bool_()))
    if removed:
        leavers = {
            name: pa.nulls(len(removed), type=target_schema.field(name).type)
            for name in target_schema.names
        }
        leavers[key] = pa.array(removed, type=target_schema.field(key).type)
        gone = pa.table({**leavers, _DELETE_FLAG: pa.array([True] * len(removed), pa.bool_())})
        source = pa.concat_tables([source, gone])
    columns = [c for c in target_schema.names if c != key]
    before = _files(existing)
    meta = {
        "operation": "merge",
        "arrow_schema": _schema_b64(target_schema),
        "partition_by": list(existing.metadata().partition_columns),
    }
    flag = f"s.`{_DELETE_FLAG}`"
    with _translated(action):
        metrics = (
            existing.merge(
                source,
                predicate=f"t.`{key}` = s.`{key}`",
                source_alias="s",
                target_alias="t",
                streamed_exec=False,  # the source is small: materialized, it prunes files
                writer_properties=_writer_properties(),
                commit_properties=_commit(prov, meta),
            )
            .when_matched_delete(predicate=flag)
            .when_matched_update_all(
                predicate=f"NOT {flag} AND ({_replaces(columns)})", except_cols=[_DELETE_FLAG]
            )
            .when_not_matched_insert_all(predicate=f"NOT {flag}", except_cols=[_DELETE_FLAG])
            .execute()
        )
    added = int(metrics.get("num_target_rows_inserted", 0))
    updated = int(metrics.get("num_target_rows_updated", 0))
    deleted = int(metrics.get("num_target_rows_deleted", 0))
    after = _files(existing)
    changed = bool(added or updated or deleted or set(after) != set(before))
    return MergeResult(
        version=existing.version() if changed else None,
        added=added,
        updated=updated,
        removed=deleted,
        rows=_row_count(existing),
        files_added=int(metrics.get("num_target_files_added", 0)),
        files_removed=int(metrics.get("num_target_files_removed", 0)),
        bytes_written=sum(size for path, size in after.items() if path not in before),
    )


def _replaces(columns: Sequence[str]) -> str:
    """SQL: the source row's state is newer than the target's, or equal with other content."""

    def newer(c: str) -> str:
        return f"((t.`{c}` IS NULL) AND (s.`{c}` IS NOT NULL)) OR (s.`{c}` > t.`{c}`)"

    same = "(s.`{0}` IS NOT DISTINCT FROM t.`{0}`)"
    differs = _any_of([f"(s.`{c}` IS DISTINCT FROM t.`{c}`)" for c in columns])
    return (
        f"({newer('version')}) OR ({same.format('version')} AND ({newer('updatedAt')})) OR "
        f"({same.format('version')} AND {same.format('updatedAt')} AND ({differs}))"
    )


def _any_of(terms: Sequence[str]) -> str:
    """OR of *terms* as a balanced tree (a flat chain of 20+ ORs exceeds the SQL parser's depth)."""
    if not terms:
        return "FALSE"
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return f"({_any_of(terms[:middle])}) OR ({_any_of(terms[middle:])})"


# -- read -------------------------------------------------------------------------------------------


def filter_expression(filters: Any) -> Any:
    """*filters* (an expression or DNF tuples) as a ``pyarrow.compute`` expression, or a typed error."""
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    try:
        return pq.filters_to_expression(filters)
    except (TypeError, ValueError, KeyError, IndexError):  # pyarrow's text can quote a value
        raise QueryValidationError(
            "filters", "must be a pyarrow.compute expression or DNF tuples (column, op, value)"
        ) from None


def check_filter(expression: Any, table_schema: pa.Schema) -> None:
    """Apply *expression* to no rows of *table_schema*: a bad column or type fails here, typed."""
    if expression is None:
        return
    try:
        pads.dataset(table_schema.empty_table()).to_table(filter=expression)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        raise QueryValidationError(
            "filters", "names a column the table lacks or compares it with the wrong type"
        ) from None


def _opened_state(
    uri: str | os.PathLike[str],
    version: int | None,
    as_of: datetime | None,
    storage_options: Mapping[str, str] | None,
    action: str,
) -> tuple[DeltaTable, _State, Any]:
    location = _location(uri)
    _check_version(version, as_of)
    options = _options(location, storage_options)
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    opened = _open(location, options, action=action, version=version, as_of=as_of)
    assert opened is not None
    table_fs = _log_fs(location, options)
    state = _state(table_fs, opened.version())
    if as_of is not None and state.timestamp > as_of:  # delta-rs gives version 0 for earlier
        raise SnapshotError(f"{action}: no such version (as_of is before the first commit)")
    return opened, state, table_fs


def dataset(
    uri: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pads.Dataset:
    """A ``pyarrow.dataset.Dataset`` of one version (latest by default), typed as written.

    DuckDB (``duckdb.arrow(ds)``), Polars (``pl.scan_pyarrow_dataset(ds)``) and Dask read it
    lazily, with partition pruning. Every data file is checked to be there with the size the log
    records (one listing, no data read), so a deleted or truncated file raises ``SnapshotError``
    here; damage inside a file of the right size fails later, in the reader, with pyarrow's
    message (which can quote a path).
    """
    action = "scanning the snapshot"
    table, state, table_fs = _opened_state(uri, version, as_of, storage_options, action)
    with _translated(action):
        scan = table.to_pyarrow_dataset(schema=state.arrow_schema, filesystem=table_fs)
        # the log stores paths percent-encoded (partition values); the file system wants them raw
        expected = {unquote(path): size for path, size in _files(table).items()}
        infos = table_fs.get_file_info(list(expected))
    from pyarrow import fs as pafs

    for info in infos:
        if info.type != pafs.FileType.File:
            raise SnapshotError(f"{action} failed: {_kind(FileNotFoundError())}")
        if info.size != expected[info.path]:
            raise SnapshotError(
                f"{action} failed: a data file of the table is damaged or truncated"
            )
    return scan


def read_table(
    uri: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    columns: Sequence[str] | None = None,
    filters: Any = None,
    storage_options: Mapping[str, str] | None = None,
) -> TableVersion:
    """Read one version of the table: its rows (Arrow types as written) and its provenance.

    Parameters
    ----------
    uri
        The table.
    version
        A version number (see :func:`history`); None for the latest.
    as_of
        The latest version committed at or before this moment (naive means UTC).
    columns
        Only these columns, in this order.
    filters
        A ``pyarrow.compute`` expression or DNF tuples (``[("Modality", "==", "CT")]``);
        partition filters skip whole files.
    storage_options
        As in :func:`write_table`.

    Returns
    -------
    TableVersion
        ``(table, provenance, version, timestamp, partition_by)``; rows in no particular order.
    """
    action = "reading the snapshot"
    opened, state, table_fs = _opened_state(uri, version, as_of, storage_options, action)
    full_schema = state.arrow_schema
    wanted = None
    if columns is not None:
        wanted = _check_names("columns", columns, full_schema)
    expression = filter_expression(filters)
    check_filter(expression, full_schema)
    with _translated(action):
        scan = opened.to_pyarrow_dataset(schema=full_schema, filesystem=table_fs)
        table = scan.to_table(columns=wanted, filter=expression)
    expected = full_schema if wanted is None else pa.schema([full_schema.field(c) for c in wanted])
    if table.schema.remove_metadata() != expected:
        with _translated(action):
            table = table.select(expected.names).cast(expected)
    return TableVersion(
        table.replace_schema_metadata(None),
        state.provenance,
        state.version,
        state.timestamp,
        tuple(str(c) for c in state.meta.get("partition_by") or ()),
    )


# -- history and vacuum ---------------------------------------------------------------------------


def history(
    uri: str | os.PathLike[str], *, storage_options: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Every version still in the log, newest first.

    Columns: ``version``, ``timestamp`` (UTC), ``operation`` (WRITE, MERGE, VACUUM END...),
    ``rows_added``, ``rows_updated``, ``rows_removed`` and ``provenance`` (the dict in force at
    that version; maintenance commits carry the previous one).
    """
    action = "reading the snapshot history"
    location = _location(uri)
    options = _options(location, storage_options)
    opened = _open(location, options, action=action)
    assert opened is not None
    log_fs = _log_fs(location, options)
    rows: list[dict[str, Any]] = []
    with _translated(action):
        for number in range(opened.version(), -1, -1):
            info = _commit_info(log_fs, number)
            if info is None:
                break
            ours = _ours(info) or {}
            metrics = info.get("operationMetrics") or {}
            operation = str(info.get("operation", ""))
            counts = _counts(operation, ours, metrics)
            rows.append(
                {
                    "version": number,
                    "timestamp": _timestamp(info),
                    "operation": operation,
                    **counts,
                    "provenance": _provenance_or_none(log_fs, number),
                }
            )
    if all(row["provenance"] is None for row in rows):
        _state(log_fs, opened.version())  # raises: not a table of this library
    frame = pd.DataFrame(
        rows,
        columns=[
            "version",
            "timestamp",
            "operation",
            "rows_added",
            "rows_updated",
            "rows_removed",
            "provenance",
        ],
    )
    typed: pd.DataFrame = frame.astype(
        {
            "version": "Int64",
            "timestamp": "datetime64[us, UTC]",
            "operation": "string",
            "rows_added": "Int64",
            "rows_updated": "Int64",
            "rows_removed": "Int64",
        }
    )
    return typed


def _provenance_or_none(log_fs: Any, version: int) -> dict[str, Any] | None:
    """The provenance in force at *version*; None for a version another tool wrote."""
    try:
        return _state(log_fs, version).provenance
    except SnapshotError:
        return None


def _counts(operation: str, ours: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, int]:
    if operation == "MERGE":
        return {
            "rows_added": int(metrics.get("num_target_rows_inserted", 0)),
            "rows_updated": int(metrics.get("num_target_rows_updated", 0)),
            "rows_removed": int(metrics.get("num_target_rows_deleted", 0)),
        }
    if "added" in ours:
        return {
            "rows_added": int(ours.get("added", 0)),
            "rows_updated": int(ours.get("updated", 0)),
            "rows_removed": int(ours.get("removed", 0)),
        }
    return {
        "rows_added": int(metrics.get("num_added_rows", 0)),
        "rows_updated": int(metrics.get("num_updated_rows", 0)),
        "rows_removed": int(metrics.get("num_deleted_rows", 0)),
    }


def vacuum(
    uri: str | os.PathLike[str],
    *,
    retain: timedelta,
    dry_run: bool = True,
    storage_options: Mapping[str, str] | None = None,
) -> int:
    """Delete data files that no version of the last *retain* needs (and debris of lost commits).

    Versions older than *retain* can no longer be read afterwards (their files are gone; the log
    still lists them). *retain* is rounded up to whole hours (delta-rs' unit).

    Returns
    -------
    int
        Files deleted (or, with ``dry_run``, that would be). Their names are not returned: they
        embed partition values.
    """
    action = "vacuuming the snapshot"
    if not isinstance(retain, timedelta) or retain < timedelta(0):
        raise QueryValidationError("retain", "must be a timedelta of zero or more")
    if not isinstance(dry_run, bool):
        raise QueryValidationError("dry_run", "must be True or False")
    location = _location(uri)
    options = _options(location, storage_options)
    opened = _open(location, options, action=action)
    assert opened is not None
    state = _state(_log_fs(location, options), opened.version())
    hours = math.ceil(retain / timedelta(hours=1))
    meta = {
        "operation": "vacuum",
        "arrow_schema": state.meta.get("arrow_schema"),
        "partition_by": state.meta.get("partition_by", []),
    }
    with _translated(action):
        removed = opened.vacuum(
            retention_hours=hours,
            dry_run=dry_run,
            enforce_retention_duration=False,
            full=True,  # also files no commit names (a lost or crashed writer's debris)
            commit_properties=_commit(state.provenance, meta, retries=None),
        )
    return len(removed)


# -- concurrency ----------------------------------------------------------------------------------


def retry_on_conflict(
    action: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
) -> T:
    """Run *action*; after a ``SnapshotConflictError``, wait (jittered backoff) and run it again.

    *action* must read the table afresh on every call and pass the version it read as
    ``expected_version``, so each attempt starts from the version that won.

    Parameters
    ----------
    action
        The read-modify-write to run.
    attempts
        Calls in all (at least 1); the last conflict is raised.
    base_delay, max_delay
        Seconds: the n-th retry waits a random time up to ``min(max_delay, base_delay * 2**n)``.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise QueryValidationError("attempts", "must be a positive integer")
    if base_delay < 0 or max_delay < 0:
        raise QueryValidationError("base_delay", "delays must be zero or more")
    for attempt in range(attempts):
        try:
            return action()
        except SnapshotConflictError:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover


# -- Glue -----------------------------------------------------------------------------------------

_GLUE_NAME = re.compile(r"[a-z0-9_]{1,255}")


def _hive_type(kind: pa.DataType) -> str:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_integer(kind):
        return {8: "tinyint", 16: "smallint", 32: "int"}.get(kind.bit_width, "bigint")
    if pa.types.is_floating(kind):
        return "float" if kind.bit_width == 32 else "double"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_date(kind):
        return "date"
    raise QueryValidationError("schema", f"type {kind} has no Glue/Hive equivalent here")


def register_glue_table(
    database_table: str,
    uri: str,
    schema: pa.Schema,
    partition_by: Sequence[str] = (),
    *,
    boto3_session: Any = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Literal["created", "updated"]:
    """Create or update the Glue table ``db.table`` for the Delta table at *uri* (Athena, EMR).

    The database is created when missing. Athena reads the table natively
    (``table_type=DELTA``; it takes the schema from the Delta log); Spark on EMR through
    ``spark.sql.sources.provider=delta``. The Glue columns are written too, for catalogs that
    show them.

    Parameters
    ----------
    database_table
        ``"database.table"``: lower-case letters, digits and underscores.
    uri
        ``s3://bucket/prefix`` of the table.
    schema
        The table's Arrow schema (``read_table(...).table.schema``).
    partition_by
        Its partition columns.
    boto3_session, endpoint_url, region
        How to reach Glue (the default session; an endpoint for moto).

    Returns
    -------
    ``"created"`` or ``"updated"``
    """
    import boto3

    if not isinstance(database_table, str) or database_table.count(".") != 1:
        raise QueryValidationError("glue_table", "must be 'database.table'")
    database, name = database_table.split(".")
    for part in (database, name):
        if not _GLUE_NAME.fullmatch(part):
            raise QueryValidationError(
                "glue_table", "names must be lower-case letters, digits and underscores"
            )
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise QueryValidationError("uri", "a Glue table needs an s3:// location")
    location = _location(uri)
    if not isinstance(schema, pa.Schema):
        raise QueryValidationError("schema", "must be a pyarrow.Schema")
    parts = _check_names("partition_by", partition_by, schema)
    session = boto3_session if boto3_session is not None else boto3.Session()
    glue = session.client("glue", region_name=region, endpoint_url=endpoint_url)
    columns = [{"Name": f.name, "Type": _hive_type(f.type)} for f in schema if f.name not in parts]
    table_input = {
        "Name": name,
        "Description": "healthimaging_df snapshot (Delta Lake)",
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {
            "table_type": "DELTA",
            "classification": "delta",
            "EXTERNAL": "TRUE",
            "spark.sql.sources.provider": "delta",
            "healthimaging_df.format": FORMAT,
        },
        "PartitionKeys": [{"Name": c, "Type": _hive_type(schema.field(c).type)} for c in parts],
        "StorageDescriptor": {
            "Columns": columns,
            "Location": location,
            "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "SerdeInfo": {
                "SerializationLibrary": (
                    "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
                ),
                "Parameters": {"path": location, "serialization.format": "1"},
            },
        },
    }
    try:
        glue.get_database(Name=database)
    except glue.exceptions.EntityNotFoundException:
        with contextlib.suppress(glue.exceptions.AlreadyExistsException):
            glue.create_database(DatabaseInput={"Name": database})
    try:
        glue.create_table(DatabaseName=database, TableInput=table_input)
        return "created"
    except glue.exceptions.AlreadyExistsException:
        glue.update_table(DatabaseName=database, TableInput=table_input)
        return "updated"
