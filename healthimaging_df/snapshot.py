"""Parquet snapshots: export a query, read it back typed, refresh it incrementally, resume exports.

Layout (see ``docs/snapshots.md``):

- ``…/name.parquet``: one Parquet file, replaced atomically (a local rename; on S3 one PUT, which
  S3 makes visible all at once).
- any other path: a directory (or S3 prefix) holding Hive-partitioned files
  ``Modality=CT/part-<version>-00000.parquet`` plus a manifest ``_healthimaging_df.json`` that lists
  the files of the current version. Data files of a new version get new names and are written
  under ``_staging-<version>/`` (skipped by pyarrow.dataset, Spark and partition-depth globs), then
  moved into place; the manifest is replaced last (atomically), so ``read_snapshot`` never sees a
  half-written snapshot on a local disk or on S3, where nothing can be renamed atomically; the
  previous version's files and the staging folder are then deleted. Readers that glob the folder
  can see old and new files together only between the first move and the last delete.

Every data file carries the provenance in its Parquet key-value metadata (key ``healthimaging_df``);
``read_snapshot`` puts it back in ``df.attrs["healthimaging_df"]``.

The storage layer (local disk or S3) is in ``healthimaging_df.storage``, Arrow and Parquet
conversions in ``healthimaging_df.tables``; the fetch behind an export runs in
``healthimaging_df.engine`` and incremental refresh is ``healthimaging_df.refresh``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from healthimaging_df import engine, provenance, schema
from healthimaging_df._version import __version__
from healthimaging_df.checkpoint import Checkpoint, fingerprint
from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.redact import RedactionPolicy, apply_redaction
from healthimaging_df.storage import (
    CHECKPOINT_SUFFIX,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Target,
    load_manifest,
    open_target,
)
from healthimaging_df.tables import (
    frame_to_table,
    iso,
    parquet_bytes,
    table_to_frame,
    table_watermark,
)

if TYPE_CHECKING:
    from healthimaging_df.progress import Progress
    from healthimaging_df.query import Query  # the argument's type only: Query imports us

__all__ = [
    "CHECKPOINT_SUFFIX",
    "DERIVED_COLUMNS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "METADATA_KEY",
    "STAGING_PREFIX",
    "SnapshotInfo",
    "export_query",
    "frame_to_table",
    "read_snapshot",
    "redacted_provenance",
    "snapshot_provenance",
    "write_snapshot",
]

METADATA_KEY = provenance.KEY
DERIVED_COLUMNS: dict[str, str] = {"StudyYear": "year of StudyDateTime (derived for partitioning)"}
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
STAGING_PREFIX = "_staging-"
_OUR_PART = re.compile(r"part-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}-[0-9]{5}\.parquet")


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
        Data files of this version (full paths or ``s3://`` URIs).
    bytes
        Total size of the data files.
    partition_cols
        Hive partition columns (empty for an unpartitioned snapshot).
    provenance
        The provenance stored with it (also in ``read_snapshot(path).attrs``).
    resumed_tasks
        Fetch tasks taken from a checkpoint of an interrupted run (0 for a fresh run).
    """

    path: str
    rows: int
    files: tuple[str, ...]
    bytes: int
    partition_cols: tuple[str, ...]
    provenance: dict[str, Any] = field(repr=False)
    resumed_tasks: int = 0

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
) -> SnapshotInfo:
    """Write *df* as a snapshot, atomically replacing any previous snapshot at *path*.

    Parameters
    ----------
    df
        A frame of this library (its ``attrs`` provenance is stored) or any frame whose columns of
        schema names have schema-compatible values.
    path
        ``….parquet`` for one file; anything else for a directory of Hive partitions with a
        manifest. Local path or ``s3://bucket/prefix``.
    partition_cols
        Hive partition columns (directory snapshots only), e.g. ``["Modality"]``; ``"StudyYear"``
        is derived from ``StudyDateTime`` when the frame lacks it.
    redact
        A :class:`~healthimaging_df.redact.RedactionPolicy` to apply first; None writes the frame
        as it is, PHI included.
    provenance
        Provenance to store; ``df.attrs["healthimaging_df"]`` when None.
    boto3_session, region, s3_endpoint_url
        How to reach S3 (default session and its region; an endpoint for S3-compatible stores).
    kms_key_id
        Encrypt S3 objects with SSE-KMS under this key (ID, alias or ARN).
    compression, row_group_size
        Parquet settings.

    Returns
    -------
    SnapshotInfo
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    check_redact(redact)
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
    return write_table(
        target,
        os.fspath(path),
        frame_to_table(df),
        prov,
        partition_cols,
        compression,
        row_group_size,
    )


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
    table: pa.Table,
    provenance: dict[str, Any],
    partition_cols: Sequence[str] | None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
) -> SnapshotInfo:
    parts = check_partition_cols(target, partition_cols)
    derived = []
    for name in parts:
        if name in table.column_names:
            continue
        if name == "StudyYear" and "StudyDateTime" in table.column_names:
            table = table.append_column(
                "StudyYear", pc.cast(pc.year(table.column("StudyDateTime")), pa.int64())
            )
            derived.append(name)
        else:
            raise SnapshotError(f"partition column {name!r} is not in the frame")
    for name in parts:
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise SnapshotError(f"partition column {name!r} must hold text, integers or flags")
    if len(parts) >= table.num_columns:
        raise SnapshotError("partition_cols cannot cover every column")

    watermark = table_watermark(table)
    prov = dict(provenance)
    prov.setdefault("schema_version", schema.SCHEMA_VERSION)
    prov.setdefault("library_version", __version__)
    prov.setdefault("redaction", None)
    prov["row_count"] = table.num_rows
    prov["watermark"] = iso(watermark)
    meta = {
        "format": "healthimaging_df.snapshot",
        "format_version": FORMAT_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(),
        "written_by": __version__,
        "partition_cols": parts,
        "derived_columns": derived,
        "columns": [c for c in table.column_names if c not in derived],
        "provenance": prov,
    }
    file_meta = {METADATA_KEY.encode(): json.dumps(meta, sort_keys=True).encode()}
    store = target.store
    if target.single_file:
        data = parquet_bytes(table, file_meta, compression, row_group_size)
        store.put(target.name, data)
        return SnapshotInfo(
            display_path, table.num_rows, (store.uri(target.name),), len(data), (), prov
        )

    old = load_manifest(target)
    if old is None and not _only_our_debris(target):
        raise SnapshotError(
            f"{store.uri(target.name)} exists and is not a snapshot (no {MANIFEST_NAME}); "
            "refusing to write into it"
        )
    version = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    staging = f"{target.name}/{STAGING_PREFIX}{version}"
    files: list[dict[str, Any]] = []
    total = 0
    # 1. every data file goes to a staging folder that readers globbing the snapshot skip
    for number, (values, part) in enumerate(_split(table, parts)):
        folder = "/".join(f"{c}={_hive_value(v)}" for c, v in zip(parts, values, strict=True))
        rel = "/".join(x for x in (folder, f"part-{version}-{number:05d}.parquet") if x)
        data = parquet_bytes(part, file_meta, compression, row_group_size)
        store.put(f"{staging}/{rel}", data)
        files.append({"path": rel, "rows": part.num_rows, "bytes": len(data)})
        total += len(data)
    # 2. complete: move them into place (new names, so the previous version stays readable)
    store.move([(f"{staging}/{f['path']}", f"{target.name}/{f['path']}") for f in files])
    manifest = {
        "format": "healthimaging_df.snapshot-manifest",
        "format_version": FORMAT_VERSION,
        "version": version,
        "files": files,
        "arrow_schema": base64.b64encode(table.schema.remove_metadata().serialize()).decode(),
        **{k: v for k, v in meta.items() if k not in ("format", "format_version")},
    }
    # 3. the commit point: one atomic replace of the manifest
    store.put(target.manifest, json.dumps(manifest, indent=1, sort_keys=True).encode())
    # 4. the previous version's files, and debris of crashed writes
    _collect_garbage(target, {f["path"] for f in files})
    return SnapshotInfo(
        display_path,
        table.num_rows,
        tuple(store.uri(f"{target.name}/{f['path']}") for f in files),
        total,
        tuple(parts),
        prov,
    )


def _collect_garbage(target: Target, keep: set[str]) -> None:
    """Delete data files of earlier versions and of crashed writes (never foreign files)."""
    prefix = f"{target.name}/"
    stale = []
    for rel in target.store.list(target.name):
        inner = rel[len(prefix) :]
        base = inner.rsplit("/", 1)[-1]
        ours = base.startswith("part-") and base.endswith(".parquet")
        if (ours and inner not in keep) or (base.startswith(".") and ".tmp-" in base):
            stale.append(rel)
    if stale:
        target.store.delete(stale)
    target.store.prune(target.name, STAGING_PREFIX)  # the (now empty) staging folders


def _only_our_debris(target: Target) -> bool:
    """Whether a folder without a manifest holds nothing but what a crashed first write left.

    Only this library's own names count (``part-<version>-NNNNN.parquet`` and temp files of a
    PUT), so a folder of some other tool's Parquet files (Spark's ``part-00000-….parquet``) is
    never written into or cleaned up.
    """
    prefix = f"{target.name}/"
    for rel in target.store.list(target.name):
        base = rel[len(prefix) :].rsplit("/", 1)[-1]
        if not (_OUR_PART.fullmatch(base) or (base.startswith(".") and ".tmp-" in base)):
            return False
    return True


def _split(table: pa.Table, parts: list[str]) -> Iterator[tuple[tuple[Any, ...], pa.Table]]:
    """Yield (partition values, rows without the partition columns); one empty file if no rows."""
    if not parts:
        yield (), table
        return
    if table.num_rows == 0:
        return
    keys = table.select(parts).group_by(parts, use_threads=False).aggregate([])
    rest = [c for c in table.column_names if c not in parts]
    for row in keys.to_pylist():
        mask = None
        for name in parts:
            value = row[name]
            column = table.column(name)
            hit = (
                pc.is_null(column)
                if value is None
                else pc.fill_null(pc.equal(column, value), False)
            )
            mask = hit if mask is None else pc.and_(mask, hit)
        yield tuple(row[n] for n in parts), table.filter(mask).select(rest)


def _hive_value(value: Any) -> str:
    if value is None:
        return _HIVE_NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    return quote(str(value), safe="")


# -- read ---------------------------------------------------------------------------------------


def read_snapshot(
    path: str | os.PathLike[str],
    *,
    dtype_backend: schema.DtypeBackend = "numpy_nullable",
    columns: Sequence[str] | None = None,
    filters: Any = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> pd.DataFrame:
    """Read a snapshot back as a typed frame with its provenance in ``attrs``.

    Parameters
    ----------
    path
        What ``write_snapshot``/``to_parquet`` wrote: a ``.parquet`` file or a snapshot directory.
    dtype_backend
        ``"numpy_nullable"`` or ``"pyarrow"``.
    columns
        Only these columns (in this order); partition and derived columns may be named.
    filters
        Row filter: a ``pyarrow.compute`` expression or DNF tuples as in ``pandas.read_parquet``
        (``[("Modality", "==", "CT")]``); partition filters skip whole files.
    boto3_session, region, s3_endpoint_url
        How to reach S3.

    Returns
    -------
    pandas.DataFrame
        The same columns, dtypes and values as written. A partitioned snapshot comes back in the
        query's result order (sort column, then imageSetId).
    """
    if dtype_backend not in schema.DTYPE_BACKENDS:
        raise QueryValidationError("dtype_backend", f"must be one of {schema.DTYPE_BACKENDS}")
    columns = _names_argument("columns", columns)
    target = open_target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    table, meta = read_table(target, columns, filters)
    order = list(columns) if columns is not None else meta["columns"]
    frame = table_to_frame(table, dtype_backend, order)
    if meta["partition_cols"] and columns is None:
        frame = _canonical_order(frame, meta["provenance"])
    frame.attrs[METADATA_KEY] = dict(meta["provenance"])
    return frame


def read_table(
    target: Target, columns: Sequence[str] | None, filters: Any, _retry: bool = True
) -> tuple[pa.Table, dict[str, Any]]:
    store = target.store
    expression = _filter_expression(filters)
    if target.single_file:
        location = store.arrow_path(target.name)
        try:
            file_schema = pq.read_schema(location, filesystem=store.arrow_fs)
        except (FileNotFoundError, OSError) as exc:
            raise SnapshotError(f"no snapshot at {store.uri(target.name)}") from exc
        meta = _file_meta(file_schema.metadata, store.uri(target.name))
        _check_filter(expression, file_schema.remove_metadata())
        table = pq.read_table(
            location,
            filesystem=store.arrow_fs,
            columns=_columns(columns, meta),
            filters=expression,
            partitioning=None,
        )
        return table.replace_schema_metadata(None), meta

    manifest = load_manifest(target)
    if manifest is None:
        raise SnapshotError(f"no snapshot at {store.uri(target.name)} (no {MANIFEST_NAME})")
    full_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["arrow_schema"])))
    _check_filter(expression, full_schema)
    parts = list(manifest["partition_cols"])
    partitioning = None
    if parts:
        partitioning = pads.partitioning(
            pa.schema([full_schema.field(n) for n in parts]), flavor="hive"
        )
    paths = [store.arrow_path(f"{target.name}/{f['path']}") for f in manifest["files"]]
    wanted = _columns(columns, manifest)
    if not paths:
        empty = full_schema.empty_table()
        return empty.select(wanted) if wanted is not None else empty, manifest
    try:
        dataset = pads.dataset(
            paths,
            schema=full_schema,
            filesystem=store.arrow_fs,
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=store.arrow_path(target.name),
        )
        table = dataset.to_table(columns=wanted, filter=expression)
    except FileNotFoundError:
        if not _retry:
            raise
        return read_table(target, columns, filters, _retry=False)  # a writer swapped versions
    if columns is None:
        derived = [c for c in manifest["derived_columns"] if c in table.column_names]
        table = table.drop_columns(derived)
    return table.replace_schema_metadata(None), manifest


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


def _filter_expression(filters: Any) -> Any:
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    try:
        return pq.filters_to_expression(filters)
    except (TypeError, ValueError, KeyError, IndexError):  # pyarrow's text can quote a value
        raise QueryValidationError(
            "filters", "must be a pyarrow.compute expression or DNF tuples (column, op, value)"
        ) from None


def _check_filter(expression: Any, table_schema: pa.Schema) -> None:
    """Apply *expression* to no rows of *table_schema*: a bad column or type fails here, typed."""
    if expression is None:
        return
    try:
        pads.dataset(table_schema.empty_table()).to_table(filter=expression)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        raise QueryValidationError(
            "filters", "names a column the snapshot lacks or compares it with the wrong type"
        ) from None


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
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> dict[str, Any]:
    """The provenance of a snapshot, without reading its rows."""
    target = open_target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    if target.single_file:
        try:
            metadata = pq.read_schema(
                target.store.arrow_path(target.name), filesystem=target.store.arrow_fs
            ).metadata
        except (FileNotFoundError, OSError) as exc:
            raise SnapshotError(f"no snapshot at {target.store.uri(target.name)}") from exc
        return dict(_file_meta(metadata, target.store.uri(target.name))["provenance"])
    manifest = load_manifest(target)
    if manifest is None:
        raise SnapshotError(f"no snapshot at {target.store.uri(target.name)}")
    return dict(manifest["provenance"])


# -- export with checkpoints ----------------------------------------------------------------


def export_query(
    query: Query,
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
) -> SnapshotInfo:
    """Run *query* and write its result as a snapshot at *path*, checkpointing as it goes.

    Every option (partition columns against the schema, the output path's folder, the checkpoint
    interval, the fetch settings) is checked before the first request. Finished fetch tasks
    (request chains, or createdAt windows of a scan) and their rows are saved next to the target
    (``<path>.ahi-checkpoint``) at most every *checkpoint_interval* seconds. If the process dies,
    the same call resumes from there: the result equals an uninterrupted run. The checkpoint is
    deleted once the snapshot is written. It holds unredacted rows (PHI).

    Parameters
    ----------
    query
        The query (``Query.to_parquet`` calls this).
    path
        Where to write; see :func:`write_snapshot`.
    client, boto3_session, progress, max_concurrency, max_tps
        As in ``Query.to_dataframe``; *boto3_session* also reaches S3.
    partition_cols, redact, region, s3_endpoint_url, kms_key_id, compression
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
    _check_parquet_options(compression, 128 * 1024)
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

    def write(table: pa.Table, info: dict[str, Any]) -> SnapshotInfo:
        return _finish_write(target, display, table, info, parts, redact, compression)

    if query.row_limit is not None:  # a small, sorted result: no checkpoints needed
        return engine.export(query.compile(), query.to_json(), run, write)
    checkpoint = Checkpoint(target, fingerprint(query.to_json()))
    coverage = checkpoint.load() if resume else None
    if not resume:
        checkpoint.discard()
    # a resumed export keeps the access path it started with: its coverage is of those chains
    forced = checkpoint.access if coverage is not None else None
    plan = engine.choose(
        lambda stats: query.compile(now=checkpoint.now, stats=stats, strategy=forced), run
    )
    checkpoint.access = plan.access
    info = engine.export(
        plan, query.to_json(), run, write, checkpoint, coverage, checkpoint_interval
    )
    checkpoint.discard()
    if checkpoint.resumed_tasks:
        info = replace(info, resumed_tasks=checkpoint.resumed_tasks)
    return info


def _finish_write(
    target: Target,
    display_path: str,
    table: pa.Table,
    prov: dict[str, Any],
    partition_cols: Sequence[str] | None,
    redact: RedactionPolicy | None,
    compression: str,
) -> SnapshotInfo:
    if redact is not None:
        df = apply_redaction(schema.arrow_to_pandas(table), redact)
        prov = redacted_provenance(prov, redact)
        table = frame_to_table(df)
    return write_table(target, display_path, table, prov, partition_cols, compression)
