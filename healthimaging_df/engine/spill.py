"""Spill files of a checkpointed export: matching rows on disk, the result put in order by buckets.

An export's result can be larger than memory. While it runs, each unfinished task's matching rows
go to a spill file a few thousand rows at a time (:class:`TaskRows`); a finished task's rows go to
the checkpoint's parts. The final pass (:class:`SortedRows`) reads only the rank and sort columns
of the parts, works out from them which rows survive (latest copy of each image set) and in what
order, then puts each surviving row into the bucket of its output row group (an Arrow IPC file) and
hands the buckets over one at a time, each sorted: at most a row group, a part and the rank columns
of the result sit in memory, whatever the result's size.

Spill files hold unredacted rows (PHI): they live in a private folder (mode 0700, from
:func:`tempfile.mkdtemp`) beside the target, or in the private checkpoint folder of a redacted
export, and are deleted when the export ends, whether it succeeded or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df.engine import flatten
from healthimaging_df.engine.frame import result_positions
from healthimaging_df.engine.memory import Buffer, release_memory
from healthimaging_df.engine.ranks import RANK_COLUMNS
from healthimaging_df.plan import Plan

SPILL_PREFIX = ".ahi-spill-"
SPILL_ROWS = 5_000  # a task's matching rows go to its spill file this many at a time
_POSITION = "__ahi_position"  # a bucket's column: the row's place in the output
_LOCK = ".lock"  # held by the run that owns the folder
_UNLOCKED_STALE_SECONDS = 3600  # a folder without a lock this old is taken for abandoned
_SLICES = 8  # an output row group is gathered from this many bucket files, one at a time
_MAX_BUCKETS = 256  # fewer slices per group when a result has more groups (open files)


def spill_prefix(destination: str) -> str:
    """The name prefix of an export's spill folders: a digest of *destination* (paths hold PHI)."""
    return f"{SPILL_PREFIX}{hashlib.sha256(destination.encode()).hexdigest()[:16]}-"


class SpillDir:
    """A private temporary folder (mode 0700) for spill files; removed on :meth:`close`.

    Folders of the same *prefix* in *parent* (the system's temporary folder when None) that a
    killed run of the same export left are removed first. A live run's folder is not: each run
    holds an exclusive lock on a file in its folder for as long as it lives (where ``fcntl`` is
    missing, only folders an hour old are taken for dead).
    """

    def __init__(self, parent: str | None = None, prefix: str = SPILL_PREFIX) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        root = Path(parent if parent is not None else tempfile.gettempdir())
        for stale in root.glob(f"{prefix}*"):
            if _abandoned(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        self._lock = _hold(self.path / _LOCK)

    def file(self, kind: str) -> Path:
        """A new file name in the folder."""
        return self.path / f"{kind}-{uuid.uuid4().hex}.arrow"

    def close(self) -> None:
        """Delete the folder and every spill file in it."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> SpillDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also after an exception: nothing of a failed export stays on disk


def _hold(path: Path) -> IO[bytes] | None:
    """Open *path* and hold an exclusive lock on it (None where ``fcntl`` is missing)."""
    if fcntl is None:
        return None
    handle = open(path, "wb")  # noqa: SIM115 (held open, with its lock, until close)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def _abandoned(folder: Path) -> bool:
    """Whether a spill folder's run is gone: nobody holds its lock (or, without one, it is old)."""
    lock = folder / _LOCK
    try:
        age = time.time() - folder.stat().st_mtime
    except OSError:
        return False
    if fcntl is None or not lock.exists():
        return age > _UNLOCKED_STALE_SECONDS
    try:
        with open(lock, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: a live run
    return True


class TaskRows:
    """One unfinished task's matching rows: a few thousand in memory, the rest in a spill file."""

    def __init__(self, folder: SpillDir) -> None:
        self._folder = folder
        self._buffer = Buffer()
        self._path: Path | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.rows = 0

    def append(self, table: pa.Table) -> None:
        """Add a page's matching rows (of the same columns as the others)."""
        self._buffer.append(table)  # an empty table adds nothing
        self.rows += table.num_rows
        if self._buffer.rows >= SPILL_ROWS:
            self._spill()

    def _spill(self) -> None:
        for table in self._buffer.take():
            if self._writer is None:
                self._path = self._folder.file("task")
                self._writer = pa.ipc.new_stream(str(self._path), table.schema)
            self._writer.write_table(table)
        release_memory()

    def tables(self) -> Iterator[pa.Table]:
        """Every row added, in order, a few thousand at a time; the spill file is deleted after."""
        if self._writer is not None and self._path is not None:
            self._writer.close()
            self._writer = None
            with pa.OSFile(str(self._path)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield pa.Table.from_batches([batch])
            self._path.unlink(missing_ok=True)
        yield from self._buffer.take()


PartReader = Callable[[list[str] | None], Iterator[pa.Table]]


class SortedRows:
    """An export's result, deduplicated and ordered, without holding its rows.

    *parts* reads the matching rows of every finished task, one part at a time, in the same order
    each time (only *columns* when given); *seen* are the ranks of rows read that did not match.
    The same rows in the same order as ``frame.latest_in_order`` of the concatenated parts, or,
    with *order* ``(column, ascending)``, in that column's order instead of the plan's (a Delta
    table's files keep rows in ``createdAt`` order whatever the query's sort).
    """

    def __init__(
        self,
        parts: PartReader,
        seen: list[pa.Table],
        schema: pa.Schema | None,
        plan: Plan,
        folder: SpillDir,
        order: tuple[str, bool] | None = None,
    ) -> None:
        if order is not None:
            plan = dataclasses.replace(plan, sort_column=order[0], ascending=order[1])
        self._parts = parts
        self._folder = folder
        self.schema = schema if schema is not None else flatten.EMPTY_TABLE.schema
        self.column_names: list[str] = list(self.schema.names)
        columns = list(dict.fromkeys([*RANK_COLUMNS, plan.sort_column]))
        ranks = [t for t in parts(columns) if t.num_rows]
        total = sum(t.num_rows for t in ranks)
        positions = result_positions(ranks, seen, plan)
        seen.clear()
        self.num_rows = len(positions)
        self.watermark = None
        if self.num_rows:
            stamps = pa.chunked_array(
                [c for t in ranks for c in t.column("updatedAt").chunks],
                self.schema.field("updatedAt").type,
            )
            self.watermark = pc.max(stamps.take(positions)).as_py()
        del ranks
        # each read row's place in the output, or -1 when it does not survive
        self._destination = np.full(total, -1, np.int64)
        self._destination[positions.to_numpy(zero_copy_only=False)] = np.arange(
            self.num_rows, dtype=np.int64
        )
        release_memory()

    def empty(self) -> pa.Table:
        """No rows, of the result's columns."""
        return self.schema.empty_table()

    def groups(self, rows: int) -> Iterator[pa.Table]:
        """The result in order, *rows* rows at a time (the last fewer; one empty if none).

        Each group is read from its slices' bucket files one slice at a time, each sorted then
        let go, so that beside the group only a slice sits in memory.
        """
        if self.num_rows == 0:
            yield self.empty()
            return
        slices = max(1, min(_SLICES, _MAX_BUCKETS // -(-self.num_rows // rows)))
        buckets = self._bucket(rows, slices)
        for start in range(0, len(buckets), slices):
            pieces = [self._sorted(path) for path in buckets[start : start + slices]]
            group = pa.concat_tables([p for p in pieces if p is not None])
            del pieces
            yield group
            del group
            release_memory()

    @staticmethod
    def _sorted(path: Path) -> pa.Table | None:
        """A bucket file's rows in output order (None if it was never written); the file goes."""
        if not path.exists():
            return None
        with pa.OSFile(str(path)) as source:
            bucket = pa.ipc.open_stream(source).read_all()
        path.unlink(missing_ok=True)
        order = pc.sort_indices(bucket[_POSITION])
        return bucket.drop_columns([_POSITION]).take(order)

    def _bucket(self, rows: int, slices: int) -> list[Path]:
        """Write every surviving row to the bucket file of its output group's slice, part by part.

        Bucket ``g * slices + s`` holds the rows of output group ``g`` (``rows`` rows each) whose
        place in it falls in slice ``s`` of ``slices`` equal ones.
        """
        count = -(-self.num_rows // rows) * slices
        paths = [self._folder.file("bucket") for _ in range(count)]
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        offset = 0
        try:
            for table in self._parts(None):
                destination = self._destination[offset : offset + table.num_rows]
                offset += table.num_rows
                kept = np.flatnonzero(destination >= 0)
                if len(kept) == 0:
                    continue
                at = destination[kept]
                if len(kept) < table.num_rows:  # else every row survives: no copy
                    table = table.take(pa.array(kept, pa.int64()))
                table = table.append_column(_POSITION, pa.array(at, pa.int64()))
                bucket = (at // rows) * slices + (at % rows) * slices // rows
                indices = np.unique(bucket)
                for index in indices:
                    piece = table if len(indices) == 1 else table.filter(pa.array(bucket == index))
                    writer = writers.get(int(index))
                    if writer is None:
                        writer = pa.ipc.new_stream(str(paths[int(index)]), piece.schema)
                        writers[int(index)] = writer
                    writer.write_table(piece)
                del table
                release_memory()
        finally:
            for writer in writers.values():
                writer.close()
        return paths

    def table(self) -> pa.Table:
        """The whole result as one table (for a write that needs it whole)."""
        groups = list(self.groups(128 * 1024))
        return pa.concat_tables(groups) if groups else self.empty()
