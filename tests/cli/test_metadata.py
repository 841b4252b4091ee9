"""``healthimaging-df metadata``: GetImageSetMetadata for a cohort file or a query.

Each test gets its own small service: reading metadata moves archived image sets to the frequent
tier, so state would leak between tests otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df.local import LocalService

from .conftest import Run, one_error_line, row, runner


@pytest.fixture
def small() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=200, seed=11) as svc:
        yield svc


@pytest.fixture
def small_cli(small: LocalService, tmp_path: Path) -> Run:
    return runner(small, tmp_path)


def records(service: LocalService) -> list[dict[str, Any]]:
    assert service.datastore_id is not None
    return service.backend.image_sets(service.datastore_id)


def test_series_of_a_cohort_file(small_cli: Run, small: LocalService, tmp_path: Path) -> None:
    wanted = [
        r
        for r in records(small)
        if r["storageTier"] == "FREQUENT_ACCESS" and row(r)["Modality"] == "CT"
    ]
    assert len(wanted) > 3
    search = small_cli(
        "search", "--datastore-id", str(small.datastore_id),
        "--where", "Modality=CT", "--where", "storageTier=FREQUENT_ACCESS", "--out", "cohort.parquet",
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    small.reset_stats()
    result = small_cli("metadata", "--from", "cohort.parquet", "--out", "series.parquet")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # nothing archived in this cohort
    assert small.stats.by_operation["GetImageSetMetadata"] == len(wanted)
    series = pd.read_parquet(tmp_path / "series.parquet")
    expected = {r["imageSetId"]: r["DICOMTags"]["DICOMSeriesInstanceUID"] for r in wanted}
    assert dict(zip(series["imageSetId"], series["SeriesInstanceUID"], strict=True)) == expected
    # Every series attribute of every image set, against the service's own documents.
    compared = 0
    by_id = series.set_index("imageSetId")
    for r in wanted:
        document = small.backend.get_image_set_metadata(str(small.datastore_id), r["imageSetId"])
        [(uid, found)] = document["Study"]["Series"].items()
        got = by_id.loc[r["imageSetId"]]
        assert got["SeriesInstanceUID"] == uid
        assert {"SeriesDescription", "Manufacturer"} <= set(found["DICOM"])
        for keyword in ("SeriesDescription", "Manufacturer", "BodyPartExamined", "SeriesNumber"):
            if keyword in found["DICOM"]:
                assert got[keyword] == found["DICOM"][keyword], (r["imageSetId"], keyword)
                compared += 1
            else:
                assert pd.isna(got[keyword]), (r["imageSetId"], keyword)
        assert got["NumberOfSeriesRelatedInstances"] == len(found["Instances"])
        thickness = {i["DICOM"]["SliceThickness"] for i in found["Instances"].values()}
        if len(thickness) == 1:  # shared by every instance: lifted to the series row
            assert got["SliceThickness"] == thickness.pop()
    assert compared >= 2 * len(wanted)
    assert series["SeriesDescription"].nunique() > 1  # real values, not one default


def test_dry_run_counts_calls_and_archived_image_sets(small_cli: Run, small: LocalService) -> None:
    mr = [r for r in records(small) if row(r)["Modality"] == "MR"]
    archived = sum(r["storageTier"] == "ARCHIVE_INSTANT_ACCESS" for r in mr)
    assert archived > 0
    small.reset_stats()
    result = small_cli(
        "metadata", "--datastore-id", str(small.datastore_id), "--where", "Modality=MR",
        "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"would make {len(mr)} GetImageSetMetadata call(s)" in result.stdout
    assert f"{archived} archived image set(s)" in result.stdout
    assert small.stats.by_operation.get("GetImageSetMetadata", 0) == 0


def test_instances_from_a_query_refuse_archived_image_sets_unless_allowed(
    small_cli: Run, small: LocalService, tmp_path: Path
) -> None:
    mr = [r for r in records(small) if row(r)["Modality"] == "MR"]
    archived = sum(r["storageTier"] == "ARCHIVE_INSTANT_ACCESS" for r in mr)
    refused = small_cli(
        "metadata", "--datastore-id", str(small.datastore_id), "--where", "Modality=MR",
        "--level", "instance", "--out", "instances.csv",
    )  # fmt: skip
    assert refused.returncode == 2  # archived image sets, no opt-in: refused, nothing touched
    line = one_error_line(refused.stderr)
    assert f"{archived} of {len(mr)} image sets are ARCHIVE_INSTANT_ACCESS" in line
    assert "--allow-archive-access" in line
    assert small.stats.by_operation.get("GetImageSetMetadata", 0) == 0
    result = small_cli(
        "metadata", "--datastore-id", str(small.datastore_id), "--where", "Modality=MR",
        "--level", "instance", "--out", "instances.csv", "--allow-archive-access",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1
    assert "ARCHIVE_INSTANT_ACCESS" in warning[0]
    instances = pd.read_csv(tmp_path / "instances.csv", dtype=str)
    assert instances["SOPInstanceUID"].is_unique
    expected = 0
    for r in mr:
        document = small.backend.get_image_set_metadata(str(small.datastore_id), r["imageSetId"])
        expected += sum(len(s["Instances"]) for s in document["Study"]["Series"].values())
    assert len(instances) == expected
    assert set(instances["imageSetId"]) == {r["imageSetId"] for r in mr}


def test_a_file_without_image_set_ids_is_a_usage_error(small_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "patients.csv").write_text("PatientID\nPAT000001\n", encoding="utf-8")
    result = small_cli("metadata", "--from", "patients.csv", "--datastore-id", "0" * 32)
    assert result.returncode == 2
    assert "--from patients.csv has no imageSetId column" in one_error_line(result.stderr)
