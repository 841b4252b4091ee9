"""Delta tables on moto's S3 (conditional PUT commits) and their Glue registration for Athena."""

from __future__ import annotations

import boto3
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError

from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.store import delta

from .conftest import PROVENANCE, Moto, by_id


def test_moto_honours_conditional_puts(moto: Moto) -> None:
    bucket = moto.bucket()
    moto.s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        moto.s3.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert moto.s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


def test_storage_options_from_a_session(moto: Moto) -> None:
    options = moto.options()
    assert options["conditional_put"] == "etag"
    assert options["AWS_ENDPOINT_URL"] == moto.endpoint_url
    assert options["AWS_ALLOW_HTTP"] == "true"
    assert (options["AWS_ACCESS_KEY_ID"], options["AWS_REGION"]) == ("testing", "us-east-1")
    locked = delta.s3_storage_options(moto.session, dynamodb_lock_table="delta_log")
    assert locked["AWS_S3_LOCKING_PROVIDER"] == "dynamodb"
    assert locked["DELTA_DYNAMO_TABLE_NAME"] == "delta_log"
    assert "conditional_put" not in locked
    aws = delta.s3_storage_options(moto.session)
    assert "AWS_ENDPOINT_URL" not in aws  # real AWS: delta-rs picks the regional endpoint


def test_round_trip_merge_history_and_conflicts_on_s3(moto: Moto, sample_table: pa.Table) -> None:
    bucket = moto.bucket()
    uri = f"s3://{bucket}/cohorts/by-patient"
    options = moto.options()
    phi = sample_table.filter(pa.compute.is_valid(sample_table.column("PatientID"))).slice(0, 40)
    info = delta.write_table(
        uri, phi, PROVENANCE, partition_by=["PatientID"], storage_options=options
    )
    assert any(k.startswith("cohorts/by-patient/_delta_log/") for k in moto.keys(bucket))
    back = delta.read_table(uri, storage_options=options)
    assert back.table.schema == phi.schema
    assert by_id(back.table).equals(by_id(phi))
    assert delta.dataset(uri, storage_options=options).count_rows() == phi.num_rows

    leaver = phi.column("imageSetId")[0].as_py()
    merged = delta.merge_table(uri, phi.slice(0, 0), [leaver], {"m": 1}, storage_options=options)
    assert (merged.version, merged.removed) == (1, 1)
    assert delta.history(uri, storage_options=options)["operation"].tolist() == ["MERGE", "WRITE"]
    with pytest.raises(SnapshotConflictError):
        delta.write_table(
            uri, phi, PROVENANCE, storage_options=options, expected_version=info.version
        )
    assert delta.read_table(uri, storage_options=options).version == 1

    moto.s3.delete_object(
        Bucket=bucket, Key="cohorts/by-patient/_delta_log/00000000000000000001.json"
    )
    moto.s3.put_object(
        Bucket=bucket, Key="cohorts/by-patient/_delta_log/00000000000000000001.json", Body=b"{"
    )
    with pytest.raises(SnapshotError) as caught:
        delta.read_table(uri, storage_options=options)
    assert "PatientID" not in str(caught.value)
    assert bucket not in str(caught.value)


def test_glue_registration_creates_then_updates(moto: Moto, sample_table: pa.Table) -> None:
    glue = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("glue", endpoint_url=moto.endpoint_url)
    uri = f"s3://{moto.bucket()}/cohorts/ct"
    arguments = {"boto3_session": moto.session, "endpoint_url": moto.endpoint_url}
    first = delta.register_glue_table(
        "imaging.ct_cohort", uri, sample_table.schema, ["Modality"], **arguments
    )
    again = delta.register_glue_table(
        "imaging.ct_cohort", uri, sample_table.schema, [], **arguments
    )
    assert (first, again) == ("created", "updated")
    table = glue.get_table(DatabaseName="imaging", Name="ct_cohort")["Table"]
    assert table["Parameters"]["table_type"] == "DELTA"
    assert table["Parameters"]["spark.sql.sources.provider"] == "delta"
    assert table["StorageDescriptor"]["Location"] == uri
    types = {c["Name"]: c["Type"] for c in table["StorageDescriptor"]["Columns"]}
    assert (types["version"], types["isPrimary"], types["createdAt"]) == (
        "bigint",
        "boolean",
        "timestamp",
    )
    assert len(types) == len(sample_table.schema)  # the update dropped the partition key
    for name, rule in (
        ("Imaging.ct", "lower-case"),
        ("imaging", "database.table"),
        ("a.b.c", "database.table"),
    ):
        with pytest.raises(QueryValidationError, match=rule):
            delta.register_glue_table(name, uri, sample_table.schema, **arguments)
    with pytest.raises(QueryValidationError, match="s3://"):
        delta.register_glue_table("imaging.x", "/tmp/x", sample_table.schema, **arguments)
