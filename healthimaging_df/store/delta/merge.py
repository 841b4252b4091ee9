"""Delta merges: upsert by ``imageSetId`` and delete by ID in one commit."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.store.delta.log import (
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
from healthimaging_df.store.errors import translated
from healthimaging_df.store.table_format import (
    MergeResult,
    any_of,
    check_provenance,
    check_table,
    check_version,
)

_DELETE_FLAG = "__healthimaging_df_delete"

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
    location = table_location(uri)
    incoming = check_table("incoming", incoming)
    prov = check_provenance(provenance)
    check_version(expected_version, None)
    if isinstance(removed_ids, (str, bytes)):
        raise QueryValidationError("removed_ids", "must be a list of keys, not one string")
    removed = list(removed_ids)
    for position, value in enumerate(removed):
        if not isinstance(value, str):
            raise QueryValidationError("removed_ids", "keys must be strings", position)
    options = options_for(location, storage_options)
    action = "merging into the snapshot"
    existing = open_table(location, options, action=action, version=expected_version)
    assert existing is not None
    state = state_at(log_fs(location, options), existing.version())
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
        return MergeResult(None, 0, 0, 0, row_count(existing), 0, 0, 0)

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
    before = files_of(existing)
    meta = {
        "operation": "merge",
        "arrow_schema": schema_b64(target_schema),
        "partition_by": list(existing.metadata().partition_columns),
    }
    flag = f"s.`{_DELETE_FLAG}`"
    with translated(action):
        metrics = (
            existing.merge(
                source,
                predicate=f"t.`{key}` = s.`{key}`",
                source_alias="s",
                target_alias="t",
                streamed_exec=False,  # the source is small: materialized, it prunes files
                writer_properties=writer_properties(),
                commit_properties=commit_properties(prov, meta),
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
    after = files_of(existing)
    changed = bool(added or updated or deleted or set(after) != set(before))
    return MergeResult(
        version=existing.version() if changed else None,
        added=added,
        updated=updated,
        removed=deleted,
        rows=row_count(existing),
        files_added=int(metrics.get("num_target_files_added", 0)),
        files_removed=int(metrics.get("num_target_files_removed", 0)),
        bytes_written=sum(size for path, size in after.items() if path not in before),
    )


def _replaces(columns: Sequence[str]) -> str:
    """SQL: the source row's state is newer than the target's, or equal with other content."""

    def newer(c: str) -> str:
        return f"((t.`{c}` IS NULL) AND (s.`{c}` IS NOT NULL)) OR (s.`{c}` > t.`{c}`)"

    same = "(s.`{0}` IS NOT DISTINCT FROM t.`{0}`)"
    differs = any_of([f"(s.`{c}` IS DISTINCT FROM t.`{c}`)" for c in columns])
    return (
        f"({newer('version')}) OR ({same.format('version')} AND ({newer('updatedAt')})) OR "
        f"({same.format('version')} AND {same.format('updatedAt')} AND ({differs}))"
    )
