"""Redaction: keyed pseudonyms that join across exports, generalized dates, no PHI in provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService
from healthimaging_df.redact import RedactionPolicy, apply_redaction
from healthimaging_df.snapshot import read_snapshot, write_snapshot

KEY = b"unit-test-key-with-enough-bytes"
FAST = {"progress": False, "max_tps": None}


def test_hashes_are_keyed_stable_and_join_across_exports(sample_frame: pd.DataFrame) -> None:
    policy = RedactionPolicy(key=KEY)
    first = apply_redaction(sample_frame.iloc[:900], policy)
    second = apply_redaction(sample_frame.iloc[600:], policy)
    other_key = apply_redaction(
        sample_frame.iloc[:900], RedactionPolicy(key=b"another-key-16-bytes")
    )

    assert "PatientName" not in first.columns
    raw_join = sample_frame.iloc[:900].merge(sample_frame.iloc[600:], on="PatientID")
    hashed_join = first.merge(second, on="PatientID")
    assert len(hashed_join) == len(raw_join) > 300
    original = set(sample_frame["PatientID"].dropna())
    assert not original & set(first["PatientID"].dropna())
    assert (first["PatientID"].dropna() != other_key["PatientID"].dropna()).all()
    assert (
        first["PatientID"].isna().tolist() == sample_frame["PatientID"].iloc[:900].isna().tolist()
    )
    assert first["StudyInstanceUID"].str.fullmatch(r"2\.25\.[1-9][0-9]*").all()
    # one study UID -> one pseudonym, distinct studies stay distinct
    pairs = pd.DataFrame(
        {"raw": sample_frame["StudyInstanceUID"].iloc[:900], "hashed": first["StudyInstanceUID"]}
    ).drop_duplicates()
    assert pairs["raw"].is_unique
    assert pairs["hashed"].is_unique
    assert list(first.dtypes) == list(sample_frame.drop(columns="PatientName").dtypes)


@pytest.mark.parametrize("dtype_backend", ["numpy_nullable", "pyarrow"])
def test_dates_are_generalized_and_shifted_per_patient(dtype_backend: str) -> None:
    from .conftest import typed_frame

    raw = typed_frame(1200, seed=4, dtype_backend=dtype_backend)  # type: ignore[arg-type]
    red = apply_redaction(raw, RedactionPolicy(key=KEY, max_shift_days=100))

    births = raw["PatientBirthDate"].astype("string")
    years = red["PatientBirthDate"].astype("string")
    has_year = births.str.match(r"^[0-9]{4}").fillna(False)
    assert (years[has_year] == births[has_year].str.slice(0, 4)).all()
    assert years[~has_year].isna().all()

    before = pd.to_datetime(raw["StudyDate"].astype("string"), format="%Y%m%d", errors="coerce")
    after = pd.to_datetime(red["StudyDate"].astype("string"), format="%Y%m%d", errors="coerce")
    shift = pd.DataFrame(
        {"patient": raw["PatientID"].astype("string"), "days": (after - before).dt.days}
    )
    shift = shift.dropna(subset=["days"])
    per_patient = shift.groupby("patient", dropna=False)["days"].nunique()
    assert (per_patient == 1).all()  # one offset per patient: intervals within a patient are kept
    assert shift["days"].nunique() > 20  # but patients move differently
    assert shift["days"].abs().between(1, 100).all()
    moved = (
        red["StudyDateTime"].astype("datetime64[us]")
        - raw["StudyDateTime"].astype("datetime64[us]")
    ).dt.days
    both = moved.notna() & (after - before).notna()
    assert (moved[both] == (after - before).dt.days[both]).all()
    assert (
        red["StudyTime"].astype("string").fillna("") == raw["StudyTime"].astype("string").fillna("")
    ).all()


def test_policy_is_recorded_without_key_or_phi(
    ahi_local: LocalService, ahi_client: Any, tmp_path: Path
) -> None:
    records = ahi_local.backend.image_sets(ahi_local.datastore_id)
    patient = next(
        r["DICOMTags"]["DICOMPatientId"] for r in records if r["DICOMTags"].get("DICOMPatientId")
    )
    query = Query(ahi_local.datastore_id).where(PatientID=patient)
    policy = RedactionPolicy(key=KEY)
    path = tmp_path / "red"
    query.to_parquet(
        str(path), client=ahi_client, redact=policy, partition_cols=["Modality"], **FAST
    )

    back = read_snapshot(path)
    assert len(back) > 0
    prov = back.attrs["healthimaging_df"]
    recorded = json.loads(prov["redaction"])
    assert recorded == policy.describe()
    assert recorded["key_fingerprint"] == policy.key_fingerprint()
    everything = b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())
    assert KEY not in everything
    assert patient.encode() not in everything
    for name in ("PatientName",):
        assert name not in back.columns
    assert "patient" not in prov["plan"].lower() or "<1 value>" in prov["plan"]
    assert json.loads(prov["query"])["predicates"] == [
        {"column": "PatientID", "op": "eq", "values_redacted": 1}
    ]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        RedactionPolicy(key=b"short")
    with pytest.raises(ValueError, match="unknown column"):
        RedactionPolicy(key=KEY, drop=("Nope",))
    with pytest.raises(ValueError, match="only text"):
        RedactionPolicy(key=KEY, hash=("version",))
    assert "unit-test" not in repr(RedactionPolicy(key=KEY))


def test_default_write_is_not_redacted(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    write_snapshot(sample_frame, tmp_path / "x.parquet")
    back = read_snapshot(tmp_path / "x.parquet")
    assert back.attrs["healthimaging_df"]["redaction"] is None
    assert re.search("[^\x00-\x7f]", "".join(back["PatientName"].dropna()))
