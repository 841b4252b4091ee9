"""How a large result is held in memory: compacted page buffers, and Arrow's allocator.

A result is built from thousands of 50-row page tables. Held as they arrive they cost a buffer
and object header per column each, and under mimalloc the segments they leave keep resident
memory high; so pages are joined into a few large tables (:class:`Buffer`), freed memory is
handed back (:func:`release_memory`), and a result is built on the system allocator
(:func:`result_memory_pool`: process-wide, so scoped to the call, see docs/architecture.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

__all__ = ["Buffer", "release_memory", "result_memory_pool"]

# page tables are joined into one contiguous table every this many rows: a 50-row page costs about
# 30 KB of buffer and object headers besides its data, a few thousand rows in one table do not
_COMPACT_ROWS = 5_000


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
