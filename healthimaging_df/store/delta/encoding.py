"""A wall-clock time in a reader-1 Delta table: a UTC-labelled timestamp and a marker.

A naive ``timestamp[us]`` column (StudyDateTime: the study's local time, no zone) makes delta-rs
declare reader 3 / writer 7 and the ``timestampNtz`` feature, which Athena's Delta reader (Delta
Lake 2.3) and older Spark, Snowflake and Databricks runtimes refuse. So a naive column is stored
as ``timestamp[us, tz=UTC]`` holding the same digits (``2024-01-02 23:30:05`` is written as
``2024-01-02 23:30:05+00:00``), with the field metadata ``{"healthimaging_df.naive": "true"}``;
the table stays at reader 1 / writer 2 with no features. Athena, Trino and Spark in a UTC session
show the wall-clock digits; :func:`to_logical` gives back the naive column.

The marker is read from the Delta schema (``DeltaTable.schema()``), not from the Parquet files:
files written by a MERGE lose their field metadata, the log's schema keeps it.

Every write casts first (:func:`to_storage`): appending naive data to a UTC column fails
("Table features must be specified") and a schema-merging write would silently upgrade the table.
A table already at reader 3 (written before this encoding) keeps its ``timestamp_ntz`` columns
until it is downgraded (``maintenance.downgrade``): :func:`to_storage` casts to the table's own
types, whatever they are.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

NAIVE_KEY = b"healthimaging_df.naive"
_UTC = "UTC"


def storage_schema(logical: pa.Schema) -> pa.Schema:
    """The schema a new table stores *logical* in: naive timestamps as UTC plus the marker."""
    fields = []
    for item in logical:
        if pa.types.is_timestamp(item.type) and item.type.tz is None:
            meta = {**(item.metadata or {}), NAIVE_KEY: b"true"}
            item = pa.field(item.name, pa.timestamp(item.type.unit, tz=_UTC), item.nullable, meta)
        fields.append(item)
    return pa.schema(fields)


def table_schema(delta_schema: object) -> pa.Schema:
    """The Arrow schema of a Delta table's log (``DeltaTable.schema()``), field metadata kept."""
    return pa.schema(delta_schema.to_arrow())  # type: ignore[attr-defined]


def to_storage(data: pa.Table, stored: pa.Schema) -> pa.Table:
    """*data* cast to the table's stored types *stored* (columns matched by name).

    A naive column goes into a UTC column with the same digits; a column the table stores naive
    (``timestamp_ntz``, reader 3) stays naive. Other columns keep their type, naive timestamps
    the table lacks encoded as for a new table (a write that reshapes the table).
    """
    fields = []
    for item in data.schema:
        target = storage_schema(pa.schema([item])).field(0)
        if item.name in stored.names and pa.types.is_timestamp(item.type):
            kept = stored.field(item.name)
            if pa.types.is_timestamp(kept.type) and kept.type.unit == item.type.unit:
                target = kept
        fields.append(pa.field(item.name, target.type, item.nullable, target.metadata))
    schema = pa.schema(fields)
    if schema == data.schema and schema.metadata == data.schema.metadata:
        return data
    return data.cast(schema)


def reader_to_storage(reader: pa.RecordBatchReader, stored: pa.Schema) -> pa.RecordBatchReader:
    """:func:`to_storage` of every batch of *reader*, as it is read."""
    empty = to_storage(reader.schema.empty_table(), stored)

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            yield from to_storage(pa.Table.from_batches([batch]), stored).to_batches()

    return pa.RecordBatchReader.from_batches(empty.schema, batches())


def naive_columns(stored: pa.Schema) -> list[str]:
    """Columns stored as UTC that mean a naive wall-clock time (the marker says so)."""
    return [
        item.name
        for item in stored
        if pa.types.is_timestamp(item.type) and (item.metadata or {}).get(NAIVE_KEY) == b"true"
    ]


def to_logical(table: pa.Table, logical: pa.Schema) -> pa.Table:
    """*table* as read from the files, in the written (logical) types: UTC digits made naive."""
    wanted = pa.schema([logical.field(name) for name in table.column_names])
    if table.schema.remove_metadata() == wanted:
        return table
    return table.select(wanted.names).cast(wanted)
