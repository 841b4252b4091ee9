"""``snapshot``, ``refresh``, ``history``, ``vacuum`` and ``keygen``: snapshots and their keys."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from healthimaging_df.cli.commands import options, output

if TYPE_CHECKING:
    from healthimaging_df.query import Query
    from healthimaging_df.store.redact import RedactionPolicy

KEY_ENV = "HEALTHIMAGING_DF_REDACTION_KEY"

SNAPSHOT_PAGE = """\
run a query into a Parquet snapshot (file or partitioned directory)

Run a query and write its result as a snapshot: one .parquet file, or a directory (local or s3://)
holding a Delta Lake table, where each write is a new version. Writes are atomic and checkpointed:
rerun the same command after an interruption to resume.

examples:
  # one Parquet file; resumes from a checkpoint if an earlier run was interrupted
  healthimaging-df snapshot cohort.parquet --datastore-id ID --where Modality=CT \\
      --between StudyDateTime 2020 2024

  # a Delta Lake table (Modality=CT/... and _delta_log/), for DuckDB, Spark, Athena or Trino;
  # every rerun or refresh adds a version (see: healthimaging-df history cohort/)
  healthimaging-df snapshot cohort/ --datastore-id ID --partition-by Modality

  # on S3, registered in Glue for Athena and EMR
  healthimaging-df snapshot s3://bucket/cohorts/ct/ --datastore-id ID --glue-table imaging.ct

  # an Apache Iceberg table: a SQL (SQLite) catalog, glue, or an http(s):// REST catalog
  healthimaging-df snapshot --iceberg-table cohorts.ct --catalog sqlite:///catalog.db \
      --warehouse ./warehouse --datastore-id ID --where Modality=CT

  # pseudonymized for export: names dropped, IDs and UIDs keyed-hashed, dates shifted per patient
  export HEALTHIMAGING_DF_REDACTION_KEY=...   # from your secrets manager, 32+ bytes (healthimaging-df keygen)
  healthimaging-df snapshot s3://bucket/cohort/ --datastore-id ID --redact --kms-key-id alias/k
"""

REFRESH_PAGE = """\
bring a snapshot up to date with what changed since it was taken

Fetch the image sets updated since a snapshot was taken, upsert them, drop those that no longer
match its query, and rewrite the snapshot atomically. The query comes from the snapshot; query
options are needed only for a redacted snapshot.

examples:
  # fetch what changed since the snapshot was taken: a file is rewritten atomically, a
  # directory (Delta table) gets one MERGE commit that rewrites only the files it touches
  healthimaging-df refresh cohort.parquet

  # a redacted snapshot keeps no query values: give the query and the same key again
  healthimaging-df refresh cohort/ --datastore-id ID --where Modality=CT --redact

  # the backstop of refreshes and events: also drop deleted image sets, refresh tiers
  healthimaging-df refresh cohort/ --reconcile

  # an Iceberg table: one snapshot that deletes the changed IDs and adds their new rows
  healthimaging-df refresh --iceberg-table cohorts.ct --catalog glue --warehouse s3://bucket/wh

The report (added, updated, removed image sets) goes to stdout.
"""


def register(commands: Any) -> None:
    """Add the ``snapshot`` and ``refresh`` commands."""
    snapshot = options.add_command(commands, "snapshot", SNAPSHOT_PAGE, run_snapshot)
    _table_arguments(snapshot, "FILE.parquet, a directory, or s3://...")
    group = snapshot.add_argument_group("snapshot")
    group.add_argument(
        "--partition-by",
        action="append",
        metavar="COL",
        help="Hive partition column (directories only); repeat for several; StudyYear is derived",
    )
    group.add_argument(
        "--no-resume",
        action="store_true",
        help="ignore a checkpoint of an interrupted run and start afresh",
    )
    group.add_argument(
        "--glue-table",
        metavar="DB.TABLE",
        help="create or update this Glue table for the snapshot (s3:// directories only)",
    )
    _storage_options(group)
    _redaction_options(snapshot)

    refresh = options.add_command(commands, "refresh", REFRESH_PAGE, run_refresh)
    _table_arguments(refresh, "a snapshot: FILE.parquet, a directory...")
    group = refresh.add_argument_group("refresh")
    group.add_argument(
        "--margin-minutes",
        type=float,
        default=5.0,
        metavar="M",
        help="also re-read updates from M minutes before the last fetch (clock skew; default 5)",
    )
    group.add_argument(
        "--reconcile",
        action="store_true",
        help="read every matching image set (the query's own requests, no metadata access): "
        "drops deleted image sets, makes storageTier and lastAccessedAt current",
    )
    _storage_options(group)
    _redaction_options(refresh)

    _table_command(commands, "history", HISTORY_PAGE, run_history)
    vacuum = _table_command(commands, "vacuum", VACUUM_PAGE, run_vacuum)
    vacuum.add_argument(
        "--retain-hours",
        type=float,
        required=True,
        metavar="H",
        help="keep every version of the last H hours readable (rounded up to whole hours)",
    )
    vacuum.add_argument(
        "--dry-run", action="store_true", help="only count the files that would be deleted"
    )

    keygen: argparse.ArgumentParser = commands.add_parser(
        "keygen",
        help="print a new random redaction key",
        description=f"Print a new random key for --redact (32 random bytes, URL-safe text). "
        f"Keep it in a secrets manager; pass it in ${KEY_ENV}.",
    )
    keygen.set_defaults(handler=run_keygen)


HISTORY_PAGE = """\
list the versions of a directory snapshot (Delta table)

List every version of a directory snapshot, newest first: when, what (WRITE, MERGE, VACUUM), rows
added, updated and removed, and the query behind it. read_snapshot(path, version=N) reads a version
back.

examples:
  healthimaging-df history cohort/
  healthimaging-df history s3://bucket/cohorts/ct/ --profile research
  healthimaging-df history --iceberg-table cohorts.ct --catalog sqlite:///catalog.db \\
      --warehouse ./warehouse

The first line names the table format, its protocol (Delta reader/writer versions, Iceberg
format version) and its table features.
"""

VACUUM_PAGE = """\
delete files of snapshot versions older than a retention

Delete the data files that no version of the last H hours needs (and debris of interrupted writes).
Versions older than that can no longer be read: keep H longer than your longest job and than any
version a paper cites.

examples:
  # how many files a 30-day retention would delete
  healthimaging-df vacuum cohort/ --retain-hours 720 --dry-run
  healthimaging-df vacuum cohort/ --retain-hours 720
"""


def _table_command(
    commands: Any, name: str, page: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A verb over an existing directory snapshot or Iceberg table: no query, no AWS options."""
    parser = options.add_command(
        commands, name, page, run, parents=[_s3_parent(), options.common_parent()]
    )
    _table_arguments(parser, "a directory snapshot, local or s3://")
    return parser


def _table_arguments(parser: argparse.ArgumentParser, help_: str, metavar: str = "PATH") -> None:
    """The snapshot a verb works on: PATH, or an Iceberg table named by the Iceberg options."""
    parser.add_argument("path", metavar=metavar, nargs="?", help=help_)
    _iceberg_options(parser)


def _iceberg_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Iceberg",
        "an Apache Iceberg table instead of PATH: NAMESPACE.TABLE in a catalog named by a URI\n"
        "(sqlite:///FILE a SQL catalog, glue or glue://CATALOG_ID AWS Glue, http(s)://... REST)",
    )
    group.add_argument("--iceberg-table", metavar="NS.TABLE", help="the Iceberg table")
    group.add_argument("--catalog", metavar="URI", help="the Iceberg catalog")
    group.add_argument(
        "--warehouse", metavar="URI", help="where new tables' files go (a folder or s3://...)"
    )


def _where(args: argparse.Namespace) -> dict[str, Any]:
    """PATH, or the Iceberg table: exactly one, checked before anything connects."""
    iceberg = getattr(args, "iceberg_table", None)
    if iceberg is None:
        if getattr(args, "catalog", None) or getattr(args, "warehouse", None):
            raise options.UsageError("--catalog and --warehouse go with --iceberg-table")
        if args.path is None:
            raise options.UsageError("give PATH, or --iceberg-table NS.TABLE --catalog URI")
        return {"path": args.path}
    if args.path is not None:
        raise options.UsageError("give PATH or --iceberg-table, not both")
    if not args.catalog:
        raise options.UsageError("--iceberg-table needs --catalog URI")
    return {"iceberg_table": iceberg, "catalog": args.catalog, "warehouse": args.warehouse}


def _s3_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("S3")
    group.add_argument("--profile", help="named profile from ~/.aws/config (s3:// paths)")
    group.add_argument("--region", help="AWS region of the bucket")
    group.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint")
    parent.set_defaults(local=False, kms_key_id=None)
    return parent


def run_history(args: argparse.Namespace) -> int:
    """Run ``history``: one line per version on stdout."""
    from healthimaging_df.snapshot import snapshot_history, snapshot_info

    where = _where(args)
    if "path" in where:
        where["path"] = _directory(args.path)
    storage = {k: v for k, v in _storage(args).items() if k != "kms_key_id"}
    info = snapshot_info(**where, **storage)
    protocol = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.protocol.items())
    features = ", ".join(info.features) or "none"
    print(f"{info.format} table: {protocol}; table features: {features}")
    frame = snapshot_history(**where, **storage)
    print("version  timestamp (UTC)                operation   added  updated  removed  rows")
    for record in frame.to_dict("records"):
        prov = record["provenance"] or {}
        moment = str(record["timestamp"].isoformat())
        print(
            f"{record['version']:>7}  {moment:<30} {record['operation']:<10} "
            f"{record['rows_added']:>6} {record['rows_updated']:>8} {record['rows_removed']:>8}  "
            f"{prov.get('row_count', '')}"
        )
    return 0


def run_vacuum(args: argparse.Namespace) -> int:
    """Run ``vacuum``: how many files were (or would be) deleted, on stdout."""
    from healthimaging_df.snapshot import vacuum_snapshot

    if not args.retain_hours >= 0 or args.retain_hours == float("inf"):
        raise options.UsageError("--retain-hours must be a number of hours >= 0")
    storage = {k: v for k, v in _storage(args).items() if k != "kms_key_id"}
    where = _where(args)
    if "path" in where:
        where["path"] = _directory(args.path)
    count = vacuum_snapshot(
        **where,
        retain=timedelta(hours=args.retain_hours),
        dry_run=args.dry_run,
        **storage,
    )
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {count} file(s) no version of the last {args.retain_hours:g} hours needs")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    """Run ``keygen``: a new key on stdout."""
    from healthimaging_df.store.redact import generate_key

    print(generate_key())
    return 0


def _directory(path: str) -> str:
    if str(path).rstrip("/").endswith(".parquet"):
        raise options.UsageError(
            f"{path} is a single-file snapshot: history and vacuum need a directory snapshot"
        )
    return path


def _storage_options(group: Any) -> None:
    group.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint")
    group.add_argument(
        "--kms-key-id", metavar="KEY", help="SSE-KMS key (ID, alias or ARN) for s3:// objects"
    )


def _redaction_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "redaction",
        "--redact pseudonymizes before writing: by default PatientName dropped; PatientID,\n"
        "AccessionNumber, StudyID and the UIDs replaced by keyed HMACs (joins across exports\n"
        "still work); birth date cut to its year; study dates shifted per patient. The key is\n"
        f"read from the environment (never the command line): ${KEY_ENV}\n"
        "unless --key-env names another variable.",
    )
    group.add_argument("--redact", action="store_true", help="apply the redaction policy")
    group.add_argument(
        "--key-env", default=KEY_ENV, metavar="VAR", help="environment variable holding the key"
    )
    group.add_argument(
        "--drop", action="append", metavar="COL", help="columns to drop (replaces the default)"
    )
    group.add_argument(
        "--hash", action="append", metavar="COL", help="columns to hash (replaces the default)"
    )
    group.add_argument(
        "--keep-birth-date", action="store_true", help="do not cut PatientBirthDate to its year"
    )
    group.add_argument("--no-date-shift", action="store_true", help="do not shift study dates")


def _policy(args: argparse.Namespace) -> RedactionPolicy | None:
    if not args.redact:
        if args.drop or args.hash or args.keep_birth_date or args.no_date_shift:
            raise options.UsageError("redaction options need --redact")
        return None
    from healthimaging_df.store.redact import DEFAULT_DROP, DEFAULT_HASH, RedactionPolicy

    key = os.environ.get(args.key_env)
    if not key:
        raise options.UsageError(
            f"--redact needs the key in the environment variable {args.key_env}"
        )
    try:
        key_bytes = key.encode("utf-8")
    except UnicodeError:  # its message quotes characters of the key
        raise options.UsageError(f"the key in {args.key_env} is not valid text") from None
    try:
        return RedactionPolicy(
            key=key_bytes,
            drop=tuple(_names(args.drop) if args.drop else DEFAULT_DROP),
            hash=tuple(_names(args.hash) if args.hash else DEFAULT_HASH),
            birth_date_to_year=not args.keep_birth_date,
            shift_dates=not args.no_date_shift,
        )
    except ValueError as exc:  # names columns or the key length, never the key
        raise options.UsageError(f"redaction policy: {exc}") from None


def _names(specs: list[str]) -> list[str]:
    return [name.strip() for spec in specs for name in spec.split(",") if name.strip()]


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    """S3 settings: the same profile and region as the service client (not with --local)."""
    session = None
    remote = str(args.path).startswith("s3://") or getattr(args, "catalog", None) == "glue"
    remote = remote or str(getattr(args, "warehouse", None) or "").startswith("s3://")
    if remote and not args.local:
        from healthimaging_df.aws.session import named

        session = named(args.profile, args.region)
    return {
        "boto3_session": session,
        "region": args.region,
        "s3_endpoint_url": args.s3_endpoint_url,
        "kms_key_id": args.kms_key_id,
    }


def run_snapshot(args: argparse.Namespace) -> int:
    """Run ``snapshot``; return the exit code."""
    from healthimaging_df.cli.commands import building, connect
    from healthimaging_df.snapshot import export_query

    where = _where(args)
    policy = _policy(args)
    target = connect.Target(args)
    query = building.build_query(args, target.datastore_id)
    with target.connect() as connection:
        info = export_query(
            query,
            **where,
            client=connection.client,
            progress=output.progress(args),
            **options.pace(args),
            partition_cols=_names(args.partition_by) if args.partition_by else None,
            redact=policy,
            resume=not args.no_resume,
            glue_table=args.glue_table,
            **_storage(args),
        )
    output.status(args, str(info))
    if info.glue:
        output.status(args, f"Glue table {args.glue_table} {info.glue}")
    return 0


def run_refresh(args: argparse.Namespace) -> int:
    """Run ``refresh``; print what changed on stdout; return the exit code."""
    from healthimaging_df.cli.commands import building, connect
    from healthimaging_df.refresh import refresh_snapshot

    where = _where(args)
    policy = _policy(args)
    query: Query | None = None
    provenance = _check_refresh(args, policy, where)
    if building.has_query_options(args) or policy is not None:
        # a redacted snapshot keeps no query values: the query comes from the command line
        target = connect.Target(args)
        query = building.build_query(args, target.datastore_id)
        if policy is None:
            _check_same_query(
                args.path if args.path is not None else args.iceberg_table, provenance, query
            )
    else:
        target = connect.Target(args, required=False)  # the query is the snapshot's own
    with target.connect() as connection:
        report = refresh_snapshot(
            **where,
            client=connection.client,
            query=query,
            redact=policy,
            margin=timedelta(minutes=args.margin_minutes),
            progress=output.progress(args),
            **options.pace(args),
            reconcile=args.reconcile,
            **_storage(args),
        )
    print(report)
    return 0


def _check_same_query(path: str, provenance: dict[str, Any], query: Query) -> None:
    """A plain snapshot refreshed by another query would mix two cohorts: a usage error."""
    import json

    from healthimaging_df import Query
    from healthimaging_df.errors import HealthImagingDFError

    recorded = provenance.get("query")
    if not isinstance(recorded, str):
        return  # refresh itself reports a damaged provenance
    try:
        made_by = Query.from_dict(json.loads(recorded))
    except (HealthImagingDFError, ValueError, TypeError, KeyError, AttributeError):
        return
    if made_by != query:
        raise options.UsageError(
            f"the query options are not the query {path} was made with: refreshing would mix two "
            "cohorts; leave them out (the snapshot keeps its query) or snapshot the new query to "
            "a new path"
        )


def _check_refresh(
    args: argparse.Namespace, policy: RedactionPolicy | None, where: dict[str, Any]
) -> dict[str, Any]:
    """Refuse, in CLI terms and before connecting, a refresh the snapshot cannot take.

    Returns the snapshot's provenance.
    """
    import json

    from healthimaging_df.cli.commands import building
    from healthimaging_df.errors import SnapshotError
    from healthimaging_df.snapshot import snapshot_provenance

    if args.limit is not None:
        raise options.UsageError(
            "--limit: a query with a limit cannot be refreshed (its first N rows can change in "
            "ways an update scan does not show); run snapshot again"
        )
    storage = {k: v for k, v in _storage(args).items() if k != "kms_key_id"}
    shown = args.path if args.path is not None else args.iceberg_table
    try:
        provenance = snapshot_provenance(**where, **storage)
    except (SnapshotError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        raise options.UsageError(
            f"{shown} is not a snapshot (snapshot or search --out FILE.parquet writes one)"
        ) from None
    recorded = provenance.get("redaction")
    if recorded:
        if policy is None or not building.has_query_options(args):
            raise options.UsageError(
                f"{shown} is redacted and keeps no query values: give the query options "
                "again (--datastore-id, --where...) and --redact with the same key"
            )
        try:
            described = json.loads(recorded) if isinstance(recorded, str) else recorded
        except ValueError:
            described = None
        if isinstance(described, dict):
            fingerprints = provenance.get("redaction_fingerprints")
            if not isinstance(fingerprints, dict):
                raise options.UsageError(
                    f"{shown} keeps no redaction fingerprints (an older version wrote it): "
                    "export it again"
                )
            try:
                policy.check_fingerprints(fingerprints, None)  # the key; the query later
            except SnapshotError:
                raise options.UsageError(
                    f"the key in {args.key_env} is not the one {shown} was made with"
                ) from None
            if described != policy.describe():
                raise options.UsageError(
                    f"the redaction options (--drop, --hash, --keep-birth-date, --no-date-shift) "
                    f"differ from those {shown} was made with"
                )
    elif policy is not None:
        raise options.UsageError(f"{shown} is not redacted: leave out --redact")
    query = provenance.get("query")
    if not building.has_query_options(args) and isinstance(query, str):
        try:
            limited = json.loads(query).get("limit") is not None
        except (ValueError, AttributeError):
            return provenance  # refresh itself reports a damaged provenance
        if limited:
            raise options.UsageError(
                f"{shown} was made by a query with --limit, which cannot be refreshed; run "
                "snapshot again"
            )
    return provenance
