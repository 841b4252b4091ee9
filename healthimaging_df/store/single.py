"""Single-file snapshots: one Parquet file with the provenance in its footer.

The file is written as a stream of row groups into a temporary file and replaced atomically
(``storage``); its key-value metadata (key ``healthimaging_df``) holds the provenance, the column
list and the partition description. A file that lacks that metadata, or whose columns are not
what the metadata says, is not a snapshot of this library.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from healthimaging_df import schema
from healthimaging_df._version import __version__
from healthimaging_df.errors import SnapshotError
from healthimaging_df.store import opaque
from healthimaging_df.store.errors import translated
from healthimaging_df.store.rows import RowGroups
from healthimaging_df.store.storage import FORMAT_VERSION, Target
from healthimaging_df.store.tables import iso, write_parquet

METADATA_KEY = "healthimaging_df"
FORMAT = "healthimaging_df.snapshot"


def complete_provenance(
    provenance: dict[str, Any],
    rows: int,
    watermark: datetime | None,
    columns: list[str],
    parts: list[str],
    derived: list[str],
) -> tuple[dict[str, Any], dict[bytes, bytes]]:
    """The provenance completed (rows, watermark, versions) and a file footer holding it."""
    prov = dict(provenance)
    prov.setdefault("schema_version", schema.SCHEMA_VERSION)
    prov.setdefault("library_version", __version__)
    prov.setdefault("redaction", None)
    prov["row_count"] = rows
    prov["watermark"] = iso(watermark)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(),
        "written_by": __version__,
        "partition_cols": parts,
        "derived_columns": derived,
        "columns": [c for c in columns if c not in derived],
        "provenance": prov,
    }
    return prov, {METADATA_KEY.encode(): json.dumps(meta, sort_keys=True).encode()}


def write_file(
    target: Target,
    rows: RowGroups,
    provenance: dict[str, Any],
    compression: str,
    row_group_size: int,
    redact: Callable[[pa.Table], pa.Table] | None,
) -> tuple[dict[str, Any], int]:
    """Write *rows* (in their order) as the file at *target*; returns the provenance and size."""
    columns = rows.column_names if redact is None else redact(rows.empty()).column_names
    watermark = rows.watermark if "updatedAt" in columns else None
    prov, footer = complete_provenance(provenance, rows.num_rows, watermark, columns, [], [])
    groups = rows.groups(row_group_size)
    if redact is not None:
        groups = (redact(group) for group in groups)
    store = target.store
    with translated("writing the snapshot"):
        size = store.put_stream(
            target.name,
            lambda sink: write_parquet(sink, groups, footer, compression, row_group_size),
        )
    return prov, size


def describe(target: Target) -> dict[str, Any]:
    """The snapshot description in the file's footer, checked against the file's columns."""
    store = target.store
    try:
        with translated("reading the snapshot"):
            file_schema = pq.read_schema(store.arrow_path(target.name), filesystem=store.arrow_fs)
    except SnapshotError as exc:
        if isinstance(exc.__context__, FileNotFoundError):
            raise SnapshotError("no snapshot there (no such file)") from None
        raise SnapshotError(
            "reading the snapshot failed: the file is not Parquet, or it is damaged or truncated"
        ) from None
    meta = _footer(file_schema.metadata)
    missing = [c for c in meta["columns"] if c not in file_schema.names]
    if missing or not meta["columns"] or len(file_schema.names) != len(meta["columns"]):
        raise SnapshotError(
            "the file's columns are not those its healthimaging_df metadata lists: it is not a "
            "snapshot of this library (read it with pandas)"
        )
    return meta


def _footer(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        raise SnapshotError("the file has no healthimaging_df metadata; read it with pandas")
    try:
        meta: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise SnapshotError("the file has damaged healthimaging_df metadata") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("provenance"), dict)
        or not isinstance(meta.get("columns"), list)
    ):
        raise SnapshotError("the file has damaged healthimaging_df metadata")
    return meta


def read_file(
    target: Target, columns: Sequence[str] | None, expression: Any
) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of the file (only *columns*, matching *expression*) and its description."""
    from healthimaging_df.store.table_format import check_filter

    meta = describe(target)
    store = target.store
    location = store.arrow_path(target.name)
    action = "reading the snapshot"
    with translated(action):
        file_schema = pq.read_schema(location, filesystem=store.arrow_fs)
    check_filter(expression, file_schema.remove_metadata())
    with translated(action):
        table = pq.read_table(
            location,
            filesystem=store.arrow_fs,
            columns=None if columns is None else list(columns),
            filters=expression,
            partitioning=None,
            page_checksum_verification=True,
        )
    return table.replace_schema_metadata(None), meta


def dataset(target: Target) -> pads.Dataset:
    """The file as a lazy dataset (its description checked first)."""
    describe(target)
    store = target.store
    location = store.arrow_path(target.name)
    with translated("scanning the snapshot"):
        file_schema = pq.read_schema(location, filesystem=store.arrow_fs)
        # named opaquely: pyarrow's errors quote the file's path, which a caller may have
        # named after a patient
        return opaque.dataset(store.arrow_fs, [(location, None)], file_schema)[0]


def row_groups(
    table: pa.Table, rows: int, redact: Callable[[pa.Table], pa.Table] | None
) -> Iterator[pa.Table]:
    """*table* whole, or redacted in slices of *rows* rows (the file's row groups)."""
    if redact is None:
        yield table
        return
    for start in range(0, max(table.num_rows, 1), rows):
        yield redact(table.slice(start, rows))
