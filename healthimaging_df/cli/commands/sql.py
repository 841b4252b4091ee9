"""``healthimaging-df sql``: Polars SQL on a live datastore, its WHERE reaching the planner."""

from __future__ import annotations

import argparse
from typing import Any

from healthimaging_df.cli.commands import options, output

PAGE = """\
run Polars SQL on a live datastore (FROM image_sets); WHERE reaches the planner

Run a SQL query over the datastore's image sets (the table image_sets): its WHERE becomes the
search's conditions, GROUP BY and the rest run in Polars.

examples:
  # image sets per modality of one patient: the WHERE becomes a PatientID request chain
  healthimaging-df sql --datastore-id ID \\
      "SELECT Modality, count(*) AS n FROM image_sets WHERE PatientID = 'P1' GROUP BY Modality"

  # a study rollup of CT studies in January 2024, to CSV
  healthimaging-df sql --local --out studies.csv "SELECT StudyInstanceUID, count(*) AS image_sets
      FROM image_sets WHERE Modality = 'CT'
      AND StudyDateTime BETWEEN '2024-01-01' AND '2024-01-31 23:59:59' GROUP BY 1"

  # what the WHERE pushes and what stays on the client (sends nothing)
  healthimaging-df sql --local --explain "SELECT * FROM image_sets WHERE PatientID LIKE 'P1%'"

The table is image_sets (columns as in docs/schema.md). Polars SQL runs the query over a lazy scan:
its WHERE is translated into the query's conditions (equality, IN, ranges, IS NULL, LIKE prefix
or substring...), whatever is not is applied exactly on the client. Needs the polars extra.
"""


def register(commands: Any) -> None:
    """Add the ``sql`` command."""
    parser = options.add_command(
        commands, "sql", PAGE, run, parents=[options.aws_parent(), options.common_parent()]
    )
    parser.add_argument("query", metavar="SQL", help="the query: SELECT ... FROM image_sets ...")
    parser.add_argument(
        "--datastore-id",
        metavar="ID",
        help="the datastore (32 characters); required unless --local",
    )
    out = parser.add_argument_group("result")
    output.add_out(
        out,
        "write to FILE (local or s3://bucket/key): .parquet, .csv, .jsonl; stdout if left out",
    )
    output.add_s3_options(out)
    options.add_explain(out, "print what the WHERE pushes and the plan; send nothing")


def run(args: argparse.Namespace) -> int:
    """Run ``sql``; return the exit code."""
    from healthimaging_df.cli.commands import connect

    fmt = output.destination(args)
    s3 = output.s3_settings(args)
    try:
        from healthimaging_df import polars as ahi_polars
    except ImportError:
        raise options.UsageError(
            'sql needs polars, an optional extra: pip install "healthimaging-df[polars]"'
        ) from None
    target = connect.Target(args)
    fetch: dict[str, Any] = {"progress": output.progress(args), **options.pace(args)}
    with target.connect() as connection:
        frame = ahi_polars.sql_frame(
            args.query, datastore_id=target.datastore_id, client=connection.client, **fetch
        )
        if args.explain:
            print(ahi_polars.explain(frame))
            return 0
        result = ahi_polars.collect_sql(frame)
    table = result.to_pandas()
    output.write_frame(table, args.out, fmt, plain=True, s3=s3)
    output.written(args, f"{len(table)} rows")
    return 0
