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
    log_fs,
    open_table,
    options_for,
    ours,
    state_at,
    table_location,
    timestamp_of,
)
from healthimaging_df.store.errors import translated

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
    location = table_location(uri)
    options = options_for(location, storage_options)
    opened = open_table(location, options, action=action)
    assert opened is not None
    fs = log_fs(location, options)
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
    location = table_location(uri)
    options = options_for(location, storage_options)
    opened = open_table(location, options, action=action)
    assert opened is not None
    state = state_at(log_fs(location, options), opened.version())
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
