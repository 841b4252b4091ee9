"""Delta writes: create a table or replace its content in one commit."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.store.delta import encoding
from healthimaging_df.store.delta.log import (
    FORMAT,
    FORMAT_VERSION,
    commit_properties,
    files_of,
    log_fs,
    open_table,
    options_for,
    row_count,
    schema_b64,
    state_at,
    table_location,
    writer_properties,
)
from healthimaging_df.store.errors import CONFLICT_HELP, translated
from healthimaging_df.store.table_format import (
    WriteResult,
    check_data,
    check_names,
    check_partition_types,
    check_provenance,
    check_version,
)

if TYPE_CHECKING:
    pass

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

    location = table_location(uri)
    table, rows = check_data(table, num_rows)
    prov = check_provenance(provenance)
    if mode not in ("overwrite", "error"):
        raise QueryValidationError("mode", "must be 'overwrite' or 'error'")
    check_version(expected_version, None)
    parts = _partition_argument(partition_by, table.schema)
    options = options_for(location, storage_options)
    action = "writing the snapshot"
    existing = open_table(
        location, options, action=action, version=expected_version, missing_ok=True
    )
    meta = {"operation": "write", "arrow_schema": schema_b64(table.schema), "rows": rows}
    if existing is None:
        if expected_version is not None:
            raise SnapshotError(f"{action}: there is no table at the expected version")
        parts = parts or []
        meta.update(partition_by=parts, added=rows, updated=0, removed=0)
        stored = encoding.storage_schema(table.schema)
        with translated(action):
            try:
                write_deltalake(
                    location,
                    _encoded(table, stored),
                    partition_by=parts or None,
                    mode="error",
                    description=_description(),
                    storage_options=options,
                    target_file_size=target_file_size,
                    writer_properties=writer_properties(),
                    commit_properties=commit_properties(prov, meta),
                )
            except Exception:
                if open_table(location, options, action=action, missing_ok=True) is not None:
                    raise SnapshotConflictError(f"{action}: {CONFLICT_HELP}") from None
                raise
        written = open_table(location, options, action=action, version=0)
        assert written is not None
        before: dict[str, int] = {}
    else:
        if mode == "error":
            raise SnapshotError(f"{action}: a table exists there (mode='error')")
        state_at(log_fs(location, options), existing.version())  # refuses a foreign table
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
        before = files_of(existing)
        old_rows = row_count(existing)
        current = encoding.table_schema(existing.schema())
        data = _encoded(table, current)
        reshape = parts != old_parts or not _same_delta_schema(current, data.schema)
        meta.update(partition_by=parts, added=rows, updated=0, removed=old_rows)
        with translated(action):
            write_deltalake(
                existing,
                data,
                partition_by=parts or None,
                mode="overwrite",
                schema_mode="overwrite" if reshape else None,
                target_file_size=target_file_size,
                writer_properties=writer_properties(),
                commit_properties=commit_properties(prov, meta),
            )
        written = existing
    files = files_of(written)
    return WriteResult(
        version=written.version(),
        rows=rows,
        files=tuple(written.file_uris()),
        bytes=sum(files.values()),
        bytes_written=sum(size for path, size in files.items() if path not in before),
        partition_by=tuple(parts),
        provenance=prov,
    )


def _partition_argument(partition_by: Sequence[str] | None, schema: pa.Schema) -> list[str] | None:
    """*partition_by* checked against the rows' *schema* (None: keep the table's partitioning)."""
    if partition_by is None:
        return None
    parts = check_names("partition_by", partition_by, schema)
    if parts and len(parts) >= len(schema.names):
        raise QueryValidationError("partition_by", "cannot cover every column")
    check_partition_types(schema, parts)
    return parts


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


def _same_delta_schema(current: pa.Schema, arrow_schema: pa.Schema) -> bool:
    return [(f.name, str(f.type)) for f in current] == [(f.name, str(f.type)) for f in arrow_schema]


def _encoded(
    data: pa.Table | pa.RecordBatchReader, stored: pa.Schema
) -> pa.Table | pa.RecordBatchReader:
    """*data* in the table's stored types (see ``encoding``): cast before every write."""
    if isinstance(data, pa.RecordBatchReader):
        return encoding.reader_to_storage(data, stored)
    return encoding.to_storage(data, stored)
