"""``healthimaging-df series-attributes``: series attributes of a cohort through QIDO-RS."""

from __future__ import annotations

import argparse
from typing import Any

from healthimaging_df.cli.commands import options, output

PAGE = """\
series attributes of a cohort through QIDO-RS (no archive access)

Join series attributes the summaries lack (SeriesDescription, Manufacturer, ...) onto a cohort (a
file written by search or snapshot, or a query), read through DICOMweb QIDO-RS includefield, many
series a request.

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
    _, group = options.add_enrichment(
        commands,
        "series-attributes",
        PAGE,
        run,
        "with StudyInstanceUID and SeriesInstanceUID columns",
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
    output.add_out(
        group,
        "write to FILE: .parquet, .csv, .jsonl; a table on stdout if left out",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``series-attributes``; return the exit code."""
    from healthimaging_df.cli.commands import building

    try:
        from healthimaging_df.dicomweb import fetch_series_attributes
    except ImportError as exc:
        raise options.UsageError(str(exc)) from None
    fmt = output.destination(args)
    target, cohort = building.cohort_source(args, ("StudyInstanceUID", "SeriesInstanceUID"))
    with target.connect() as connection:
        result = fetch_series_attributes(
            cohort(connection),
            args.fields,
            client=connection.client,
            dicomweb_endpoint_url=args.dicomweb_endpoint_url,
            datastore_id=target.datastore_id,
            **options.pace(args),
            scope=args.scope,
        )
    output.write_frame(result, args.out, fmt)
    output.written(args, f"{len(result)} rows with {len(args.fields)} series field(s)")
    return 0
