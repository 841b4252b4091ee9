"""Fixtures for snapshot tests: a typed frame covering every column, and moto's S3 on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import schema
from healthimaging_df.engine import flatten
from healthimaging_df.local import generate_image_sets


def odd_summaries() -> list[dict[str, Any]]:
    """Hand-made summaries: every optional field missing, and awkward non-ASCII text."""
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
                "DICOMPatientId": "Ünïcødé-患者-🩻",
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


def typed_frame(
    n: int = 1500, seed: int = 11, dtype_backend: schema.DtypeBackend = "numpy_nullable"
) -> pd.DataFrame:
    """A frame as Query.to_dataframe makes it (sorted updatedAt desc, imageSetId) with provenance."""
    items = generate_image_sets(n, seed=seed) + odd_summaries()
    table = flatten.summaries_to_table(items)
    df = schema.arrow_to_pandas(table, dtype_backend)
    df = df.sort_values(
        ["updatedAt", "imageSetId"], ascending=[False, True], kind="stable", na_position="last"
    ).reset_index(drop=True)
    df.attrs["healthimaging_df"] = {
        "datastore_id": "f" * 32,
        "query": json.dumps(
            {
                "datastore_id": "f" * 32,
                "predicates": [],
                "sort_by": None,
                "ascending": False,
                "limit": None,
            }
        ),
        "plan": "[]",
        "endpoint_url": "http://127.0.0.1:1",
        "region": "us-east-1",
        "fetched_at": "2026-01-01T00:00:00+00:00",
        "library_version": "test",
        "schema_version": schema.SCHEMA_VERSION,
    }
    return df


@pytest.fixture(scope="session")
def sample_frame() -> pd.DataFrame:
    df = typed_frame()
    # the fixture must really cover nulls in every nullable column and non-ASCII text
    for name in schema.COLUMN_NAMES:
        if name not in ("imageSetId", "version", "createdAt", "updatedAt"):
            assert df[name].isna().any(), name
    assert df["PatientName"].str.contains("[^\x00-\x7f]", regex=True).any()
    return df


class S3:
    """moto's S3 server on 127.0.0.1 with dummy credentials."""

    def __init__(self, endpoint_url: str) -> None:
        import boto3

        self.endpoint_url = endpoint_url
        self.session = boto3.Session(
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        self.client = self.session.client("s3", endpoint_url=endpoint_url)
        self.count = 0

    def bucket(self) -> str:
        self.count += 1
        name = f"snapshots-{self.count}"
        self.client.create_bucket(Bucket=name)
        return name

    def arrow_fs(self) -> Any:
        from pyarrow import fs as pafs

        host = self.endpoint_url.split("://", 1)[1]
        return pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=host,
            scheme="http",
        )

    def options(self) -> dict[str, Any]:
        return {"boto3_session": self.session, "s3_endpoint_url": self.endpoint_url}


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3(f"http://{host}:{port}")
    finally:
        server.stop()
