"""Redaction: keyed pseudonyms that join across exports, generalized dates, no PHI in provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.errors import HealthImagingDFError, QueryValidationError, SnapshotError
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
    # IDs with letters: an all-digit ID could turn up by chance inside a hex datastore ID
    patients = sorted(
        {
            r["DICOMTags"]["DICOMPatientId"]
            for r in records
            if re.fullmatch(r"(PAT|SUBJECT|MRN-)[0-9]+", r["DICOMTags"].get("DICOMPatientId", ""))
        }
    )[:2]
    assert len(patients) == 2
    query = Query(ahi_local.datastore_id).where(PatientID=patients)
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
    for patient in patients:
        assert patient.encode() not in everything
    for name in ("PatientName",):
        assert name not in back.columns

    # every provenance string, the query and the plan above all, is free of the query's values
    plan = prov["plan"]
    assert isinstance(plan, str)
    assert plan.startswith(f"Plan for datastore {ahi_local.datastore_id}")
    assert "PatientID" in plan  # the plan is there, with its structure but without values
    assert "SearchImageSets request chains: 2" in plan
    texts = [v for v in prov.values() if isinstance(v, str)]
    assert prov["query"] in texts
    assert plan in texts
    manifest = (path / "_healthimaging_df.json").read_text(encoding="utf-8")
    for text in [*texts, json.dumps(prov), manifest]:
        for patient in patients:
            assert patient not in text
    assert json.loads(prov["query"])["predicates"] == [
        {"column": "PatientID", "op": "in", "values_redacted": 2}
    ]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):  # still a ValueError for callers
        RedactionPolicy(key=b"short")
    cases: list[tuple[dict[str, Any], str, int | None, str]] = [
        ({"key": b"short"}, "key", None, "at least 16 bytes"),
        ({"key": 1234567890123456789}, "key", None, "bytes or str"),
        ({"key": KEY, "drop": ("PatientName", "Nope")}, "drop", 1, "unknown column"),
        ({"key": KEY, "drop": "PatientName"}, "drop", None, "not one string"),
        ({"key": KEY, "hash": ("version",)}, "hash", 0, "only text"),
        ({"key": KEY, "drop": ("PatientID",)}, "hash", None, "both dropped and hashed"),
        ({"key": KEY, "max_shift_days": 0}, "max_shift_days", None, "positive"),
        ({"key": KEY, "max_shift_days": True}, "max_shift_days", None, "positive"),
        ({"key": KEY, "shift_dates": "no"}, "shift_dates", None, "True or False"),
    ]
    for kwargs, field, position, rule in cases:
        with pytest.raises(QueryValidationError, match=rule) as caught:
            RedactionPolicy(**kwargs)
        assert (caught.value.field, caught.value.position) == (field, position)
        assert isinstance(caught.value, HealthImagingDFError)
    secret = "a-secret-key-that-is-long-enough"
    with pytest.raises(QueryValidationError) as caught:
        RedactionPolicy(key=secret.encode(), drop=("Nope",))
    assert secret not in str(caught.value)
    assert "unit-test" not in repr(RedactionPolicy(key=KEY))

    policy = RedactionPolicy(key=KEY)
    with pytest.raises(QueryValidationError, match="unknown column"):
        policy.hash_value("Nope", "P1")
    with pytest.raises(QueryValidationError, match="must be a string") as caught:
        policy.hash_value("PatientID", 12345)  # type: ignore[arg-type]
    assert "12345" not in str(caught.value)
    with pytest.raises(QueryValidationError, match="DataFrame"):
        apply_redaction({"PatientID": ["P1"]}, policy)  # type: ignore[arg-type]


def test_an_unreadable_provenance_query_is_refused_not_leaked(
    tmp_path: Path, sample_frame: pd.DataFrame
) -> None:
    df = sample_frame.iloc[:10].copy()
    df.attrs = {"healthimaging_df": {**sample_frame.attrs["healthimaging_df"], "query": "P-42{"}}
    with pytest.raises(SnapshotError, match="cannot be redacted") as caught:
        write_snapshot(df, tmp_path / "x.parquet", redact=RedactionPolicy(key=KEY))
    assert "P-42" not in str(caught.value)
    assert not (tmp_path / "x.parquet").exists()


def test_default_write_is_not_redacted(tmp_path: Path, sample_frame: pd.DataFrame) -> None:
    write_snapshot(sample_frame, tmp_path / "x.parquet")
    back = read_snapshot(tmp_path / "x.parquet")
    assert back.attrs["healthimaging_df"]["redaction"] is None
    assert re.search("[^\x00-\x7f]", "".join(back["PatientName"].dropna()))
