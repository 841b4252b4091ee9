"""Snapshots on S3 (moto's server on 127.0.0.1): round trip, SSE-KMS, export and refresh."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pyarrow.dataset as pads
import pytest

from healthimaging_df import Query, storage
from healthimaging_df.local import LocalService
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import read_snapshot, write_snapshot

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

    dataset = pads.dataset(
        f"{bucket}/cohorts/by-modality",
        filesystem=moto_s3.arrow_fs(),
        format="parquet",
        partitioning="hive",
    )
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
    assert sum(k.endswith(".parquet") for k in keys) == smaller["Modality"].nunique(dropna=False)
    pd.testing.assert_frame_equal(read_snapshot(parted, **moto_s3.options()), smaller)


def test_sse_kms(moto_s3: S3, sample_frame: pd.DataFrame) -> None:
    bucket = moto_s3.bucket()
    kms = moto_s3.session.client("kms", endpoint_url=moto_s3.endpoint_url)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    path = f"s3://{bucket}/enc"
    write_snapshot(
        sample_frame, path, partition_cols=["Modality"], kms_key_id=key_id, **moto_s3.options()
    )
    listed = moto_s3.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert any(o["Key"].endswith("_healthimaging_df.json") for o in listed)
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
    query.to_parquet(path, client=client, partition_cols=["Modality"], **FAST, **moto_s3.options())
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


def test_staged_files_stay_out_of_sight_on_s3(
    moto_s3: S3, sample_frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto_s3.bucket()
    path = f"s3://{bucket}/cohort"
    write_snapshot(sample_frame, path, partition_cols=["Modality"], **moto_s3.options())
    other = sample_frame.iloc[:200].reset_index(drop=True)
    other.attrs = sample_frame.attrs

    def crash(self: storage._S3Store, moves: list[tuple[str, str]]) -> None:
        raise OSError("killed after the staging writes")

    monkeypatch.setattr(storage._S3Store, "move", crash)
    with pytest.raises(OSError, match="killed"):
        write_snapshot(other, path, partition_cols=["Modality"], **moto_s3.options())
    monkeypatch.undo()

    def keys() -> list[str]:
        listed = moto_s3.client.list_objects_v2(Bucket=bucket, Prefix="cohort/")
        return [o["Key"] for o in listed.get("Contents", [])]

    assert any(k.startswith("cohort/_staging-") for k in keys())
    dataset = pads.dataset(
        f"{bucket}/cohort", filesystem=moto_s3.arrow_fs(), format="parquet", partitioning="hive"
    )
    assert dataset.count_rows() == len(sample_frame)

    write_snapshot(other, path, partition_cols=["Modality"], **moto_s3.options())
    assert not any("_staging-" in k for k in keys())
    assert sum(k.endswith(".parquet") for k in keys()) == other["Modality"].nunique(dropna=False)
    pd.testing.assert_frame_equal(read_snapshot(path, **moto_s3.options()), other)
