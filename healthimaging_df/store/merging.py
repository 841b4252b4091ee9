"""What a merge changes, worked out the same way for every table format.

A merge upserts rows by ``imageSetId`` and deletes by ID. :func:`plan_merge` reads only the rows
of the touched IDs (with the file each lies in) and decides, in Arrow: a stored row is replaced
when the incoming state is newer (``version``, then ``updatedAt``, nulls lowest) or equal with
other content; keys not stored are inserted; removed keys that are stored go. A format then
rewrites only the files holding rows that change or go (``layout.cover``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.store import layout


def rows_with_files(scan: Any, expression: pc.Expression) -> pa.Table:
    """The rows of *scan* matching *expression*, each with its file's path in ``__file``."""
    pieces = []
    for fragment in scan.get_fragments(filter=expression):
        piece = fragment.to_table(schema=scan.schema, filter=expression)
        if piece.num_rows:
            path = pa.array([str(fragment.path)] * piece.num_rows, pa.string())
            pieces.append(piece.append_column("__file", path))
    if not pieces:
        return scan.schema.empty_table().append_column("__file", pa.array([], pa.string()))
    return pa.concat_tables(pieces)


def check_removed(removed_ids: Any) -> list[str]:
    """*removed_ids* as a list of distinct strings, else a typed error."""
    if isinstance(removed_ids, (str, bytes)):
        raise QueryValidationError("removed_ids", "must be a list of keys, not one string")
    removed = list(removed_ids)
    for position, value in enumerate(removed):
        if not isinstance(value, str):
            raise QueryValidationError("removed_ids", "keys must be strings", position)
    if len(set(removed)) != len(removed):
        raise QueryValidationError("removed_ids", "has repeated keys")
    return removed


def check_incoming(
    incoming: pa.Table, target_schema: pa.Schema, key: str, removed: list[str], action: str
) -> pa.Table:
    """*incoming* in the table's column order and types, its keys checked."""
    if key not in target_schema.names:
        raise QueryValidationError("key", f"column {key!r} is not in the table")
    for needed in ("version", "updatedAt"):
        if needed not in target_schema.names:
            raise SnapshotError(f"{action}: the table has no {needed} column")
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
    order = layout.ORDER_COLUMN
    if order in incoming.column_names and incoming.column(order).null_count:
        raise QueryValidationError("incoming", f"has rows without a {layout.ORDER_COLUMN}")
    if removed and pc.any(pc.is_in(keys, value_set=pa.array(removed, pa.string()))).as_py():
        raise QueryValidationError("removed_ids", "names keys that are also in incoming")
    return incoming


def distinct(a: pa.ChunkedArray | pa.Array, b: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``a IS DISTINCT FROM b``, element-wise."""
    both = pc.and_(pc.is_valid(a), pc.is_valid(b))
    return pc.if_else(both, pc.not_equal(a, b), pc.xor(pc.is_null(a), pc.is_null(b)))


def newer(new: pa.ChunkedArray | pa.Array, old: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``new`` ranks above ``old`` (nulls lowest)."""
    return pc.fill_null(
        pc.or_(pc.and_(pc.is_null(old), pc.is_valid(new)), pc.greater(new, old)), False
    )


def replacing(incoming: pa.Table, old: pa.Table, key: str, columns: Sequence[str]) -> pa.Array:
    """Which rows of *incoming* replace the stored row of their key (False where none is)."""
    where = pc.index_in(incoming.column(key), value_set=old.column(key))
    present = pc.is_valid(where)
    if not pc.any(present).as_py():
        return pa.array([False] * incoming.num_rows, pa.bool_())
    stored = old.take(pc.fill_null(where, 0))

    def same(name: str) -> pa.Array:
        return pc.invert(distinct(incoming.column(name), stored.column(name)))

    differs = [distinct(incoming.column(c), stored.column(c)) for c in columns if c != key]
    any_diff = differs[0] if differs else pa.array([False] * incoming.num_rows)
    for item in differs[1:]:
        any_diff = pc.or_(any_diff, item)
    newer_version = newer(incoming.column("version"), stored.column("version"))
    newer_time = newer(incoming.column("updatedAt"), stored.column("updatedAt"))
    same_version = same("version")
    result = pc.or_(
        newer_version,
        pc.or_(
            pc.and_(same_version, newer_time),
            pc.and_(pc.and_(same_version, same("updatedAt")), any_diff),
        ),
    )
    return pc.and_(present, pc.fill_null(result, False))


@dataclass(frozen=True)
class MergePlan:
    """What a merge changes: rows going in, keys and files going out."""

    inserted: pa.Table
    updated: pa.Table
    deleted: int
    going: pa.Table  # the stored rows replaced or deleted, each with its file in ``__file``

    @property
    def new_rows(self) -> pa.Table:
        """The rows written anew (updated, then inserted)."""
        return pa.concat_tables([self.updated, self.inserted])

    @property
    def files(self) -> set[str]:
        """Files holding a row that changes or goes."""
        return {str(path) for path in self.going.column("__file").to_pylist()}

    @property
    def empty(self) -> bool:
        """Nothing changes."""
        return not (self.inserted.num_rows or self.updated.num_rows or self.deleted)


def plan_merge(
    scan: Any, incoming: pa.Table, removed: list[str], key: str, schema: pa.Schema
) -> MergePlan:
    """Read the touched rows of *scan* by key and decide what changes (see ``TableFormat.merge``)."""
    kind = schema.field(key).type
    touched = pa.concat_arrays([incoming.column(key).combine_chunks(), pa.array(removed, kind)])
    old = rows_with_files(scan, pc.field(key).isin(touched))
    present = pc.is_in(incoming.column(key), value_set=old.column(key))
    inserted = incoming.filter(pc.invert(present))
    updated = incoming.filter(replacing(incoming, old, key, schema.names))
    gone = pc.is_in(old.column(key), value_set=pa.array(removed, kind))
    going = pc.or_(gone, pc.is_in(old.column(key), value_set=updated.column(key)))
    deleted = int(pc.sum(gone.cast(pa.int64())).as_py() or 0)
    return MergePlan(inserted, updated, deleted, old.filter(going))


def replace_going(kept: pa.Table, plan: MergePlan, key: str, action: str) -> pa.Table:
    """What a merge writes: *kept* (the stored rows it replaces) less the rows that go, plus new.

    In file order. Every row that goes must be in *kept*, else the statistics lied: refused.
    """
    going = plan.going.column(key)
    leaving = pc.is_in(kept.column(key), value_set=going)
    if pc.sum(leaving.cast(pa.int64())).as_py() != plan.going.num_rows:
        raise SnapshotError(  # the statistics do not cover a row they should: refuse
            f"{action}: the table's file statistics disagree with its rows; run optimize first"
        )
    data = pa.concat_tables(
        [kept.filter(pc.invert(leaving)), plan.new_rows.select(kept.column_names)]
    )
    return layout.file_order(data)
