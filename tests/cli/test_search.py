"""``healthimaging-df search`` through the installed entry point, checked by brute force."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import healthimaging_df as ahi
from healthimaging_df.local import LocalService

from .conftest import ENTRY_POINT, Run, clean_env, ids, one_error_line


def test_parquet_file_holds_exactly_the_cohort(
    cli: Run, service: LocalService, datastore_id: str, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    low, high = pd.Timestamp("2018-01-01"), pd.Timestamp("2022-12-31 23:59:59.999999")
    expected = [
        r
        for r in rows
        if r["Modality"] in ("CT", "MR")
        and r["isPrimary"] is True
        and r["StudyDateTime"] is not None
        and low <= r["StudyDateTime"] <= high
    ]
    assert len(expected) > 20
    result = cli(
        "search",
        "--datastore-id", datastore_id,
        "--where", "Modality=CT", "--where", "Modality=MR", "--where", "isPrimary=true",
        "--between", "StudyDateTime", "2018-01-01", "2022-12-31",
        "--out", "cohort.parquet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == f"{len(expected)} image sets -> cohort.parquet"
    assert set(pd.read_parquet(tmp_path / "cohort.parquet")["imageSetId"]) == ids(expected)
    frame = ahi.read_snapshot(tmp_path / "cohort.parquet")  # typed, as written
    assert frame["imageSetId"].is_unique
    assert str(frame["SeriesNumber"].dtype) == "Int64"
    assert str(frame["createdAt"].dtype) == "datetime64[us, UTC]"
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was left behind"


def test_ids_from_csv_fans_out_one_chain_per_id(
    cli: Run, service: LocalService, datastore_id: str, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    patients = sorted({r["PatientID"] for r in rows if r["PatientID"]})[:5]
    lines = ["patient_id,note", *(f'{p},"seen, twice"' for p in patients), f"{patients[0]},dup"]
    (tmp_path / "patients.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = [r for r in rows if r["PatientID"] in patients and r["Modality"] != "CT"]
    service.reset_stats()
    result = cli(
        "search", "--datastore-id", datastore_id,
        "--ids-from", "patients.csv", "--csv-column", "patient_id", "--column", "PatientID",
        "--where", "Modality!=CT", "--out", "cohort.csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert service.stats.by_operation["SearchImageSets"] == len(patients)
    frame = pd.read_csv(tmp_path / "cohort.csv", dtype=str, keep_default_na=False)
    assert set(frame["imageSetId"]) == ids(expected) != set()
    assert set(frame["PatientID"]) <= set(patients)
    assert "CT" not in set(frame["Modality"])


def test_ids_from_text_file_to_json_lines_with_chosen_columns(
    cli: Run, datastore_id: str, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    studies = sorted({r["StudyInstanceUID"] for r in rows if r["StudyInstanceUID"]})[:4]
    text = "# studies of interest\n\n" + "\n".join(f"  {s}  " for s in studies) + "\n"
    (tmp_path / "studies.txt").write_text(text, encoding="utf-8")
    expected = [r for r in rows if r["StudyInstanceUID"] in studies]
    result = cli(
        "search", "--datastore-id", datastore_id,
        "--ids-from", "studies.txt", "--column", "StudyInstanceUID",
        "--columns", "imageSetId,StudyInstanceUID", "--columns", "SeriesNumber",
        "--out", "cohort.jsonl",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = pd.read_json(tmp_path / "cohort.jsonl", lines=True, dtype=False)
    assert list(records.columns) == ["imageSetId", "StudyInstanceUID", "SeriesNumber"]
    assert set(records["imageSetId"]) == ids(expected)
    by_id = {r["imageSetId"]: r for r in expected}
    for item in records.to_dict("records"):
        assert item["StudyInstanceUID"] == by_id[item["imageSetId"]]["StudyInstanceUID"]


def test_ids_from_stdin_as_csv_on_stdout(
    cli: Run, datastore_id: str, rows: list[dict[str, Any]]
) -> None:
    patients = sorted({r["PatientID"] for r in rows if r["PatientID"]})[-3:]
    expected = [r for r in rows if r["PatientID"] in patients]
    result = cli(
        "search", "--datastore-id", datastore_id, "--ids-from", "-", "--format", "csv", "-q",
        input="\n".join(patients) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    frame = pd.read_csv(io.StringIO(result.stdout), dtype=str)
    assert set(frame["imageSetId"]) == ids(expected)


def test_table_on_stdout_is_sorted_and_limited(
    cli: Run, datastore_id: str, rows: list[dict[str, Any]]
) -> None:
    mr = sorted((r for r in rows if r["Modality"] == "MR"), key=lambda r: r["imageSetId"])
    dated = [r for r in mr if r["StudyDateTime"] is not None]
    dated.sort(key=lambda r: r["StudyDateTime"], reverse=True)  # stable: ties by imageSetId
    expected = [r["imageSetId"] for r in dated[:7]]
    result = cli(
        "search", "--datastore-id", datastore_id,
        "--where", "Modality=MR", "--sort", "StudyDateTime:desc", "--limit", "7",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "imageSetId", "PatientID", "StudyDateTime", "Modality", "BodyPartExamined", "isPrimary",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines] == expected
    assert result.stderr.strip() == "7 image sets -> stdout"


def test_explain_sends_nothing_and_needs_no_credentials(cli: Run, tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("PAT-A\nPAT-B\nPAT-C\n", encoding="utf-8")
    result = cli(
        "search", "--datastore-id", "0" * 32, "--ids-from", "ids.txt", "--where", "Modality=CT",
        "--explain",
        env=clean_env(),  # no endpoint, no region, no credentials
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "SearchImageSets request chains: 3" in result.stdout
    assert "Modality == <1 value>" in result.stdout
    assert "PAT-A" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--where", "Colour=red"], "Colour: unknown column; valid columns: imageSetId"),
        (["--where", "SeriesNumber=two"], "SeriesNumber: expects an integer"),
        (["--where", "isPrimary=maybe"], "isPrimary: expects true or false"),
        (["--sort", "StudyDateTime:sideways"], "--sort expects COL, COL:asc or COL:desc"),
        (["--out", "cohort.xlsx"], "cannot tell the format of --out from '.xlsx'"),
        (["--ids-from", "missing.txt"], "cannot read --ids-from missing.txt: No such file"),
        (["--between", "StudyDateTime", "2022", "2021"], "the lower bound is after the upper"),
    ],
)
def test_bad_arguments_exit_2_before_sending(
    cli: Run, service: LocalService, datastore_id: str, args: list[str], message: str
) -> None:
    service.reset_stats()
    result = cli("search", "--datastore-id", datastore_id, *args)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert line.startswith("healthimaging-df search: error: ")
    assert message in line
    assert result.stdout == ""
    assert service.stats.by_operation.get("SearchImageSets", 0) == 0


def test_usage_errors_of_argparse_and_of_the_datastore_exit_2(cli: Run) -> None:
    missing = cli("search", "--where", "Modality=CT")
    assert missing.returncode == 2
    assert "--datastore-id is required" in one_error_line(missing.stderr)
    malformed = cli("search", "--datastore-id", "NOT-AN-ID")
    assert malformed.returncode == 2
    assert "datastore_id: must be 32 characters" in one_error_line(malformed.stderr)
    bad_limit = cli("search", "--datastore-id", "0" * 32, "--limit", "0")
    assert bad_limit.returncode == 2
    assert bad_limit.stderr.splitlines()[-1].endswith(
        "argument --limit: expects a positive integer"
    )


def test_unknown_datastore_exits_1_without_phi(
    cli: Run, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    patient = next(r["PatientID"] for r in rows if r["PatientID"])
    result = cli(
        "search", "--datastore-id", "f" * 32, "--where", f"PatientID={patient}",
        "--out", "cohort.parquet", "-v",
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("healthimaging-df search: error: SearchImageSets request #0 failed")
    assert "ResourceNotFoundException (HTTP 404)" in last
    assert "Traceback" in result.stderr  # -v shows where it failed...
    assert patient not in result.stderr  # ...but never a value
    assert not (tmp_path / "cohort.parquet").exists()


def test_verbose_botocore_log_carries_no_phi(
    cli: Run, datastore_id: str, rows: list[dict[str, Any]]
) -> None:
    patient = next(r["PatientID"] for r in rows if r["PatientID"] and r["PatientName"])
    mine = [r for r in rows if r["PatientID"] == patient]
    result = cli(
        "search", "--datastore-id", datastore_id, "--where", f"PatientID={patient}",
        "--out", "cohort.parquet", "-vv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "botocore.parsers" in result.stderr
    assert "redacted by healthimaging_df" in result.stderr
    assert "healthimaging_df.engine.fetch" in result.stderr
    secrets = {patient} | {r["PatientName"] for r in mine} | {r["StudyInstanceUID"] for r in mine}
    leaked = sorted(s for s in secrets if s and s in result.stderr)
    assert leaked == []


def test_local_flag_needs_no_aws_at_all(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "healthimaging_df", "search", "--local",
         "--where", "Modality=MR", "--limit", "3", "--out", "local.parquet"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(tmp_path / "local.parquet")
    assert len(frame) == 3
    assert set(frame["Modality"]) == {"MR"}


def test_progress_goes_to_stderr_only_when_it_is_a_terminal(
    service: LocalService, datastore_id: str, tmp_path: Path
) -> None:
    def run(*extra: str) -> tuple[int, str, bytes]:
        leader, follower = pty.openpty()
        # a new pty is 0 columns wide, and tqdm draws nothing in 0 columns
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        try:
            process = subprocess.run(
                [str(ENTRY_POINT), "search", "--datastore-id", datastore_id,
                 "--where", "Modality=CT", "--format", "csv", *extra],
                cwd=tmp_path, env=clean_env(service.env()), stdout=subprocess.PIPE,
                stderr=follower, timeout=120, check=False,
            )  # fmt: skip
        finally:
            os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        os.close(leader)
        return process.returncode, process.stdout.decode(), seen

    code, out, terminal = run()
    assert code == 0
    assert b"SearchImageSets" in terminal  # the tqdm bar
    assert b"image sets -> stdout" in terminal
    assert out.startswith("imageSetId,")  # results stay on stdout, bar-free
    assert "SearchImageSets" not in out
    code, out, terminal = run("-q")
    assert code == 0
    assert terminal == b""


SECRET_IDS = ["PAT-SECRET-001", "PAT-SECRET-002", "PAT-SECRET-003"]


@pytest.mark.parametrize(("name", "sep"), [("ids.csv", ","), ("ids.tsv", "\t")])
def test_headerless_id_file_is_a_usage_error_that_quotes_no_id(
    cli: Run, service: LocalService, datastore_id: str, tmp_path: Path, name: str, sep: str
) -> None:
    # No header row: the reader takes the first line of IDs for the column names.
    lines = [sep.join(SECRET_IDS[i:] + SECRET_IDS[:i]) for i in range(len(SECRET_IDS))]
    (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    service.reset_stats()
    result = cli(
        "search", "--datastore-id", datastore_id, "--ids-from", name, "--column", "PatientID",
        "-v",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # -v adds the traceback above it
    assert line.startswith("healthimaging-df search: error: ")
    assert f"--ids-from {name} has no column 'PatientID'" in line
    assert "(3 column(s))" in line
    assert "--csv-column" in line
    assert [s for s in SECRET_IDS if s in result.stderr] == []
    assert "PAT-SECRET" not in result.stderr + result.stdout
    assert service.stats.by_operation.get("SearchImageSets", 0) == 0


def test_missing_id_column_names_only_the_headers_that_are_schema_columns(
    cli: Run, datastore_id: str, tmp_path: Path
) -> None:
    (tmp_path / "ids.csv").write_text(
        "PAT-SECRET-001,StudyInstanceUID,Modality,mrn\nx,1.2.3,CT,PAT-SECRET-002\n",
        encoding="utf-8",
    )
    result = cli("search", "--datastore-id", datastore_id, "--ids-from", "ids.csv")
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "(4 column(s); of the schema's column names it has: StudyInstanceUID, Modality)" in line
    assert "PAT-SECRET" not in line
    assert "mrn" not in line  # not a schema column: could as well be a value


def test_malformed_csv_is_a_usage_error_that_quotes_no_cell(
    cli: Run, datastore_id: str, tmp_path: Path
) -> None:
    # A cell over the csv module's field size limit makes it raise csv.Error.
    huge = "PAT-SECRET-001" + "9" * 200_000
    (tmp_path / "ids.csv").write_text(f"PatientID\n{huge}\n", encoding="utf-8")
    result = cli("search", "--datastore-id", datastore_id, "--ids-from", "ids.csv")
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "--ids-from ids.csv is not a well-formed CSV file" in line
    assert "PAT-SECRET" not in line


def test_stdin_that_is_not_utf8_is_a_usage_error(service: LocalService, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ENTRY_POINT), "search", "--datastore-id", "0" * 32, "--ids-from", "-"],
        cwd=tmp_path,
        env=clean_env(service.env()),
        input=b"PAT-SECRET-\xff\xfe01\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    stderr = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 2, stderr
    assert "cannot read --ids-from -: stdin is not UTF-8 text" in one_error_line(stderr)
    assert "PAT-SECRET" not in stderr


def test_a_stray_word_is_not_echoed_by_argparse(
    cli: Run, service: LocalService, datastore_id: str
) -> None:
    # An unquoted value with a space: "PAT-SECRET 001" splits, and "001" would be echoed.
    service.reset_stats()
    result = cli(
        "search", "--datastore-id", datastore_id, "--where", "PatientName=SECRET", "DOE^JANE",
    )  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "1 unrecognized argument(s), not shown" in last
    assert "DOE^JANE" not in result.stderr
    assert service.stats.by_operation.get("SearchImageSets", 0) == 0


def test_any_groups_are_an_or_of_ands_through_query_union(
    cli: Run, datastore_id: str, rows: list[dict[str, Any]]
) -> None:
    """--any A B --any C --where D keeps (A and B and D) or (C and D): exact, as Query.union."""
    patient = sorted({r["PatientID"] for r in rows if r["PatientID"]})[0]
    expected = {
        r["imageSetId"]
        for r in rows
        if r["isPrimary"] is True
        and (
            (r["Modality"] == "CT" and r["BodyPartExamined"] == "CHEST")
            or r["PatientID"] == patient
        )
    }
    argv = [
        "search", "--datastore-id", datastore_id,
        "--any", "Modality=CT", "BodyPartExamined=CHEST", "--any", f"PatientID={patient}",
        "--where", "isPrimary=true",
    ]  # fmt: skip
    result = cli(*argv, "--format", "jsonl", "--columns", "imageSetId", "-q")
    assert result.returncode == 0, result.stderr
    got = pd.read_json(io.StringIO(result.stdout), lines=True, dtype=False)
    assert set(got["imageSetId"]) == expected
    assert len(got) == len(expected)
    only_chest = {r["imageSetId"] for r in rows if r["BodyPartExamined"] == "CHEST"}
    assert expected - only_chest  # the second group adds rows the first does not hold
    # the same query as Python's union
    union = ahi.Query(datastore_id).where(Modality="CT", BodyPartExamined="CHEST") | ahi.Query(
        datastore_id
    ).where(PatientID=patient)
    explained = cli(*argv, "--explain")
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout == union.where(isPrimary=True).explain() + "\n"
    assert "union" in explained.stdout


def test_a_malformed_any_condition_is_a_usage_error_naming_any(cli: Run) -> None:
    result = cli("search", "--datastore-id", "0" * 32, "--any", "Modality", "--explain")
    assert result.returncode == 2
    assert "--any expects COL=VALUE" in one_error_line(result.stderr)
