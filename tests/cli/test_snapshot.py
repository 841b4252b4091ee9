"""``healthimaging-df snapshot`` and ``refresh`` against a local service that changes in between."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import healthimaging_df as ahi
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot

from .conftest import Run, clean_env, ids, one_error_line, row, runner

KEY = "a-test-key-of-more-than-32-bytes-0123456789"


@pytest.fixture
def small() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=250, seed=5) as svc:
        yield svc


@pytest.fixture
def small_cli(small: LocalService, tmp_path: Path) -> Run:
    return runner(small, tmp_path)


def rows(service: LocalService) -> list[dict[str, Any]]:
    assert service.datastore_id is not None
    return [row(r) for r in service.backend.image_sets(service.datastore_id)]


def primary_ct(service: LocalService) -> list[dict[str, Any]]:
    return [r for r in rows(service) if r["Modality"] == "CT" and r["isPrimary"] is True]


def test_snapshot_then_refresh_after_the_datastore_changed(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    datastore_id = str(small.datastore_id)
    before = primary_ct(small)
    result = small_cli(
        "snapshot", "cohort.parquet", "--datastore-id", datastore_id,
        "--where", "Modality=CT", "--where", "isPrimary=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"snapshot cohort.parquet: {len(before)} rows" in result.stderr
    assert set(read_snapshot(tmp_path / "cohort.parquet")["imageSetId"]) == ids(before)

    leaving, changing = before[0]["imageSetId"], before[1]["imageSetId"]
    joining = next(
        r["imageSetId"] for r in rows(small) if r["Modality"] == "MR" and r["isPrimary"] is True
    )
    small.backend.update_image_set(datastore_id, leaving, is_primary=False)
    small.backend.update_image_set(datastore_id, changing, tags={"DICOMSeriesNumber": 99})
    small.backend.update_image_set(datastore_id, joining, tags={"DICOMSeriesModality": "CT"})

    refreshed = small_cli("refresh", "cohort.parquet")
    assert refreshed.returncode == 0, refreshed.stderr
    assert refreshed.stdout.startswith("1 added, 1 updated, 1 removed")
    frame = read_snapshot(tmp_path / "cohort.parquet")
    assert set(frame["imageSetId"]) == ids(primary_ct(small))
    assert frame.set_index("imageSetId").loc[changing, "SeriesNumber"] == 99


def test_partitioned_directory_from_search_output_refreshes_too(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    datastore_id = str(small.datastore_id)
    result = small_cli(
        "snapshot", "by-modality", "--datastore-id", datastore_id,
        "--where", "isPrimary=true", "--partition-by", "Modality",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = {r["imageSetId"] for r in rows(small) if r["isPrimary"] is True}
    modalities = {r["Modality"] for r in rows(small) if r["isPrimary"] is True and r["Modality"]}
    folders = {p.name for p in (tmp_path / "by-modality").iterdir() if p.is_dir()}
    assert {f"Modality={m}" for m in modalities} <= folders
    assert set(read_snapshot(tmp_path / "by-modality")["imageSetId"]) == expected
    # a Parquet file from `search --out` is a snapshot as well
    search = small_cli(
        "search", "--datastore-id", datastore_id, "--where", "Modality=US", "--out", "us.parquet"
    )
    assert search.returncode == 0, search.stderr
    refreshed = small_cli("refresh", "us.parquet", "-q")
    assert refreshed.returncode == 0, refreshed.stderr
    assert refreshed.stdout.startswith("0 added, 0 updated, 0 removed")


def test_redacted_snapshot_holds_no_identifiers_and_refreshes_with_the_key(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    datastore_id = str(small.datastore_id)
    env = clean_env({**small.env(), "HEALTHIMAGING_DF_REDACTION_KEY": KEY})
    no_key = small_cli("snapshot", "red.parquet", "--datastore-id", datastore_id, "--redact")
    assert no_key.returncode == 2
    assert "HEALTHIMAGING_DF_REDACTION_KEY" in one_error_line(no_key.stderr)

    mr = [r for r in rows(small) if r["Modality"] == "MR"]
    result = small_cli(
        "snapshot", "red.parquet", "--datastore-id", datastore_id, "--where", "Modality=MR",
        "--redact", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frame = ahi.read_snapshot(tmp_path / "red.parquet")
    assert "PatientName" not in frame.columns
    assert set(frame["imageSetId"]) == ids(mr)
    raw = (tmp_path / "red.parquet").read_bytes()
    leaked = {r["PatientID"] for r in mr if r["PatientID"] and r["PatientID"].encode() in raw}
    assert leaked == set()

    without = small_cli("refresh", "red.parquet")
    assert without.returncode == 2  # a usage error, in CLI terms
    assert "is redacted" in one_error_line(without.stderr)
    assert "--redact" in one_error_line(without.stderr)
    again = small_cli(
        "refresh", "red.parquet", "--datastore-id", datastore_id, "--where", "Modality=MR",
        "--redact", env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 added, 0 updated, 0 removed")


@pytest.mark.slow  # 14 runs of the entry point: about 30 s on 2 shared cores
def test_history_vacuum_and_keygen_of_a_directory_snapshot(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    datastore_id = str(small.datastore_id)
    made = small_cli(
        "snapshot", "cohort", "--datastore-id", datastore_id, "--where", "isPrimary=true",
        "--partition-by", "Modality", "-q",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    changing = primary_ct(small)[0]["imageSetId"]
    small.backend.update_image_set(datastore_id, changing, tags={"DICOMSeriesModality": "MR"})
    refreshed = small_cli("refresh", "cohort", "-q")
    assert refreshed.returncode == 0, refreshed.stderr
    assert refreshed.stdout.startswith("0 added, 1 updated, 0 removed")

    history = small_cli("history", "cohort")
    assert history.returncode == 0, history.stderr
    described, *lines = history.stdout.strip().splitlines()
    assert described == (
        "delta table: min reader version 1, min writer version 2; table features: none"
    )
    assert lines[0].split()[0] == "version"
    assert [line.split()[0] for line in lines[1:]] == ["1", "0"]
    assert lines[1].split()[2:6] == ["MERGE", "0", "1", "0"]
    assert lines[2].split()[2] == "WRITE"
    assert read_snapshot(tmp_path / "cohort", version=0)["imageSetId"].is_unique

    dry = small_cli("vacuum", "cohort", "--retain-hours", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # the MERGE retired only the CT file that held the changed row (its new state went to a new
    # file under Modality=MR; the old MR file was left as it was)
    assert dry.stdout.startswith("would delete 1 file(s)")
    assert len(read_snapshot(tmp_path / "cohort", version=0)) > 0  # a dry run keeps them
    done = small_cli("vacuum", "cohort", "--retain-hours", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deleted 1 file(s)")

    for args, needle in (
        (("vacuum", "cohort"), "--retain-hours"),
        (("vacuum", "cohort", "--retain-hours", "-1"), "--retain-hours"),
        (("history", "x.parquet"), "single-file"),
        (("history", "nowhere"), "no snapshot"),
        (
            ("snapshot", "c2", "--datastore-id", datastore_id, "--glue-table", "db.t"),
            "glue_table",
        ),
    ):
        failed = small_cli(*args)
        assert failed.returncode == 2 if needle != "no snapshot" else failed.returncode != 0
        assert needle in failed.stderr, failed.stderr
    assert not (tmp_path / "c2").exists()

    keys = [small_cli("keygen") for _ in range(2)]
    assert all(k.returncode == 0 for k in keys)
    texts = [k.stdout.strip() for k in keys]
    assert texts[0] != texts[1]
    assert all(len(t.encode()) >= 32 for t in texts)


def test_iceberg_snapshot_refresh_and_history_from_the_command_line(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    pytest.importorskip("pyiceberg")
    datastore_id = str(small.datastore_id)
    where = ["--iceberg-table", "cohorts.ct", "--catalog", "sqlite:///catalog.db"]
    where += ["--warehouse", "warehouse"]
    result = small_cli(
        "snapshot", *where, "--datastore-id", datastore_id, "--where", "Modality=CT",
        "--partition-by", "Modality",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    before = primary_ct(small)[0]["imageSetId"]
    small.backend.update_image_set(datastore_id, before, tags={"DICOMSeriesModality": "MR"})
    refreshed = small_cli("refresh", *where)
    assert refreshed.returncode == 0, refreshed.stderr
    assert "1 removed" in refreshed.stdout
    history = small_cli("history", *where)
    assert history.returncode == 0, history.stderr
    described, _header, merge, write = history.stdout.strip().splitlines()
    assert described == "iceberg table: format version 2; table features: none"
    assert merge.split()[2:6] == ["MERGE", "0", "0", "1"]
    assert write.split()[2] == "WRITE"
    back = ahi.read_snapshot(
        iceberg_table="cohorts.ct",
        catalog=f"sqlite:///{tmp_path}/catalog.db",
        warehouse=str(tmp_path / "warehouse"),
    )
    assert before not in set(back["imageSetId"])
    for wrong in (["snapshot", "x", *where], ["history", "--catalog", "sqlite:///c.db", "x"]):
        failed = (
            small_cli(*wrong, "--datastore-id", datastore_id)
            if wrong[0] == "snapshot"
            else (small_cli(*wrong))
        )
        assert failed.returncode == 2, failed.stderr


def test_bad_snapshot_targets_exit_2_before_any_request(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    datastore_id = str(small.datastore_id)
    small.reset_stats()
    partitioned = small_cli(
        "snapshot", "cohort", "--datastore-id", datastore_id, "--partition-by", "createdAt"
    )
    assert partitioned.returncode == 2, partitioned.stderr
    assert "createdAt" in one_error_line(partitioned.stderr)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    into_foreign = small_cli("snapshot", "foreign", "--datastore-id", datastore_id)
    assert into_foreign.returncode == 2, into_foreign.stderr
    assert "another tool" in one_error_line(into_foreign.stderr)
    assert small.stats.requests == 0
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_rollup_written_as_parquet_reads_back(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    import pandas as pd

    for per in ("study", "patient"):
        result = small_cli(
            "search", "--datastore-id", str(small.datastore_id), "--per", per,
            "--out", f"{per}.parquet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        plain = pd.read_parquet(tmp_path / f"{per}.parquet")
        ours = read_snapshot(tmp_path / f"{per}.parquet")
        assert len(plain) == len(ours) > 0
        assert list(plain.columns) == list(ours.columns)
