"""Parquet snapshots: export a query, read it back typed, refresh it incrementally, resume exports.

Layout (see ``docs/snapshots.md``):

- ``…/name.parquet``: one Parquet file, replaced atomically (a local rename; on S3 one PUT, which
  S3 makes visible all at once). Its provenance is in the file's key-value metadata (key
  ``healthimaging_df``).
- any other path: a directory (or S3 prefix) holding a Delta Lake table written through
  ``healthimaging_df.store.delta`` (atomic commits, optimistic concurrency, time travel, MERGE). Each
  commit carries the provenance; rows are written in ``createdAt`` order so a refresh's MERGE
  rewrites few files.

``read_snapshot`` puts the provenance back in ``df.attrs["healthimaging_df"]``. Single-file
storage (local disk or S3) is in ``healthimaging_df.store.storage``, Arrow and Parquet conversions in
``healthimaging_df.store.tables``; the fetch behind an export runs in ``healthimaging_df.engine`` and
incremental refresh is ``healthimaging_df.refresh``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol, overload

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from healthimaging_df import engine, schema
from healthimaging_df._version import __version__
from healthimaging_df.core import checks
from healthimaging_df.engine import provenance
from healthimaging_df.engine.checkpoint import Checkpoint, fingerprint, private_root, private_store
from healthimaging_df.engine.spill import SortedRows, spill_prefix
from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.plan import Plan
from healthimaging_df.store import delta
from healthimaging_df.store.redact import SHIFTED_COLUMNS, RedactionPolicy, apply_redaction
from healthimaging_df.store.storage import (
    CHECKPOINT_SUFFIX,
    FORMAT_VERSION,
    S3Store,
    Target,
    open_target,
)
from healthimaging_df.store.tables import (
    frame_to_table,
    iso,
    table_to_frame,
    table_watermark,
    write_parquet,
)

if TYPE_CHECKING:
    from healthimaging_df.core.progress import Progress


class ExportableQuery(Protocol):
    """What an export needs of a query (``Query`` has it; ``Query`` imports this module)."""

    @property
    def row_limit(self) -> int | None:
        """The query's limit, if any."""

    def compile(self, now: datetime | None = ..., stats: Any = ..., strategy: Any = ...) -> Plan:
        """The query's plan."""

    def to_json(self) -> str:
        """The query as canonical JSON."""


__all__ = [
    "CHECKPOINT_SUFFIX",
    "DERIVED_COLUMNS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "TARGET_FILE_SIZE",
    "SnapshotHistory",
    "SnapshotInfo",
    "export_query",
    "frame_to_table",
    "read_snapshot",
    "redacted_provenance",
    "scan_snapshot",
    "snapshot_history",
    "snapshot_provenance",
    "vacuum_snapshot",
    "write_snapshot",
]

METADATA_KEY = provenance.KEY
DERIVED_COLUMNS: dict[str, str] = {"StudyYear": "year of StudyDateTime (derived for partitioning)"}
# data files of directory snapshots are closed at this size (about 1,500 rows): small enough that a
# refresh's MERGE rewrites a small part of a large table (at 1 MiB, 100,000 rows in 9 Modality
# partitions are one file per partition and a MERGE rewrites a quarter of the table), large
# enough for scans
TARGET_FILE_SIZE = 128 * 1024


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    """What a write produced.

    Attributes
    ----------
    path
        The snapshot's path as given.
    rows
        Rows written.
    files
        Data files of this version (full paths or ``s3://`` URIs; they embed partition values,
        so keep them out of logs).
    bytes
        Total size of the data files.
    partition_cols
        Hive partition columns (empty for an unpartitioned snapshot).
    provenance
        The provenance stored with it (also in ``read_snapshot(path).attrs``).
    resumed_tasks
        Fetch tasks taken from a checkpoint of an interrupted run (0 for a fresh run).
    version
        The Delta version this write committed (None for a single-file snapshot).
    bytes_written
        Bytes of the data files this write added (equal to *bytes* for a single file).
    glue
        ``"created"`` or ``"updated"`` when a Glue table was registered, else None.
    """

    path: str
    rows: int
    files: tuple[str, ...] = field(repr=False)
    bytes: int
    partition_cols: tuple[str, ...]
    provenance: dict[str, Any] = field(repr=False)
    resumed_tasks: int = 0
    version: int | None = None
    bytes_written: int | None = None
    glue: str | None = None

    def __str__(self) -> str:
        resumed = f", resumed {self.resumed_tasks} checkpointed tasks" if self.resumed_tasks else ""
        return (
            f"snapshot {self.path}: {self.rows} rows in {len(self.files)} file(s), "
            f"{self.bytes} bytes{resumed}"
        )


# -- write --------------------------------------------------------------------------------------


def write_snapshot(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    partition_cols: Sequence[str] | None = None,
    redact: RedactionPolicy | None = None,
    provenance: dict[str, Any] | None = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
    glue_table: str | None = None,
) -> SnapshotInfo:
    """Write *df* as a snapshot, atomically replacing any previous snapshot at *path*.

    Parameters
    ----------
    df
        A frame of this library (its ``attrs`` provenance is stored) or any frame whose columns of
        schema names have schema-compatible values.
    path
        ``….parquet`` for one file; anything else for a Delta table (a new version of it when
        one is there). Local path or ``s3://bucket/prefix``.
    partition_cols
        Hive partition columns (directory snapshots only), e.g. ``["Modality"]``; ``"StudyYear"``
        is derived from ``StudyDateTime`` when the frame lacks it.
    redact
        A :class:`~healthimaging_df.store.redact.RedactionPolicy` to apply first; None writes the frame
        as it is, PHI included.
    provenance
        Provenance to store; ``df.attrs["healthimaging_df"]`` when None.
    boto3_session, region, s3_endpoint_url
        How to reach S3 (default session and its region; an endpoint for S3-compatible stores).
    kms_key_id
        Encrypt S3 objects with SSE-KMS under this key (ID, alias or ARN).
    compression, row_group_size
        Parquet settings (of single-file snapshots; Delta tables are written zstd).
    glue_table
        ``"database.table"``: create or update this Glue table for the snapshot (an ``s3://``
        directory), for Athena and EMR.

    Returns
    -------
    SnapshotInfo
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    check_redact(redact)
    check_glue_table(glue_table, path)
    _check_parquet_options(compression, row_group_size)
    target = open_target(
        path,
        boto3_session=boto3_session,
        region=region,
        s3_endpoint_url=s3_endpoint_url,
        kms_key_id=kms_key_id,
    )
    prov = dict(provenance if provenance is not None else df.attrs.get(METADATA_KEY) or {})
    if redact is not None:
        if prov.get("redaction"):
            raise SnapshotError("the frame is already redacted; pass redact=None")
        df = apply_redaction(df, redact)
        prov = redacted_provenance(prov, redact)
    info = write_table(
        target,
        os.fspath(path),
        frame_to_table(df),
        prov,
        partition_cols,
        compression,
        row_group_size,
    )
    return register_glue(target, info, glue_table)


def check_glue_table(glue_table: Any, path: Any) -> None:
    """Refuse a Glue registration that cannot work, before anything runs."""
    if glue_table is None:
        return
    if not isinstance(glue_table, str) or glue_table.count(".") != 1:
        raise QueryValidationError("glue_table", "must be 'database.table'")
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    if not isinstance(text, str) or not text.startswith("s3://") or text.endswith(".parquet"):
        raise QueryValidationError("glue_table", "needs an s3:// directory (Delta) snapshot path")


def register_glue(target: Target, info: SnapshotInfo, glue_table: str | None) -> SnapshotInfo:
    """Create or update the Glue table *glue_table* for the Delta table just written."""
    if glue_table is None:
        return info
    store = target.store
    assert isinstance(store, S3Store)
    uri, options = delta_location(target)
    head = delta.read_table(uri, filters=pc.scalar(False), storage_options=options)
    outcome = delta.register_glue_table(
        glue_table,
        uri,
        head.table.schema,
        head.partition_by,
        boto3_session=store.session,
        region=store.region,
        endpoint_url=_glue_endpoint(store.endpoint_url),
    )
    return replace(info, glue=outcome)


def _glue_endpoint(s3_endpoint: str | None) -> str | None:
    """Glue on the same local endpoint as S3 (moto serves both); AWS's own endpoint otherwise."""
    if s3_endpoint and not s3_endpoint.rstrip("/").endswith("amazonaws.com"):
        return s3_endpoint
    return None


def check_partition_cols(target: Target, partition_cols: Sequence[str] | None) -> list[str]:
    """The partition columns, checked against the schema and the path before anything runs."""
    parts = _names_argument("partition_cols", partition_cols) or []
    if len(set(parts)) != len(parts):
        raise QueryValidationError("partition_cols", "names a column twice")
    if target.single_file and parts:
        raise QueryValidationError(
            "partition_cols", "needs a directory path (not one ending in .parquet)"
        )
    return parts


def _check_schema_partitions(parts: list[str]) -> None:
    known = set(schema.COLUMN_NAMES) | set(DERIVED_COLUMNS)
    for position, name in enumerate(parts):
        if name not in known:
            raise QueryValidationError(
                "partition_cols", "must be schema columns (or StudyYear)", position
            )


def check_redact(redact: Any) -> None:
    if redact is not None and not isinstance(redact, RedactionPolicy):
        raise QueryValidationError("redact", "must be a RedactionPolicy or None")


def _check_parquet_options(compression: Any, row_group_size: Any) -> None:
    if not isinstance(compression, str) or (
        compression.lower() != "none" and not _codec_available(compression)
    ):
        raise QueryValidationError("compression", "must be a Parquet codec pyarrow has (or none)")
    if (
        isinstance(row_group_size, bool)
        or not isinstance(row_group_size, int)
        or row_group_size < 1
    ):
        raise QueryValidationError("row_group_size", "must be a positive integer")


def _codec_available(name: str) -> bool:
    try:
        return bool(pa.Codec.is_available(name))
    except ValueError:
        return False


def _names_argument(argument: str, names: Sequence[str] | None) -> list[str] | None:
    """*names* as a list, refusing one string (which would read as a list of letters)."""
    if names is None:
        return None
    if isinstance(names, str):
        raise QueryValidationError(argument, "must be a list of column names, not one string")
    out = list(names)
    for position, name in enumerate(out):
        if not isinstance(name, str):
            raise QueryValidationError(argument, "column names must be strings", position)
    return out


def redacted_provenance(prov: dict[str, Any], policy: RedactionPolicy) -> dict[str, Any]:
    """Provenance without PHI: the query's values and the plan's requests are replaced."""
    return provenance.redacted(prov, policy)


def write_table(
    target: Target,
    display_path: str,
    table: pa.Table | SortedRows,
    provenance: dict[str, Any],
    partition_cols: Sequence[str] | None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
    redact: Callable[[pa.Table], pa.Table] | None = None,
) -> SnapshotInfo:
    """Write *table* as the snapshot at *target*, its provenance completed (rows, watermark).

    A single file is written as a stream of row groups, never whole in memory; *redact* (only
    one that leaves ``updatedAt`` as it is) is then applied one row group at a time. A
    :class:`SortedRows` (an export's result, on disk) is read a row group at a time for either
    kind of target: a single file in the result's order, a Delta table as an Arrow stream that
    delta-rs writes as it reads (the rows must come in :data:`FILE_ORDER`).
    """
    if isinstance(table, SortedRows):
        if target.single_file:
            return _write_sorted(
                target, display_path, table, provenance, compression, row_group_size, redact
            )
        return _write_sorted_delta(
            target, display_path, table, provenance, partition_cols, row_group_size, redact
        )
    if redact is not None and not target.single_file:
        table, redact = redact(table), None
    parts = check_partition_cols(target, partition_cols)
    derived = [name for name in parts if name not in table.column_names]
    table = derive_columns(table, derived)
    _check_partition_types(table.schema, parts)

    columns = table.column_names if redact is None else redact(table.slice(0, 0)).column_names
    watermark = table_watermark(table) if "updatedAt" in columns else None
    prov, file_meta = _file_metadata(provenance, table.num_rows, watermark, columns, parts, derived)
    store = target.store
    if target.single_file:
        groups = _row_groups(table, row_group_size, redact)
        size = store.put_stream(
            target.name,
            lambda sink: write_parquet(sink, groups, file_meta, compression, row_group_size),
        )
        return SnapshotInfo(
            display_path,
            table.num_rows,
            (store.uri(target.name),),
            size,
            (),
            prov,
            bytes_written=size,
        )
    return _write_delta(target, display_path, file_order(table), table.num_rows, prov, parts)


def _check_partition_types(table_schema: pa.Schema, parts: list[str]) -> None:
    for name in parts:
        kind = table_schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise SnapshotError(f"partition column {name!r} must hold text, integers or flags")
    if len(parts) >= len(table_schema.names):
        raise SnapshotError("partition_cols cannot cover every column")


def _write_delta(
    target: Target,
    display_path: str,
    data: pa.Table | pa.RecordBatchReader,
    rows: int,
    prov: dict[str, Any],
    parts: list[str],
) -> SnapshotInfo:
    """Commit *data* (*rows* rows, in file order) as the Delta table at *target*."""
    uri, options = delta_location(target)
    try:
        result = delta.write_table(
            uri,
            data,
            prov,
            partition_by=parts,
            storage_options=options,
            target_file_size=TARGET_FILE_SIZE,
            num_rows=rows,
        )
    except SnapshotConflictError:
        raise
    except QueryValidationError as exc:
        raise SnapshotError(f"writing the snapshot: {exc}") from None
    return SnapshotInfo(
        display_path,
        result.rows,
        result.files,
        result.bytes,
        tuple(parts),
        prov,
        version=result.version,
        bytes_written=result.bytes_written,
    )


def _write_sorted_delta(
    target: Target,
    display_path: str,
    rows: SortedRows,
    provenance: dict[str, Any],
    partition_cols: Sequence[str] | None,
    row_group_size: int,
    redact: Callable[[pa.Table], pa.Table] | None,
) -> SnapshotInfo:
    """:func:`write_table` of an export's result on disk to a Delta table, streamed.

    Each row group is redacted and given its derived columns as it is read; delta-rs consumes the
    stream file by file, so memory holds a row group and delta-rs' open files, not the result.
    """
    parts = check_partition_cols(target, partition_cols)
    columns = rows.column_names if redact is None else redact(rows.empty()).column_names
    derived = [name for name in parts if name not in columns]
    groups = rows.groups(row_group_size)
    if redact is not None:
        groups = (redact(group) for group in groups)
    groups = (derive_columns(group, derived) for group in groups)
    first = next(groups)  # the bucketing pass runs here; an empty result is one empty group
    _check_partition_types(first.schema, parts)
    watermark = rows.watermark if "updatedAt" in columns else None
    prov, _ = _file_metadata(provenance, rows.num_rows, watermark, columns, parts, derived)
    batches = (batch for group in itertools.chain([first], groups) for batch in group.to_batches())
    reader = pa.RecordBatchReader.from_batches(first.schema, batches)
    return _write_delta(target, display_path, reader, rows.num_rows, prov, parts)


def _file_metadata(
    provenance: dict[str, Any],
    rows: int,
    watermark: datetime | None,
    columns: list[str],
    parts: list[str],
    derived: list[str],
) -> tuple[dict[str, Any], dict[bytes, bytes]]:
    """The completed provenance and the file's footer metadata."""
    prov = dict(provenance)
    prov.setdefault("schema_version", schema.SCHEMA_VERSION)
    prov.setdefault("library_version", __version__)
    prov.setdefault("redaction", None)
    prov["row_count"] = rows
    prov["watermark"] = iso(watermark)
    meta = {
        "format": "healthimaging_df.snapshot",
        "format_version": FORMAT_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(),
        "written_by": __version__,
        "partition_cols": parts,
        "derived_columns": derived,
        "columns": [c for c in columns if c not in derived],
        "provenance": prov,
    }
    return prov, {METADATA_KEY.encode(): json.dumps(meta, sort_keys=True).encode()}


def _write_sorted(
    target: Target,
    display_path: str,
    rows: SortedRows,
    provenance: dict[str, Any],
    compression: str,
    row_group_size: int,
    redact: Callable[[pa.Table], pa.Table] | None,
) -> SnapshotInfo:
    """:func:`write_table` of an export's result on disk to a single file, a row group at a time."""
    columns = rows.column_names if redact is None else redact(rows.empty()).column_names
    watermark = rows.watermark if "updatedAt" in columns else None
    prov, file_meta = _file_metadata(provenance, rows.num_rows, watermark, columns, [], [])
    groups = rows.groups(row_group_size)
    if redact is not None:
        groups = (redact(group) for group in groups)
    store = target.store
    size = store.put_stream(
        target.name,
        lambda sink: write_parquet(sink, groups, file_meta, compression, row_group_size),
    )
    return SnapshotInfo(
        display_path, rows.num_rows, (store.uri(target.name),), size, (), prov, bytes_written=size
    )


def _row_groups(
    table: pa.Table, rows: int, redact: Callable[[pa.Table], pa.Table] | None
) -> Iterator[pa.Table]:
    """*table* whole, or redacted in slices of *rows* rows (the file's row groups)."""
    if redact is None:
        yield table
        return
    for start in range(0, max(table.num_rows, 1), rows):
        yield redact(table.slice(start, rows))


def derive_columns(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """*table* with the derived columns *names* appended (``StudyYear`` from ``StudyDateTime``)."""
    for name in names:
        if name in table.column_names:
            continue
        if name == "StudyYear" and "StudyDateTime" in table.column_names:
            year = pc.cast(pc.year(table.column("StudyDateTime")), pa.int64())
            table = table.append_column("StudyYear", year)
        else:
            raise SnapshotError(f"partition column {name!r} is not in the frame")
    return table


# A Delta snapshot's rows by createdAt (ties by imageSetId), whatever the query's order
FILE_ORDER = ("createdAt", True)


def file_order(table: pa.Table) -> pa.Table:
    """Rows in :data:`FILE_ORDER` (then imageSetId): a refresh then rewrites few files.

    Changes in HealthImaging concentrate on recently imported image sets; with rows in creation
    order they sit in the last files of each partition, and a MERGE rewrites only those.
    """
    keys = [(c, "ascending") for c in (FILE_ORDER[0], "imageSetId") if c in table.column_names]
    return table.sort_by(keys) if keys else table


def delta_location(target: Target) -> tuple[str, dict[str, str] | None]:
    """The Delta table's URI and delta-rs storage options (S3: from the target's session)."""
    store = target.store
    uri = store.uri(target.name)
    if isinstance(store, S3Store):
        options = delta.s3_storage_options(
            store.session, endpoint_url=store.endpoint_url, region=store.region
        )
        if store.kms_key_id:
            options["AWS_SERVER_SIDE_ENCRYPTION"] = "aws:kms"
            options["AWS_SSE_KMS_KEY_ID"] = store.kms_key_id
        return uri, options
    return uri, None


# -- read ---------------------------------------------------------------------------------------


def _check_chunk_rows(chunk_rows: Any) -> None:
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        raise QueryValidationError("chunk_rows", "must be a positive integer or None")


@overload
def read_snapshot(
    path: str | os.PathLike[str],
    *,
    dtype_backend: schema.DtypeBackend = ...,
    columns: Sequence[str] | None = ...,
    filters: Any = ...,
    version: int | None = ...,
    as_of: datetime | None = ...,
    chunk_rows: None = ...,
    boto3_session: Any = ...,
    region: str | None = ...,
    s3_endpoint_url: str | None = ...,
) -> pd.DataFrame: ...


@overload
def read_snapshot(
    path: str | os.PathLike[str],
    *,
    dtype_backend: schema.DtypeBackend = ...,
    columns: Sequence[str] | None = ...,
    filters: Any = ...,
    version: int | None = ...,
    as_of: datetime | None = ...,
    chunk_rows: int,
    boto3_session: Any = ...,
    region: str | None = ...,
    s3_endpoint_url: str | None = ...,
) -> Iterator[pd.DataFrame]: ...


def read_snapshot(
    path: str | os.PathLike[str],
    *,
    dtype_backend: schema.DtypeBackend = "numpy_nullable",
    columns: Sequence[str] | None = None,
    filters: Any = None,
    version: int | None = None,
    as_of: datetime | None = None,
    chunk_rows: int | None = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """Read a snapshot back as a typed frame with its provenance in ``attrs``.

    Parameters
    ----------
    path
        What ``write_snapshot``/``to_parquet`` wrote: a ``.parquet`` file or a snapshot directory
        (a Delta table).
    dtype_backend
        ``"numpy_nullable"`` or ``"pyarrow"``.
    columns
        Only these columns (in this order); partition and derived columns may be named.
    filters
        Row filter: a ``pyarrow.compute`` expression or DNF tuples as in ``pandas.read_parquet``
        (``[("Modality", "==", "CT")]``); partition filters skip whole files.
    version, as_of
        Time travel (directory snapshots): the version numbered *version* (see
        :func:`snapshot_history`), or the latest version committed at or before *as_of* (naive
        means UTC). Both None: the latest.
    chunk_rows
        Yield frames of at most this many rows instead of one frame (bounded memory; each frame
        typed and with the provenance in ``attrs``; rows in file order).
    boto3_session, region, s3_endpoint_url
        How to reach S3.

    Returns
    -------
    pandas.DataFrame or iterator of pandas.DataFrame
        The same columns, dtypes and values as written. A directory snapshot comes back in the
        query's result order (sort column, then imageSetId).
    """
    if dtype_backend not in schema.DTYPE_BACKENDS:
        raise QueryValidationError("dtype_backend", f"must be one of {schema.DTYPE_BACKENDS}")
    columns = _names_argument("columns", columns)
    _check_chunk_rows(chunk_rows)
    target = open_target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    _check_time_travel(target, version, as_of)
    if chunk_rows is not None:
        return _read_chunks(target, columns, filters, version, as_of, chunk_rows, dtype_backend)
    table, meta = read_table(target, columns, filters, version=version, as_of=as_of)
    order = list(columns) if columns is not None else meta["columns"]
    frame = table_to_frame(table, dtype_backend, order)
    if (meta["partition_cols"] or not target.single_file) and columns is None:
        frame = _canonical_order(frame, meta["provenance"])
    frame.attrs[METADATA_KEY] = dict(meta["provenance"])
    return frame


def _check_time_travel(target: Target, version: Any, as_of: Any) -> None:
    if version is not None and as_of is not None:
        raise QueryValidationError("version", "give version or as_of, not both")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise QueryValidationError("version", "must be a version number (int >= 0)")
    if isinstance(version, int) and version < 0:
        raise QueryValidationError("version", "must be a version number (int >= 0)")
    if as_of is not None and not isinstance(as_of, datetime):
        raise QueryValidationError("as_of", "must be a datetime")
    if target.single_file and (version is not None or as_of is not None):
        raise QueryValidationError(
            "version", "time travel needs a directory (Delta) snapshot, not a .parquet file"
        )


def _read_chunks(
    target: Target,
    columns: list[str] | None,
    filters: Any,
    version: int | None,
    as_of: datetime | None,
    chunk_rows: int,
    dtype_backend: schema.DtypeBackend,
) -> Iterator[pd.DataFrame]:
    """Frames of at most *chunk_rows* rows, checked and opened before the first one is asked for."""
    expression = delta.filter_expression(filters)
    if target.single_file:
        meta = _single_meta(target)
        location = target.store.arrow_path(target.name)
        try:
            scan = pads.dataset(location, filesystem=target.store.arrow_fs, format="parquet")
        except (FileNotFoundError, OSError) as exc:
            raise SnapshotError("reading the snapshot failed: the file cannot be read") from exc
    else:
        uri, options = delta_location(target)
        meta, scan = _delta_scan(uri, options, version, as_of)
    names = meta["columns"]
    wanted = _columns(columns, meta)
    delta.check_filter(expression, scan.schema.remove_metadata())
    order = list(columns) if columns is not None else names
    read = wanted if wanted is not None else names
    prov = dict(meta["provenance"])

    def frames() -> Iterator[pd.DataFrame]:
        try:
            batches = scan.to_batches(columns=read, filter=expression, batch_size=chunk_rows)
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                frame = table_to_frame(pa.Table.from_batches([batch]), dtype_backend, order)
                frame.attrs[METADATA_KEY] = dict(prov)
                yield frame
        except (OSError, pa.ArrowException):
            raise SnapshotError(
                "reading the snapshot failed: a data file is damaged or missing"
            ) from None

    return frames()


def _delta_scan(
    uri: str, options: dict[str, str] | None, version: int | None, as_of: datetime | None
) -> tuple[dict[str, Any], pads.Dataset]:
    scan = delta.dataset(uri, version=version, as_of=as_of, storage_options=options)
    head = delta.read_table(
        uri, version=version, as_of=as_of, filters=pc.scalar(False), storage_options=options
    )
    return _delta_meta(head), scan


def _delta_meta(read: delta.TableVersion) -> dict[str, Any]:
    """The snapshot description of one Delta version (its columns, partitions, provenance)."""
    parts = list(read.partition_by)
    derived = [c for c in parts if c in DERIVED_COLUMNS]
    return {
        "columns": [c for c in read.table.column_names if c not in derived],
        "partition_cols": parts,
        "derived_columns": derived,
        "provenance": read.provenance,
        "version": read.version,
        "timestamp": read.timestamp,
    }


def read_table(
    target: Target,
    columns: Sequence[str] | None,
    filters: Any,
    *,
    version: int | None = None,
    as_of: datetime | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of a snapshot (derived columns dropped unless named) and its description."""
    store = target.store
    expression = delta.filter_expression(filters)
    if target.single_file:
        meta = _single_meta(target)
        location = store.arrow_path(target.name)
        file_schema = pq.read_schema(location, filesystem=store.arrow_fs)
        delta.check_filter(expression, file_schema.remove_metadata())
        table = pq.read_table(
            location,
            filesystem=store.arrow_fs,
            columns=_columns(columns, meta),
            filters=expression,
            partitioning=None,
        )
        return table.replace_schema_metadata(None), meta

    uri, options = delta_location(target)
    if columns is not None or expression is not None:
        head = delta.read_table(
            uri, version=version, as_of=as_of, filters=pc.scalar(False), storage_options=options
        )
        meta = _delta_meta(head)
        wanted = _columns(columns, meta)
        delta.check_filter(expression, head.table.schema)
    else:
        wanted = None
    read = delta.read_table(
        uri,
        version=version,
        as_of=as_of,
        columns=wanted,
        filters=expression,
        storage_options=options,
    )
    meta = _delta_meta(read)
    table = read.table
    if columns is None:
        table = table.drop_columns([c for c in meta["derived_columns"] if c in table.column_names])
    return table, meta


def _single_meta(target: Target) -> dict[str, Any]:
    store = target.store
    try:
        file_schema = pq.read_schema(store.arrow_path(target.name), filesystem=store.arrow_fs)
    except (FileNotFoundError, OSError) as exc:
        raise SnapshotError(f"no snapshot at {store.uri(target.name)}") from exc
    return _file_meta(file_schema.metadata, store.uri(target.name))


def _columns(columns: Sequence[str] | None, meta: dict[str, Any]) -> list[str] | None:
    if columns is None:
        return None
    known = set(meta["columns"]) | set(meta.get("derived_columns", ()))
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise SnapshotError(f"columns not in the snapshot: {', '.join(unknown)}")
    return list(columns)


def _file_meta(metadata: dict[bytes, bytes] | None, where: str) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        raise SnapshotError(f"{where} has no healthimaging_df metadata; read it with pandas")
    try:
        meta: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise SnapshotError(f"{where} has damaged healthimaging_df metadata") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("provenance"), dict):
        raise SnapshotError(f"{where} has damaged healthimaging_df metadata")
    return meta


def _sort_spec(provenance: dict[str, Any]) -> tuple[str, bool]:
    with contextlib.suppress(Exception):
        query = json.loads(provenance["query"])
        if query.get("sort_by"):
            return str(query["sort_by"]), bool(query.get("ascending"))
    return "updatedAt", False


def _canonical_order(frame: pd.DataFrame, provenance: dict[str, Any]) -> pd.DataFrame:
    column, ascending = _sort_spec(provenance)
    keys = [c for c in (column, "imageSetId") if c in frame.columns]
    if not keys:
        return frame
    ordered = frame.sort_values(
        keys, ascending=[ascending, True][: len(keys)], kind="stable", na_position="last"
    )
    out: pd.DataFrame = ordered.reset_index(drop=True)
    return out


def snapshot_provenance(
    path: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> dict[str, Any]:
    """The provenance of a snapshot (of one version, the latest by default), without its rows."""
    target = open_target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    _check_time_travel(target, version, as_of)
    if target.single_file:
        return dict(_single_meta(target)["provenance"])
    uri, options = delta_location(target)
    head = delta.read_table(
        uri, version=version, as_of=as_of, filters=pc.scalar(False), storage_options=options
    )
    return dict(head.provenance)


def scan_snapshot(
    path: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> pads.Dataset:
    """A lazy ``pyarrow.dataset.Dataset`` of a snapshot, for DuckDB, Polars and Dask.

    Typed as written, with partition pruning; a directory snapshot at one version (latest by
    default; *version* / *as_of* as in :func:`read_snapshot`). Files are opened when scanned.
    """
    target = open_target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    _check_time_travel(target, version, as_of)
    if target.single_file:
        _single_meta(target)
        return pads.dataset(
            target.store.arrow_path(target.name), filesystem=target.store.arrow_fs, format="parquet"
        )
    uri, options = delta_location(target)
    return delta.dataset(uri, version=version, as_of=as_of, storage_options=options)


def snapshot_history(
    path: str | os.PathLike[str],
    *,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> pd.DataFrame:
    """Every version of a directory snapshot, newest first.

    Columns: ``version``, ``timestamp`` (UTC), ``operation`` (WRITE, MERGE, VACUUM END...),
    ``rows_added``, ``rows_updated``, ``rows_removed`` and ``provenance`` (a dict).
    """
    target = _directory_target(path, boto3_session, region, s3_endpoint_url)
    uri, options = delta_location(target)
    history: pd.DataFrame = SnapshotHistory(delta.history(uri, storage_options=options))
    return history


# provenance entries shown in a history's display: none holds a value of the query
_SHOWN_PROVENANCE = ("fetched_at", "refreshed_since", "library_version", "redacted")


class SnapshotHistory(pd.DataFrame):
    """:func:`snapshot_history`'s frame; shown (repr, notebook) without provenance values.

    A plain DataFrame in every other way (selections stay a ``SnapshotHistory``). Its
    ``provenance`` column holds the query and requests of each version (PHI, like the rows):
    the display replaces each dict by its value-free entries; ``frame["provenance"]`` still
    gives the dicts.
    """

    @property
    def _constructor(self) -> type[SnapshotHistory]:
        return SnapshotHistory

    def _shown(self) -> pd.DataFrame:
        frame: pd.DataFrame = pd.DataFrame(self)
        if "provenance" in frame.columns:
            frame["provenance"] = [_provenance_shown(p) for p in frame["provenance"]]
        return frame

    def __repr__(self) -> str:
        return repr(self._shown())

    def _repr_html_(self) -> str | None:
        shown = getattr(self._shown(), "_repr_html_")()  # noqa: B009 - not in pandas-stubs
        return None if shown is None else str(shown)


def _provenance_shown(prov: Any) -> str:
    if not isinstance(prov, dict):
        return "(none)"
    shown = [f"{k}={prov[k]}" for k in _SHOWN_PROVENANCE if prov.get(k) not in (None, "")]
    return "; ".join(["query withheld (PHI)", *shown])


def vacuum_snapshot(
    path: str | os.PathLike[str],
    *,
    retain: timedelta,
    dry_run: bool = True,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> int:
    """Delete data files no version of the last *retain* needs; returns how many (would) go.

    Versions older than *retain* cannot be read afterwards. ``dry_run=True`` (the default) only
    counts. *retain* is rounded up to whole hours.
    """
    target = _directory_target(path, boto3_session, region, s3_endpoint_url)
    uri, options = delta_location(target)
    return delta.vacuum(uri, retain=retain, dry_run=dry_run, storage_options=options)


def _directory_target(
    path: str | os.PathLike[str], boto3_session: Any, region: str | None, endpoint: str | None
) -> Target:
    target = open_target(path, boto3_session=boto3_session, region=region, s3_endpoint_url=endpoint)
    if target.single_file:
        raise QueryValidationError(
            "path", "history and vacuum need a directory (Delta) snapshot, not a .parquet file"
        )
    return target


# -- export with checkpoints ----------------------------------------------------------------


def export_query(
    query: ExportableQuery,
    path: str | os.PathLike[str],
    *,
    client: Any = None,
    boto3_session: Any = None,
    progress: Progress = None,
    max_concurrency: int = 8,
    max_tps: float | None = 25.0,
    partition_cols: Sequence[str] | None = None,
    redact: RedactionPolicy | None = None,
    resume: bool = True,
    checkpoint_interval: float = 5.0,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
    compression: str = "zstd",
    glue_table: str | None = None,
) -> SnapshotInfo:
    """Run *query* and write its result as a snapshot at *path*, checkpointing as it goes.

    Every option (partition columns against the schema, the output path's folder, the checkpoint
    interval, the fetch settings) is checked before the first request. Finished fetch tasks
    (request chains, or createdAt windows of a scan) and their rows are saved at most every
    *checkpoint_interval* seconds: next to the target (``<path>.ahi-checkpoint``), or for a
    redacted export in a private local folder (mode 0700) under the user's cache directory
    (``$HEALTHIMAGING_DF_CACHE`` or ``~/.cache/healthimaging_df``), never at the destination. If
    the process dies, the same call resumes from there: the result equals an uninterrupted run.
    The checkpoint is deleted once the snapshot is written. It holds unredacted rows (PHI).
    Matching rows wait on disk, not in memory, until the file is written in order a row group at a
    time: in the checkpoint, and in a private spill folder (mode 0700) beside a local target, in
    the private checkpoint folder for a redacted export, else the system's temporary folder. The
    spill folder is removed when the export ends, or by the next run after a kill.

    Parameters
    ----------
    query
        The query (``Query.to_parquet`` calls this).
    path
        Where to write; see :func:`write_snapshot`.
    client, boto3_session, progress, max_concurrency, max_tps
        As in ``Query.to_dataframe``; *boto3_session* also reaches S3.
    partition_cols, redact, region, s3_endpoint_url, kms_key_id, compression, glue_table
        As in :func:`write_snapshot`.
    resume
        Continue from a checkpoint of the same query if there is one; False starts afresh.
    checkpoint_interval
        Seconds between checkpoint saves (0 saves after every finished task).

    Returns
    -------
    SnapshotInfo
    """
    check_redact(redact)
    check_glue_table(glue_table, path)
    _check_parquet_options(compression, 128 * 1024)
    checks.flag("resume", resume)
    if isinstance(checkpoint_interval, bool) or not (
        isinstance(checkpoint_interval, (int, float)) and 0 <= checkpoint_interval < float("inf")
    ):
        raise QueryValidationError("checkpoint_interval", "must be a number of seconds >= 0")
    target = open_target(
        path,
        boto3_session=boto3_session,
        region=region,
        s3_endpoint_url=s3_endpoint_url,
        kms_key_id=kms_key_id,
    )
    parts = check_partition_cols(target, partition_cols)
    _check_schema_partitions(parts)
    target.store.check_writable()
    run = engine.prepare(client, boto3_session, progress, max_concurrency, max_tps)
    display = os.fspath(path)

    def write(table: pa.Table | SortedRows, info: dict[str, Any]) -> SnapshotInfo:
        written = _finish_write(target, display, table, info, parts, redact, compression)
        return register_glue(target, written, glue_table)

    if query.row_limit is not None:  # a small, sorted result: no checkpoints needed
        return engine.export(query.compile(), query.to_json(), run, write)
    # a redacted export's checkpoint and spill files hold raw rows: never beside the target
    location = private_store(target.store.uri(target.name)) if redact is not None else None
    spill_parent = (
        str(private_root()) if redact is not None else target.store.folder_of(target.name)
    )
    checkpoint = Checkpoint(target, fingerprint(query.to_json()), location)
    coverage = checkpoint.load() if resume else None
    if not resume:
        checkpoint.discard()
    # A resumed export keeps the access path it started with, so its chains are read again
    # alike (the coverage is by chain key, see checkpoint.chain_key). Not a QIDO-RS plan's:
    # forcing "qido" would turn a fallback into an error; its chains follow QIDO-RS's answer.
    forced = checkpoint.access if coverage is not None and checkpoint.access != "qido" else None
    plan = engine.choose(
        lambda stats: query.compile(now=checkpoint.now, stats=stats, strategy=forced), run
    )
    checkpoint.access = plan.access
    coverage = checkpoint.bind(plan, coverage)
    info = engine.export(
        plan,
        query.to_json(),
        run,
        write,
        checkpoint,
        coverage,
        checkpoint_interval,
        spill_parent,
        spill_prefix(target.store.uri(target.name)),
        order=None if target.single_file else FILE_ORDER,
    )
    checkpoint.discard()
    if checkpoint.resumed_tasks:
        info = replace(info, resumed_tasks=checkpoint.resumed_tasks)
    return info


def _finish_write(
    target: Target,
    display_path: str,
    table: pa.Table | SortedRows,
    prov: dict[str, Any],
    partition_cols: Sequence[str] | None,
    redact: RedactionPolicy | None,
    compression: str,
) -> SnapshotInfo:
    if redact is None:
        return write_table(target, display_path, table, prov, partition_cols, compression)
    policy = redact

    def redacted(part: pa.Table) -> pa.Table:
        return frame_to_table(apply_redaction(schema.arrow_to_pandas(part), policy))

    prov = redacted_provenance(prov, policy)
    changed = set(policy.hash) | (set(SHIFTED_COLUMNS) if policy.shift_dates else set())
    if "updatedAt" in changed:  # the watermark is of redacted values: redact the whole first
        table = redacted(table.table() if isinstance(table, SortedRows) else table)
        return write_table(target, display_path, table, prov, partition_cols, compression)
    return write_table(
        target, display_path, table, prov, partition_cols, compression, redact=redacted
    )
