"""The frame stage: filter exactly, keep the latest version of each image set, order, limit.

Every path that turns pages into rows (a whole result, chunks, a checkpointed export, a refresh's
change scan) goes through these functions, so they share one rule: an image set is represented by
the highest ``(version, updatedAt)`` read of it, and a stale copy never outlives a newer one, even
when the newer one no longer matches (superseded copies are dropped before filtering, in effect).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import schema
from healthimaging_df.engine import flatten
from healthimaging_df.engine.fetch import Page
from healthimaging_df.engine.provenance import KEY as provenance_key
from healthimaging_df.plan import Plan
from healthimaging_df.plan.predicates import Predicate

RANK_COLUMNS = ["imageSetId", "version", "updatedAt"]
# page tables are joined into one contiguous table every this many rows: a 50-row page costs about
# 30 KB of buffer and object headers besides its data, a few thousand rows in one table do not
_COMPACT_ROWS = 5_000
RANK_SHARD_BITS = 4
RANK_SHARDS = 1 << RANK_SHARD_BITS  # a RankIndex's shards: a merge copies 1/16 of the ids
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of id words * this
_FOLD_ROWS = 50_000  # a Chunker folds the ranks it has read into its index every this many rows
_NULL_RANK = np.iinfo(np.int64).min  # a null version or updatedAt: lower than any value
_EMPTY_RANKS = flatten.EMPTY_TABLE.select(RANK_COLUMNS)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
Rank = tuple[int, int]


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


class Buffer:
    """Tables appended a page at a time, joined into contiguous tables every ``_COMPACT_ROWS`` rows.

    Thousands of 50-row tables cost a buffer and object header per column each; a few large ones
    do not. :meth:`take` hands everything over as a list of tables and forgets it.
    """

    def __init__(self) -> None:
        self._tables: list[pa.Table] = []
        self._tail: list[pa.Table] = []
        self._tail_rows = 0
        self.rows = 0

    def append(self, table: pa.Table) -> None:
        """Add *table* (of the same columns as the others)."""
        if table.num_rows == 0:
            return
        self._tail.append(table)
        self._tail_rows += table.num_rows
        self.rows += table.num_rows
        if self._tail_rows >= _COMPACT_ROWS:
            self._compact()

    def _compact(self) -> None:
        if self._tail:
            self._tables.append(pa.concat_tables(self._tail).combine_chunks())
            self._tail, self._tail_rows = [], 0
            release_memory()

    def chunks(self, name: str) -> list[pa.Array]:
        """The chunks of column *name* of every table added (nothing is copied)."""
        return [c for t in (*self._tables, *self._tail) for c in t.column(name).chunks]

    def take(self) -> list[pa.Table]:
        """Every table added, compacted; the buffer is empty afterwards."""
        self._compact()
        tables, self._tables, self.rows = self._tables, [], 0
        return tables


_pool_lock = threading.Lock()
_pool_users = 0
_pool_saved: pa.MemoryPool | None = None


@contextmanager
def result_memory_pool() -> Iterator[None]:
    """Allocate Arrow memory from the system allocator while a large result is built.

    mimalloc (pyarrow's default) keeps a segment's pages while any block in it lives; a result
    built from thousands of short-lived page tables, compacted, gathered and converted to pandas,
    leaves many such segments: peak resident memory of a 300,000-row ``to_dataframe`` was 1.87x
    the frame under mimalloc and 1.44x under glibc's allocator (docs/benchmarks.md). pyarrow's
    default pool is switched for the duration (it is process-wide: arrays made meanwhile by other
    threads come from it too, which changes nothing but where their bytes live) and restored
    when the last such call ends. Left alone when ``ARROW_DEFAULT_MEMORY_POOL`` is set or the
    default is not mimalloc: a user's choice of allocator stands.
    """
    global _pool_users, _pool_saved
    with _pool_lock:
        if _pool_users == 0:
            current = pa.default_memory_pool()
            if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ and current.backend_name == "mimalloc":
                _pool_saved = current
                pa.set_memory_pool(pa.system_memory_pool())
        _pool_users += 1
    try:
        yield
    finally:
        with _pool_lock:
            _pool_users -= 1
            if _pool_users == 0 and _pool_saved is not None:
                if pa.default_memory_pool().backend_name == "system":  # else someone chose anew
                    pa.set_memory_pool(_pool_saved)
                _pool_saved = None


def release_memory() -> None:
    """Hand memory Arrow's allocator holds but no longer uses back to the system.

    mimalloc (pyarrow's default) keeps freed pages for reuse; between the page-sized tables a
    compaction frees and the large ones it makes, that can be tens of MiB of resident memory.
    """
    pa.default_memory_pool().release_unused()


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


def rank_of(version: int | None, updated_at: datetime | None) -> Rank:
    """Order of two states of one image set: version, then updatedAt; a null is lowest."""
    micros = -1
    if updated_at is not None:
        aware = updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=timezone.utc)
        micros = (aware - _EPOCH) // _MICROSECOND
    return (-1 if version is None else version, micros)


def ranks(table: pa.Table) -> Iterator[tuple[str, Rank]]:
    """``(imageSetId, rank)`` of every row (ids present)."""
    ids = table.column("imageSetId").to_pylist()
    versions = table.column("version").to_pylist()
    micros = pc.cast(table.column("updatedAt"), pa.int64()).to_pylist()
    for image_set, version, stamp in zip(ids, versions, micros, strict=True):
        if image_set is not None:
            yield image_set, (-1 if version is None else version, -1 if stamp is None else stamp)


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


def rank_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(imageSetId, version, updatedAt)`` of *table* as numpy arrays.

    Ids become fixed-width bytes, the rank int64 with nulls lowest. Rows must have an id (pages
    are checked for one).
    """
    column = table.column("imageSetId").combine_chunks()
    ids = np.asarray(column.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype=np.bytes_)
    if table.num_rows == 0:
        ids = ids.astype("S32")
    versions = pc.fill_null(table.column("version"), _NULL_RANK).to_numpy()
    stamps = pc.cast(table.column("updatedAt"), pa.int64())
    return ids, versions.astype(np.int64), pc.fill_null(stamps, _NULL_RANK).to_numpy()


class _Level:
    """Image sets sorted by id, with their highest rank read and whether they were yielded."""

    def __init__(self) -> None:
        self.ids = np.empty(0, "S32")
        self.versions = np.empty(0, np.int64)
        self.stamps = np.empty(0, np.int64)
        self.done = np.empty(0, np.bool_)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each of *ids* is (or would go), and whether it is there."""
        at = np.searchsorted(self.ids, ids)
        found = at < len(self.ids)
        found[found] = self.ids[at[found]] == ids[found]
        return at, found

    def insert(self, at: np.ndarray, ids: np.ndarray, v: np.ndarray, t: np.ndarray) -> None:
        """Insert sorted, absent *ids* at positions *at* (from :meth:`find`), not yet yielded."""
        self.ids = np.insert(self.ids, at, ids)
        self.versions = np.insert(self.versions, at, v)
        self.stamps = np.insert(self.stamps, at, t)
        self.done = np.insert(self.done, at, np.zeros(len(ids), np.bool_))

    def absorb(self, other: _Level) -> None:
        """Merge *other* (disjoint ids) into this level."""
        at, _ = self.find(other.ids)
        self.ids = np.insert(self.ids, at, other.ids)
        self.versions = np.insert(self.versions, at, other.versions)
        self.stamps = np.insert(self.stamps, at, other.stamps)
        self.done = np.insert(self.done, at, other.done)


class _Shard:
    """One shard of a :class:`RankIndex`: a large level and a small one, both sorted by id.

    New ids go to the small level, merged into the large one when it reaches a quarter of its
    size, so a fold costs the size of what it adds, not of the whole shard.
    """

    def __init__(self) -> None:
        self._main = _Level()
        self._recent = _Level()

    def __len__(self) -> int:
        return len(self._main.ids) + len(self._recent.ids)

    def fold(self, ids: np.ndarray, versions: np.ndarray, stamps: np.ndarray) -> int:
        """Record ranks read; return how many raised the rank of an image set already yielded."""
        if len(ids) == 0:
            return 0
        order = np.lexsort((stamps, versions, ids))  # by id, then rank: the last of each is best
        ids, versions, stamps = ids[order], versions[order], stamps[order]
        last = np.ones(len(ids), np.bool_)
        last[:-1] = ids[1:] != ids[:-1]
        ids, versions, stamps = ids[last], versions[last], stamps[last]
        late = 0
        rest = np.ones(len(ids), np.bool_)
        for level in (self._main, self._recent):
            at, found = level.find(ids)
            found &= rest
            where, v, t = at[found], versions[found], stamps[found]
            newer = (v > level.versions[where]) | (
                (v == level.versions[where]) & (t > level.stamps[where])
            )
            late += int(np.count_nonzero(newer & level.done[where]))
            level.versions[where[newer]] = v[newer]
            level.stamps[where[newer]] = t[newer]
            rest &= ~found
        if rest.any():
            at, _ = self._recent.find(ids[rest])
            self._recent.insert(at, ids[rest], versions[rest], stamps[rest])
            if len(self._recent.ids) > max(4096, len(self._main.ids) // 4):
                self._main.absorb(self._recent)
                self._recent = _Level()
        return late

    def claim(self, ids: np.ndarray, versions: np.ndarray, stamps: np.ndarray) -> np.ndarray:
        """Which rows to yield; their image sets are marked yielded.

        A row is yielded when it is the latest copy read of an image set not yielded yet, and the
        first of identical copies. Every id must have been folded.
        """
        fresh = np.zeros(len(ids), np.bool_)
        for level in (self._main, self._recent):
            at, found = level.find(ids)
            where = at[found]
            fresh[found] = (
                ~level.done[where]
                & (level.versions[where] == versions[found])
                & (level.stamps[where] == stamps[found])
            )
        rows = np.flatnonzero(fresh)
        _, first = np.unique(ids[rows], return_index=True)
        rows = np.sort(rows[first])
        for level in (self._main, self._recent):
            at, found = level.find(ids[rows])
            level.done[at[found]] = True
        return rows


class RankIndex:
    """The highest ``(version, updatedAt)`` read of every image set, and which were yielded.

    Numpy arrays sorted by id, about 49 bytes per image set (a dict of tuples costs ten times
    that), in :data:`RANK_SHARDS` shards by a hash of the id: merging a shard's levels copies
    that shard only, so the index never needs twice its size for a moment (one array of every
    id did: 80 bytes a row at the peak instead of 49).
    """

    def __init__(self) -> None:
        self._shards = [_Shard() for _ in range(RANK_SHARDS)]

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)

    def fold(self, ids: np.ndarray, versions: np.ndarray, stamps: np.ndarray) -> int:
        """Record ranks read; return how many raised the rank of an image set already yielded."""
        late = 0
        for shard, rows in self._split(ids):
            late += shard.fold(ids[rows], versions[rows], stamps[rows])
        return late

    def claim(self, ids: np.ndarray, versions: np.ndarray, stamps: np.ndarray) -> np.ndarray:
        """Which rows to yield, in order; their image sets are marked yielded (see ``_Shard``)."""
        kept = [
            rows[shard.claim(ids[rows], versions[rows], stamps[rows])]
            for shard, rows in self._split(ids)
        ]
        return np.sort(np.concatenate(kept)) if kept else np.empty(0, np.intp)

    def _split(self, ids: np.ndarray) -> Iterator[tuple[_Shard, np.ndarray]]:
        """Each shard with the positions of *ids* that belong to it (an id's copies stay together)."""
        if len(ids) == 0:
            return
        words = np.ascontiguousarray(ids, "S32").view(np.uint64).reshape(-1, 4)
        mixed = (words[:, 0] ^ words[:, 1] ^ words[:, 2] ^ words[:, 3]) * _GOLDEN
        shards = (mixed >> np.uint64(64 - RANK_SHARD_BITS)).astype(np.intp)
        order = np.argsort(shards, kind="stable")
        bounds = np.searchsorted(shards[order], np.arange(RANK_SHARDS + 1))
        for n in range(RANK_SHARDS):
            if bounds[n] < bounds[n + 1]:
                yield self._shards[n], order[bounds[n] : bounds[n + 1]]


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
