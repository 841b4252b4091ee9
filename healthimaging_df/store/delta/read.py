"""Delta reads: one version (latest, ``version=N`` or ``as_of``), whole or as a lazy dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.dataset as pads

from healthimaging_df.errors import SnapshotError
from healthimaging_df.store.delta.log import (
    State,
    files_of,
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


def dataset(
    uri: str | os.PathLike[str],
    *,
    version: int | None = None,
    as_of: datetime | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pads.Dataset:
    """A ``pyarrow.dataset.Dataset`` of one version (latest by default), typed as written.

    DuckDB (``duckdb.arrow(ds)``), Polars (``pl.scan_pyarrow_dataset(ds)``) and Dask read it
    lazily, with partition pruning. Every data file is checked to be there with the size the log
    records (one listing, no data read), so a deleted or truncated file raises ``SnapshotError``
    here; damage inside a file of the right size fails later, in the reader, with pyarrow's
    message (which can quote a path).
    """
    action = "scanning the snapshot"
    table, state, table_fs = opened_state(uri, version, as_of, storage_options, action)
    with translated(action):
        scan = table.to_pyarrow_dataset(schema=state.arrow_schema, filesystem=table_fs)
        # the log stores paths percent-encoded (partition values); the file system wants them raw
        expected = {unquote(path): size for path, size in files_of(table).items()}
        infos = table_fs.get_file_info(list(expected))
    from pyarrow import fs as pafs

    for info in infos:
        if info.type != pafs.FileType.File:
            raise SnapshotError(f"{action} failed: {kind(FileNotFoundError())}")
        if info.size != expected[info.path]:
            raise SnapshotError(
                f"{action} failed: a data file of the table is damaged or truncated"
            )
    return scan


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
    """
    action = "reading the snapshot"
    opened, state, table_fs = opened_state(uri, version, as_of, storage_options, action)
    full_schema = state.arrow_schema
    wanted = None
    if columns is not None:
        wanted = check_names("columns", columns, full_schema)
    expression = filter_expression(filters)
    check_filter(expression, full_schema)
    with translated(action):
        scan = opened.to_pyarrow_dataset(schema=full_schema, filesystem=table_fs)
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
