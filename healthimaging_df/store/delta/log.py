"""The Delta log: where a table is, how to reach it, what our commits say, what a folder holds.

Every commit of this library carries ``commitInfo.healthimaging_df`` (the format marker, the exact
Arrow schema, the partition columns, row counts) and ``commitInfo.userMetadata`` (the provenance as
JSON). :func:`state_at` reads the one commit a version needs (one object read); the full listing
is ``maintenance.history`` through ``DeltaTable.history()``.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthimaging_df.aws import session as aws_session
from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.store.errors import CONFLICT_HELP, translated

if TYPE_CHECKING:
    from deltalake import DeltaTable

FORMAT = "healthimaging_df.store.delta-snapshot"
FORMAT_VERSION = 1
COMMIT_KEY = "healthimaging_df"
# operations of other tools that change files but not rows: a table stays ours through them
MAINTENANCE = frozenset({"VACUUM START", "VACUUM END", "OPTIMIZE", "SET TBLPROPERTIES"})

# -- locations and options -------------------------------------------------------------------


def table_location(uri: str | os.PathLike[str]) -> str:
    """A table's location: an absolute local path or ``s3://bucket/prefix``, else a typed error."""
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


# delta-rs ``storage_options`` from a boto3 session (the default session when None), its
# credentials as of now: one definition, in ``aws.session`` with every other client and option
s3_storage_options = aws_session.delta_storage_options


def options_for(location: str, storage_options: Mapping[str, str] | None) -> dict[str, str] | None:
    """delta-rs storage options: those given (checked), else the default session's for S3."""
    if storage_options is not None:
        if not isinstance(storage_options, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in storage_options.items()
        ):
            raise QueryValidationError("storage_options", "must map option names to strings")
        return dict(storage_options)
    if location.startswith("s3://"):
        return s3_storage_options()
    return None


# -- the log ------------------------------------------------------------------------------------


def log_fs(location: str, options: dict[str, str] | None) -> Any:
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
    with translated("opening the S3 location"):
        s3 = pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    return pafs.SubTreeFileSystem(location[len("s3://") :], s3)


def commit_info(fs: Any, version: int) -> dict[str, Any] | None:
    """The ``commitInfo`` of *version*, with ``_committed_at`` (None if its log file is gone).

    ``_committed_at`` is the log file's modification time: what delta-rs resolves ``as_of``
    against (the commitInfo timestamp is taken a moment before the file is written).
    """
    name = f"_delta_log/{version:020d}.json"
    try:
        with fs.open_input_stream(name) as handle:
            data = handle.read()
        mtime = fs.get_file_info(name).mtime
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


def ours(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """Our commit marker in a ``commitInfo`` (None for another tool's commit)."""
    meta = info.get(COMMIT_KEY)
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        return meta
    return None


@dataclass(frozen=True)
class State:
    """What our commits say about one version: marker, schema, partitioning, provenance."""

    version: int
    meta: dict[str, Any]
    provenance: dict[str, Any]
    timestamp: datetime

    @property
    def arrow_schema(self) -> pa.Schema:
        """The exact Arrow schema the rows were written with."""
        try:
            return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.meta["arrow_schema"])))
        except (KeyError, ValueError, TypeError, pa.ArrowException):
            raise SnapshotError("the table's commit metadata is damaged (schema)") from None


def state_at(fs: Any, version: int) -> State:
    """The provenance in force at *version*: its own commit, or ours before maintenance commits."""
    at = version
    timestamp: datetime | None = None
    while at >= 0:
        info = commit_info(fs, at)
        if info is None:
            raise SnapshotError(
                "the log entry with this version's provenance was cleaned up "
                "(delta.logRetentionDuration); re-export to get a readable history"
            )
        if timestamp is None:
            timestamp = timestamp_of(info)
        meta = ours(info)
        if meta is not None:
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise SnapshotError("the table was written by a newer healthimaging_df; upgrade")
            return State(version, meta, provenance_of(info), timestamp)
        if str(info.get("operation", "")) not in MAINTENANCE:
            break
        at -= 1
    raise SnapshotError(
        "this Delta table was not written by healthimaging_df (its commit has no provenance); "
        "read it with deltalake.DeltaTable, or write the snapshot to a new path"
    )


def provenance_of(info: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance JSON of a ``commitInfo`` (``userMetadata``)."""
    try:
        prov = json.loads(info.get("userMetadata") or "{}")
    except (TypeError, ValueError):
        raise SnapshotError("the table's commit metadata is damaged (provenance)") from None
    if not isinstance(prov, dict):
        raise SnapshotError("the table's commit metadata is damaged (provenance)")
    return prov


def timestamp_of(info: Mapping[str, Any]) -> datetime:
    """A commit's time: its log file's modification time, else its ``timestamp``."""
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
    infos = log_fs(location, options).get_file_info(selector)
    return [info for info in infos if info.type == pafs.FileType.File]


def _all_written_by_delta_rs(
    location: str, options: dict[str, str] | None, paths: Sequence[str]
) -> bool:
    """Whether every file is a whole Parquet file written by delta-rs (``created_by`` parquet-rs).

    Such a folder without a log is what a crashed (or a concurrent) first write leaves: writing
    the first version into it is safe, because version 0 is committed create-if-absent. Spark
    names its files alike but its footers say ``parquet-mr``: those folders are never written to.
    """
    table_fs = log_fs(location, options)
    for path in paths:
        try:
            created_by = str(pq.read_metadata(path, filesystem=table_fs).created_by or "")
        except (OSError, pa.ArrowException):
            return False  # a file still being written, or not Parquet
        if not created_by.startswith("parquet-rs"):
            return False
    return True


_LOG_ENTRY = re.compile(r"\d{20}\.(json|checkpoint(\.\d+\.\d+)?\.parquet)|_last_checkpoint")


def classify(location: str, options: dict[str, str] | None) -> str:
    """What is at *location*: ``"empty"``, ``"table"``, ``"debris"``, ``"creating"``, ``"other"``.

    Debris: only whole delta-rs data files; creating: only fresh files with delta-rs names.
    """
    files = _listing(location, options)
    if not files:
        return "empty"
    paths = [info.path.replace("\\", "/") for info in files]
    logged = [path.rsplit("/", 1)[-1] for path in paths if path.split("/")[-2:-1] == ["_delta_log"]]
    if any(_LOG_ENTRY.fullmatch(name) for name in logged):
        return "table"
    if logged:  # no commit yet: a first commit under way (fresh), or debris of one
        return "creating" if _fresh(files) else "other"
    if all(_DELTA_PART.fullmatch(path.rsplit("/", 1)[-1]) for path in paths):
        if _all_written_by_delta_rs(location, options, paths):
            return "debris"
        if _fresh(files):
            return "creating"
    return "other"


def _fresh(files: Sequence[Any]) -> bool:
    """Whether the newest of *files* is younger than the grace given a first commit under way."""
    newest = max((info.mtime for info in files if info.mtime is not None), default=None)
    if newest is None:
        return False
    moment = newest if newest.tzinfo else newest.replace(tzinfo=timezone.utc)
    return bool(datetime.now(timezone.utc) - moment < _CREATION_GRACE)


def open_table(
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
    with translated(action):
        kind = classify(location, options)
    if kind == "debris" and missing_ok:  # a crashed first write: version 0 is still free
        return None
    if kind == "creating" and missing_ok:  # a writer's first commit is under way
        raise SnapshotConflictError(f"{action}: {CONFLICT_HELP}")
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
    with translated(action):
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


def schema_b64(table_schema: pa.Schema) -> str:
    """*table_schema* without metadata, as base64 Arrow IPC (kept in our commit marker)."""
    return base64.b64encode(table_schema.remove_metadata().serialize().to_pybytes()).decode()


def commit_properties(
    prov: dict[str, Any], meta: dict[str, Any], *, retries: int | None = 0
) -> Any:
    """delta-rs ``CommitProperties`` carrying our marker *meta* and the provenance *prov*."""
    from deltalake import CommitProperties

    custom = {
        COMMIT_KEY: {"format": FORMAT, "format_version": FORMAT_VERSION, **meta},
        "userMetadata": json.dumps(prov, sort_keys=True, allow_nan=False),
    }
    return CommitProperties(custom_metadata=custom, max_commit_retries=retries)


def writer_properties() -> Any:
    """Parquet settings of every data file: zstd."""
    from deltalake import WriterProperties

    return WriterProperties(compression="ZSTD")


def files_of(table: DeltaTable) -> dict[str, int]:
    """Size of each data file of the table's loaded version, by its log path."""
    actions = pa.table(table.get_add_actions(flatten=True))
    return dict(
        zip(
            actions.column("path").to_pylist(),
            actions.column("size_bytes").to_pylist(),
            strict=True,
        )
    )


def row_count(table: DeltaTable) -> int:
    """Rows of the table's loaded version (from the log's statistics)."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if "num_records" not in actions.column_names or actions.num_rows == 0:
        return 0
    return int(pc.sum(actions.column("num_records")).as_py() or 0)
