"""The frame stage: filter exactly, keep the latest version of each image set, order, limit.

Ranks (which copy of an image set is the latest, and the index a chunked run keeps of them) are
``engine.ranks``; how a large result is held in memory (compacted buffers, the allocator) is
``engine.memory``.

Every path that turns pages into rows (a whole result, chunks, a checkpointed export, a refresh's
change scan) goes through these functions, so they share one rule: an image set is represented by
the highest ``(version, updatedAt)`` read of it, and a stale copy never outlives a newer one, even
when the newer one no longer matches (superseded copies are dropped before filtering, in effect).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import schema
from healthimaging_df.engine import flatten
from healthimaging_df.engine.fetch import Page
from healthimaging_df.engine.memory import Buffer, release_memory, result_memory_pool
from healthimaging_df.engine.provenance import KEY as provenance_key
from healthimaging_df.engine.ranks import (
    RANK_COLUMNS,
    Rank,
    RankIndex,
    rank_arrays,
    rank_of,
    ranks,
)
from healthimaging_df.plan import Plan
from healthimaging_df.plan.predicates import Predicate

# Names that moved to engine.ranks and engine.memory stay importable from here.
__all__ = [
    "RANK_COLUMNS",
    "Buffer",
    "Chunker",
    "Collector",
    "Rank",
    "RankIndex",
    "apply_predicates",
    "distinct_count",
    "drop_superseded",
    "frame_of",
    "latest_in_order",
    "latest_rows",
    "order",
    "predicate_mask",
    "rank_arrays",
    "rank_of",
    "ranks",
    "release_memory",
    "result_memory_pool",
    "result_positions",
    "split_page",
    "to_frame",
]

_FOLD_ROWS = 50_000  # a Chunker folds the ranks it has read into its index every this many rows
_EMPTY_RANKS = flatten.EMPTY_TABLE.select(RANK_COLUMNS)


def distinct_count(values: pa.ChunkedArray) -> int:
    """How many distinct non-null values *values* holds.

    By sorting, not hashing: Arrow's hash of a string column (``pc.count_distinct``) peaks at
    about 240 bytes a row, a sort at about 15, and this runs over every row of a result.
    """
    values = values.drop_null()
    if len(values) < 2:
        return len(values)
    ordered = values.take(pc.sort_indices(values)).combine_chunks()
    return 1 + int(
        pc.sum(pc.not_equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))).as_py()
    )


def apply_predicates(table: pa.Table, predicates: tuple[Predicate, ...]) -> pa.Table:
    """Rows of *table* that satisfy every predicate.

    A union's plan (and query) holds one ``plan.AnyOf`` predicate: OR over its queries of the AND
    of each query's predicates (``Plan.predicate_groups``), so every caller applies a union exactly.
    """
    if not predicates or table.num_rows == 0:
        return table
    return table.filter(predicate_mask(table, predicates))


def predicate_mask(table: pa.Table, predicates: tuple[Predicate, ...]) -> pa.ChunkedArray:
    """True where a row satisfies every predicate (a null verdict is False, as a filter drops it)."""
    mask = predicates[0].mask(table)
    for p in predicates[1:]:
        mask = pc.and_(mask, p.mask(table))
    return pc.fill_null(mask, False)


def split_page(table: pa.Table, predicates: tuple[Predicate, ...]) -> tuple[pa.Table, pa.Table]:
    """The rows of a page that match, and the ranks (``RANK_COLUMNS``) of those that do not.

    What deduplication needs: a matching row carries its own rank, a row that does not match only
    its rank (a newer copy that no longer matches supersedes an older one that does).
    """
    if not predicates or table.num_rows == 0:
        return table, _EMPTY_RANKS
    mask = predicate_mask(table, predicates)
    return table.filter(mask), table.select(RANK_COLUMNS).filter(pc.invert(mask))


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per imageSetId: the highest version, then the latest updatedAt (nulls lowest).

    Rows without an imageSetId are dropped (they cannot be told apart).
    """
    table = table.filter(pc.is_valid(table.column("imageSetId")))
    if table.num_rows == 0:
        return table
    # nulls sort last in either direction, so a null version or updatedAt never beats a known one
    ordered = table.sort_by(
        [("imageSetId", "ascending"), ("version", "descending"), ("updatedAt", "descending")]
    )
    ids = ordered.column("imageSetId").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), first]))


def drop_superseded(matched: pa.Table, seen: pa.Table) -> pa.Table:
    """One row per image set of *matched*, and only where it is the latest copy *seen* (unfiltered).

    A stale copy that matches must not outlive a newer copy that no longer does (an image set read
    twice while it was being updated).
    """
    if matched.num_rows == 0:
        return matched
    if distinct_count(seen.column("imageSetId")) == seen.num_rows:
        return matched  # every image set was read once: nothing is superseded
    latest = latest_rows(seen.select(RANK_COLUMNS)).rename_columns(["imageSetId", "_v", "_u"])
    joined = matched.join(latest, "imageSetId", join_type="inner")
    current = pc.and_(
        _same(joined.column("version"), joined.column("_v")),
        _same(joined.column("updatedAt"), joined.column("_u")),
    )
    kept = joined.filter(current).drop_columns(["_v", "_u"])
    return latest_rows(kept).select(matched.column_names)  # identical copies: keep one


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """Element-wise equality where two nulls are equal."""
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(both_null, pc.fill_null(pc.equal(a, b), False))


def order(table: pa.Table, plan: Plan) -> pa.Table:
    """The plan's order (sort column, then imageSetId; nulls last), cut to its limit."""
    if table.num_rows > 1:
        direction = "ascending" if plan.ascending else "descending"
        # nulls sort last in either direction (pyarrow's default, as the frame always did)
        table = table.sort_by([(plan.sort_column, direction), ("imageSetId", "ascending")])
    if plan.limit is not None:
        table = table.slice(0, plan.limit)
    return table


def latest_in_order(matched: list[pa.Table], unmatched: list[pa.Table], plan: Plan) -> pa.Table:
    """The result of matching rows read: latest copies only, ordered and limited.

    The same rows in the same order as :func:`drop_superseded` then :func:`order`; *unmatched*
    holds the ranks of rows read that did not match. Both lists are emptied: which rows to keep,
    and in what order, is worked out on the rank and sort columns alone, then the result is
    gathered one column at a time, each source column let go once gathered, so that the peak is
    about one copy of the result plus a column (when nothing else holds the tables).
    """
    positions = result_positions(matched, unmatched, plan)
    unmatched.clear()
    return _gather(matched, positions)


def result_positions(matched: list[pa.Table], unmatched: list[pa.Table], plan: Plan) -> pa.Array:
    """Positions, in the concatenation of *matched*, of the result's rows in the result's order.

    Only the rank columns and the plan's sort column of *matched* are read, so a caller can pass
    those alone (the export's final pass keeps its rows on disk).
    """
    keep = _latest_positions(matched, unmatched)
    return _order_positions(matched, keep, plan)


def _column(tables: list[pa.Table], name: str, kind: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array([c for t in tables for c in t.column(name).chunks], kind)


def _latest_positions(matched: list[pa.Table], unmatched: list[pa.Table]) -> pa.Array | None:
    """Positions (in the concatenation of *matched*) of the rows to keep; None for all of them.

    A matched row is kept when it is the first read of its image set's highest
    ``(version, updatedAt)`` (nulls lowest) among every row read, matched or not.
    """
    rows = sum(t.num_rows for t in matched)
    if rows == 0:
        return None
    ranks = [t.select(RANK_COLUMNS) for t in (*matched, *unmatched) if t.num_rows]
    table = pa.concat_tables(ranks)
    del ranks
    # a stable sort: among equal ranks the earliest row comes first, and matched rows precede
    # unmatched ones; nulls sort last in either direction, so a null rank is the lowest. (A sort
    # rather than a hash for the common "every image set read once" case: a hash of the ids
    # costs sixteen times the memory.)
    ordered = pc.sort_indices(
        table,
        sort_keys=[
            ("imageSetId", "ascending"),
            ("version", "descending"),
            ("updatedAt", "descending"),
        ],
    )
    ids = table.column("imageSetId").take(ordered).combine_chunks()
    del table
    differs = pc.fill_null(pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)), True)
    first = pc.and_(pc.is_valid(ids), pa.concat_arrays([pa.array([True]), differs]))
    if ids.null_count == 0 and pc.all(first).as_py():
        return None  # every image set was read once: nothing is superseded
    leaders = ordered.filter(first)
    kept = leaders.filter(pc.less(leaders, pa.scalar(rows, leaders.type)))
    return pc.take(kept, pc.sort_indices(kept))


def _order_positions(matched: list[pa.Table], keep: pa.Array | None, plan: Plan) -> pa.Array:
    """Positions of the kept rows in the plan's order (sort column, then imageSetId), limited."""
    rows = sum(t.num_rows for t in matched)
    if keep is None:
        keep = pa.array(np.arange(rows, dtype=np.int64))
    if len(keep) > 1:
        kind = matched[0].schema.field(plan.sort_column).type
        keys = pa.table(
            {
                "key": _column(matched, plan.sort_column, kind),
                "id": _column(matched, "imageSetId", pa.string()),
            }
        ).take(keep)
        direction = "ascending" if plan.ascending else "descending"
        # nulls sort last in either direction (pyarrow's default, as the frame always did)
        keep = keep.take(pc.sort_indices(keys, sort_keys=[("key", direction), ("id", "ascending")]))
    if plan.limit is not None:
        keep = keep.slice(0, plan.limit)
    return keep


def _gather(tables: list[pa.Table], positions: pa.Array) -> pa.Table:
    """Rows *positions* of the concatenation of *tables*, one column at a time; empties *tables*."""
    if not tables:
        return flatten.EMPTY_TABLE
    table = pa.concat_tables(tables)
    tables.clear()
    schema_ = table.schema
    columns = []
    while table.num_columns:
        columns.append(table.column(0).take(positions))
        table = table.remove_column(0)  # the last reference to the source column goes
        release_memory()
    return pa.Table.from_arrays(columns, schema=schema_)


def to_frame(
    table: pa.Table, dtype_backend: schema.DtypeBackend, provenance: dict[str, Any] | None
) -> pd.DataFrame:
    """Convert once to pandas, provenance in ``attrs``."""
    return frame_of([table], dtype_backend, provenance)


def frame_of(
    holder: list[pa.Table], dtype_backend: schema.DtypeBackend, provenance: dict[str, Any] | None
) -> pd.DataFrame:
    """:func:`to_frame` of the one table in *holder*, which is emptied.

    Each Arrow column is freed as soon as it is converted, unless someone else holds the table:
    the frame is then built without a second copy of the result.
    """
    combined = holder.pop().combine_chunks()  # a new table object: releasing it frees no one's
    frame = schema.arrow_to_pandas(combined, dtype_backend, release=True)
    del combined
    release_memory()
    if provenance is not None:
        frame.attrs[provenance_key] = provenance
    return frame


@dataclass
class _ChainLimit:
    keys: list[Any] = field(default_factory=list)  # matched, non-null sort keys, in chain order
    dated: bool = False  # a non-null sort key has been read


class Collector:
    """Gathers a plan's pages into one result; tells the fetcher when a chain can stop.

    Holds the matching rows (compacted every few thousand rows) and the ranks of the rows that did
    not match: what deduplication needs, and no more.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._matched = Buffer()
        self._unmatched = Buffer()  # (imageSetId, version, updatedAt) of rows read, not matching
        self._limits: dict[int, _ChainLimit] = {}
        self._distinct: int | None = None

    def add(self, page: Page) -> bool:
        """Take one page; return True when its chain needs no more pages (limit reached)."""
        if page.done or page.rows == 0:
            return False
        matched, unmatched = split_page(page.table, self.plan.predicates)
        self._matched.append(matched)
        self._unmatched.append(unmatched)
        if not self.plan.stops_early:
            return False
        return self._limit_reached(page.chain, page.table, matched)

    def _limit_reached(self, chain: int, page: pa.Table, matched: pa.Table) -> bool:
        """Tell whether a chain, which arrives in sort order, can stop.

        Only rows whose sort key is known count: the client sorts nulls last, so an undated row
        (which the service may send first) never takes the place of a dated one still to come.
        The chain stops once it holds ``limit`` dated matches and its cursor has moved past the
        limit-th one's key (no tie can follow), or once undated rows follow dated ones.
        """
        assert self.plan.limit is not None
        state = self._limits.setdefault(chain, _ChainLimit())
        column = self.plan.sort_column
        state.keys.extend(matched.column(column).drop_null().to_pylist())
        known = page.column(column).drop_null()
        if len(state.keys) < self.plan.limit:
            state.dated = state.dated or len(known) > 0
            return False
        if len(known) == 0 or page.column(column)[-1].is_valid is False:
            # undated rows after dated ones: the dated rows are exhausted
            done = state.dated or len(known) > 0
            state.dated = True
            return done
        state.dated = True
        return bool(known[-1].as_py() != state.keys[self.plan.limit - 1])

    def distinct_seen(self) -> int:
        """Image sets read, matching or not."""
        ids = pa.chunked_array(
            [*self._matched.chunks("imageSetId"), *self._unmatched.chunks("imageSetId")],
            pa.string(),
        )
        return distinct_count(ids)

    def table(self) -> pa.Table:
        """The result as Arrow: latest copies only, matched, ordered, limited; the collector empties."""
        return latest_in_order(self._matched.take(), self._unmatched.take(), self.plan)

    def finish(
        self,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
        provenance: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """The result: typed, deduplicated, sorted, limited, with provenance in ``attrs``."""
        return frame_of([self.table()], dtype_backend, provenance)


class Chunker:
    """Turns pages into frames of about ``chunk_rows`` matching rows, each image set once.

    Holds the matched rows of at most one chunk plus the highest rank read of every image set
    (what deduplication needs, in a :class:`RankIndex`). A row is yielded only if it is the latest
    copy read so far and its image set has not been yielded yet: an image set whose match does
    not change while the query runs comes out exactly once. One read again later at a newer
    version (it was updated while the query ran) is not yielded a second time.
    """

    def __init__(
        self,
        plan: Plan,
        chunk_rows: int,
        dtype_backend: schema.DtypeBackend,
        provenance: dict[str, Any],
    ) -> None:
        self.plan = plan
        self.chunk_rows = chunk_rows
        self.dtype_backend = dtype_backend
        self.provenance = provenance
        self._pending = Buffer()  # matching rows not yet yielded
        self._read = Buffer()  # ranks of rows read since the last fold
        self._index = RankIndex()
        self._any = False
        self.late_versions = 0  # newer copies of already-yielded image sets (counted, not yielded)

    def add(self, page: Page) -> Iterator[pd.DataFrame]:
        """Take one page; yield a chunk when enough matching rows are buffered."""
        if page.done or page.rows == 0:
            return
        self._read.append(page.table.select(RANK_COLUMNS))
        self._pending.append(apply_predicates(page.table, self.plan.predicates))
        if self._read.rows >= _FOLD_ROWS:
            self._fold()
        if self._pending.rows >= self.chunk_rows:
            yield from self._emit()

    def flush(self) -> Iterator[pd.DataFrame]:
        """Yield what is left; an empty result still yields one empty, typed frame."""
        yield from self._emit()
        if not self._any:
            self._any = True
            yield to_frame(flatten.EMPTY_TABLE, self.dtype_backend, self.provenance)

    def _fold(self) -> None:
        for table in self._read.take():
            if table.column("imageSetId").null_count:
                table = table.filter(pc.is_valid(table.column("imageSetId")))
            self.late_versions += self._index.fold(*rank_arrays(table))

    def _emit(self) -> Iterator[pd.DataFrame]:
        holder = self._fresh()
        if holder:
            yield frame_of(holder, self.dtype_backend, self.provenance)

    def _fresh(self) -> list[pa.Table]:
        """The pending rows to yield (in a holder list, or none): latest copies, once each."""
        self._fold()
        tables = self._pending.take()
        if not tables:
            return []
        table = pa.concat_tables(tables)
        del tables
        if table.column("imageSetId").null_count:
            table = table.filter(pc.is_valid(table.column("imageSetId")))
        rows = self._index.claim(*rank_arrays(table))
        if len(rows) < table.num_rows:  # else every row is fresh: no copy needed
            table = table.take(pa.array(rows, pa.int64()))
        if not table.num_rows:
            return []
        self._any = True
        return [table]


class TableChunker(Chunker):
    """A :class:`Chunker` that yields Arrow tables of the declared schema: no pandas on the way."""

    def add(self, page: Page) -> Iterator[pa.Table]:
        """Take one page; yield a table when enough matching rows are buffered."""
        return super().add(page)

    def flush(self) -> Iterator[pa.Table]:
        """Yield what is left; an empty result still yields one empty, typed table."""
        yield from self._emit()
        if not self._any:
            self._any = True
            yield flatten.EMPTY_TABLE

    def _emit(self) -> Iterator[pa.Table]:
        holder = self._fresh()
        if holder:
            yield holder.pop().combine_chunks()
