"""The ``healthimaging-df`` command line; each command group registers its own subparser.

Exit codes: 0 success, 1 service error, 2 usage or configuration error, 3 nothing matched
(``search --fail-if-empty``). Errors are printed as one
line that names the problem and never a DICOM value (PHI); ``--verbose`` adds log lines and, on a
failure, the traceback with only our own (PHI-free) exception messages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_SERVICE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
quick start:
  healthimaging-df demo                                   # a query on the bundled local service
  healthimaging-df search --local --where Modality=CT --out cohort.parquet
  healthimaging-df search --datastore-id ID --profile p --region us-east-1 \\
      --ids-from patients.txt --out cohort.parquet         # the same against AWS

Credentials, region and endpoint come from the usual places (AWS_PROFILE, AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL_MEDICAL_IMAGING, ~/.aws/config) unless given as options.

Every command has --help with examples. Exit status: 0 success, 1 service error, 2 usage or
configuration error, 3 search --fail-if-empty and nothing matched, 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every command."""
    from healthimaging_df.cli import demo
    from healthimaging_df.cli.commands import (
        doctor,
        metadata,
        search,
        series_attributes,
        snapshot,
        sql,
        sync,
    )
    from healthimaging_df.local import cli as local_cli

    parser = argparse.ArgumentParser(
        prog="healthimaging-df",
        description="AWS HealthImaging image-set search as DataFrames and Parquet.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log on stderr (no PHI); -vv for more"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar or summary on stderr"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    search.register(commands)
    snapshot.register(commands)
    sync.register(commands)
    metadata.register(commands)
    series_attributes.register(commands)
    sql.register(commands)
    doctor.register(commands)
    demo.register(commands)
    local_cli.register(commands)
    return parser


class _Version(argparse.Action):
    """``--version``, reading the installed version only when asked (importlib.metadata is slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from healthimaging_df._version import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (see EPILOG: 0, 1, 2, 3 or 130)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would quote them all, and a stray word is often a value (PHI)
        parser.error(_unrecognized(extras))
    verbose = int(args.verbose)
    _configure_logging(verbose)
    try:
        result: int = args.handler(args)
    except KeyboardInterrupt as exc:
        # an export's own message says what its checkpoint holds (counts, never values)
        detail = f": {exc}" if str(exc) else ""
        print(f"healthimaging-df: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:  # every failure becomes one PHI-free line and an exit code
        code, message = describe(exc, _given_paths(args))
        if verbose:
            _print_traceback(exc)
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return code
    try:
        sys.stdout.flush()  # a pipe closed after the last write shows up here
    except BrokenPipeError:
        return _closed_pipe()
    return result


def _closed_pipe() -> int:
    """The reader of stdout went away (``| head``): stop quietly with 0, as Python's docs advise."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    return EXIT_OK


def _unrecognized(extras: Sequence[str]) -> str:
    """Name unknown options (option names are not PHI); count the other words, never show them."""
    options = [word.partition("=")[0] for word in extras if word.startswith("--")]
    others = len(extras) - len(options)
    text = f"unrecognized option(s): {', '.join(options)}" if options else ""
    if others:
        rest = (
            f"{others} other argument(s), not shown as they may be values; quote a value that "
            "holds spaces (--where 'StudyDescription=CT CHEST')"
        )
        text = (
            f"{text}; {rest}"
            if text
            else f"{others} unrecognized argument(s){rest[rest.index(',') :]}"
        )
    return text


def _given_paths(args: argparse.Namespace) -> list[str]:
    """The file and directory paths typed on the command line (not stdin/stdout's ``-``)."""
    given = (getattr(args, name, None) for name in ("out", "path", "source", "ids_from"))
    return [str(path) for path in given if path not in (None, "", "-")]


def _file_named(filename: object, given: Sequence[str]) -> str:
    """How an ``OSError``'s file is named: only paths typed on the command line are shown.

    Paths the library builds can hold values (a Hive partition directory is
    ``PatientID=<value>``), so a file under a given directory is not named, only the directory;
    a temporary file next to a given path is named by that path.
    """
    text = os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else ""
    if not text:
        return " (path withheld: it may hold values)"
    path = Path(os.path.abspath(text))
    for typed in given:
        target = Path(os.path.abspath(typed))
        if path == target or path in target.parents:  # the path, or a directory on its way
            return f": {text}"
        if path.parent == target.parent and path.name.startswith(f".{target.name}."):
            return f": {typed}"
        if target in path.parents:
            return f": a file under {typed}"
    return " (path withheld: it may hold values)"


def describe(exc: BaseException, given_paths: Sequence[str] = ()) -> tuple[int, str]:
    """The exit code and a one-line, PHI-free message for *exc*.

    Our own exceptions are written without values; any other exception is named by its type only,
    since its message may quote a request or response (PHI). An ``OSError``'s file is named only
    when it is one of *given_paths* (typed on the command line), or lies under one.
    """
    from healthimaging_df.cli.commands.options import UsageError
    from healthimaging_df.errors import HealthImagingDFError, QueryValidationError, SearchError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, QueryValidationError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, SearchError):
        hint = _HINTS.get(exc.code, "")
        return EXIT_SERVICE, f"{exc}{hint}"
    if isinstance(exc, HealthImagingDFError):
        return EXIT_SERVICE, str(exc)
    from healthimaging_df import aws

    if aws.is_aws_error(exc):
        return EXIT_SERVICE, aws.describe(exc)
    if isinstance(exc, OSError):
        where = _file_named(exc.filename, given_paths) if exc.filename else ""
        return EXIT_SERVICE, f"{exc.strerror or type(exc).__name__}{where}"
    return EXIT_SERVICE, f"unexpected {type(exc).__name__} (run with --verbose for the traceback)"


_HINTS = {
    "ResourceNotFoundException": " (is --datastore-id right, in this region and account?)",
    "AccessDeniedException": " (see docs/security.md for the IAM policy the CLI needs)",
    "UnrecognizedClientException": " (are the credentials valid for this region?)",
    "EndpointConnectionError": " (is the endpoint reachable? check --endpoint-url and --region)",
    "ConnectionClosedError": " (is the endpoint reachable? check --endpoint-url and --region)",
}


def _print_traceback(exc: BaseException) -> None:
    """Each exception of the chain: its stack, and its message only if it is one of ours."""
    from healthimaging_df.cli.commands.options import UsageError
    from healthimaging_df.errors import HealthImagingDFError

    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in reversed(chain):
        print("Traceback (most recent call last):", file=sys.stderr)
        print("".join(traceback.format_tb(item.__traceback__)), end="", file=sys.stderr)
        safe = isinstance(item, (HealthImagingDFError, UsageError))
        text = str(item) if safe else "<message withheld: it may contain PHI>"
        print(f"{type(item).__module__}.{type(item).__qualname__}: {text}", file=sys.stderr)


def _configure_logging(verbose: int) -> None:
    """-v: our DEBUG log on stderr; -vv: botocore's too (its bodies redacted by our filter)."""
    if not verbose:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = ["healthimaging_df"] + (["botocore", "urllib3"] if verbose > 1 else [])
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
