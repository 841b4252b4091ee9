"""Generated GetImageSetMetadata documents: small by default, realistic on request."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from healthimaging_df.local import LocalService, SeriesShape

UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def fetch(service: LocalService, image_set_id: str) -> tuple[bytes, dict[str, Any]]:
    blob = (
        service.client()
        .get_image_set_metadata(datastoreId=service.datastore_id, imageSetId=image_set_id)[
            "imageSetMetadataBlob"
        ]
        .read()
    )
    return blob, json.loads(gzip.decompress(blob))


def instances(document: dict[str, Any]) -> list[dict[str, Any]]:
    (series,) = document["Study"]["Series"].values()
    return list(series["Instances"].values())


def test_realistic_series_through_boto3(ahi_service_factory: Callable[..., LocalService]) -> None:
    service = ahi_service_factory(
        image_sets=20, seed=3, instances_per_series=300, attributes_per_instance=44
    )
    record = next(
        r
        for r in service.backend.image_sets(service.datastore_id)
        if r["DICOMTags"].get("DICOMSeriesModality") == "CT"
    )
    blob, document = fetch(service, record["imageSetId"])
    assert fetch(service, record["imageSetId"])[0] == blob  # deterministic, byte for byte
    rows = instances(document)
    assert len(rows) == 300
    assert {len(row["DICOM"]) for row in rows} == {44}
    assert [row["DICOM"]["InstanceNumber"] for row in rows] == list(range(1, 301))
    uids = [row["DICOM"]["SOPInstanceUID"] for row in rows]
    assert len(set(uids)) == 300
    assert all(UID.fullmatch(uid) for uid in uids)
    assert len({row["DICOM"]["SliceLocation"] for row in rows}) == 300  # varies per instance
    assert len({row["DICOM"]["KVP"] for row in rows}) == 1  # constant per series
    assert all(len(row["ImageFrames"]) == 1 for row in rows)
    (series,) = document["Study"]["Series"]
    assert series == record["DICOMTags"]["DICOMSeriesInstanceUID"]
    assert document["Patient"]["DICOM"].get("PatientID") == record["DICOMTags"].get(
        "DICOMPatientId"
    )
    # The Python API gives the same document, and reading it is an access as before.
    assert (
        service.backend.get_image_set_metadata(service.datastore_id, record["imageSetId"])
        == document
    )
    after = next(
        r
        for r in service.backend.image_sets(service.datastore_id)
        if r["imageSetId"] == record["imageSetId"]
    )
    assert after["storageTier"] == "FREQUENT_ACCESS"


def test_attribute_budget_and_private_tags() -> None:
    from healthimaging_df.local import generate_image_sets
    from healthimaging_df.local.documents import metadata_document

    record = generate_image_sets(1, seed=2)[0]
    for wanted in (3, 20, 58, 90):
        rows = instances(metadata_document("a" * 32, record, SeriesShape(5, wanted)))
        assert {len(row["DICOM"]) for row in rows} == {wanted}
    many = instances(metadata_document("a" * 32, record, SeriesShape(5, 90)))[0]["DICOM"]
    private = [key for key in many if key.startswith("0019")]
    assert len(private) == 90 - 58  # 58 realistic keywords, then private tags
    few = instances(metadata_document("a" * 32, record, SeriesShape(5, 3)))[0]["DICOM"]
    assert set(few) == {"SOPInstanceUID", "InstanceNumber", "SOPClassUID"}


def test_default_shape_and_runtime_switch(ahi_service_factory: Callable[..., LocalService]) -> None:
    service = ahi_service_factory(image_sets=5, seed=1)
    image_set_id = service.backend.image_sets(service.datastore_id)[0]["imageSetId"]
    assert 2 <= len(instances(fetch(service, image_set_id)[1])) <= 5
    service.backend.series_shape = SeriesShape(instances_per_series=40)
    rows = instances(fetch(service, image_set_id)[1])
    assert len(rows) == 40
    assert {len(row["DICOM"]) for row in rows} == {44}


@pytest.mark.parametrize("bad", [{"instances_per_series": 0}, {"attributes_per_instance": 2}])
def test_series_shape_validation(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SeriesShape(**bad)


def test_cached_documents_follow_new_versions(
    ahi_service_factory: Callable[..., LocalService],
) -> None:
    service = ahi_service_factory(image_sets=5, seed=2, instances_per_series=50)
    record = service.backend.image_sets(service.datastore_id)[0]
    image_set_id = record["imageSetId"]
    first, document = fetch(service, image_set_id)
    service.backend.update_image_set(
        service.datastore_id, image_set_id, tags={"DICOMSeriesModality": "ZZ"}
    )
    _, updated = fetch(service, image_set_id)
    (series,) = updated["Study"]["Series"].values()
    assert series["DICOM"]["Modality"] == "ZZ"
    (old_series,) = document["Study"]["Series"].values()
    assert old_series["DICOM"]["Modality"] != "ZZ"
    blob = (
        service.client()
        .get_image_set_metadata(
            datastoreId=service.datastore_id,
            imageSetId=image_set_id,
            versionId=str(record["version"]),
        )["imageSetMetadataBlob"]
        .read()
    )
    assert blob == first  # the earlier version still gives its own document
