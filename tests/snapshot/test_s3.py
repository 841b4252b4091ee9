"""Snapshots on S3 (moto's server on 127.0.0.1): round trip, SSE-KMS, export and refresh."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import (
    read_snapshot,
    scan_snapshot,
    vacuum_snapshot,
    write_snapshot,
)
from healthimaging_df.store import delta
from healthimaging_df.store.tables import frame_to_table

from .conftest import S3

FAST = {"progress": False, "max_tps": None}


def test_round_trip_and_pyarrow_reads(moto_s3: S3, sample_frame: pd.DataFrame) -> None:
    bucket = moto_s3.bucket()
    single = f"s3://{bucket}/cohorts/one.parquet"
    parted = f"s3://{bucket}/cohorts/by-modality"
    write_snapshot(sample_frame, single, **moto_s3.options())
    info = write_snapshot(sample_frame, parted, partition_cols=["Modality"], **moto_s3.options())
    for path in (single, parted):
        pd.testing.assert_frame_equal(read_snapshot(path, **moto_s3.options()), sample_frame)

    dataset = scan_snapshot(parted, **moto_s3.options())
    assert dataset.count_rows() == len(sample_frame)
    assert len(info.files) == len(dataset.files)

    smaller = sample_frame.iloc[:100].reset_index(drop=True)
    smaller.attrs = sample_frame.attrs
    write_snapshot(smaller, parted, partition_cols=["Modality"], **moto_s3.options())
    keys = [
        o["Key"]
        for o in moto_s3.client.list_objects_v2(Bucket=bucket, Prefix="cohorts/by-modality/")[
            "Contents"
        ]
    ]
    assert any(k.startswith("cohorts/by-modality/_delta_log/") for k in keys)
    parquet = sum(k.endswith(".parquet") for k in keys)  # both versions, until a vacuum
    assert parquet == sample_frame["Modality"].nunique(dropna=False) + smaller["Modality"].nunique(
        dropna=False
    )
    pd.testing.assert_frame_equal(read_snapshot(parted, **moto_s3.options()), smaller)
    pd.testing.assert_frame_equal(
        read_snapshot(parted, version=0, **moto_s3.options()), sample_frame
    )


def test_sse_kms(moto_s3: S3, sample_frame: pd.DataFrame) -> None:
    bucket = moto_s3.bucket()
    kms = moto_s3.session.client("kms", endpoint_url=moto_s3.endpoint_url)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    path = f"s3://{bucket}/enc"
    write_snapshot(
        sample_frame, path, partition_cols=["Modality"], kms_key_id=key_id, **moto_s3.options()
    )
    listed = moto_s3.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert any("/_delta_log/" in o["Key"] for o in listed)
    for item in listed:
        head = moto_s3.client.head_object(Bucket=bucket, Key=item["Key"])
        assert head["ServerSideEncryption"] == "aws:kms"
        assert key_id in head["SSEKMSKeyId"]


def test_export_and_refresh_on_s3(
    moto_s3: S3, ahi_service_factory: Callable[..., LocalService]
) -> None:
    service = ahi_service_factory(image_sets=300, seed=12)
    client = service.client()
    bucket = moto_s3.bucket()
    path = f"s3://{bucket}/exports/cohort"
    query = Query(service.datastore_id).where(isPrimary=True)
    query.to_delta(path, client=client, partition_cols=["Modality"], **FAST, **moto_s3.options())
    victim = service.backend.image_sets(service.datastore_id)[0]["imageSetId"]
    service.backend.update_image_set(
        service.datastore_id, victim, tags={"DICOMSeriesModality": "XA"}
    )
    report = refresh_snapshot(path, client=client, **FAST, **moto_s3.options())
    assert report.fetched == 1
    got = read_snapshot(path, **moto_s3.options())
    want = query.to_dataframe(client=client, **FAST)
    got.attrs = want.attrs = {}
    pd.testing.assert_frame_equal(got, want)
    keys = [o["Key"] for o in moto_s3.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any("ahi-checkpoint" in k for k in keys)


def test_versions_on_top_of_another_commit_and_vacuum_on_s3(
    moto_s3: S3, sample_frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto_s3.bucket()
    path = f"s3://{bucket}/cohort"
    write_snapshot(sample_frame, path, partition_cols=["Modality"], **moto_s3.options())
    other = sample_frame.iloc[:200].reset_index(drop=True)
    other.attrs = sample_frame.attrs

    def keys() -> list[str]:
        listed = moto_s3.client.list_objects_v2(Bucket=bucket, Prefix="cohort/")
        return [o["Key"] for o in listed.get("Contents", [])]

    # another writer commits version 1 between our read and our commit: ours loses, whole
    real = delta.DeltaFormat.write

    def raced(self: delta.DeltaFormat, *args: object, **kwargs: object) -> object:
        real(self, frame_to_table(sample_frame.iloc[:50]), {"x": 1})
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta.DeltaFormat, "write", raced)
    written = write_snapshot(other, path, partition_cols=["Modality"], **moto_s3.options())
    monkeypatch.undo()
    assert written.version == 2  # no expected_version: a plain overwrite commits on top
    before = len(keys())
    assert any("/_delta_log/" in k for k in keys())
    pd.testing.assert_frame_equal(read_snapshot(path, **moto_s3.options()), other)
    assert vacuum_snapshot(path, retain=timedelta(0), dry_run=True, **moto_s3.options()) > 0
    assert len(keys()) == before  # a dry run deletes nothing
    vacuum_snapshot(path, retain=timedelta(0), dry_run=False, **moto_s3.options())
    assert sum(k.endswith(".parquet") for k in keys()) == other["Modality"].nunique(dropna=False)
    pd.testing.assert_frame_equal(read_snapshot(path, **moto_s3.options()), other)
