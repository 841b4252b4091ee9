"""What a table writer reads rows from: a small protocol, so the store needs nothing of the engine.

An export's result waits on disk (``engine/spill.SortedRows``) and is handed over one row group at
a time; a frame already in memory is one table. Both satisfy :class:`RowGroups`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc


@runtime_checkable
class RowGroups(Protocol):
    """Rows in the order to write, handed over a row group at a time."""

    @property
    def num_rows(self) -> int:
        """Rows in all."""

    @property
    def column_names(self) -> list[str]:
        """The columns of every group."""

    @property
    def watermark(self) -> datetime | None:
        """The highest ``updatedAt`` of the rows (None without rows)."""

    def empty(self) -> pa.Table:
        """No rows, of the groups' columns and types."""

    def groups(self, rows: int) -> Iterator[pa.Table]:
        """The rows in order, at most *rows* at a time (one empty group when there are none)."""


class TableRows:
    """A table in memory as :class:`RowGroups`."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    @property
    def num_rows(self) -> int:
        """Rows in all."""
        return int(self._table.num_rows)

    @property
    def column_names(self) -> list[str]:
        """The table's columns."""
        return list(self._table.column_names)

    @property
    def watermark(self) -> datetime | None:
        """The highest ``updatedAt``."""
        if "updatedAt" not in self._table.column_names or self._table.num_rows == 0:
            return None
        value = pc.max(self._table.column("updatedAt")).as_py()
        return value if isinstance(value, datetime) else None

    def empty(self) -> pa.Table:
        """No rows, of the table's schema."""
        return self._table.schema.empty_table()

    def groups(self, rows: int) -> Iterator[pa.Table]:
        """Slices of at most *rows* rows (zero-copy)."""
        if self._table.num_rows == 0:
            yield self.empty()
            return
        for start in range(0, self._table.num_rows, rows):
            yield self._table.slice(start, rows)
