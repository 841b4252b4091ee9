"""The verbs issue 11 adds: rollups, derived filters, streaming, --fail-if-empty, local dump/data."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService, load_jsonl
from healthimaging_df.local.sigv4 import sign_request

from .conftest import ENTRY_POINT, Run, clean_env, ids, runner


@pytest.fixture(scope="module")
def frame(service: LocalService, datastore_id_module: str) -> pd.DataFrame:
    return Query(datastore_id_module).to_dataframe(client=service.client(), progress=False)


@pytest.fixture(scope="module")
def datastore_id_module(service: LocalService) -> str:
    assert service.datastore_id is not None
    return service.datastore_id


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_per_study_and_patient_write_the_accessor_rollups(
    cli: Run, datastore_id: str, frame: pd.DataFrame
) -> None:
    ct = frame[frame["Modality"] == "CT"]
    for per, rollup, key in (
        ("study", ct.ahi.studies(), "StudyInstanceUID"),
        ("patient", ct.ahi.patients(), "PatientID"),
    ):
        result = cli(
            "search", "--datastore-id", datastore_id, "--where", "Modality=CT", "--per", per,
            "--format", "jsonl", "-q",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        got = jsonl(result.stdout)
        assert [r[key] for r in got] == rollup[key].tolist()
        assert [r["imageSetCount"] for r in got] == rollup["imageSetCount"].tolist()


def test_derived_filters_match_the_accessor(
    cli: Run, datastore_id: str, frame: pd.DataFrame
) -> None:
    age = frame.ahi.age_at_study()
    year = pd.to_numeric(frame["StudyDate"].str[:4], errors="coerce")
    expected = set(frame.loc[(age >= 40).fillna(False) & (age <= 60).fillna(False)
                             & (year == 2021).fillna(False), "imageSetId"])  # fmt: skip
    assert expected
    result = cli(
        "search", "--datastore-id", datastore_id, "--between", "ageAtStudy", "40", "60",
        "--where", "StudyYear=2021", "--format", "jsonl", "--columns", "imageSetId", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ids(jsonl(result.stdout)) == expected
    explained = cli(
        "search", "--datastore-id", datastore_id, "--between", "ageAtStudy", "40", "60",
        "--explain",
    )  # fmt: skip
    assert "ageAtStudy between <2 values> (derived from" in explained.stdout


def test_streamed_csv_holds_exactly_the_cohort(
    cli: Run, datastore_id: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    result = cli("search", "--datastore-id", datastore_id, "--where", "isPrimary=true",
                 "--out", "all.csv", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "all.csv", dtype=str)
    assert list(written.columns) == list(frame.columns)
    expected = set(frame.loc[frame["isPrimary"].fillna(False).astype(bool), "imageSetId"])
    assert sorted(written["imageSetId"]) == sorted(expected)
    empty = cli("search", "--datastore-id", datastore_id, "--where", "PatientID=NOBODY",
                "--format", "csv", "--fail-if-empty", "-q")  # fmt: skip
    assert empty.returncode == 3
    assert empty.stdout.splitlines() == [",".join(frame.columns)]


@pytest.fixture(scope="module")
def big() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=2500, seed=3) as svc:
        yield svc


def test_head_stops_the_fetch_early(big: LocalService, tmp_path: Path) -> None:
    args = [str(ENTRY_POINT), "search", "--datastore-id", str(big.datastore_id), "--format",
            "jsonl", "--max-concurrency", "1", "--max-tps", "1000", "-q"]  # fmt: skip
    big.reset_stats()
    full = subprocess.run(args, env=clean_env(big.env()), capture_output=True, check=False)
    assert full.returncode == 0
    assert len(full.stdout.splitlines()) == 2500
    everything = big.stats.requests
    big.reset_stats()
    process = subprocess.Popen(
        args, env=clean_env(big.env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stderr is not None
    assert json.loads(process.stdout.readline())["imageSetId"]
    process.stdout.close()
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""
    process.stderr.close()
    assert big.stats.requests < everything / 2, (big.stats.requests, everything)


def test_local_dump_then_serve_data(tmp_path: Path) -> None:
    run = runner(LocalService.seeded(image_sets=0, seed=0), tmp_path)
    dumped = run("local", "dump", "sets.jsonl", "--image-sets", "30", "--seed", "5")
    assert dumped.returncode == 0, dumped.stderr
    records = load_jsonl(tmp_path / "sets.jsonl")
    assert len(records) == 30
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthimaging_df", "local", "serve", "--data",
         str(tmp_path / "sets.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().split()[-1]
        line = proc.stdout.readline()
        datastore_id = line.split()[1]
        assert "(30 image sets)" in line
        url = f"{endpoint}/datastore/{datastore_id}/searchImageSets?maxResults=50"
        request = urllib.request.Request(
            url, data=b"{}", method="POST", headers=sign_request("POST", url, b"{}")
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            served = json.loads(response.read())["imageSetsMetadataSummaries"]
        assert {r["imageSetId"] for r in served} == {r["imageSetId"] for r in records}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    bad = run("local", "serve", "--data", "missing.jsonl")
    assert bad.returncode == 2
    assert "missing.jsonl" in bad.stderr


def test_where_not_on_a_derived_value(cli: Run, datastore_id: str, frame: pd.DataFrame) -> None:
    year = pd.to_numeric(frame["StudyDate"].str[:4], errors="coerce")
    expected = set(frame.loc[(year != 2021) | year.isna(), "imageSetId"])
    assert 0 < len(expected) < len(frame)
    result = cli(
        "search", "--datastore-id", datastore_id, "--where", "StudyYear!=2021",
        "--format", "jsonl", "--columns", "imageSetId", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ids(jsonl(result.stdout)) == expected
