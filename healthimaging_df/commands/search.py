"""``healthimaging-df search``: a cohort to Parquet, CSV, JSON Lines or a table on stdout."""

from __future__ import annotations

import argparse
from typing import Any

from healthimaging_df.commands import building, connect, options, output

EXAMPLES = """\
examples:
  # CT and MR primary image sets of studies in 2021-2023, to Parquet
  healthimaging-df search --datastore-id ID --where Modality=CT --where Modality=MR \\
      --where isPrimary=true --between StudyDateTime 2021-01-01 2023-12-31 --out cohort.parquet

  # the everyday cohort script: every image set of the patients listed in a CSV file
  healthimaging-df search --datastore-id ID --ids-from patients.csv --column PatientID \\
      --out cohort.csv

  # what would be sent (no request, no credentials needed)
  healthimaging-df search --datastore-id ID --ids-from ids.txt --where Modality=CT --explain

  # try it without AWS, on the bundled local service and its synthetic data
  healthimaging-df search --local --where Modality=MR --sort StudyDateTime:desc --limit 5
"""


def register(commands: Any) -> None:
    """Add the ``search`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "search",
        parents=[options.query_parent(), options.aws_parent(), options.common_parent()],
        help="run a query; write Parquet, CSV, JSON Lines or a table",
        description="Run a SearchImageSets query (fanned out, paged and filtered exactly, as "
        "Query.to_dataframe does) and write the matching image sets.",
        epilog=f"{EXAMPLES}\n{options.EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    out = parser.add_argument_group("result")
    out.add_argument(
        "--out",
        metavar="FILE",
        help="write to FILE: .parquet (or .pq), .csv, .jsonl (or .ndjson); stdout if left out",
    )
    out.add_argument(
        "--format",
        choices=output.FORMATS,
        help="override the format the --out extension implies; csv or jsonl also go to stdout",
    )
    output.add_mkdir(out)
    out.add_argument(
        "--columns",
        action="append",
        metavar="COL[,COL...]",
        help="columns to keep, in order (default: all in files; a short list in the table)",
    )
    out.add_argument(
        "--no-provenance",
        action="store_true",
        help="keep the query (its values are PHI), plan, datastore and endpoint out of a "
        "Parquet file's metadata",
    )
    out.add_argument(
        "--explain",
        action="store_true",
        help="print the plan (what is pushed down, request chains) and send nothing",
    )
    out.add_argument(
        "--show-values",
        action="store_true",
        help="with --explain, print the query's values too (they are usually PHI)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``search``; return the exit code."""
    fmt = output.output_format(args.out, args.format)
    output.check_destination(args.out, args.mkdir)
    columns = building.parse_columns(args.columns)
    target = connect.Target(args)
    query = building.build_query(args, target.datastore_id)
    if args.explain:
        print(query.explain(show_values=args.show_values))
        return 0
    with target.connect() as connection:
        frame = query.to_dataframe(
            client=connection.client,
            progress=output.progress(args),
            max_concurrency=args.max_concurrency,
            max_tps=args.max_tps,
        )
    if columns is None and fmt == "table":
        columns = list(output.TABLE_COLUMNS)
    if columns is not None:
        frame = frame[columns]
    if args.no_provenance:
        frame.attrs.clear()
    output.write_frame(frame, args.out, fmt)
    where = args.out if args.out not in (None, "-") else "stdout"
    output.status(args, f"{len(frame)} image sets -> {where}")
    return 0
