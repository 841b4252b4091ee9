"""``healthimaging-df search``: a cohort to Parquet, CSV, JSON Lines or a table on stdout."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from healthimaging_df.cli.commands import options, output

if TYPE_CHECKING:
    import pandas as pd

PAGE = """\
run a query; write Parquet, CSV, JSON Lines or a table

Run a SearchImageSets query (fanned out, paged and filtered exactly, as Query.to_dataframe does)
and write the matching image sets.

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

  # one row per study (or --per patient), of patients aged 40 to 60 at the study
  healthimaging-df search --local --between ageAtStudy 40 60 --per study --out studies.csv

CSV and JSON Lines rows are written as pages arrive (so `| head` stops the fetch early), in
arrival order; give --sort (or --limit) for the query's order, which needs the whole result first.
"""

EXIT_EMPTY = 3  # --fail-if-empty and nothing matched
STREAM_CHUNK_ROWS = 200  # rows per chunk written while streaming: about 4 pages


def register(commands: Any) -> None:
    """Add the ``search`` command."""
    parser = options.add_command(commands, "search", PAGE, run)
    out = parser.add_argument_group("result")
    out.add_argument(
        "--out",
        metavar="FILE",
        help="write to FILE (local or s3://bucket/key): .parquet (or .pq), .csv, .jsonl (or "
        ".ndjson); stdout if left out",
    )
    out.add_argument(
        "--format",
        choices=output.FORMATS,
        help="override the format the --out extension implies; csv or jsonl also go to stdout",
    )
    output.add_mkdir(out)
    output.add_s3_options(out)
    out.add_argument(
        "--columns",
        action="append",
        metavar="COL[,COL...]",
        help="columns to keep, in order (default: all in files; a short list in the table)",
    )
    out.add_argument(
        "--per",
        choices=("study", "patient"),
        help="one row per study or per patient (df.ahi.studies() / patients()) instead of one "
        "per image set",
    )
    out.add_argument(
        "--fail-if-empty",
        action="store_true",
        help=f"exit with status {EXIT_EMPTY} when nothing matched (the output is still written)",
    )
    out.add_argument(
        "--no-provenance",
        action="store_true",
        help="keep the query (its values are PHI), plan, datastore and endpoint out of a "
        "Parquet file's metadata",
    )
    options.add_explain(
        out, "print the plan (what is pushed down, request chains) and send nothing"
    )
    out.add_argument(
        "--show-values",
        action="store_true",
        help="with --explain, print the query's values too (they are usually PHI)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``search``; return the exit code."""
    from healthimaging_df.cli.commands import building, connect

    fmt = output.destination(args)
    _check_writable(args.out)
    s3 = output.s3_settings(args)
    columns = None if args.per else building.parse_columns(args.columns)
    target = connect.Target(args)
    query = building.build_query(args, target.datastore_id)
    if args.explain:
        print(_explained(query, args))
        return 0
    fetch: dict[str, Any] = {"progress": output.progress(args), **options.pace(args)}
    streaming = fmt in ("csv", "jsonl") and not (args.per or args.sort or args.limit)
    with target.connect() as connection:
        if streaming:
            client = connection.client

            def chunks() -> Iterator[pd.DataFrame]:  # planned once the destination is open
                yield from query.iter_dataframes(
                    chunk_rows=STREAM_CHUNK_ROWS, client=client, **fetch
                )

            count = output.stream_frames(chunks(), args.out, fmt, columns, s3)
        else:
            frame = query.to_dataframe(client=connection.client, **fetch)
    if not streaming:
        frame = _shape(frame, args, fmt, columns)
        output.write_frame(frame, args.out, fmt, plain=bool(args.per), s3=s3)
        count = len(frame)
    rows = {"study": "studies", "patient": "patients"}.get(args.per or "", "image sets")
    output.written(args, f"{count} {rows}")
    if args.fail_if_empty and count == 0:
        return EXIT_EMPTY
    return 0


def _explained(query: Any, args: argparse.Namespace) -> str:
    """The plan, priced at the run's --max-tps; no request is sent and no AWS library loaded.

    ``--explain`` stays instant, so it reads no statistics (they are kept by endpoint, which
    takes botocore to resolve): ``Query.explain(client=...)`` in Python does.
    """
    return str(
        query.explain(
            show_values=args.show_values,
            **options.pace(args),
        )
    )


def _check_writable(out: str | None) -> None:
    """A local --out whose folder cannot be written fails now, not after the whole fetch."""
    if out in (None, "-") or "://" in out:
        return
    from healthimaging_df.errors import QueryValidationError
    from healthimaging_df.store.storage import open_target

    try:
        open_target(out).store.check_writable()
    except QueryValidationError as error:
        raise options.UsageError(f"--out {out}: {error.rule}") from None


def _shape(frame: pd.DataFrame, args: argparse.Namespace, fmt: str, columns: Any) -> pd.DataFrame:
    """The rows and columns to write: a rollup (--per), --columns, the table's short list."""
    from healthimaging_df import cohort

    if args.per:
        rollup = cohort.studies(frame) if args.per == "study" else cohort.patients(frame)
        if args.columns:
            names = [n.strip() for spec in args.columns for n in spec.split(",") if n.strip()]
            unknown = [n for n in names if n not in rollup.columns]
            if unknown:
                raise options.UsageError(
                    f"--columns with --per {args.per}: no column {unknown[0]!r}; the columns "
                    f"are {', '.join(map(str, rollup.columns))}"
                )
            rollup = rollup[list(dict.fromkeys(names))]
        rollup.attrs.clear()  # a plain table: no provenance (the query's values are PHI)
        return rollup
    if columns is None and fmt == "table":
        columns = list(output.TABLE_COLUMNS)
    if columns is not None:
        frame = frame[columns]
    if args.no_provenance:
        frame.attrs.clear()
    return frame
