"""Redaction: keyed pseudonyms that join across exports, generalized dates, no PHI in provenance."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.errors import HealthImagingDFError, QueryValidationError, SnapshotError
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot, write_snapshot
from healthimaging_df.store.redact import (
    MIN_KEY_BYTES,
    RedactionPolicy,
    apply_redaction,
    generate_key,
)

KEY = b"unit-test-key-with-enough-bytes-for-32"
OTHER_KEY = b"another-unit-test-key-of-32-bytes+"
FAST = {"progress": False, "max_tps": None}


def test_hashes_are_keyed_stable_and_join_across_exports(sample_frame: pd.DataFrame) -> None:
    policy = RedactionPolicy(key=KEY)
    first = apply_redaction(sample_frame.iloc[:900], policy)
    second = apply_redaction(sample_frame.iloc[600:], policy)
    other_key = apply_redaction(sample_frame.iloc[:900], RedactionPolicy(key=OTHER_KEY))

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
    query.to_delta(str(path), client=ahi_client, redact=policy, partition_cols=["Modality"], **FAST)

    back = read_snapshot(path)
    assert len(back) > 0
    prov = back.attrs["healthimaging_df"]
    recorded = json.loads(prov["redaction"])
    assert recorded == policy.describe()
    assert recorded == RedactionPolicy(key=OTHER_KEY).describe()  # nothing derived from the key
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
    log = [p.read_text(encoding="utf-8") for p in sorted((path / "_delta_log").glob("*.json"))]
    assert log  # a Delta table: every commit of its log is free of the values too
    for text in [*texts, json.dumps(prov), *log]:
        for patient in patients:
            assert patient not in text
    assert json.loads(prov["query"])["predicates"] == [
        {"column": "PatientID", "op": "in", "values_redacted": 2}
    ]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):  # still a ValueError for callers
        RedactionPolicy(key=b"short")
    cases: list[tuple[dict[str, Any], str, int | None, str]] = [
        ({"key": b"short"}, "key", None, "at least 32 bytes"),
        ({"key": "a 16-byte secret"}, "key", None, "at least 32 bytes"),  # the guessed key's size
        ({"key": b"k" * 31}, "key", None, "at least 32 bytes"),
        ({"key": b"ab" * 40}, "key", None, "too few byte values"),
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


def test_generated_keys_are_long_random_and_usable() -> None:
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key.encode()) >= MIN_KEY_BYTES
        RedactionPolicy(key=key)
    assert len(generate_key(64)) > len(generate_key())
    with pytest.raises(QueryValidationError, match="at least 32") as caught:
        generate_key(16)
    assert caught.value.field == "nbytes"


def test_equal_values_in_different_columns_get_different_pseudonyms() -> None:
    policy = RedactionPolicy(key=KEY)
    value = "12345"
    pseudonyms = {policy.hash_value(c, value) for c in ("PatientID", "AccessionNumber", "StudyID")}
    assert len(pseudonyms) == 3
    frame = pd.DataFrame(
        {
            "PatientID": pd.array([value], dtype="string"),
            "AccessionNumber": pd.array([value], dtype="string"),
        }
    )
    out = apply_redaction(frame, policy)
    assert out.loc[0, "PatientID"] != out.loc[0, "AccessionNumber"]


def test_fingerprints_check_key_and_query_without_a_cheap_oracle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    policy = RedactionPolicy(key=KEY)
    query = json.dumps(
        {
            "datastore_id": "f" * 32,
            "predicates": [{"column": "PatientID", "op": "in", "values": ["PAT-00042"]}],
        }
    )
    record = policy.fingerprints(query)
    text = json.dumps(record)
    assert "PAT-00042" not in text
    assert KEY.decode() not in text
    assert record["kdf"] == "scrypt"
    assert record["n"] >= 2**14
    assert record["r"] >= 8
    assert policy.fingerprints(query) != record  # a fresh salt every time: no precomputed table

    same_query_reordered = json.dumps(json.loads(query), sort_keys=True, indent=2)
    policy.check_fingerprints(record, same_query_reordered)
    RedactionPolicy(key=KEY, shift_dates=False).check_fingerprints(record, None)  # key only
    with pytest.raises(SnapshotError, match="different key"):
        RedactionPolicy(key=OTHER_KEY).check_fingerprints(record, query)
    other = query.replace("PAT-00042", "PAT-00043")
    with pytest.raises(SnapshotError, match="not the query") as caught:
        policy.check_fingerprints(record, other)
    assert "PAT-0004" not in str(caught.value)
    for damaged in ({}, {**record, "kdf": "md5"}, {**record, "salt": "!!"}, {**record, "n": 2**30}):
        with pytest.raises(SnapshotError, match="damaged"):
            policy.check_fingerprints(damaged, query)

    # every guess of the key costs one scrypt call (16 MiB, tens of ms): count them
    calls = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    for guess in (OTHER_KEY, KEY):
        with contextlib.suppress(SnapshotError):
            RedactionPolicy(key=guess).check_fingerprints(record, None)
    assert calls == [record["n"]] * 2
    with pytest.raises(SnapshotError, match="removed"):
        policy.key_fingerprint()  # the old fast fingerprint fails closed
