"""``healthimaging-df doctor``: a read-only check of a live setup in a few requests."""

from __future__ import annotations

import argparse
from typing import Any

from healthimaging_df.cli.commands import options

PAGE = """\
check a live setup, read-only, in a few requests

Check credentials, region and endpoint, the datastore, each permission the library uses, DICOMweb,
the botocore model, latency and throttling; read-only.

examples:
  # credentials, region, endpoint, permissions, DICOMweb, latency: a readable table
  healthimaging-df doctor --datastore-id ID

  # the same as JSON: {"checks": [{"name": ..., "status": "ok" | "warn" | "fail", "detail": ...}]}
  healthimaging-df doctor --datastore-id ID --json

  # and the service contract checks: which assumptions of the library hold on this datastore
  healthimaging-df doctor --datastore-id ID --conformance

Nothing is written and nothing is un-archived: GetImageSetMetadata is tried on a FREQUENT_ACCESS
image set only. What doctor learns about DICOMweb is remembered for the queries that follow.

exit status:
  0  searching works (warnings may remain: read them)
  1  searching does not work (no credentials or region, SearchImageSets refused, ...)
  2  usage error (bad option or value); nothing was sent"""


def register(commands: Any) -> None:
    """Add the ``doctor`` command."""
    parser = options.add_command(
        commands,
        "doctor",
        PAGE,
        run,
        parents=[options.aws_parent(), options.common_parent()],
        exit_status=None,
    )
    group = parser.add_argument_group("doctor")
    group.add_argument(
        "--datastore-id", metavar="ID", help="the datastore to check; required unless --local"
    )
    group.add_argument("--json", action="store_true", help="print the checks as JSON")
    group.add_argument(
        "--conformance",
        action="store_true",
        help="also run the service contract checks (about forty requests more, read-only)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``doctor``; return 0 when searching works, else 1."""
    from healthimaging_df.checkup import doctor
    from healthimaging_df.cli.commands import connect

    with connect.Target(args).connect() as connection:
        report = doctor(
            connection.datastore_id,
            client=connection.client,
            conformance_checks=args.conformance,
        )
    print(report.to_json() if args.json else report.table())
    return report.exit_code
