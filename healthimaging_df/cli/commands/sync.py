"""``sync``: keep a snapshot current from HealthImaging events an EventBridge rule puts on SQS."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from healthimaging_df.cli.commands import options
from healthimaging_df.cli.commands.snapshot import (
    _check_refresh,
    _policy,
    _redaction_options,
    _storage,
    _storage_options,
    _table_arguments,
    _where,
)

if TYPE_CHECKING:
    from healthimaging_df.query import Query

SYNC_PAGE = """\
keep a snapshot current from HealthImaging change events on an SQS queue

Read HealthImaging's image-set events (delivered to an SQS queue by an EventBridge rule), delete
the deleted image sets' rows, read the created, copied and updated ones again with the fewest
SearchImageSets requests, and commit each batch once; a message leaves the queue only after the
commit that covers it.

examples:
  # drain the queue once and exit (cron, a scheduled task); docs/snapshots.md has the
  # EventBridge rule, the queue policy and the IAM actions
  healthimaging-df sync cohort/ --queue-url https://sqs.us-east-1.amazonaws.com/123456789012/ahi

  # run until SIGTERM or Ctrl-C, reconciling once a day (the backstop for lost events)
  healthimaging-df sync cohort/ --queue-url URL --reconcile-every 24h

  # a redacted snapshot: the query and the same key again, as for refresh
  healthimaging-df sync cohort/ --queue-url URL --datastore-id ID --where Modality=CT --redact

  # an Iceberg table: one snapshot per batch
  healthimaging-df sync --iceberg-table cohorts.ct --catalog glue --queue-url URL --once

A line per batch goes to stderr; the summary (messages, rows added, updated, removed, poison
messages) to stdout.
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``24h`` or ``7d`` as a positive timedelta."""
    found = _DURATION.fullmatch(text.strip())
    seconds = float(found.group(1)) * _UNITS[found.group(2)] if found else 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be a positive duration such as 900s, 15m, 24h, 7d")
    return timedelta(seconds=seconds)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sync`` command."""
    sync = options.add_command(commands, "sync", SYNC_PAGE, run_sync)
    _table_arguments(sync, "a snapshot: a directory (Delta) or a file", metavar="SNAPSHOT")
    group = sync.add_argument_group("sync")
    group.add_argument("--queue-url", required=True, metavar="URL", help="the SQS queue")
    group.add_argument("--once", action="store_true", help="drain the messages waiting, then exit")
    group.add_argument(
        "--sqs-endpoint-url", metavar="URL", help="an SQS-compatible endpoint (not AWS)"
    )
    group.add_argument(
        "--reconcile-every",
        type=duration,
        metavar="DURATION",
        help="run a reconciling refresh when the last full read is older (e.g. 24h, 7d)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        metavar="N",
        help="messages per commit (default 1000)",
    )
    group.add_argument(
        "--visibility-timeout",
        type=int,
        default=300,
        metavar="S",
        help="seconds a received message stays hidden (default 300)",
    )
    _storage_options(group)
    _redaction_options(sync)


def run_sync(args: argparse.Namespace) -> int:
    """Run ``sync``; print the summary on stdout; return the exit code."""
    from healthimaging_df.aws import session as aws_session
    from healthimaging_df.cli.commands import building, connect
    from healthimaging_df.sync import sync_snapshot

    where = _where(args)
    policy = _policy(args)
    query: Query | None = None
    _check_refresh(args, policy, where)
    if building.has_query_options(args) or policy is not None:
        target = connect.Target(args)
        query = building.build_query(args, target.datastore_id)
    else:
        target = connect.Target(args, required=False)
    storage = _storage(args)
    sqs = None
    if args.sqs_endpoint_url:
        session = aws_session.named(args.profile, args.region)
        sqs = aws_session.client(
            "sqs", session, region=args.region or "us-east-1", endpoint_url=args.sqs_endpoint_url
        )
    with target.connect() as connection:
        report = sync_snapshot(
            **where,
            queue_url=args.queue_url,
            client=connection.client,
            sqs_client=sqs,
            query=query,
            redact=policy,
            once=args.once,
            progress=not getattr(args, "quiet", False),
            reconcile_every=args.reconcile_every,
            batch_size=args.batch_size,
            visibility_timeout=args.visibility_timeout,
            **options.pace(args),
            **storage,
        )
    print(report)
    for message_id, reason in report.poison:
        print(f"poison message {message_id}: {reason}")
    return 0
