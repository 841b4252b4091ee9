"""Arrow tables of snapshots: frames to and from Arrow, Parquet bytes, provenance timestamps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthimaging_df import schema
from healthimaging_df.core import dates
from healthimaging_df.errors import SnapshotError


def frame_to_table(df: pd.DataFrame) -> pa.Table:
    """Convert a frame to Arrow: schema columns get the declared types, others pyarrow's guess."""
    arrays = []
    fields = []
    for name in df.columns:
        if not isinstance(name, str):
            raise SnapshotError("column names must be strings")
        series = df[name]
        declared = schema.BY_NAME.get(name)
        try:
            if declared is not None:
                array = pa.array(series, type=declared.arrow_type, from_pandas=True)
            else:
                array = pa.array(series, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            # the exception text can quote a value (PHI): keep only the column and the error kind
            raise SnapshotError(
                f"column {name!r} cannot be stored as {declared.kind if declared else 'Arrow'} "
                f"({type(exc).__name__})"
            ) from None
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        arrays.append(array)
        fields.append(pa.field(name, declared.arrow_type if declared else array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def dtype_backend_of(df: pd.DataFrame) -> schema.DtypeBackend:
    """The dtype backend a frame uses: pyarrow if any column is Arrow-backed."""
    if any(isinstance(df[c].dtype, pd.ArrowDtype) for c in df.columns if c in schema.BY_NAME):
        return "pyarrow"
    return "numpy_nullable"


def table_to_frame(
    table: pa.Table, dtype_backend: schema.DtypeBackend, order: Sequence[str] | None = None
) -> pd.DataFrame:
    """A snapshot table as pandas, in *order* (columns it lacks are skipped), typed by the schema."""
    frame = schema.arrow_to_pandas(table, dtype_backend)
    if order is not None:
        frame = frame[[c for c in order if c in frame.columns]]
    out: pd.DataFrame = frame.reset_index(drop=True)
    return out


def table_watermark(table: pa.Table) -> datetime | None:
    """The highest updatedAt of *table*, or None."""
    if "updatedAt" not in table.column_names or table.num_rows == 0:
        return None
    value = pc.max(table.column("updatedAt")).as_py()
    return value if isinstance(value, datetime) else None


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return None if moment is None else moment.astimezone(timezone.utc).isoformat()


def parse_iso(text: Any) -> datetime | None:
    """A timezone-aware datetime from ISO 8601 text, or None for anything else."""
    if not isinstance(text, str):
        return None
    try:
        return dates.read_iso(text)
    except dates.TimestampError:
        raise SnapshotError("the provenance holds a timestamp that is not ISO 8601") from None


def parquet_bytes(
    table: pa.Table, metadata: dict[bytes, bytes], compression: str, row_group_size: int
) -> bytes:
    """*table* as Parquet file bytes with *metadata* in the footer."""
    sink = pa.BufferOutputStream()
    write_parquet(sink, [table], metadata, compression, row_group_size)
    return bytes(sink.getvalue().to_pybytes())


def write_parquet(
    sink: Any,
    tables: Iterable[pa.Table],
    metadata: dict[bytes, bytes],
    compression: str,
    row_group_size: int,
) -> None:
    """Write *tables* (one schema) to *sink* as one Parquet file with *metadata* in the footer.

    Each table is written as it comes, in row groups of at most *row_group_size* rows, so a
    caller can hand them over one row group at a time.
    """
    writer: pq.ParquetWriter | None = None
    try:
        for table in tables:
            if writer is None:
                meta = {**metadata, b"pandas": _pandas_metadata(table)}
                # page checksums: a flipped bit in a page is an error on read, not another value
                writer = pq.ParquetWriter(
                    sink,
                    table.schema.with_metadata(meta),
                    compression=compression,
                    write_page_checksum=True,
                )
            writer.write_table(
                table.replace_schema_metadata(writer.schema.metadata), row_group_size
            )
    finally:
        if writer is not None:
            writer.close()


def _pandas_metadata(table: pa.Table) -> bytes:
    """Return the schema note pandas writes, so a plain ``pd.read_parquet`` gets Int64 and boolean.

    A dtype pandas cannot name again (``list<item: string>[pyarrow]``, a rollup's list column)
    is noted as ``object``: pandas would otherwise refuse to read the file.
    """
    import json

    empty = schema.arrow_to_pandas(table.slice(0, 0))
    note = json.loads(pa.Table.from_pandas(empty, preserve_index=False).schema.metadata[b"pandas"])
    for column in note.get("columns", ()):
        try:
            pd.api.types.pandas_dtype(column.get("numpy_type"))
        except TypeError:
            column["numpy_type"] = "object"
    return json.dumps(note).encode()
