"""Delta merges: upsert by ``imageSetId`` and delete by ID in one commit, rewriting few files.

delta-rs' own MERGE prunes target files only by the min/max of the source's keys: 1% of the rows
changed at random rewrote 10 files of 10 into one unsorted file, after which every refresh
rewrote the whole table. So a merge here works out itself which rows change (in Arrow: the
touched rows are read by key), which files hold them, and the ``createdAt`` spans of those files
(``layout.cover``); it then replaces exactly those spans in one commit with
``write_deltalake(mode="overwrite", predicate=...)``: delta-rs removes the files inside them
(and rewrites a neighbour that only partly overlaps), and the new rows go in sorted, at the
target file size. Files outside the spans are not read or written, so the ``createdAt`` layout
survives every merge. delta-rs checks that every written row satisfies the predicate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa

from healthimaging_df.store import layout
from healthimaging_df.store.delta import encoding, log
from healthimaging_df.store.delta.read import checked_dataset
from healthimaging_df.store.errors import translated
from healthimaging_df.store.merging import check_incoming, check_removed, plan_merge, replace_going
from healthimaging_df.store.table_format import (
    MergeResult,
    any_of,
    check_provenance,
    check_table,
    check_version,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable

# statistics keep milliseconds: a file's last row can lie up to 1 ms past its recorded max
_STATS_PRECISION = timedelta(milliseconds=1)
# a file without statistics is taken to span every plausible createdAt
_EARLIEST = datetime(1900, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(2200, 1, 1, tzinfo=timezone.utc)


def merge_table(
    uri: str | os.PathLike[str],
    incoming: pa.Table,
    removed_ids: Sequence[str],
    provenance: Mapping[str, Any],
    *,
    key: str = "imageSetId",
    expected_version: int | None = None,
    storage_options: Mapping[str, str] | None = None,
    target_file_size: int | None = None,
) -> MergeResult:
    """Upsert *incoming* by *key* and delete *removed_ids*, in one commit.

    A row of *incoming* replaces the table's row with the same key when its ``(version,
    updatedAt)`` is newer (nulls lowest), or equal with any other column different; an older state
    never replaces a newer one. Keys not in the table are inserted; removed keys not in it are
    ignored. Only the files holding touched rows are rewritten (see the module's docstring);
    nothing is committed when nothing changes.

    Parameters
    ----------
    uri
        An existing table of this library.
    incoming
        Rows to upsert, with exactly the table's columns (any order); keys unique and non-null.
    removed_ids
        Keys to delete (rows that left the cohort, image sets deleted from the datastore); none
        of them may be in *incoming*.
    provenance
        JSON-ready dict stored with the commit (the new version's provenance).
    key
        The key column.
    expected_version
        The version the caller read; a table that moved past it raises ``SnapshotConflictError``.
    storage_options
        As in ``write_table``.
    target_file_size
        Bytes at which a rewritten file is closed (delta-rs' default when None).

    Returns
    -------
    MergeResult
    """
    location = log.table_location(uri)
    incoming = check_table("incoming", incoming)
    prov = check_provenance(provenance)
    check_version(expected_version, None)
    removed = check_removed(removed_ids)
    options = log.options_for(location, storage_options)
    action = "merging into the snapshot"
    existing = log.open_table(location, options, action=action, version=expected_version)
    assert existing is not None
    table_fs = log.log_fs(location, options)
    state = log.state_at(table_fs, existing.version())
    target_schema = state.arrow_schema
    incoming = check_incoming(incoming, target_schema, key, removed, action)
    parts = list(existing.metadata().partition_columns)
    if incoming.num_rows == 0 and not removed:
        return MergeResult(None, 0, 0, 0, log.row_count(existing), 0, 0, 0)

    scan, names = checked_dataset(existing, state, table_fs, action)
    with translated(action):
        plan = plan_merge(scan, incoming, removed, key, target_schema)
    if plan.empty:
        return MergeResult(None, 0, 0, 0, log.row_count(existing), 0, 0, 0)

    order = layout.ORDER_COLUMN if layout.ORDER_COLUMN in target_schema.names else None
    files = _file_spans(existing, parts, order)
    touched = {names[name] for name in plan.files}
    spans = layout.cover(files, touched, _points(plan.new_rows, parts, order))
    with translated(action):
        kept = scan.to_table(filter=layout.span_filter(spans, parts, order))
    data = replace_going(kept, plan, key, action)
    data = encoding.to_storage(layout.file_order(data), encoding.table_schema(existing.schema()))
    before = log.files_of(existing)
    inserted, updated, deleted = plan.inserted, plan.updated, plan.deleted
    meta = {
        "operation": "merge",
        "arrow_schema": log.schema_b64(target_schema),
        "partition_by": parts,
        "added": inserted.num_rows,
        "updated": updated.num_rows,
        "removed": deleted,
        "rewritten_rows": data.num_rows,
    }
    from deltalake import write_deltalake

    with translated(action):
        write_deltalake(
            existing,
            data,
            mode="overwrite",
            predicate=_span_sql(spans, parts, target_schema, order),
            partition_by=parts or None,
            target_file_size=target_file_size,
            writer_properties=log.writer_properties(),
            commit_properties=log.commit_properties(prov, meta),
        )
    after = log.files_of(existing)
    return MergeResult(
        version=existing.version(),
        added=inserted.num_rows,
        updated=updated.num_rows,
        removed=deleted,
        rows=log.row_count(existing),
        files_added=len(set(after) - set(before)),
        files_removed=len(set(before) - set(after)),
        bytes_written=sum(size for path, size in after.items() if path not in before),
    )


def _file_spans(
    table: DeltaTable, parts: Sequence[str], column: str | None
) -> list[layout.FileSpan]:
    """Every data file's partition values and ``createdAt`` range, from the log's statistics."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return []
    names = actions.column_names if column is not None else []
    lows = actions.column(f"min.{column}").to_pylist() if f"min.{column}" in names else None
    highs = actions.column(f"max.{column}").to_pylist() if f"max.{column}" in names else None
    values = [actions.column(f"partition.{p}").to_pylist() for p in parts]
    spans = []
    for index, path in enumerate(actions.column("path").to_pylist()):
        low = lows[index] if lows is not None else None
        high = highs[index] if highs is not None else None
        spans.append(
            layout.FileSpan(
                unquote(str(path)),
                tuple(v[index] for v in values),
                _utc(low) if low is not None else _EARLIEST,
                _utc(high) + _STATS_PRECISION if high is not None else _LATEST,
            )
        )
    return spans


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _points(
    rows: pa.Table, parts: Sequence[str], column: str | None
) -> list[tuple[tuple[Any, ...], datetime]]:
    """(partition values, createdAt) of every row written anew."""
    moments = rows.column(column).to_pylist() if column else [_EARLIEST] * rows.num_rows
    values = [rows.column(p).to_pylist() for p in parts]
    return [(tuple(v[index] for v in values), _utc(moment)) for index, moment in enumerate(moments)]


def _span_sql(
    spans: Sequence[layout.Span], parts: Sequence[str], schema: pa.Schema, order: str | None
) -> str:
    """The spans as the SQL predicate delta-rs replaces (a balanced OR of ranges)."""
    terms = []
    for span in spans:
        term = []
        if order is not None:
            term += [f"`{order}` >= {_timestamp(span.low)}", f"`{order}` < {_timestamp(span.high)}"]
        for name, value in zip(parts, span.partition, strict=True):
            term.append(_equals(name, value, schema.field(name).type))
        terms.append("(" + " AND ".join(term or ["TRUE"]) + ")")
    return any_of(terms)


def _timestamp(moment: datetime) -> str:
    return "'" + moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "'"


def _equals(name: str, value: Any, kind: pa.DataType) -> str:
    if value is None:
        return f"`{name}` IS NULL"
    if pa.types.is_boolean(kind):
        return f"`{name}` = {'true' if value else 'false'}"
    if pa.types.is_integer(kind):
        return f"`{name}` = {int(value)}"
    text = str(value).replace("'", "''")
    return f"`{name}` = '{text}'"
