"""Delta history and vacuum."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pandas as pd

from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.store.delta.log import (
    commit_info,
    commit_properties,
    files_of,
    log_fs,
    open_table,
    options_for,
    ours,
    row_count,
    state_at,
    table_location,
    timestamp_of,
    writer_properties,
)
from healthimaging_df.store.errors import translated
from healthimaging_df.store.layout import DEFAULT_TARGET_FILE_SIZE, ORDER_COLUMN, file_order
from healthimaging_df.store.table_format import history_frame


def _opened(
    uri: str | os.PathLike[str], storage_options: Mapping[str, str] | None, action: str
) -> tuple[str, dict[str, str] | None, Any, Any]:
    """The table at *uri*: its location, delta-rs options, opened table and log file system."""
    location = table_location(uri)
    options = options_for(location, storage_options)
    opened = open_table(location, options, action=action)
    assert opened is not None
    return location, options, opened, log_fs(location, options)


# -- history and vacuum ---------------------------------------------------------------------------


def history(
    uri: str | os.PathLike[str], *, storage_options: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Every version still in the log, newest first.

    Columns: ``version``, ``timestamp`` (UTC), ``operation`` (WRITE, MERGE, VACUUM END...),
    ``rows_added``, ``rows_updated``, ``rows_removed`` and ``provenance`` (the dict in force at
    that version; maintenance commits carry the previous one).

    Read by hand from ``_delta_log`` through pyarrow's file system, not ``DeltaTable.history()``:
    delta-rs 1.6 holds the GIL while it reads the log from S3 (an S3 server in the same process,
    moto in tests, is never answered: it hung past 120 s), and ``history(limit)`` of a table
    loaded at an older version lists negative version numbers. The times are the log files'
    modification times, which is what delta-rs resolves ``as_of`` against (the commit's own
    ``timestamp`` can be a millisecond earlier).
    """
    action = "reading the snapshot history"
    _, _, opened, fs = _opened(uri, storage_options, action)
    rows: list[dict[str, Any]] = []
    with translated(action):
        for number in range(opened.version(), -1, -1):
            info = commit_info(fs, number)
            if info is None:
                break
            meta = ours(info) or {}
            metrics = info.get("operationMetrics") or {}
            operation = str(info.get("operation", ""))
            if meta.get("operation") == "merge":
                operation = "MERGE"  # our merge commits through a predicate overwrite
            counts = _counts(operation, meta, metrics)
            rows.append(
                {
                    "version": number,
                    "timestamp": timestamp_of(info),
                    "operation": operation,
                    **counts,
                    "provenance": _provenance_or_none(fs, number),
                }
            )
    if all(row["provenance"] is None for row in rows):
        state_at(fs, opened.version())  # raises: not a table of this library
    return history_frame(rows)


def _provenance_or_none(fs: Any, version: int) -> dict[str, Any] | None:
    """The provenance in force at *version*; None for a version another tool wrote."""
    try:
        return state_at(fs, version).provenance
    except SnapshotError:
        return None


def _counts(operation: str, meta: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, int]:
    if operation == "MERGE" and "added" not in meta:
        return {
            "rows_added": int(metrics.get("num_target_rows_inserted", 0)),
            "rows_updated": int(metrics.get("num_target_rows_updated", 0)),
            "rows_removed": int(metrics.get("num_target_rows_deleted", 0)),
        }
    if "added" in meta:
        return {
            "rows_added": int(meta.get("added", 0)),
            "rows_updated": int(meta.get("updated", 0)),
            "rows_removed": int(meta.get("removed", 0)),
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
    _, _, opened, fs = _opened(uri, storage_options, action)
    state = state_at(fs, opened.version())
    hours = math.ceil(retain / timedelta(hours=1))
    meta = {
        "operation": "vacuum",
        "arrow_schema": state.meta.get("arrow_schema"),
        "partition_by": state.meta.get("partition_by", []),
    }
    with translated(action):
        removed = opened.vacuum(
            retention_hours=hours,
            dry_run=dry_run,
            enforce_retention_duration=False,
            full=True,  # also files no commit names (a lost or crashed writer's debris)
            commit_properties=commit_properties(state.provenance, meta, retries=None),
        )
    return len(removed)


def protocol(table: Any) -> tuple[dict[str, int], tuple[str, ...]]:
    """A loaded table's protocol versions and its table features (reader and writer, sorted)."""
    found = table.protocol()
    versions = {
        "min_reader_version": int(found.min_reader_version),
        "min_writer_version": int(found.min_writer_version),
    }
    features = set(found.reader_features or ()) | set(found.writer_features or ())
    return versions, tuple(sorted(features))


def info(uri: str | os.PathLike[str], *, storage_options: Mapping[str, str] | None = None) -> Any:
    """Format, version, protocol, features, size and provenance of the latest version."""
    from healthimaging_df.store.table_format import TableInfo

    action = "describing the snapshot"
    _, _, opened, fs = _opened(uri, storage_options, action)
    state = state_at(fs, opened.version())
    with translated(action):
        versions, features = protocol(opened)
        files = files_of(opened)
        rows = row_count(opened)
    return TableInfo(
        format="delta",
        version=opened.version(),
        rows=rows,
        files=len(files),
        bytes=sum(files.values()),
        partition_by=tuple(opened.metadata().partition_columns),
        protocol=versions,
        features=features,
        provenance=state.provenance,
    )


def optimize(
    uri: str | os.PathLike[str],
    provenance: Mapping[str, Any] | None = None,
    *,
    target_file_size: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> Any:
    """Rewrite the files of every partition into ``createdAt``-sorted files of the target size.

    Merges keep the layout, but small files pile up over many small refreshes: this is the
    compaction to run on request (``delta-rs``' ``z_order`` on ``createdAt`` alone, which sorts).
    Rows and provenance do not change; the protocol stays at reader 1 / writer 2.
    """
    from healthimaging_df.store.table_format import MergeResult

    action = "optimizing the snapshot"
    _, _, opened, fs = _opened(uri, storage_options, action)
    state = state_at(fs, opened.version())
    prov = dict(provenance) if provenance is not None else state.provenance
    meta = {
        "operation": "optimize",
        "arrow_schema": state.meta.get("arrow_schema"),
        "partition_by": state.meta.get("partition_by", []),
    }
    before = files_of(opened)
    with translated(action):
        opened.optimize.z_order(
            [ORDER_COLUMN] if ORDER_COLUMN in state.arrow_schema.names else [],
            target_size=target_file_size,
            writer_properties=writer_properties(),
            commit_properties=commit_properties(prov, meta),
        )
        opened.update_incremental()
        after = files_of(opened)
    changed = set(after) != set(before)
    return MergeResult(
        version=opened.version() if changed else None,
        added=0,
        updated=0,
        removed=0,
        rows=row_count(opened),
        files_added=len(set(after) - set(before)),
        files_removed=len(set(before) - set(after)),
        bytes_written=sum(size for path, size in after.items() if path not in before),
    )


def downgrade(
    uri: str | os.PathLike[str], *, storage_options: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Rewrite a reader-3 table (``timestamp_ntz``) in place at reader 1 / writer 2, once.

    delta-rs has no drop-feature operation, and a plain overwrite keeps the protocol. A
    ``CREATE OR REPLACE`` (``DeltaTable.create(mode="overwrite")``) writes a new protocol: it
    commits an empty version with a new table id, and the rows come back in the next commit,
    encoded for reader 1 (naive times labelled UTC). The path stays the same, so a Glue table or
    a job pointing at it needs no change (on S3 there is no atomic rename to swap a copy in),
    and every earlier version still reads (``read_snapshot(version=N)``). Between the two
    commits a reader sees no rows: run it when nothing reads the table. A table already at
    reader 1 is left alone.

    Returns
    -------
    dict
        The protocol after (``min_reader_version``, ``min_writer_version``).
    """
    from deltalake import DeltaTable, write_deltalake

    from healthimaging_df.store.delta import encoding
    from healthimaging_df.store.delta.read import checked_dataset

    action = "downgrading the snapshot"
    location, options, opened, fs = _opened(uri, storage_options, action)
    state = state_at(fs, opened.version())
    versions, _ = protocol(opened)
    if versions["min_reader_version"] == 1 and versions["min_writer_version"] <= 2:
        return versions
    expected = opened.version()
    with translated(action):
        rows = checked_dataset(opened, state, fs, action, footers=True)[0].to_table()
    stored = encoding.storage_schema(state.arrow_schema)
    parts = list(opened.metadata().partition_columns)
    meta = {
        "operation": "downgrade",
        "arrow_schema": state.meta.get("arrow_schema"),
        "partition_by": parts,
    }
    with translated(action):
        current = DeltaTable(location, storage_options=options)
        if current.version() != expected:
            from healthimaging_df.errors import SnapshotConflictError
            from healthimaging_df.store.errors import CONFLICT_HELP

            raise SnapshotConflictError(f"{action}: {CONFLICT_HELP}")
        replaced = DeltaTable.create(
            location,
            schema=stored,
            mode="overwrite",
            partition_by=parts or None,
            description=opened.metadata().description,
            storage_options=options,
            commit_properties=commit_properties(state.provenance, {**meta, "rows": 0}),
        )
        write_deltalake(
            replaced,
            encoding.to_storage(file_order(rows), stored),
            mode="append",
            partition_by=parts or None,
            target_file_size=DEFAULT_TARGET_FILE_SIZE,
            writer_properties=writer_properties(),
            commit_properties=commit_properties(state.provenance, meta),
        )
        after, _ = protocol(replaced)
    return after
