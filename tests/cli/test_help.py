"""``--help`` at every level, and the mapping of exceptions to exit codes and PHI-free lines."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from healthimaging_df import __version__
from healthimaging_df.cli import app as cli
from healthimaging_df.cli.commands.options import UsageError
from healthimaging_df.errors import MetadataFetchError, QueryValidationError, SearchError


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subparsers(sub).items()})
    return found


def test_every_command_has_help_and_ours_have_examples_and_exit_codes() -> None:
    parser = cli.build_parser()
    commands = subparsers(parser)
    assert {"search", "snapshot", "refresh", "metadata", "demo", "local", "local serve"} <= set(
        commands
    )
    assert "examples" in parser.format_help()
    for name in ("search", "snapshot", "refresh", "metadata"):
        text = commands[name].format_help()
        assert "examples:" in text, name
        assert "exit status:" in text, name
        assert f"healthimaging-df {name}" in text, name
        for option in ("--profile", "--region", "--endpoint-url", "--local", "--verbose"):
            assert option in text, (name, option)


def test_version_through_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "healthimaging_df", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"healthimaging-df {__version__}"


PHI = "PAT-SECRET-42"


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (UsageError("--sort expects COL"), 2, "--sort expects COL"),
        (QueryValidationError("PatientID", "too long", 3), 2, "PatientID (value #4): too long"),
        (
            SearchError("SearchImageSets", 0, "AccessDeniedException", 403, server_message=PHI),
            1,
            "AccessDeniedException (HTTP 403) (see docs/security.md",
        ),
        (MetadataFetchError({"a" * 32: "InternalServerException"}), 1, "1 image set(s)"),
        (
            ClientError({"Error": {"Code": "ValidationException", "Message": PHI}}, "GetDatastore"),
            1,
            "GetDatastore failed with ValidationException",
        ),
        (NoCredentialsError(), 1, "AWS SDK error: NoCredentialsError"),
        (FileNotFoundError(2, "No such file or directory", "out/x.csv"), 1, "path withheld"),
        (RuntimeError(PHI), 1, "unexpected RuntimeError (run with --verbose"),
    ],
)
def test_exceptions_become_an_exit_code_and_a_line_without_values(
    error: BaseException, code: int, words: str
) -> None:
    exit_code, message = cli.describe(error)
    assert exit_code == code
    assert words in message
    assert PHI not in message
    assert "\n" not in message


def test_verbose_traceback_withholds_foreign_messages(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        try:
            raise ValueError(PHI)
        except ValueError:
            raise SearchError("SearchImageSets", 1, "ValidationException", 400) from None
    except SearchError as outer:
        try:
            raise RuntimeError(PHI) from outer
        except RuntimeError as error:
            cli._print_traceback(error)
    err = capsys.readouterr().err
    assert "SearchImageSets request #1 failed with ValidationException" in err
    assert "builtins.RuntimeError: <message withheld" in err
    assert PHI not in err


@pytest.mark.parametrize(
    ("filename", "words"),
    [
        ("out/x.csv", "No such file or directory: out/x.csv"),  # the path typed
        ("out", "No such file or directory: out"),  # a directory on its way
        ("out/.x.csv.4242.tmp", "No such file or directory: out/x.csv"),  # its temporary file
        (f"cohort/PatientID={PHI}/part-0.parquet", "a file under cohort"),  # a Hive partition
        (f"/elsewhere/{PHI}.parquet", "(path withheld: it may hold values)"),
    ],
)
def test_os_errors_name_only_paths_typed_on_the_command_line(filename: str, words: str) -> None:
    error = FileNotFoundError(2, "No such file or directory", filename)
    exit_code, message = cli.describe(error, ["out/x.csv", "cohort"])
    assert exit_code == 1
    assert words in message
    assert PHI not in message


def test_foreign_warnings_are_printed_without_their_message() -> None:
    import warnings

    from healthimaging_df.cli.commands.metadata import _warning_text
    from healthimaging_df.errors import ArchiveAccessWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(f"cannot cast {PHI}", RuntimeWarning, stacklevel=1)
        warnings.warn("3 of 9 image sets are archived", ArchiveAccessWarning, stacklevel=1)
    texts = [_warning_text(w) for w in caught]
    assert texts == [
        "RuntimeWarning (message withheld: it may quote values)",
        "3 of 9 image sets are archived",
    ]
