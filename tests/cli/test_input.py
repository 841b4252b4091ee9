"""What users mistype is caught before a request, in CLI terms (exit 2), naming the option."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import pytest

from healthimaging_df.cli import app as cli
from healthimaging_df.cli.commands.building import read_ids
from healthimaging_df.local import LocalService

from .conftest import ENTRY_POINT, Run, clean_env, ids, one_error_line

DS = "0123456789abcdef0123456789abcdef"


def run_inline(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:  # in-process: usage errors need no service and no subprocess
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in clean_env().items():
        monkeypatch.setenv(name, value)
    import os

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("PatientID=", ("PatientID", "empty")),
        ("Modality=ct", ("Modality", "--ignore-case")),
        ("Modality=CT,MR", ("Modality", "one code per value")),
        ("Modality==CT", ("Modality", "code string")),
        ("Modality = CT", ("Modality", "spaces")),
        ("PatientID=P1 ", ("PatientID", "spaces")),
    ],
)
def test_values_that_cannot_match_are_usage_errors(
    capsys: pytest.CaptureFixture[str], where: str, words: tuple[str, ...]
) -> None:
    code, err = run_inline(capsys, "search", "--datastore-id", DS, "--where", where, "--explain")
    assert code == 2
    line = one_error_line(err)
    for word in words:
        assert word in line


def test_ignore_case_matches_code_strings_whatever_their_case(
    cli: Run, datastore_id: str, rows: list[dict[str, Any]]
) -> None:
    expected = ids([r for r in rows if r["Modality"] in ("CT", "MR")])
    result = cli(
        "search", "--datastore-id", datastore_id, "--where", "Modality=ct", "--where",
        "Modality=Mr", "--ignore-case", "--format", "jsonl", "--columns", "imageSetId", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = {line.split('"')[3] for line in result.stdout.splitlines()}
    assert got == expected


def test_unknown_options_are_named_and_stray_words_are_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run_inline(capsys, "search", "--datastore-id", DS, "--limt", "2", "SECRET-9")
    assert code == 2
    assert "--limt" in err
    assert "SECRET-9" not in err
    assert "2 other" in err


def test_missing_region_names_what_botocore_reads(
    capsys: pytest.CaptureFixture[str], no_aws: None
) -> None:
    code, err = run_inline(capsys, "search", "--datastore-id", DS)
    assert code == 2
    line = one_error_line(err)
    assert "AWS_DEFAULT_REGION" in line
    assert "--region" in line
    assert "profile" in line


def test_custom_endpoint_without_host_prefix_switch_is_caught_at_once(
    capsys: pytest.CaptureFixture[str], no_aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_MEDICAL_IMAGING", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code, err = run_inline(capsys, "search", "--datastore-id", DS)
    assert code == 2  # a usage error, before any request (one sent would end in exit 1)
    line = one_error_line(err)
    assert "AWS_DISABLE_HOST_PREFIX_INJECTION=true" in line
    assert "runtime-" in line


def test_ids_end_only_at_real_line_breaks(tmp_path: Path) -> None:
    source = tmp_path / "ids.txt"
    source.write_text("A\u2028B\r\nC\rD\nE\x0cF\x1cG\n", encoding="utf-8")
    assert read_ids(str(source), "PatientID") == ["A\u2028B", "C", "D", "E\x0cF\x1cG"]


def test_value_positions_count_from_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = tmp_path / "uids.txt"
    source.write_text("1.2.3\n1.2.x\n", encoding="utf-8")
    code, err = run_inline(
        capsys, "search", "--datastore-id", DS, "--ids-from", str(source), "--column",
        "SeriesInstanceUID", "--explain",
    )  # fmt: skip
    assert code == 2
    assert "(value #2)" in one_error_line(err)


def test_out_in_a_missing_directory_is_refused_unless_mkdir(
    cli: Run, datastore_id: str, tmp_path: Path
) -> None:
    refused = cli(
        "search", "--datastore-id", datastore_id, "--out", "new/dir/x.csv", "--limit", "2"
    )
    assert refused.returncode == 2
    assert "--mkdir" in one_error_line(refused.stderr)
    assert not (tmp_path / "new").exists()
    made = cli(
        "search", "--datastore-id", datastore_id, "--out", "new/dir/x.csv", "--limit", "2",
        "--mkdir", "-q",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert len((tmp_path / "new/dir/x.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "table"])
def test_a_closed_pipe_ends_quietly_with_status_0(
    service: LocalService, datastore_id: str, tmp_path: Path, fmt: str
) -> None:
    process = subprocess.Popen(
        [str(ENTRY_POINT), "search", "--datastore-id", datastore_id, "--format", fmt, "-q"],
        cwd=tmp_path,
        env=clean_env(service.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""
    process.stderr.close()


def test_refresh_usage_errors_exit_2_in_cli_terms(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bogus = tmp_path / "notes.parquet"
    bogus.write_text("not parquet", encoding="utf-8")
    code, err = run_inline(capsys, "refresh", str(bogus))
    assert code == 2
    assert "not a snapshot" in one_error_line(err)
    code, err = run_inline(capsys, "refresh", str(tmp_path / "none.parquet"))
    assert code == 2
    code, err = run_inline(capsys, "refresh", str(bogus), "--datastore-id", DS, "--limit", "3")
    assert code == 2
    assert "--limit" in one_error_line(err)


def test_local_serve_options_are_described() -> None:
    parser = cli.build_parser()
    local = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = next(
        a for a in local.choices["local"]._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["serve"]
    undescribed = [a.option_strings for a in serve._actions if a.option_strings and not a.help]
    assert undescribed == []


def test_an_out_path_in_a_read_only_place_fails_before_any_request(
    cli: Run, datastore_id: str, service: Any
) -> None:
    service.reset_stats()
    result = cli("search", "--datastore-id", datastore_id, "--out", "/proc/ahi-test.csv", "-q")
    assert result.returncode == 2
    assert "not writable" in result.stderr
    assert service.stats.requests == 0


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("ids.txt", "P1\nP2\nSECRET-ID\n".encode("utf-16-le"), "UTF-16"),
        ("ids.txt", "P1\nP2\nSECRET-ID\n".encode("utf-16-be"), "UTF-16"),
        ("ids.csv", "PatientID\nP1\n".encode("utf-16-le"), "UTF-16"),
        ("ids.csv", b'PatientID\nP1\n"SECRET-ID\nP2\n', "quote"),
        ("ids.csv", b'PatientID\n"SECRET-ID"x\nP2\n', "quote"),
    ],
    ids=["utf16le-txt", "utf16be-txt", "utf16le-csv", "unclosed-quote", "text-after-quote"],
)
def test_an_id_file_that_is_not_utf8_text_or_well_formed_csv_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, data: bytes, problem: str
) -> None:
    source = tmp_path / name
    source.write_bytes(data)
    code, err = run_inline(
        capsys, "search", "--datastore-id", DS, "--ids-from", str(source), "--explain"
    )
    assert code == 2, err
    line = one_error_line(err)
    assert problem in line
    assert name in line
    assert "SECRET" not in line


def test_a_refresh_given_another_query_is_a_usage_error(
    cli: Run, datastore_id: str, service: LocalService
) -> None:
    made = cli(
        "snapshot", "ct.parquet", "--datastore-id", datastore_id, "--where", "Modality=CT", "-q"
    )
    assert made.returncode == 0, made.stderr
    service.reset_stats()
    other = cli(
        "refresh", "ct.parquet", "--datastore-id", datastore_id, "--where", "Modality=MR", "-q"
    )
    assert other.returncode == 2, other.stderr
    assert "not the query" in one_error_line(other.stderr)
    assert service.stats.requests == 0
    same = cli(
        "refresh", "ct.parquet", "--datastore-id", datastore_id, "--where", "Modality=CT", "-q"
    )
    assert same.returncode == 0, same.stderr


def test_help_names_the_region_variable_botocore_reads_and_every_exit_status() -> None:
    env = clean_env()
    for argv in (["--help"], ["search", "--help"]):
        shown = subprocess.run(
            [str(ENTRY_POINT), *argv], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert "AWS_DEFAULT_REGION" in shown, argv
        assert "AWS_REGION," not in shown, argv  # botocore does not read it for the region
        assert "3 " in shown.split("xit status")[-1], argv
        assert "--fail-if-empty" in shown.split("xit status")[-1], argv
