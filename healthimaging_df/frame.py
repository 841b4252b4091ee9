"""The frame stage: filter exactly, keep the latest version of each image set, order, limit.

Every path that turns pages into rows (a whole result, chunks, a checkpointed export, a refresh's
change scan) goes through these functions, so they share one rule: an image set is represented by
the highest ``(version, updatedAt)`` read of it, and a stale copy never outlives a newer one, even
when the newer one no longer matches (superseded copies are dropped before filtering, in effect).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import flatten, schema
from healthimaging_df.fetch import Page
from healthimaging_df.plan import Plan
from healthimaging_df.predicates import Predicate
from healthimaging_df.provenance import KEY as provenance_key

RANK_COLUMNS = ["imageSetId", "version", "updatedAt"]
_COMPACT_ROWS = 20_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
Rank = tuple[int, int]


def apply_predicates(table: pa.Table, predicates: tuple[Predicate, ...]) -> pa.Table:
    """Rows of *table* that satisfy every predicate.

    A union's plan (and query) holds one ``plan.AnyOf`` predicate: OR over its queries of the AND
    of each query's predicates (``Plan.predicate_groups``), so every caller applies a union exactly.
    """
    if not predicates or table.num_rows == 0:
        return table
    mask = predicates[0].mask(table)
    for p in predicates[1:]:
        mask = pc.and_(mask, p.mask(table))
    return table.filter(mask)


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
    if pc.count_distinct(seen.column("imageSetId")).as_py() == seen.num_rows:
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


def to_frame(
    table: pa.Table, dtype_backend: schema.DtypeBackend, provenance: dict[str, Any] | None
) -> pd.DataFrame:
    """Convert once to pandas, provenance in ``attrs``."""
    frame = schema.arrow_to_pandas(table.combine_chunks(), dtype_backend)
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
    """Gathers a plan's pages into one result; tells the fetcher when a chain can stop."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._matched: list[pa.Table] = []
        self._seen: list[pa.Table] = []  # (imageSetId, version, updatedAt) of every row read
        self._limits: dict[int, _ChainLimit] = {}
        self._pending_rows = 0  # matched rows in page-sized tables since the last compaction
        self._compacted = 0  # how many leading tables of _matched are already compacted

    def _compact(self) -> None:
        """Join the page-sized tables read since the last compaction into one contiguous table.

        Thousands of 50-row tables cost a buffer header per column each; a few large ones do not.
        """
        recent = self._matched[self._compacted :]
        joined = pa.concat_tables(recent).combine_chunks()
        del self._matched[self._compacted :]
        self._matched.append(joined)
        self._compacted = len(self._matched)
        self._pending_rows = 0

    def add(self, page: Page) -> bool:
        """Take one page; return True when its chain needs no more pages (limit reached)."""
        if page.done or page.rows == 0:
            return False
        matched = apply_predicates(page.table, self.plan.predicates)
        if matched.num_rows:
            self._matched.append(matched)
            self._pending_rows += matched.num_rows
            if self._pending_rows >= _COMPACT_ROWS:
                self._compact()
        self._seen.append(page.table.select(RANK_COLUMNS))
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
        if not self._seen:
            return 0
        ids = pa.concat_tables(self._seen).column("imageSetId")
        return int(pc.count_distinct(ids).as_py())

    def table(self) -> pa.Table:
        """The result as Arrow: latest copies only, matched, ordered, limited."""
        matched = pa.concat_tables(self._matched) if self._matched else flatten.EMPTY_TABLE
        seen = pa.concat_tables(self._seen) if self._seen else None
        self._matched, self._seen, self._compacted = [], [], 0
        if seen is not None:
            matched = drop_superseded(matched, seen)
        del seen
        return order(matched, self.plan)

    def finish(
        self,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
        provenance: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """The result: typed, deduplicated, sorted, limited, with provenance in ``attrs``."""
        return to_frame(self.table(), dtype_backend, provenance)


class Chunker:
    """Turns pages into frames of about ``chunk_rows`` matching rows, each image set once.

    Holds the matched rows of at most one chunk plus the highest rank read of every image set
    (what deduplication needs). A row is yielded only if it is the latest copy read so far and its
    image set has not been yielded yet: an image set whose match does not change while the query
    runs comes out exactly once. One read again later at a newer version (it was updated while the
    query ran) is not yielded a second time.
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
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._best: dict[str, Rank] = {}
        self._yielded: set[str] = set()
        self._any = False
        self.late_versions = 0  # newer copies of already-yielded image sets (counted, not yielded)

    def add(self, page: Page) -> Iterator[pd.DataFrame]:
        """Take one page; yield a chunk when enough matching rows are buffered."""
        if page.done or page.rows == 0:
            return
        for image_set, rank in ranks(page.table):
            if rank > self._best.get(image_set, (-2, -2)):
                self._best[image_set] = rank
                if image_set in self._yielded:
                    self.late_versions += 1
        matched = apply_predicates(page.table, self.plan.predicates)
        if matched.num_rows:
            self._pending.append(matched)
            self._pending_rows += matched.num_rows
        if self._pending_rows >= self.chunk_rows:
            yield from self._emit()

    def flush(self) -> Iterator[pd.DataFrame]:
        """Yield what is left; an empty result still yields one empty, typed frame."""
        yield from self._emit()
        if not self._any:
            self._any = True
            yield to_frame(flatten.EMPTY_TABLE, self.dtype_backend, self.provenance)

    def _emit(self) -> Iterator[pd.DataFrame]:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        keep = []
        for image_set, rank in ranks(table):
            fresh = image_set not in self._yielded and rank == self._best.get(image_set)
            keep.append(fresh)
            if fresh:
                self._yielded.add(image_set)
        table = table.filter(pa.array(keep, pa.bool_()))
        if table.num_rows:
            self._any = True
            yield to_frame(table, self.dtype_backend, self.provenance)
