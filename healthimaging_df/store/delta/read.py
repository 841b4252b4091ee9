"""Delta reads: one version (latest, ``version=N`` or ``as_of``), whole or as a lazy dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from healthimaging_df.errors import SnapshotError
from healthimaging_df.store import opaque
from healthimaging_df.store.delta.log import (
    State,
    log_fs,
    open_table,
    options_for,
    state_at,
    table_location,
)
from healthimaging_df.store.errors import kind, translated
from healthimaging_df.store.table_format import (
    TableVersion,
    check_filter,
    check_names,
    check_version,
    filter_expression,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable


def opened_state(
    uri: str | os.PathLike[str],
    version: int | None,
    as_of: datetime | None,
    storage_options: Mapping[str, str] | None,
    action: str,
) -> tuple[DeltaTable, State, Any]:
    """The table at one version, what our commit says of it, and a file system rooted at it."""
    location = table_location(uri)
    check_version(version, as_of)
    options = options_for(location, storage_options)
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    opened = open_table(location, options, action=action, version=version, as_of=as_of)
    assert opened is not None
    table_fs = log_fs(location, options)
    state = state_at(table_fs, opened.version())
    if as_of is not None and state.timestamp > as_of:  # delta-rs gives version 0 for earlier
        raise SnapshotError(f"{action}: no such version (as_of is before the first commit)")
    return opened, state, table_fs


def checked_dataset(
    table: DeltaTable, state: State, table_fs: Any, action: str, *, footers: bool = False
) -> tuple[pads.Dataset, dict[str, str]]:
    """The loaded version as a dataset in its written types, once its files match the log.

    Every data file named by the log must lie inside the table (no absolute path, no ``..``),
    be there, and have the size the log records (one listing, no data read); with *footers*,
    each file's Parquet footer must also count the rows the log records (one footer read a
    file: a file replaced by another of the same size). A mismatch raises ``SnapshotError``.
    The dataset names its files opaquely (``store/opaque.py``); the map to the real paths is
    returned with it.
    """
    from pyarrow import fs as pafs

    damaged = f"{action} failed: a data file is damaged or truncated (it does not match the log)"
    with translated(action):
        actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    counts = (
        actions.column("num_records").to_pylist()
        if "num_records" in actions.column_names
        else [None] * len(paths)
    )
    parts = [str(c) for c in state.meta.get("partition_by") or ()]
    values = {p: actions.column(f"partition.{p}").to_pylist() for p in parts}
    # the log stores paths percent-encoded (partition values); the file system wants them raw
    expected: dict[str, tuple[int, int | None]] = {}
    files = []
    for index, (path, size, count) in enumerate(zip(paths, sizes, counts, strict=True)):
        raw = unquote(str(path))
        if "://" in raw or raw.startswith(("/", "\\")) or ".." in raw.replace("\\", "/").split("/"):
            raise SnapshotError(f"{action}: the log names a data file outside the table")
        expected[raw] = (int(size), None if count is None else int(count))
        partition = {p: values[p][index] for p in parts}
        files.append((raw, opaque.partition_expression(partition, state.arrow_schema)))
    with translated(action):
        infos = table_fs.get_file_info(list(expected))
    for info in infos:
        if info.type != pafs.FileType.File:
            raise SnapshotError(f"{action} failed: {kind(FileNotFoundError())}")
        if info.size != expected[info.path][0]:
            raise SnapshotError(damaged)
    with translated(action):
        scan, names = opaque.dataset(table_fs, files, state.arrow_schema)
        if footers:
            for fragment in scan.get_fragments():
                want = expected[names[str(fragment.path)]][1]
                if want is not None and fragment.metadata.num_rows != want:
                    raise SnapshotError(damaged)
    return scan, names


def dataset(
    uri: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pads.Dataset:
    """A ``pyarrow.dataset.Dataset`` of one version (latest by default), typed as written.

    DuckDB (``duckdb.arrow(ds)``), Polars (``pl.scan_pyarrow_dataset(ds)``) and Dask read it
    lazily, with partition pruning. Every data file is checked against the log first (see
    :func:`checked_dataset`); damage inside a file of the right size fails later, in the reader
    (``snapshot.scan_snapshot`` wraps the dataset so that error is typed and names no path).
    """
    action = "scanning the snapshot"
    table, state, table_fs = opened_state(uri, version, as_of, storage_options, action)
    return checked_dataset(table, state, table_fs, action)[0]


def read_table(
    uri: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    columns: Sequence[str] | None = None,
    filters: Any = None,
    storage_options: Mapping[str, str] | None = None,
) -> TableVersion:
    """Read one version of the table: its rows (Arrow types as written) and its provenance.

    Parameters
    ----------
    uri
        The table.
    version
        A version number (see :func:`history`); None for the latest.
    as_of
        The latest version committed at or before this moment (naive means UTC).
    columns
        Only these columns, in this order.
    filters
        A ``pyarrow.compute`` expression or DNF tuples (``[("Modality", "==", "CT")]``);
        partition filters skip whole files.
    storage_options
        As in :func:`write_table`.

    Returns
    -------
    TableVersion
        ``(table, provenance, version, timestamp, partition_by)``; rows in no particular order.
        Every data file is checked against the log first, footers included.
    """
    action = "reading the snapshot"
    opened, state, table_fs = opened_state(uri, version, as_of, storage_options, action)
    full_schema = state.arrow_schema
    wanted = None
    if columns is not None:
        wanted = check_names("columns", columns, full_schema)
    expression = filter_expression(filters)
    check_filter(expression, full_schema)
    nothing = isinstance(filters, pc.Expression) and filters.equals(pc.scalar(False))
    if nothing:  # the schema and provenance only: no file is opened
        table = full_schema.empty_table()
        if wanted is not None:
            table = table.select(wanted)
    else:
        scan = checked_dataset(opened, state, table_fs, action, footers=True)[0]
        with translated(action):
            table = scan.to_table(columns=wanted, filter=expression)
    expected = full_schema if wanted is None else pa.schema([full_schema.field(c) for c in wanted])
    if table.schema.remove_metadata() != expected:
        with translated(action):
            table = table.select(expected.names).cast(expected)
    return TableVersion(
        table.replace_schema_metadata(None),
        state.provenance,
        state.version,
        state.timestamp,
        tuple(str(c) for c in state.meta.get("partition_by") or ()),
    )
