"""Glue tables for Delta snapshots on S3 (Athena, EMR)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa

from healthimaging_df.errors import QueryValidationError
from healthimaging_df.store.delta.log import FORMAT, table_location
from healthimaging_df.store.table_format import check_names

# -- Glue -----------------------------------------------------------------------------------------

_GLUE_NAME = re.compile(r"[a-z0-9_]{1,255}")


def _hive_type(kind: pa.DataType) -> str:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_integer(kind):
        return {8: "tinyint", 16: "smallint", 32: "int"}.get(kind.bit_width, "bigint")
    if pa.types.is_floating(kind):
        return "float" if kind.bit_width == 32 else "double"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_date(kind):
        return "date"
    raise QueryValidationError("schema", f"type {kind} has no Glue/Hive equivalent here")


def register_glue_table(
    database_table: str,
    uri: str,
    schema: pa.Schema,
    partition_by: Sequence[str] = (),
    *,
    boto3_session: Any = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Literal["created", "updated"]:
    """Create or update the Glue table ``db.table`` for the Delta table at *uri* (Athena, EMR).

    The database is created when missing. Athena reads the table natively
    (``table_type=DELTA``; it takes the schema from the Delta log); Spark on EMR through
    ``spark.sql.sources.provider=delta``. The Glue columns are written too, for catalogs that
    show them.

    Parameters
    ----------
    database_table
        ``"database.table"``: lower-case letters, digits and underscores.
    uri
        ``s3://bucket/prefix`` of the table.
    schema
        The table's Arrow schema (``read_table(...).table.schema``).
    partition_by
        Its partition columns.
    boto3_session, endpoint_url, region
        How to reach Glue (the default session; an endpoint for moto).

    Returns
    -------
    ``"created"`` or ``"updated"``
    """
    from healthimaging_df.aws import session as aws_session

    if not isinstance(database_table, str) or database_table.count(".") != 1:
        raise QueryValidationError("glue_table", "must be 'database.table'")
    database, name = database_table.split(".")
    for part in (database, name):
        if not _GLUE_NAME.fullmatch(part):
            raise QueryValidationError(
                "glue_table", "names must be lower-case letters, digits and underscores"
            )
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise QueryValidationError("uri", "a Glue table needs an s3:// location")
    location = table_location(uri)
    if not isinstance(schema, pa.Schema):
        raise QueryValidationError("schema", "must be a pyarrow.Schema")
    parts = check_names("partition_by", partition_by, schema)
    glue = aws_session.client("glue", boto3_session, region=region, endpoint_url=endpoint_url)
    columns = [{"Name": f.name, "Type": _hive_type(f.type)} for f in schema if f.name not in parts]
    table_input = {
        "Name": name,
        "Description": "healthimaging_df snapshot (Delta Lake)",
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {
            "table_type": "DELTA",
            "classification": "delta",
            "EXTERNAL": "TRUE",
            "spark.sql.sources.provider": "delta",
            "healthimaging_df.format": FORMAT,
        },
        "PartitionKeys": [{"Name": c, "Type": _hive_type(schema.field(c).type)} for c in parts],
        "StorageDescriptor": {
            "Columns": columns,
            "Location": location,
            "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "SerdeInfo": {
                "SerializationLibrary": (
                    "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
                ),
                "Parameters": {"path": location, "serialization.format": "1"},
            },
        },
    }
    try:
        glue.get_database(Name=database)
    except glue.exceptions.EntityNotFoundException:
        with contextlib.suppress(glue.exceptions.AlreadyExistsException):
            glue.create_database(DatabaseInput={"Name": database})
    try:
        glue.create_table(DatabaseName=database, TableInput=table_input)
        return "created"
    except glue.exceptions.AlreadyExistsException:
        glue.update_table(DatabaseName=database, TableInput=table_input)
        return "updated"
