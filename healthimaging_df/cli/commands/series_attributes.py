"""``healthimaging-df series-attributes``: series attributes of a cohort through QIDO-RS."""

from __future__ import annotations

import argparse
from typing import Any

from healthimaging_df.aws import quotas
from healthimaging_df.cli.commands import options, output

EXAMPLES = """\
examples:
  # SeriesDescription and Manufacturer of every series of a cohort file
  healthimaging-df series-attributes --from cohort.parquet \\
      --field SeriesDescription --field Manufacturer --out series.parquet

  # straight from a query; the datastore-wide scope pages /series 1,000 series a request
  healthimaging-df series-attributes --datastore-id ID --where Modality=MR \\
      --field SeriesDescription --scope datastore --out mr.csv

QIDO-RS is a search, not an access: archived image sets stay archived (unlike the metadata
command, whose every GetImageSetMetadata call is an access).
"""


def register(commands: Any) -> None:
    """Add the ``series-attributes`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "series-attributes",
        parents=[options.query_parent(), options.aws_parent(), options.common_parent()],
        help="series attributes of a cohort through QIDO-RS (no archive access)",
        description="Join series attributes the summaries lack (SeriesDescription, "
        "Manufacturer, ...) onto a cohort (a file written by search or snapshot, or a query), "
        "read through DICOMweb QIDO-RS includefield, many series a request.",
        epilog=f"{EXAMPLES}\n{options.EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("series attributes")
    group.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="image sets to read: a .parquet, .csv or .jsonl file with StudyInstanceUID and "
        "SeriesInstanceUID columns; the query options are not used then",
    )
    group.add_argument(
        "--field",
        dest="fields",
        action="append",
        required=True,
        metavar="KEYWORD",
        help="a series attribute by DICOM keyword or tag (repeat; at most 50)",
    )
    group.add_argument(
        "--scope",
        choices=("study", "datastore"),
        default="study",
        help="study: one request per study of the cohort (default); datastore: page /series "
        "for the whole datastore (cheaper when the cohort is most of it)",
    )
    group.add_argument(
        "--out",
        metavar="FILE",
        help="write to FILE: .parquet, .csv, .jsonl; a table on stdout if left out",
    )
    group.add_argument("--format", choices=output.FORMATS, help="override the --out extension")
    output.add_mkdir(group)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``series-attributes``; return the exit code."""
    from healthimaging_df.cli.commands import building, connect
    from healthimaging_df.core.frames import provenance_datastore

    try:
        from healthimaging_df.dicomweb import fetch_series_attributes
    except ImportError as exc:
        raise options.UsageError(str(exc)) from None
    fmt = output.output_format(args.out, args.format)
    output.check_destination(args.out, args.mkdir)
    if args.source is not None:
        if building.has_query_options(args):
            raise options.UsageError("--from reads image sets from a file: leave out query options")
        cohort = output.read_frame(args.source)
        missing = [c for c in ("StudyInstanceUID", "SeriesInstanceUID") if c not in cohort]
        if missing:
            raise options.UsageError(f"--from {args.source} has no {missing[0]} column")
        given = args.datastore_id or provenance_datastore(cohort)
        target = connect.Target(args, given)
    else:
        target = connect.Target(args)
        query = building.build_query(args, target.datastore_id)
        cohort = None
    with target.connect() as connection:
        if cohort is None:
            cohort = query.to_dataframe(
                client=connection.client,
                progress=output.progress(args),
                max_concurrency=args.max_concurrency,
                max_tps=min(args.max_tps, quotas.SEARCH_TPS),
            )
        result = fetch_series_attributes(
            cohort,
            args.fields,
            client=connection.client,
            dicomweb_endpoint_url=args.dicomweb_endpoint_url,
            datastore_id=target.datastore_id,
            max_tps=args.max_tps,
            max_concurrency=args.max_concurrency,
            scope=args.scope,
        )
    output.write_frame(result, args.out, fmt)
    where = args.out if args.out not in (None, "-") else "stdout"
    output.status(args, f"{len(result)} rows with {len(args.fields)} series field(s) -> {where}")
    return 0
