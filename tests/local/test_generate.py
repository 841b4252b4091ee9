from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from healthimaging_df.local import dump_jsonl, generate_image_sets, load_jsonl

TAGS = {
    "DICOMPatientId", "DICOMPatientName", "DICOMPatientBirthDate", "DICOMPatientSex",
    "DICOMStudyInstanceUID", "DICOMStudyId", "DICOMStudyDescription",
    "DICOMNumberOfStudyRelatedSeries", "DICOMNumberOfStudyRelatedInstances",
    "DICOMAccessionNumber", "DICOMSeriesInstanceUID", "DICOMSeriesModality",
    "DICOMSeriesBodyPart", "DICOMSeriesNumber", "DICOMStudyDate", "DICOMStudyTime",
}  # fmt: skip


def test_deterministic_and_exact_count() -> None:
    assert generate_image_sets(500, seed=3) == generate_image_sets(500, seed=3)
    assert generate_image_sets(500, seed=3) != generate_image_sets(500, seed=4)
    assert len(generate_image_sets(0)) == 0
    assert len(generate_image_sets(1)) == 1
    assert len(generate_image_sets(777, seed=1)) == 777


def test_record_shape() -> None:
    records = generate_image_sets(3000, seed=0)
    ids = [r["imageSetId"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert re.fullmatch(r"[0-9a-z]{32}", r["imageSetId"])
        assert r["version"] >= 1
        assert r["createdAt"].tzinfo == timezone.utc
        assert r["createdAt"] <= r["updatedAt"] <= r["lastAccessedAt"]
        assert (
            datetime(2023, 1, 1, tzinfo=timezone.utc)
            <= r["createdAt"]
            < datetime(2026, 1, 2, tzinfo=timezone.utc)
        )
        assert r["storageTier"] in {"FREQUENT_ACCESS", "ARCHIVE_INSTANT_ACCESS"}
        assert set(r["DICOMTags"]) <= TAGS
        for uid in ("DICOMStudyInstanceUID", "DICOMSeriesInstanceUID"):
            assert re.fullmatch(r"1\.2\.826\.0\.1\.3680043\.8\.498\.\d+", r["DICOMTags"][uid])


def test_realistic_mess() -> None:
    records = generate_image_sets(5000, seed=0)
    tags = [r["DICOMTags"] for r in records]
    assert {r["storageTier"] for r in records} == {"FREQUENT_ACCESS", "ARCHIVE_INSTANT_ACCESS"}
    assert Counter(r["version"] > 1 for r in records)[True] > 100
    assert {t["DICOMSeriesModality"] for t in tags} >= {
        "CT",
        "MR",
        "CR",
        "DX",
        "US",
        "PT",
        "NM",
        "MG",
        "SR",
    }
    non_primary = [r for r in records if not r["isPrimary"]]
    assert 0.02 < len(non_primary) / len(records) < 0.08
    primary_series = {r["DICOMTags"]["DICOMSeriesInstanceUID"] for r in records if r["isPrimary"]}
    assert all(r["DICOMTags"]["DICOMSeriesInstanceUID"] in primary_series for r in non_primary)
    dates = Counter(len(t["DICOMStudyDate"]) if "DICOMStudyDate" in t else None for t in tags)
    assert dates[8]
    assert dates[4]
    assert dates[6]
    assert dates[0]
    assert dates[None]
    times = Counter(len(t["DICOMStudyTime"]) if "DICOMStudyTime" in t else None for t in tags)
    assert times[6]
    assert times[13]
    assert times[4]
    assert times[2]
    assert times[None]
    assert any("DICOMAccessionNumber" not in t for t in tags)
    names = {t.get("DICOMPatientName", "") for t in tags}
    assert any(not n.isascii() for n in names)
    assert all(n.count("^") >= 1 for n in names if n)
    # Several studies per patient, several series per study sharing study-level tags.
    by_patient: dict[str, set[str]] = {}
    for t in tags:
        by_patient.setdefault(t.get("DICOMPatientId", ""), set()).add(t["DICOMStudyInstanceUID"])
    assert max(len(v) for v in by_patient.values()) >= 3
    by_study: dict[str, list[dict[str, object]]] = {}
    for t in tags:
        by_study.setdefault(t["DICOMStudyInstanceUID"], []).append(t)
    multi = [v for v in by_study.values() if len(v) > 2]
    assert multi
    for series in multi:
        assert len({(s.get("DICOMStudyDate"), s.get("DICOMAccessionNumber")) for s in series}) == 1
    seconds = Counter(r["createdAt"].replace(microsecond=0) for r in records)
    assert max(seconds.values()) >= 3
    assert any(r["createdAt"].microsecond for r in records)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = generate_image_sets(200, seed=9)
    path = tmp_path / "sets.jsonl"
    assert dump_jsonl(records, path) == 200
    assert load_jsonl(path) == records
