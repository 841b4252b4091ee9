"""The table-format interface under snapshots: what Delta and Iceberg each implement.

A directory snapshot is a table in an open table format. :class:`TableFormat` is everything the
snapshot, refresh and sync code asks of one: write (create or replace the content in one
commit), merge (upsert by ``imageSetId`` and delete by ID in one commit, rewriting only the files
that hold touched rows), read at a version or a moment, a lazy scan, the current IDs and their
states, history, expiry of old versions, compaction and a description of the table (format,
protocol, features). ``store/delta/`` and ``store/iceberg/`` implement it; a third format is one
more module with one more subclass.

The results and the argument checks every format shares live here too.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypedDict, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from healthimaging_df.core import checks
from healthimaging_df.errors import QueryValidationError, SnapshotConflictError

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
# the columns of every format's history, newest version first
HISTORY_COLUMNS = [
    "version",
    "timestamp",
    "operation",
    "rows_added",
    "rows_updated",
    "rows_removed",
    "provenance",
]


def history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A table's history rows as the typed frame ``snapshot_history`` returns."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    typed: pd.DataFrame = frame.astype(
        {
            "version": "Int64",
            "timestamp": "datetime64[us, UTC]",
            "operation": "string",
            "rows_added": "Int64",
            "rows_updated": "Int64",
            "rows_removed": "Int64",
        }
    )
    return typed


KEY = "imageSetId"
# the columns a merge ranks states by, and that current_ids() returns with the key
STATE_COLUMNS = (KEY, "version", "updatedAt")

# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    """What a write committed.

    Attributes
    ----------
    version
        The table version this commit created (Delta version; Iceberg: the sequence number).
    rows
        Rows in that version.
    files
        Data files of that version (full paths or URIs: not for logs, they embed partition values).
    bytes
        Total size of those files.
    bytes_written
        Size of the files this commit wrote.
    partition_by
        Partition columns of the table.
    provenance
        The provenance stored with the commit.
    """

    version: int
    rows: int
    files: tuple[str, ...] = field(repr=False)
    bytes: int
    bytes_written: int
    partition_by: tuple[str, ...]
    provenance: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class MergeResult:
    """What a merge (refresh, deletion) committed (``version`` is None when nothing changed).

    Attributes
    ----------
    version
        The version of the commit, or None if no row changed (no commit is made).
    added, updated, removed
        Rows inserted, replaced by a newer state, and deleted (leavers).
    rows
        Rows in the table after the merge.
    files_added, files_removed
        Data files the commit wrote and retired.
    bytes_written
        Size of the files the commit wrote.
    """

    version: int | None
    added: int
    updated: int
    removed: int
    rows: int
    files_added: int
    files_removed: int
    bytes_written: int


class TableVersion(NamedTuple):
    """One version of a table as read: its rows (or none), provenance, version, time, partitioning."""

    table: pa.Table
    provenance: dict[str, Any]
    version: int
    timestamp: datetime
    partition_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableInfo:
    """A description of a table without its rows: what :meth:`TableFormat.info` returns.

    Attributes
    ----------
    format
        ``"delta"`` or ``"iceberg"``.
    version
        The current version (Delta version, Iceberg snapshot id).
    rows, files, bytes
        Rows, data files and their total size in the current version.
    partition_by
        Partition columns.
    protocol
        What a reader and a writer must support: Delta ``{"min_reader_version": 1,
        "min_writer_version": 2}``, Iceberg ``{"format_version": 2}``.
    features
        Table features (Delta reader and writer features); empty when there are none.
    provenance
        The provenance of the current version.
    """

    format: str
    version: int
    rows: int
    files: int
    bytes: int
    partition_by: tuple[str, ...]
    protocol: dict[str, int]
    features: tuple[str, ...]
    provenance: dict[str, Any] = field(repr=False)


class Commit(TypedDict):
    """How a write or merge commits: on the version it read, closing files at a size.

    ``expected_version``: a table that moved past it raises ``SnapshotConflictError`` (None:
    the latest at call time); ``target_file_size``: bytes at which a data file is closed.
    """

    expected_version: int | None
    target_file_size: int | None


class TableWrite(Commit):
    """:meth:`TableFormat.write`'s arguments, as a format's ``_write`` gets them."""

    table: pa.Table | pa.RecordBatchReader
    provenance: Mapping[str, Any]
    partition_by: Sequence[str] | None
    num_rows: int | None


class TableMerge(Commit):
    """:meth:`TableFormat.merge`'s arguments, as a format's ``_merge`` gets them."""

    incoming: pa.Table
    removed_ids: Sequence[str]
    provenance: Mapping[str, Any]


class TableRead(TypedDict):
    """:meth:`TableFormat.read`'s arguments, as a format's ``_read`` gets them."""

    version: int | None
    as_of: datetime | None
    columns: Sequence[str] | None
    filters: Any


class TableFormat(abc.ABC):
    """One table of one format at one location; every method is one read or one commit.

    Writers take ``expected_version`` (the version they read): a table that moved past it raises
    ``SnapshotConflictError`` and nothing is committed. Errors are ``SnapshotError`` without a path.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether a table is there (a foreign or damaged one raises ``SnapshotError``)."""

    def write(
        self,
        data: pa.Table | pa.RecordBatchReader,
        provenance: Mapping[str, Any],
        *,
        partition_by: Sequence[str] | None = None,
        expected_version: int | None = None,
        num_rows: int | None = None,
        target_file_size: int | None = None,
    ) -> WriteResult:
        """Create the table or replace its content, in one commit (rows in the order given).

        *partition_by* None keeps the table's partitioning (none for a new table); a reader's
        rows are counted in *num_rows*.
        """
        commit = Commit(expected_version=expected_version, target_file_size=target_file_size)
        request = TableWrite(
            table=data,
            provenance=provenance,
            partition_by=partition_by,
            num_rows=num_rows,
            **commit,
        )
        return self._write(request)

    @abc.abstractmethod
    def _write(self, request: TableWrite) -> WriteResult:
        """:meth:`write` in this format."""

    def merge(
        self,
        incoming: pa.Table,
        removed_ids: Sequence[str],
        provenance: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        target_file_size: int | None = None,
    ) -> MergeResult:
        """Upsert *incoming* by ``imageSetId`` and delete *removed_ids*, in one commit.

        A row replaces the stored one when its ``(version, updatedAt)`` is newer (nulls lowest),
        or equal with other content; an older state never replaces a newer one. Only the files
        holding touched rows are rewritten, in ``createdAt`` order at *target_file_size*; nothing
        is committed (``version`` None) when nothing changes. ``merge(empty, ids, ...)`` deletes.
        """
        commit = Commit(expected_version=expected_version, target_file_size=target_file_size)
        request = TableMerge(
            incoming=incoming, removed_ids=removed_ids, provenance=provenance, **commit
        )
        return self._merge(request)

    @abc.abstractmethod
    def _merge(self, request: TableMerge) -> MergeResult:
        """:meth:`merge` in this format."""

    def delete_ids(
        self,
        ids: Sequence[str],
        provenance: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        target_file_size: int | None = None,
    ) -> MergeResult:
        """Delete the rows of *ids* (absent ones are ignored), in one commit."""
        empty = self.head().table
        return self.merge(
            empty,
            ids,
            provenance,
            expected_version=expected_version,
            target_file_size=target_file_size,
        )

    def read(
        self,
        *,
        version: int | None = None,
        as_of: datetime | None = None,
        columns: Sequence[str] | None = None,
        filters: Any = None,
    ) -> TableVersion:
        """One version's rows (types as written) and provenance; the latest by default."""
        return self._read(TableRead(version=version, as_of=as_of, columns=columns, filters=filters))

    @abc.abstractmethod
    def _read(self, request: TableRead) -> TableVersion:
        """:meth:`read` in this format."""

    def head(self, *, version: int | None = None, as_of: datetime | None = None) -> TableVersion:
        """One version without rows: its schema, provenance, version, time and partitioning."""
        return self.read(version=version, as_of=as_of, filters=pc.scalar(False))

    @abc.abstractmethod
    def scan(self, *, version: int | None = None, as_of: datetime | None = None) -> pads.Dataset:
        """A lazy dataset of one version, typed as written, every data file checked first."""

    def current_ids(self, *, version: int | None = None) -> pa.Table:
        """``imageSetId``, ``version``, ``updatedAt`` of every row of one version (the latest)."""
        return self.read(version=version, columns=list(STATE_COLUMNS)).table

    @abc.abstractmethod
    def history(self) -> pd.DataFrame:
        """Every version still recorded, newest first (see ``snapshot_history``)."""

    @abc.abstractmethod
    def expire(self, retain: timedelta, *, dry_run: bool = True) -> int:
        """Delete files no version of the last *retain* needs; how many (would) go."""

    @abc.abstractmethod
    def optimize(
        self, provenance: Mapping[str, Any] | None = None, *, target_file_size: int | None = None
    ) -> MergeResult:
        """Rewrite small or overlapping files into sorted files of *target_file_size*."""

    @abc.abstractmethod
    def info(self) -> TableInfo:
        """Format, version, protocol, features, size and provenance of the current version."""


# -- validation ----------------------------------------------------------------------------------


def check_table(argument: str, table: Any) -> pa.Table:
    """*table* if it is a ``pyarrow.Table`` with distinct names none of which start with ``__``."""
    if not isinstance(table, pa.Table):
        raise QueryValidationError(argument, "must be a pyarrow.Table")
    if len(set(table.column_names)) != len(table.column_names):
        raise QueryValidationError(argument, "has repeated column names")
    if any(name.startswith("__") for name in table.column_names):
        raise QueryValidationError(argument, "column names must not start with two underscores")
    return table


def check_data(data: Any, num_rows: Any) -> tuple[pa.Table | pa.RecordBatchReader, int]:
    """*data* (a table, or a reader with its *num_rows*) and its row count, else a typed error."""
    if isinstance(data, pa.RecordBatchReader):
        checks.integer(
            "num_rows", num_rows, minimum=0, rule="a reader needs its row count (an int >= 0)"
        )
        check_table("table", data.schema.empty_table())
        return data, num_rows
    table = check_table("table", data)
    if num_rows is not None and num_rows != table.num_rows:
        raise QueryValidationError("num_rows", "must be None or the table's row count")
    return table, table.num_rows


def check_provenance(provenance: Any) -> dict[str, Any]:
    """*provenance* as a dict if it is JSON-ready, else a typed error."""
    if not isinstance(provenance, Mapping):
        raise QueryValidationError("provenance", "must be a dict")
    prov = dict(provenance)
    try:
        json.dumps(prov, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError):
        raise QueryValidationError(
            "provenance", "must be JSON-serializable (text keys; no NaN or objects)"
        ) from None
    return prov


def column_names(argument: str, names: Any) -> list[str]:
    """*names* as a list of strings, refusing one string (which would read as a list of letters)."""
    if isinstance(names, str):
        raise QueryValidationError(argument, "must be a list of column names, not one string")
    out = list(names)
    for position, name in enumerate(out):
        if not isinstance(name, str):
            raise QueryValidationError(argument, "column names must be strings", position)
    return out


def check_names(argument: str, names: Any, table_schema: pa.Schema) -> list[str]:
    """*names* as a list of distinct columns of *table_schema*, else a typed error."""
    out = column_names(argument, names)
    for position, name in enumerate(out):
        if name not in table_schema.names:
            raise QueryValidationError(argument, f"column {name!r} is not in the table", position)
    if len(set(out)) != len(out):
        raise QueryValidationError(argument, "has a repeated column")
    return out


def check_partition_types(table_schema: pa.Schema, parts: Sequence[str]) -> None:
    """Partition columns must hold text, integers or flags (a folder per value of anything else)."""
    for position, name in enumerate(parts):
        kind = table_schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise QueryValidationError(
                "partition_by", f"{name!r} must hold text, integers or flags", position
            )


def check_version(version: Any, as_of: Any) -> None:
    """Refuse a version that is not an int >= 0, an as_of that is not a datetime, or both."""
    if version is not None:
        checks.non_negative_int("version", version)
    if as_of is not None and not isinstance(as_of, datetime):
        raise QueryValidationError("as_of", "must be a datetime (naive means UTC)")
    if version is not None and as_of is not None:
        raise QueryValidationError("as_of", "give version or as_of, not both")


def any_of(terms: Sequence[str]) -> str:
    """OR of *terms* as a balanced tree (a flat chain of 20+ ORs exceeds the SQL parser's depth)."""
    if not terms:
        return "FALSE"
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return f"({any_of(terms[:middle])}) OR ({any_of(terms[middle:])})"


# -- read -------------------------------------------------------------------------------------------


def filter_expression(filters: Any) -> Any:
    """*filters* (an expression or DNF tuples) as a ``pyarrow.compute`` expression, or a typed error."""
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    try:
        return pq.filters_to_expression(filters)
    except (TypeError, ValueError, KeyError, IndexError):  # pyarrow's text can quote a value
        raise QueryValidationError(
            "filters", "must be a pyarrow.compute expression or DNF tuples (column, op, value)"
        ) from None


def check_filter(expression: Any, table_schema: pa.Schema) -> None:
    """Apply *expression* to no rows of *table_schema*: a bad column or type fails here, typed."""
    if expression is None:
        return
    try:
        pads.dataset(table_schema.empty_table()).to_table(filter=expression)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        raise QueryValidationError(
            "filters", "names a column the table lacks or compares it with the wrong type"
        ) from None


# -- concurrency ----------------------------------------------------------------------------------


def retry_on_conflict(
    action: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
) -> T:
    """Run *action*; after a ``SnapshotConflictError``, wait (jittered backoff) and run it again.

    *action* must read the table afresh on every call and pass the version it read as
    ``expected_version``, so each attempt starts from the version that won.

    Parameters
    ----------
    action
        The read-modify-write to run.
    attempts
        Calls in all (at least 1); the last conflict is raised.
    base_delay, max_delay
        Seconds: the n-th retry waits a random time up to ``min(max_delay, base_delay * 2**(n-1))``
        (``aws.retry``'s full jitter).
    """
    from healthimaging_df.aws.retry import Backoff, retrying

    checks.positive_int("attempts", attempts)
    if base_delay < 0 or max_delay < 0:
        raise QueryValidationError("base_delay", "delays must be zero or more")
    return retrying(
        lambda _attempt: action(),
        retry_if=lambda exc: isinstance(exc, SnapshotConflictError),
        backoff=Backoff(attempts=attempts, base=base_delay, cap=max_delay),
    )
