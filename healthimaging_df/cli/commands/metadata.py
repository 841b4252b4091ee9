"""``healthimaging-df metadata``: series- or instance-level DICOM attributes of a cohort."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from healthimaging_df.aws import quotas
from healthimaging_df.cli.commands import options, output

PAGE = """\
GetImageSetMetadata for a cohort: series or instance attributes

Call GetImageSetMetadata for each image set of a cohort (a file written by search or snapshot, or a
query) and write one row per series or instance.

examples:
  # series-level attributes (SeriesDescription, Manufacturer, SliceThickness...) of a cohort file
  healthimaging-df search --datastore-id ID --ids-from patients.txt --out cohort.parquet
  healthimaging-df metadata --from cohort.parquet --out series.parquet

  # how many GetImageSetMetadata calls, and how many archived image sets they would touch
  healthimaging-df metadata --from cohort.parquet --dry-run

  # or straight from a query, one row per instance, failures as rows instead of an error
  healthimaging-df metadata --datastore-id ID --where StudyInstanceUID=1.2.3 --level instance \\
      --on-error report --out instances.csv

  # from S3 to S3 (the same --profile and --region; --s3-endpoint-url or AWS_ENDPOINT_URL_S3)
  healthimaging-df metadata --from s3://bucket/cohort.parquet --out s3://bucket/series.parquet

Each call counts as an access: it moves an ARCHIVE_INSTANT_ACCESS image set back to the frequent
(more expensive) tier, so none is read without --allow-archive-access. Image sets whose tier the
cohort does not tell (no storageTier column, or a file written more than 15 minutes ago) are
looked up first with GetImageSet, which is not an access; if the cohort shows or the look-ups
find any archived image set, the command refuses (exit 2) before any GetImageSetMetadata call,
naming how many. --dry-run counts what --allow-archive-access would move.
"""


def register(commands: Any) -> None:
    """Add the ``metadata`` command."""
    parser, group = options.add_enrichment(
        commands,
        "metadata",
        PAGE,
        run,
        "(local or s3://bucket/key) with an imageSetId column (and version)",
    )
    group.add_argument(
        "--level",
        choices=("series", "instance"),
        default="series",
        help="one row per series (default) or per instance",
    )
    group.add_argument(
        "--on-error",
        choices=("raise", "report"),
        default="raise",
        help="raise: exit 1 listing the error codes if any image set failed (default); report: "
        "write failed image sets as rows with a metadataError column",
    )
    group.add_argument(
        "--dry-run", action="store_true", help="say how many calls would be made; send nothing"
    )
    archive = group.add_mutually_exclusive_group()
    archive.add_argument(
        "--allow-archive-access",
        dest="allow_archive_access",
        action="store_const",
        const=True,
        default=False,
        help="read archived image sets too (each moves to FREQUENT_ACCESS, a warning says how "
        "many); no tier look-ups. Without it, any archived image set is refused",
    )
    archive.add_argument(
        "--refuse-archive-access",
        dest="allow_archive_access",
        action="store_const",
        const=False,
        help="refuse if any image set is archived: the default, kept for scripts",
    )
    output.add_out(
        group,
        "write to FILE (local or s3://bucket/key): .parquet, .csv, .jsonl; a table on "
        "stdout if left out",
    )
    output.add_s3_options(group)
    # GetImageSetMetadata's own quota; a query run first stays under SearchImageSets'.
    parser.set_defaults(max_tps=quotas.METADATA_TPS)


def run(args: argparse.Namespace) -> int:
    """Run ``metadata``; return the exit code."""
    from healthimaging_df.cli.commands import building
    from healthimaging_df.metadata import fetch_metadata

    fmt = output.destination(args)
    s3 = output.s3_settings(args)
    target, cohort = building.cohort_source(args, ("imageSetId",), s3)
    with target.connect() as connection:
        frame = cohort(connection)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fetch_metadata(
                frame,
                client=connection.client,
                level=args.level,
                **options.pace(args),
                progress=output.progress(args),
                dry_run=args.dry_run,
                on_error=args.on_error,
                datastore_id=target.datastore_id,
                allow_archive_access=args.allow_archive_access,
            )
        for warning in caught:
            print(f"healthimaging-df metadata: warning: {_warning_text(warning)}", file=sys.stderr)
    if not hasattr(result, "columns"):  # a dry run's MetadataPlan
        print(result)
        return 0
    output.write_frame(result, args.out, fmt, s3=s3)
    output.written(args, f"{len(result)} {args.level} rows from {len(frame)} image sets")
    if "metadataError" in result.columns:
        failed = int(result["metadataError"].notna().sum())
        if failed:
            output.status(args, f"{failed} image set(s) failed: see the metadataError column")
    return 0


def _warning_text(warning: warnings.WarningMessage) -> str:
    """Our warnings' words (written without values); any other warning by its category only."""
    from healthimaging_df.errors import HealthImagingDFWarning

    if issubclass(warning.category, HealthImagingDFWarning):
        return str(warning.message)
    return f"{warning.category.__name__} (message withheld: it may quote values)"
