"""The ``healthimaging-df`` command line; each command group registers its own subparser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from healthimaging_df import __version__


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every command."""
    from healthimaging_df import demo
    from healthimaging_df.local import cli as local_cli

    parser = argparse.ArgumentParser(
        prog="healthimaging-df",
        description="AWS HealthImaging image-set search as DataFrames and Parquet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.register(commands)
    local_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 service error, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
