"""Snapshots: export a query, read it back typed, refresh it incrementally, resume exports.

Where a snapshot lives (see ``docs/snapshots.md``), named the same way by every function here,
``Query.to_parquet`` / ``to_delta`` / ``to_iceberg``, ``df.ahi`` and the CLI:

- ``path="…/name.parquet"``: one Parquet file, replaced atomically; its provenance is in the
  file's key-value metadata (``healthimaging_df.store.single``);
- any other ``path`` (a folder or ``s3://bucket/prefix``): a Delta Lake table
  (``healthimaging_df.store.delta``), reader 1 / writer 2;
- ``iceberg_table="ns.table", catalog=URI[, warehouse=URI]``: an Apache Iceberg table
  (``healthimaging_df.store.iceberg``; ``sqlite:///…`` a SQL catalog, ``glue`` the AWS Glue
  catalog, ``http(s)://…`` a REST catalog).

Delta and Iceberg tables sit behind one interface (``store.table_format.TableFormat``): every
write, refresh and compaction is one commit carrying the provenance, rows are kept in
``createdAt`` order so a refresh rewrites few files, and every version can be read again.
``read_snapshot`` puts the provenance back in ``df.attrs["healthimaging_df"]``. The fetch behind
an export runs in ``healthimaging_df.engine``; incremental refresh is ``healthimaging_df.refresh``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, overload

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from healthimaging_df import engine, schema
from healthimaging_df.aws.quotas import SEARCH_TPS
from healthimaging_df.core import checks
from healthimaging_df.engine import provenance
from healthimaging_df.engine.checkpoint import Checkpoint, fingerprint, private_root, private_store
from healthimaging_df.engine.spill import spill_prefix
from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.options import (
    ReadLocation,
    S3Location,
    SnapshotReadOptions,
    WriteLocation,
    keywords,
)
from healthimaging_df.plan import Plan
from healthimaging_df.store import delta, layout, single
from healthimaging_df.store.errors import translated
from healthimaging_df.store.iceberg import IcebergFormat, IcebergTarget
from healthimaging_df.store.layout import DERIVED_COLUMNS, FILE_ORDER, derive_columns, file_order
from healthimaging_df.store.redact import SHIFTED_COLUMNS, RedactionPolicy, apply_redaction
from healthimaging_df.store.rows import RowGroups, TableRows
from healthimaging_df.store.storage import (
    CHECKPOINT_SUFFIX,
    FORMAT_VERSION,
    S3Store,
    Target,
    open_target,
)
from healthimaging_df.store.table_format import (
    TableFormat,
    TableInfo,
    TableVersion,
    check_filter,
    check_partition_types,
    column_names,
    filter_expression,
)
from healthimaging_df.store.tables import frame_to_table, table_to_frame

if TYPE_CHECKING:
    from typing_extensions import Unpack

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
    "FILE_ORDER",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "TARGET_FILE_SIZE",
    "Location",
    "SnapshotHistory",
    "SnapshotInfo",
    "TableInfo",
    "downgrade_snapshot",
    "export_query",
    "file_order",
    "frame_to_table",
    "locate",
    "optimize_snapshot",
    "read_snapshot",
    "redacted_provenance",
    "scan_snapshot",
    "snapshot_history",
    "snapshot_info",
    "snapshot_provenance",
    "vacuum_snapshot",
    "write_snapshot",
]

METADATA_KEY = provenance.KEY
# data files of table snapshots are closed at this size (about 1,500 rows): small enough that a
# refresh rewrites a small part of a large table, large enough for scans
TARGET_FILE_SIZE = layout.DEFAULT_TARGET_FILE_SIZE


# -- where a snapshot lives -----------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A snapshot's place: a single file (*target*), or a table (*table*, Delta or Iceberg).

    *target* is also where an export's checkpoint and spill files go (beside a file or a Delta
    folder); an Iceberg table has none (they go to the private local folder).
    """

    display: str
    target: Target | None
    table: TableFormat | None = field(default=None, repr=False)

    @property
    def single_file(self) -> bool:
        """Whether the snapshot is one Parquet file."""
        return self.table is None

    @property
    def kind(self) -> str:
        """``"file"``, ``"delta"`` or ``"iceberg"``."""
        return "file" if self.table is None else self.table.name


def locate(
    path: str | os.PathLike[str] | None = None,
    *,
    iceberg_table: str | None = None,
    catalog: str | None = None,
    warehouse: str | None = None,
    catalog_properties: Mapping[str, str] | None = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
) -> Location:
    """Where *path* (a file or a Delta folder) or *iceberg_table* in *catalog* is; checked only."""
    if iceberg_table is None:
        if catalog is not None or warehouse is not None or catalog_properties is not None:
            raise QueryValidationError("catalog", "catalog and warehouse go with iceberg_table")
        if path is None:
            raise QueryValidationError("path", "give a path, or iceberg_table= and catalog=")
        target = open_target(
            path,
            boto3_session=boto3_session,
            region=region,
            s3_endpoint_url=s3_endpoint_url,
            kms_key_id=kms_key_id,
        )
        display = os.fspath(path)
        if target.single_file:
            return Location(display, target)
        uri, options = delta_location(target)
        return Location(display, target, delta.DeltaFormat(uri, options))
    if path is not None:
        raise QueryValidationError("path", "give a path or iceberg_table=, not both")
    if catalog is None:
        raise QueryValidationError("catalog", "iceberg_table needs catalog= (a catalog URI)")
    if kms_key_id is not None:
        raise QueryValidationError(
            "kms_key_id", "an Iceberg table's encryption is the warehouse bucket's setting"
        )
    spec = IcebergTarget(
        iceberg_table,
        catalog,
        warehouse,
        dict(catalog_properties or {}),
        boto3_session,
        region,
        s3_endpoint_url,
    )
    return Location(iceberg_table, None, IcebergFormat(spec))


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


def _table_of(where: Location) -> TableFormat:
    if where.table is None:
        raise QueryValidationError(
            "path", "history, vacuum and optimize need a table (a directory or iceberg_table=)"
        )
    return where.table


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    """What a write produced.

    Attributes
    ----------
    path
        The snapshot's path (or Iceberg table identifier) as given.
    rows
        Rows written.
    files
        Data files of this version (full paths or URIs; they embed partition values,
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
        The table version this write committed (Delta version, Iceberg snapshot id; None for
        a single-file snapshot).
    bytes_written
        Bytes of the data files this write added (equal to *bytes* for a single file).
    glue
        ``"created"`` or ``"updated"`` when a Glue table was registered, else None.
    format
        ``"file"``, ``"delta"`` or ``"iceberg"``.
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
    format: str = "file"

    def __str__(self) -> str:
        resumed = f", resumed {self.resumed_tasks} checkpointed tasks" if self.resumed_tasks else ""
        return (
            f"snapshot {self.path}: {self.rows} rows in {len(self.files)} file(s), "
            f"{self.bytes} bytes{resumed}"
        )


# -- argument checks --------------------------------------------------------------------------


def check_glue_table(glue_table: Any, where: Location) -> None:
    """Refuse a Glue registration that cannot work, before anything runs."""
    if glue_table is None:
        return
    if not isinstance(glue_table, str) or glue_table.count(".") != 1:
        raise QueryValidationError("glue_table", "must be 'database.table'")
    if where.kind != "delta" or not where.display.startswith("s3://"):
        raise QueryValidationError(
            "glue_table",
            "needs an s3:// directory (Delta) snapshot path; an Iceberg table is registered by "
            "its catalog (catalog='glue')",
        )


def register_glue(where: Location, info: SnapshotInfo, glue_table: str | None) -> SnapshotInfo:
    """Create or update the Glue table *glue_table* for the Delta table just written."""
    if glue_table is None:
        return info
    assert where.target is not None
    store = where.target.store
    assert isinstance(store, S3Store)
    uri, options = delta_location(where.target)
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


def check_partition_cols(where: Location, partition_cols: Sequence[str] | None) -> list[str]:
    """The partition columns, checked against the schema and the path before anything runs."""
    parts = _names_argument("partition_cols", partition_cols) or []
    if len(set(parts)) != len(parts):
        raise QueryValidationError("partition_cols", "names a column twice")
    if where.single_file and parts:
        raise QueryValidationError(
            "partition_cols", "needs a directory path (not one ending in .parquet)"
        )
    return parts


def check_schema_partitions(parts: list[str]) -> None:
    """Partition columns must be text, integer or flag columns of the schema (or StudyYear)."""
    known = set(schema.COLUMN_NAMES) | set(DERIVED_COLUMNS)
    for position, name in enumerate(parts):
        if name not in known:
            raise QueryValidationError(
                "partition_cols", "must be schema columns (or StudyYear)", position
            )
        if name in schema.BY_NAME and schema.BY_NAME[name].kind not in ("string", "int", "bool"):
            raise QueryValidationError(
                "partition_cols",
                f"{name!r} is not a text, integer or flag column (a folder per value)",
                position,
            )


def check_redact(redact: Any) -> None:
    """*redact* must be a RedactionPolicy or None."""
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
    return None if names is None else column_names(argument, names)


def _check_foreign_folder(where: Location) -> None:
    """Refuse, before any request, a Delta path whose folder holds files but no table."""
    if where.kind == "delta" and where.table is not None:
        assert isinstance(where.table, delta.DeltaFormat)
        with translated("writing the snapshot"):
            kind = delta.log.classify(where.table.uri, where.table.storage_options)
        if kind == "other":
            raise QueryValidationError(
                "path",
                "the folder holds files but no Delta log (another tool's output); use a new path",
            )


def redacted_provenance(prov: dict[str, Any], policy: RedactionPolicy) -> dict[str, Any]:
    """Provenance without PHI: the query's values and the plan's requests are replaced."""
    return provenance.redacted(prov, policy)


# -- write --------------------------------------------------------------------------------------


@keywords(WriteLocation, locate)
def write_snapshot(
    df: pd.DataFrame,
    path: str | os.PathLike[str] | None = None,
    *,
    partition_cols: Sequence[str] | None = None,
    redact: RedactionPolicy | None = None,
    provenance: dict[str, Any] | None = None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
    glue_table: str | None = None,
    **location: Unpack[WriteLocation],
) -> SnapshotInfo:
    """Write *df* as a snapshot, atomically replacing any previous snapshot there.

    Parameters
    ----------
    df
        A frame of this library (its ``attrs`` provenance is stored) or any frame whose columns of
        schema names have schema-compatible values.
    path
        ``….parquet`` for one file; anything else for a Delta table (a new version of it when
        one is there). Local path or ``s3://bucket/prefix``. Leave it out for Iceberg.
    partition_cols
        Hive partition columns (tables only), e.g. ``["Modality"]``; ``"StudyYear"`` (the year
        of StudyDate, as ``where(StudyYear=...)`` means it) is derived when the frame lacks it.
        None keeps an existing table's partitioning (none for a new one).
    redact
        A :class:`~healthimaging_df.store.redact.RedactionPolicy` to apply first; None writes the frame
        as it is, PHI included.
    provenance
        Provenance to store; ``df.attrs["healthimaging_df"]`` when None.
    boto3_session, region, s3_endpoint_url
        How to reach S3 (and Glue): default session and its region; an endpoint for
        S3-compatible stores.
    kms_key_id
        Encrypt S3 objects with SSE-KMS under this key (ID, alias or ARN).
    compression, row_group_size
        Parquet settings (of single-file snapshots; tables are written zstd).
    glue_table
        ``"database.table"``: create or update this Glue table for the snapshot (an ``s3://``
        Delta directory), for Athena and EMR.
    iceberg_table, catalog, warehouse, catalog_properties
        An Iceberg table instead of *path*: ``"namespace.table"`` in the catalog *catalog*
        (``sqlite:///…``, ``glue``, ``http(s)://…``), new tables' files under *warehouse*;
        more pyiceberg catalog properties in *catalog_properties*.

    Returns
    -------
    SnapshotInfo
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    check_redact(redact)
    where = locate(path, **location)
    check_glue_table(glue_table, where)
    _check_parquet_options(compression, row_group_size)
    parts = check_partition_cols(where, partition_cols)
    prov = dict(provenance if provenance is not None else df.attrs.get(METADATA_KEY) or {})
    if redact is not None:
        if prov.get("redaction"):
            raise SnapshotError("the frame is already redacted; pass redact=None")
        df = apply_redaction(df, redact)
        prov = redacted_provenance(prov, redact)
    del parts  # checked; None (keep a table's partitioning) is passed on as None
    info = write_table(where, frame_to_table(df), prov, partition_cols, compression, row_group_size)
    return register_glue(where, info, glue_table)


def write_table(
    where: Location,
    table: pa.Table | RowGroups,
    provenance: dict[str, Any],
    partition_cols: Sequence[str] | None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
    redact: Callable[[pa.Table], pa.Table] | None = None,
) -> SnapshotInfo:
    """Write *table* as the snapshot at *where*, its provenance completed (rows, watermark).

    Rows come as a table or as :class:`~healthimaging_df.store.rows.RowGroups` (an export's result
    on disk), read a row group at a time: a single file in their order, a table (which must get
    them in :data:`FILE_ORDER`) as an Arrow stream its writer consumes as it goes. *redact* is
    applied a row group at a time (only one that leaves ``updatedAt`` as it is).
    """
    parts = check_partition_cols(where, partition_cols)
    if isinstance(table, pa.Table):
        rows: RowGroups = TableRows(table if where.single_file else file_order(table))
    else:
        rows = table
    if where.single_file:
        assert where.target is not None
        prov, size = single.write_file(
            where.target, rows, provenance, compression, row_group_size, redact
        )
        uri = where.target.store.uri(where.target.name)
        return SnapshotInfo(
            where.display, rows.num_rows, (uri,), size, (), prov, bytes_written=size
        )
    if partition_cols is None and where.table is not None and where.table.exists():
        parts = list(where.table.head().partition_by)  # None keeps the table's partitioning
    return _write_table_format(where, rows, provenance, parts, row_group_size, redact)


def _write_table_format(
    where: Location,
    rows: RowGroups,
    provenance: dict[str, Any],
    parts: list[str],
    row_group_size: int,
    redact: Callable[[pa.Table], pa.Table] | None,
) -> SnapshotInfo:
    """Stream *rows* into the table at *where* in one commit.

    Each row group is redacted and given its derived columns as it is read; the table writer
    consumes the stream file by file, so memory holds a row group and the writer's open files.
    """
    table = where.table
    assert table is not None
    columns = rows.column_names if redact is None else redact(rows.empty()).column_names
    derived = [name for name in parts if name not in columns]
    groups = rows.groups(row_group_size)
    if redact is not None:
        groups = (redact(group) for group in groups)
    groups = (derive_columns(group, derived) for group in groups)
    first = next(groups)  # an export's bucketing pass runs here; no rows is one empty group
    try:
        check_partition_types(first.schema, parts)
    except QueryValidationError as exc:
        raise SnapshotError(f"writing the snapshot: {exc}") from None
    watermark = rows.watermark if "updatedAt" in columns else None
    prov, _ = single.complete_provenance(
        provenance, rows.num_rows, watermark, columns, parts, derived
    )
    batches = (batch for group in itertools.chain([first], groups) for batch in group.to_batches())
    reader = pa.RecordBatchReader.from_batches(first.schema, batches)
    try:
        result = table.write(
            reader,
            prov,
            partition_by=parts,
            num_rows=rows.num_rows,
            target_file_size=TARGET_FILE_SIZE,
        )
    except SnapshotConflictError:
        raise
    except QueryValidationError as exc:
        raise SnapshotError(f"writing the snapshot: {exc}") from None
    return SnapshotInfo(
        where.display,
        result.rows,
        result.files,
        result.bytes,
        tuple(parts),
        prov,
        version=result.version,
        bytes_written=result.bytes_written,
        format=table.name,
    )


def commit_rows(
    where: Location,
    meta: dict[str, Any],
    result: pa.Table,
    incoming: pa.Table,
    removed: list[str],
    provenance: dict[str, Any],
) -> None:
    """A refresh's or a sync's commit: upsert *incoming*, delete *removed* by ID.

    A table (Delta or Iceberg) gets one MERGE based on the version read (*meta*, as
    :func:`read_table` described it), its rows in file order with the derived partition
    columns; a single file is rewritten whole as *result*.
    """
    if where.table is None:
        write_table(where, result, provenance, [])
        return
    where.table.merge(
        derive_columns(file_order(incoming), meta["derived_columns"]),
        removed,
        provenance,
        expected_version=meta.get("version"),
        target_file_size=TARGET_FILE_SIZE,
    )


# -- read ---------------------------------------------------------------------------------------


def _check_chunk_rows(chunk_rows: Any) -> None:
    checks.optional_positive_int("chunk_rows", chunk_rows)


@overload
def read_snapshot(
    path: str | os.PathLike[str] | None = ...,
    *,
    chunk_rows: None = ...,
    **options: Unpack[SnapshotReadOptions],
) -> pd.DataFrame: ...


@overload
def read_snapshot(
    path: str | os.PathLike[str] | None = ...,
    *,
    chunk_rows: int,
    **options: Unpack[SnapshotReadOptions],
) -> Iterator[pd.DataFrame]: ...


@keywords(ReadLocation, locate)
def read_snapshot(
    path: str | os.PathLike[str] | None = None,
    *,
    dtype_backend: schema.DtypeBackend = "numpy_nullable",
    columns: Sequence[str] | None = None,
    filters: Any = None,
    version: int | None = None,
    as_of: datetime | None = None,
    chunk_rows: int | None = None,
    **location: Unpack[ReadLocation],
) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """Read a snapshot back as a typed frame with its provenance in ``attrs``.

    Parameters
    ----------
    path
        What ``write_snapshot``/``to_parquet``/``to_delta`` wrote: a ``.parquet`` file or a
        snapshot directory (a Delta table). Leave it out for Iceberg.
    dtype_backend
        ``"numpy_nullable"`` or ``"pyarrow"``.
    columns
        Only these columns (in this order); partition and derived columns may be named.
    filters
        Row filter: a ``pyarrow.compute`` expression or DNF tuples as in ``pandas.read_parquet``
        (``[("Modality", "==", "CT")]``); partition filters skip whole files.
    version, as_of
        Time travel (tables): the version numbered *version* (a Delta version, an Iceberg
        snapshot id; see :func:`snapshot_history`), or the latest version committed at or before
        *as_of* (naive means UTC). Both None: the latest.
    chunk_rows
        Yield frames of at most this many rows instead of one frame (bounded memory; each frame
        typed and with the provenance in ``attrs``; rows in file order).
    boto3_session, region, s3_endpoint_url
        How to reach S3 (and Glue).
    iceberg_table, catalog, warehouse, catalog_properties
        An Iceberg table instead of *path* (see :func:`write_snapshot`).

    Returns
    -------
    pandas.DataFrame or iterator of pandas.DataFrame
        The same columns, dtypes and values as written. A table comes back in the query's
        result order (sort column, then imageSetId).
    """
    if dtype_backend not in schema.DTYPE_BACKENDS:
        raise QueryValidationError("dtype_backend", f"must be one of {schema.DTYPE_BACKENDS}")
    columns = _names_argument("columns", columns)
    _check_chunk_rows(chunk_rows)
    where = locate(path, **location)
    _check_time_travel(where, version, as_of)
    if chunk_rows is not None:
        return _read_chunks(where, columns, filters, version, as_of, chunk_rows, dtype_backend)
    table, meta = read_table(where, columns, filters, version=version, as_of=as_of)
    order = list(columns) if columns is not None else meta["columns"]
    reorder = bool(meta["partition_cols"] or not where.single_file) and columns is None
    if reorder:
        table, reorder = _canonical_table(table, order, meta["provenance"])
    frame = table_to_frame(table, dtype_backend, order)
    if reorder:
        frame = _canonical_order(frame, meta["provenance"])
    frame.attrs[METADATA_KEY] = dict(meta["provenance"])
    return frame


def _check_time_travel(where: Location, version: Any, as_of: Any) -> None:
    if version is not None and as_of is not None:
        raise QueryValidationError("version", "give version or as_of, not both")
    if version is not None:
        checks.integer("version", version, minimum=0, rule="must be a version number (int >= 0)")
    if as_of is not None and not isinstance(as_of, datetime):
        raise QueryValidationError("as_of", "must be a datetime")
    if where.single_file and (version is not None or as_of is not None):
        raise QueryValidationError(
            "version", "time travel needs a table (a directory or iceberg_table=), not a file"
        )


def _table_meta(read: TableVersion) -> dict[str, Any]:
    """The snapshot description of one table version (its columns, partitions, provenance)."""
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
    where: Location,
    columns: Sequence[str] | None,
    filters: Any,
    *,
    version: int | None = None,
    as_of: datetime | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of a snapshot (derived columns dropped unless named) and its description."""
    expression = filter_expression(filters)
    if where.table is None:
        assert where.target is not None
        meta = single.describe(where.target)
        table, meta = single.read_file(where.target, _columns(columns, meta), expression)
        return table, meta
    fmt = where.table
    wanted = None
    if columns is not None or expression is not None:
        head = fmt.head(version=version, as_of=as_of)
        meta = _table_meta(head)
        wanted = _columns(columns, meta)
        check_filter(expression, head.table.schema)
        if head.version != version and version is None and as_of is None:
            version = head.version  # the same version as the head, whatever commits meanwhile
    read = fmt.read(version=version, as_of=as_of, columns=wanted, filters=expression)
    meta = _table_meta(read)
    table = read.table
    if columns is None:
        table = table.drop_columns([c for c in meta["derived_columns"] if c in table.column_names])
    return table, meta


def _columns(columns: Sequence[str] | None, meta: dict[str, Any]) -> list[str] | None:
    if columns is None:
        return None
    known = set(meta["columns"]) | set(meta.get("derived_columns", ()))
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise SnapshotError(f"columns not in the snapshot: {', '.join(unknown)}")
    return list(columns)


def _read_chunks(
    where: Location,
    columns: list[str] | None,
    filters: Any,
    version: int | None,
    as_of: datetime | None,
    chunk_rows: int,
    dtype_backend: schema.DtypeBackend,
) -> Iterator[pd.DataFrame]:
    """Frames of at most *chunk_rows* rows, checked and opened before the first one is asked for."""
    expression = filter_expression(filters)
    if where.table is None:
        assert where.target is not None
        meta = single.describe(where.target)
        scan = single.dataset(where.target)
    else:
        head = where.table.head(version=version, as_of=as_of)
        meta = _table_meta(head)
        scan = where.table.scan(version=head.version)
    names = meta["columns"]
    wanted = _columns(columns, meta)
    check_filter(expression, scan.schema.remove_metadata())
    order = list(columns) if columns is not None else names
    read = wanted if wanted is not None else names
    prov = dict(meta["provenance"])

    def frames() -> Iterator[pd.DataFrame]:
        with translated("reading the snapshot"):
            batches = scan.to_batches(columns=read, filter=expression, batch_size=chunk_rows)
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                frame = table_to_frame(pa.Table.from_batches([batch]), dtype_backend, order)
                frame.attrs[METADATA_KEY] = dict(prov)
                yield frame

    return frames()


def _sort_spec(provenance: dict[str, Any]) -> tuple[str, bool]:
    with contextlib.suppress(Exception):
        query = json.loads(provenance["query"])
        if query.get("sort_by"):
            return str(query["sort_by"]), bool(query.get("ascending"))
    return "updatedAt", False


def _canonical_table(
    table: pa.Table, order: Sequence[str], provenance: dict[str, Any]
) -> tuple[pa.Table, bool]:
    """*table* in the query's result order, sorted by Arrow (a stable sort, nulls last).

    Five times faster than sorting the frame. A sort key Arrow orders differently from pandas
    (a dictionary column: pandas orders a categorical by its categories) is left to
    :func:`_canonical_order`: the second value says whether the frame still needs it.
    """
    column, ascending = _sort_spec(provenance)
    keys = [c for c in (column, "imageSetId") if c in order and c in table.column_names]
    if not keys or any(pa.types.is_dictionary(table.schema.field(c).type) for c in keys):
        return table, bool(keys)
    directions = ["ascending" if ascending else "descending", "ascending"]
    # nulls go last by default, in every pyarrow we support (>= 15: no per-key option before 25)
    indices = pc.sort_indices(table, sort_keys=list(zip(keys, directions, strict=False)))
    return table.take(indices), False


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


@keywords(ReadLocation, locate)
def snapshot_provenance(
    path: str | os.PathLike[str] | None = None,
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    **location: Unpack[ReadLocation],
) -> dict[str, Any]:
    """The provenance of a snapshot (of one version, the latest by default), without its rows."""
    where = locate(path, **location)
    _check_time_travel(where, version, as_of)
    if where.table is None:
        assert where.target is not None
        return dict(single.describe(where.target)["provenance"])
    return dict(where.table.head(version=version, as_of=as_of).provenance)


@keywords(ReadLocation, locate)
def scan_snapshot(
    path: str | os.PathLike[str] | None = None,
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    **location: Unpack[ReadLocation],
) -> pads.Dataset:
    """A lazy ``pyarrow.dataset.Dataset`` of a snapshot, for DuckDB, Polars and Dask.

    Typed as written, with partition pruning; a table at one version (latest by default;
    *version* / *as_of* as in :func:`read_snapshot`). Every data file is checked against the
    table's log (there, with the recorded size) first; files are opened when scanned.
    """
    where = locate(path, **location)
    _check_time_travel(where, version, as_of)
    if where.table is None:
        assert where.target is not None
        return single.dataset(where.target)
    return where.table.scan(version=version, as_of=as_of)


@keywords(ReadLocation, locate)
def snapshot_history(
    path: str | os.PathLike[str] | None = None, **location: Unpack[ReadLocation]
) -> pd.DataFrame:
    """Every version of a table snapshot, newest first.

    Columns: ``version`` (a Delta version, an Iceberg snapshot id), ``timestamp`` (UTC),
    ``operation`` (WRITE, MERGE, VACUUM END, OPTIMIZE...), ``rows_added``, ``rows_updated``,
    ``rows_removed`` and ``provenance`` (a dict). :func:`snapshot_info` gives the protocol.
    """
    rows = _table_of(locate(path, **location)).history()
    history: pd.DataFrame = SnapshotHistory(rows)
    return history


@keywords(ReadLocation, locate)
def snapshot_info(
    path: str | os.PathLike[str] | None = None, **location: Unpack[ReadLocation]
) -> TableInfo:
    """A table snapshot's format, version, protocol and features, rows, files and provenance.

    A Delta table written by this library declares ``{"min_reader_version": 1,
    "min_writer_version": 2}`` and no features; one written before it used reader 3 and the
    ``timestampNtz`` feature until :func:`downgrade_snapshot` rewrote it. An Iceberg table
    gives its ``format_version``.
    """
    return _table_of(locate(path, **location)).info()


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


@keywords(ReadLocation, locate)
def vacuum_snapshot(
    path: str | os.PathLike[str] | None = None,
    *,
    retain: timedelta,
    dry_run: bool = True,
    **location: Unpack[ReadLocation],
) -> int:
    """Delete data files no version of the last *retain* needs; returns how many (would) go.

    Versions older than *retain* cannot be read afterwards (Iceberg: their snapshots are
    expired). ``dry_run=True`` (the default) only counts. Delta rounds *retain* up to hours.
    """
    table = _table_of(locate(path, **location))
    return table.expire(retain, dry_run=dry_run)


@keywords(ReadLocation, locate)
def optimize_snapshot(
    path: str | os.PathLike[str] | None = None, **location: Unpack[ReadLocation]
) -> int | None:
    """Compact a table's files into ``createdAt``-sorted files of the target size, on request.

    Refreshes keep the layout, but many small refreshes (sync) leave small files: this rewrites
    them in one commit (rows and provenance unchanged). Returns the new version, or None when
    nothing was rewritten.
    """
    table = _table_of(locate(path, **location))
    return table.optimize(target_file_size=TARGET_FILE_SIZE).version


@keywords(S3Location, locate)
def downgrade_snapshot(
    path: str | os.PathLike[str], **location: Unpack[S3Location]
) -> dict[str, int]:
    """Rewrite a Delta snapshot written at reader 3 (``timestampNtz``) at reader 1 / writer 2.

    A one-time step for tables written before this version, so Athena and older Spark,
    Snowflake and Databricks read them: the path stays, earlier versions stay readable, the
    table gets a new id (``CREATE OR REPLACE``), and between its two commits a reader sees no
    rows (run it when nothing reads the table). Returns the protocol after.
    """
    where = locate(path, **location)
    if not isinstance(where.table, delta.DeltaFormat):
        raise QueryValidationError("path", "downgrade applies to a Delta (directory) snapshot")
    return where.table.downgrade()


# -- export with checkpoints ----------------------------------------------------------------


@keywords(WriteLocation, locate)
def export_query(
    query: ExportableQuery,
    path: str | os.PathLike[str] | None = None,
    *,
    client: Any = None,
    progress: Progress = None,
    max_concurrency: int | None = None,
    max_tps: float | None = SEARCH_TPS,
    partition_cols: Sequence[str] | None = None,
    redact: RedactionPolicy | None = None,
    resume: bool = True,
    checkpoint_interval: float = 5.0,
    compression: str = "zstd",
    glue_table: str | None = None,
    dicomweb_endpoint_url: str | None = None,
    **location: Unpack[WriteLocation],
) -> SnapshotInfo:
    """Run *query* and write its result as a snapshot, checkpointing as it goes.

    Every option (partition columns against the schema, the output path's folder, a folder of
    another tool's files, the checkpoint interval, the fetch settings) is checked before the
    first request. Finished fetch tasks (request chains, or createdAt windows of a scan) and
    their rows are saved at most every *checkpoint_interval* seconds: next to the target
    (``<path>.ahi-checkpoint``), or for a redacted export or an Iceberg table in a private local
    folder (mode 0700) under the user's cache directory (``$HEALTHIMAGING_DF_CACHE`` or
    ``~/.cache/healthimaging_df``). If the process dies, the same call resumes from there: the
    result equals an uninterrupted run. The checkpoint is deleted once the snapshot is written.
    It holds unredacted rows (PHI). Matching rows wait on disk, not in memory, until the
    snapshot is written a row group at a time; the spill folder is removed when the export ends,
    or by the next run after a kill.

    Parameters
    ----------
    query
        The query (``Query.to_parquet`` / ``to_delta`` / ``to_iceberg`` call this).
    path
        Where to write; see :func:`write_snapshot`.
    client, boto3_session, progress, max_concurrency, max_tps
        As in ``Query.to_dataframe``; *boto3_session* also reaches S3.
    partition_cols, redact, region, s3_endpoint_url, kms_key_id, compression, glue_table
        As in :func:`write_snapshot`.
    iceberg_table, catalog, warehouse, catalog_properties
        An Iceberg table instead of *path*, as in :func:`write_snapshot`.
    resume
        Continue from a checkpoint of the same query if there is one; False starts afresh.
    checkpoint_interval
        Seconds between checkpoint saves (0 saves after every finished task).

    Returns
    -------
    SnapshotInfo
    """
    check_redact(redact)
    _check_parquet_options(compression, 128 * 1024)
    checks.flag("resume", resume)
    if isinstance(checkpoint_interval, bool) or not (
        isinstance(checkpoint_interval, (int, float)) and 0 <= checkpoint_interval < float("inf")
    ):
        raise QueryValidationError("checkpoint_interval", "must be a number of seconds >= 0")
    if not isinstance(resume, bool):
        raise QueryValidationError("resume", "must be True or False")
    where = locate(path, **location)
    check_glue_table(glue_table, where)
    parts = check_partition_cols(where, partition_cols)
    check_schema_partitions(parts)
    if where.target is not None:
        where.target.store.check_writable()
    _check_foreign_folder(where)
    run = engine.prepare(
        client,
        location.get("boto3_session"),
        progress,
        max_concurrency,
        max_tps,
        dicomweb_endpoint_url=dicomweb_endpoint_url,
    )

    def write(table: pa.Table | RowGroups, info: dict[str, Any]) -> SnapshotInfo:
        written = _finish_write(where, table, info, partition_cols, redact, compression)
        return register_glue(where, written, glue_table)

    if query.row_limit is not None:  # a small, sorted result: no checkpoints needed
        return engine.export(query.compile(), query.to_json(), run, write)
    destination = _destination_key(where)
    # a redacted export's checkpoint and spill files hold raw rows: never beside the target
    private = redact is not None or where.target is None
    checkpoint_store = private_store(destination) if private else None
    spill_parent = (
        str(private_root())
        if private or where.target is None
        else where.target.store.folder_of(where.target.name)
    )
    target = where.target if where.target is not None else _private_target(destination)
    checkpoint = Checkpoint(target, fingerprint(query.to_json()), checkpoint_store)
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
        spill_prefix(destination),
        order=None if where.single_file else FILE_ORDER,
    )
    checkpoint.discard()
    if checkpoint.resumed_tasks:
        info = replace(info, resumed_tasks=checkpoint.resumed_tasks)
    return info


def _destination_key(where: Location) -> str:
    """What names an export's destination in checkpoint and spill folder digests."""
    if where.target is not None:
        return where.target.store.uri(where.target.name)
    assert isinstance(where.table, IcebergFormat)
    spec = where.table.target
    return f"iceberg:{spec.catalog}#{spec.identifier}"


def _private_target(destination: str) -> Target:
    """A stand-in storage target for an export without a folder (an Iceberg table)."""
    store, folder = private_store(destination)
    return Target(store, folder, single_file=False)


def _finish_write(
    where: Location,
    table: pa.Table | RowGroups,
    prov: dict[str, Any],
    partition_cols: Sequence[str] | None,
    redact: RedactionPolicy | None,
    compression: str,
) -> SnapshotInfo:
    if redact is None:
        return write_table(where, table, prov, partition_cols, compression)
    policy = redact

    def redacted(part: pa.Table) -> pa.Table:
        return frame_to_table(apply_redaction(schema.arrow_to_pandas(part), policy))

    prov = redacted_provenance(prov, policy)
    changed = set(policy.hash) | (set(SHIFTED_COLUMNS) if policy.shift_dates else set())
    if "updatedAt" in changed:  # the watermark is of redacted values: redact the whole first
        whole = table if isinstance(table, pa.Table) else _whole(table)
        return write_table(where, redacted(whole), prov, partition_cols, compression)
    return write_table(where, table, prov, partition_cols, compression, redact=redacted)


def _whole(rows: RowGroups) -> pa.Table:
    groups = list(rows.groups(128 * 1024))
    return pa.concat_tables(groups) if groups else rows.empty()


def check_table_path(path: Any, method: str) -> None:
    """A Delta table needs a folder path: refuse one ending in ``.parquet``."""
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).rstrip("/").endswith(".parquet"):
        raise QueryValidationError(
            "path", f"{method} writes a table into a folder; a .parquet path is to_parquet's"
        )


def _deprecated_directory(path: str | os.PathLike[str], stacklevel: int = 3) -> None:
    """Warn that ``to_parquet(directory)`` is spelled ``to_delta`` now."""
    text = os.fspath(path)
    if isinstance(text, str) and not text.rstrip("/").endswith(".parquet"):
        warnings.warn(
            "to_parquet(directory) writes a Delta table: call to_delta(directory) instead "
            "(to_parquet is for single .parquet files)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
