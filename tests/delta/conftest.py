"""Fixtures for the Delta storage tests: typed tables covering every column, moto's S3 and Glue."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pytest

from healthimaging_df import schema
from healthimaging_df.engine import flatten
from healthimaging_df.local import generate_image_sets

PROVENANCE: dict[str, Any] = {
    "datastore_id": "f" * 32,
    "query": '{"datastore_id": "' + "f" * 32 + '", "predicates": []}',
    "fetched_at": "2026-01-01T00:00:00+00:00",
    "library_version": "test",
    "schema_version": schema.SCHEMA_VERSION,
    "redaction": None,
}


def odd_summaries() -> list[dict[str, Any]]:
    """Every optional field missing in one, awkward text (partition-unsafe characters) in another."""
    moment = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)
    return [
        {"imageSetId": "0" * 31 + "a", "version": 1, "createdAt": moment, "updatedAt": moment},
        {
            "imageSetId": "0" * 31 + "b",
            "version": 7,
            "createdAt": moment,
            "updatedAt": moment,
            "lastAccessedAt": moment,
            "storageTier": "ARCHIVE_INSTANT_ACCESS",
            "isPrimary": False,
            "DICOMTags": {
                "DICOMPatientId": "Ünïcødé/患者=🩻 %2F",
                "DICOMPatientName": "Ωmega^Zoë^\u200b",
                "DICOMPatientBirthDate": "19000101",
                "DICOMPatientSex": "O",
                "DICOMStudyInstanceUID": "1.2.3.4",
                "DICOMStudyId": "",
                "DICOMStudyDescription": "IRM cérébrale — contrôle\nligne 2",
                "DICOMNumberOfStudyRelatedSeries": 0,
                "DICOMNumberOfStudyRelatedInstances": 2**40,
                "DICOMAccessionNumber": "Ä-1",
                "DICOMSeriesInstanceUID": "1.2.3.4.5",
                "DICOMSeriesModality": "MR",
                "DICOMSeriesBodyPart": "HEAD",
                "DICOMSeriesNumber": -1,
                "DICOMStudyDate": "20240229",
                "DICOMStudyTime": "235959.999999",
            },
        },
    ]


def typed_table(n: int = 400, seed: int = 11) -> pa.Table:
    """An Arrow table of the declared schema, as the fetch produces it."""
    return flatten.summaries_to_table(generate_image_sets(n, seed=seed) + odd_summaries())


def by_id(table: pa.Table) -> pa.Table:
    """*table* in imageSetId order (Delta keeps no row order)."""
    return table.sort_by("imageSetId").combine_chunks()


@pytest.fixture(scope="session")
def sample_table() -> pa.Table:
    table = typed_table()
    assert table.schema == schema.arrow_schema()
    for name in schema.COLUMN_NAMES:  # nulls in every nullable column
        if name not in ("imageSetId", "version", "createdAt", "updatedAt"):
            assert table.column(name).null_count > 0, name
    return table


class Moto:
    """moto's server on 127.0.0.1 with dummy credentials (S3 and Glue)."""

    def __init__(self, endpoint_url: str) -> None:
        import boto3

        self.endpoint_url = endpoint_url
        self.session = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        self.s3 = self.session.client("s3", endpoint_url=endpoint_url)
        self.count = 0

    def bucket(self) -> str:
        self.count += 1
        name = f"delta-{self.count}"
        self.s3.create_bucket(Bucket=name)
        return name

    def options(self) -> dict[str, str]:
        from healthimaging_df.store.delta import s3_storage_options

        return s3_storage_options(self.session, endpoint_url=self.endpoint_url)

    def keys(self, bucket: str) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=bucket)
        return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield Moto(f"http://{host}:{port}")
    finally:
        server.stop()
