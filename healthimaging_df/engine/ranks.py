"""Ranks: which copy of an image set is the latest, and the index of those a chunked run has read.

An image set's copies are ordered by ``(version, updatedAt)``, a null lowest (:func:`rank_of`);
a result keeps the highest read. :class:`RankIndex` remembers the highest rank of every image set
a chunked run has read, and which it has yielded, in sorted numpy arrays (about 49 bytes an image
set), so a run of millions of rows can tell a late newer copy from one already handed out.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "RANK_COLUMNS",
    "RANK_SHARDS",
    "RANK_SHARD_BITS",
    "Rank",
    "RankIndex",
    "rank_arrays",
    "rank_of",
    "ranks",
]

RANK_COLUMNS = ["imageSetId", "version", "updatedAt"]
RANK_SHARD_BITS = 4
RANK_SHARDS = 1 << RANK_SHARD_BITS  # a RankIndex's shards: a merge copies 1/16 of the ids
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of id words * this
_NULL_RANK = np.iinfo(np.int64).min  # a null version or updatedAt: lower than any value
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
Rank = tuple[int, int]


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
