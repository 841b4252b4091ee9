"""The local service follows the documented service: versions, updates, tiers, limits."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ClientError

from healthimaging_df.local import Backend, LocalService, generate_image_sets

UTC = timezone.utc
MODEL = botocore.session.get_session().get_service_model("medical-imaging")


def model_has(shape: str, member: str) -> bool:
    return member in MODEL.shape_for(shape).members


def code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


@pytest.fixture
def service(ahi_service_factory: Callable[..., LocalService]) -> LocalService:
    return ahi_service_factory(image_sets=120, seed=6)


def by_id(service: LocalService) -> dict[str, dict[str, Any]]:
    assert service.datastore_id is not None
    return {r["imageSetId"]: r for r in service.backend.image_sets(service.datastore_id)}


def updates(**levels: Any) -> dict[str, Any]:
    return {"DICOMUpdates": {"updatableAttributes": json.dumps({"SchemaVersion": 1.1, **levels})}}


def test_list_image_set_versions_newest_first(service: LocalService) -> None:
    client = service.client()
    record = max(by_id(service).values(), key=lambda r: r["version"])
    assert record["version"] >= 3
    versions = client.list_image_set_versions(
        datastoreId=service.datastore_id, imageSetId=record["imageSetId"]
    )["imageSetPropertiesList"]
    assert [v["versionId"] for v in versions] == [str(n) for n in range(record["version"], 0, -1)]
    paged = [
        v["versionId"]
        for page in client.get_paginator("list_image_set_versions").paginate(
            datastoreId=service.datastore_id,
            imageSetId=record["imageSetId"],
            PaginationConfig={"PageSize": 1},
        )
        for v in page["imageSetPropertiesList"]
    ]
    assert paged == [v["versionId"] for v in versions]


def test_update_image_set_metadata_is_an_access(service: LocalService) -> None:
    client = service.client()
    record = next(
        r
        for r in by_id(service).values()
        if r["storageTier"] == "ARCHIVE_INSTANT_ACCESS"
        and "DICOMSeriesInstanceUID" in r["DICOMTags"]
    )
    series_uid = record["DICOMTags"]["DICOMSeriesInstanceUID"]
    answer = client.update_image_set_metadata(
        datastoreId=service.datastore_id,
        imageSetId=record["imageSetId"],
        latestVersionId=str(record["version"]),
        updateImageSetMetadataUpdates=updates(
            Study={
                "DICOM": {"StudyDescription": "REVISED ✓"},
                "Series": {series_uid: {"DICOM": {"Modality": "MR", "SeriesNumber": 7}}},
            }
        ),
    )
    assert answer["latestVersionId"] == str(record["version"] + 1)
    assert answer["imageSetState"] == "ACTIVE"
    assert answer["imageSetWorkflowStatus"] == "UPDATED"
    after = by_id(service)[record["imageSetId"]]
    assert after["DICOMTags"]["DICOMStudyDescription"] == "REVISED ✓"
    assert after["DICOMTags"]["DICOMSeriesModality"] == "MR"
    assert after["DICOMTags"]["DICOMSeriesNumber"] == 7
    assert after["storageTier"] == "FREQUENT_ACCESS"
    assert after["lastAccessedAt"] == after["updatedAt"] > record["lastAccessedAt"]
    got = client.get_image_set(datastoreId=service.datastore_id, imageSetId=record["imageSetId"])
    assert got["storageTier"] == "FREQUENT_ACCESS"
    assert service.stats.by_operation["UpdateImageSetMetadata"] == 1


def test_update_image_set_metadata_rules(service: LocalService) -> None:
    client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
    record = next(r for r in by_id(service).values() if "DICOMStudyId" in r["DICOMTags"])
    ds, image_set_id, version = service.datastore_id, record["imageSetId"], record["version"]

    def update(latest: int, body: dict[str, Any], **flags: Any) -> Any:
        return client.update_image_set_metadata(
            datastoreId=ds,
            imageSetId=image_set_id,
            latestVersionId=str(latest),
            updateImageSetMetadataUpdates=body,
            **flags,
        )

    with pytest.raises(ClientError) as caught:
        update(version + 1, updates(Patient={"DICOM": {"PatientName": "X^Y"}}))
    assert code(caught) == "ConflictException"
    with pytest.raises(ClientError) as caught:
        update(version, updates(Study={"DICOM": {"StudyID": "42"}}))
    assert code(caught) == "ValidationException"
    assert "force" in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as caught:
        update(version, updates(Study={"Series": {"1.2.3": {"DICOM": {"Modality": "CT"}}}}))
    assert code(caught) == "ValidationException"
    with pytest.raises(ClientError) as caught:
        update(version, {"DICOMUpdates": {"updatableAttributes": b"not json"}})
    assert code(caught) == "ValidationException"
    assert by_id(service)[image_set_id]["version"] == version  # nothing applied

    update(version, updates(Study={"DICOM": {"StudyID": "42"}}), force=True)
    removed = update(
        version + 1,
        {
            "DICOMUpdates": {
                "removableAttributes": json.dumps(
                    {"SchemaVersion": 1.1, "Study": {"DICOM": {"StudyID": "42"}}}
                )
            }
        },
        force=True,  # removing StudyID needs it too
    )
    assert "DICOMStudyId" not in by_id(service)[image_set_id]["DICOMTags"]
    update(int(removed["latestVersionId"]), {"revertToVersionId": str(version)})
    reverted = by_id(service)[image_set_id]
    assert reverted["DICOMTags"] == record["DICOMTags"]
    assert reverted["version"] == version + 3


@pytest.mark.skipif(
    not model_has("UpdateImageSetMetadataRequest", "includeStudyImageSets"),
    reason="this botocore has no includeStudyImageSets",
)
def test_include_study_image_sets_bumps_the_study_primary_image_sets(
    service: LocalService,
) -> None:
    """aws-facts.md §1: every *primary* image set of the study, atomically, versions + 1."""
    records = by_id(service)
    studies: dict[str, list[str]] = {}
    for r in records.values():
        studies.setdefault(r["DICOMTags"]["DICOMStudyInstanceUID"], []).append(r["imageSetId"])
    members = max(
        studies.values(), key=lambda ids: (any(not records[i]["isPrimary"] for i in ids), len(ids))
    )
    primary = [i for i in members if records[i]["isPrimary"]]
    non_primary = [i for i in members if not records[i]["isPrimary"]]
    assert len(primary) >= 2
    assert non_primary  # the study has a conflicting copy, which must not change
    first = records[primary[0]]
    client = service.client()
    client.update_image_set_metadata(
        datastoreId=service.datastore_id,
        imageSetId=first["imageSetId"],
        latestVersionId=str(first["version"]),
        includeStudyImageSets=True,
        updateImageSetMetadataUpdates=updates(Study={"DICOM": {"StudyDescription": "ONE STUDY"}}),
    )
    after = by_id(service)
    for image_set_id in primary:
        assert after[image_set_id]["version"] == records[image_set_id]["version"] + 1
        assert after[image_set_id]["updatedAt"] > records[image_set_id]["updatedAt"]
        assert after[image_set_id]["DICOMTags"]["DICOMStudyDescription"] == "ONE STUDY"
    others = set(records) - set(primary)
    assert all(after[i] == records[i] for i in others)


def test_generated_tiers_follow_the_30_day_rule() -> None:
    cutoff = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(days=30)
    records = generate_image_sets(3000, seed=12)
    archived = [r["lastAccessedAt"] < cutoff for r in records]
    assert [r["storageTier"] == "ARCHIVE_INSTANT_ACCESS" for r in records] == archived
    assert 0 < sum(archived) < len(records)


def test_request_body_cap_answers_413_validation(
    ahi_service_factory: Callable[..., LocalService],
) -> None:
    backend = Backend()
    ds = backend.create_datastore("cap")
    backend.add_image_sets(ds, generate_image_sets(5, seed=1))
    record = backend.image_sets(ds)[0]
    with LocalService(backend, max_body_bytes=2048) as svc:
        client = svc.client(retries={"mode": "standard", "total_max_attempts": 1})
        big = updates(Study={"DICOM": {"StudyDescription": "x" * 3000}})
        with pytest.raises(ClientError) as caught:
            client.update_image_set_metadata(
                datastoreId=ds,
                imageSetId=record["imageSetId"],
                latestVersionId=str(record["version"]),
                updateImageSetMetadataUpdates=big,
            )
        assert code(caught) == "ValidationException"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
        assert "2048 bytes" in caught.value.response["Error"]["Message"]
        # The same connection pool keeps working; a body under the cap is served.
        assert client.search_image_sets(datastoreId=ds)["imageSetsMetadataSummaries"]
        assert backend.image_sets(ds)[0]["version"] == record["version"]


@pytest.mark.skipif(
    not model_has("DatastoreProperties", "losslessStorageFormat"),
    reason="this botocore has no losslessStorageFormat",
)
def test_get_datastore_lossless_storage_format() -> None:
    backend = Backend()
    default = backend.create_datastore("a")
    jpeg = backend.create_datastore("b", lossless_storage_format="JPEG_2000_LOSSLESS")
    with pytest.raises(ValueError, match="lossless_storage_format"):
        backend.create_datastore("c", lossless_storage_format="PNG")
    with LocalService(backend) as svc:
        client = svc.client()
        formats = {
            ds: client.get_datastore(datastoreId=ds)["datastoreProperties"]["losslessStorageFormat"]
            for ds in (default, jpeg)
        }
        summaries = client.list_datastores()["datastoreSummaries"]
    assert formats == {default: "HTJ2K", jpeg: "JPEG_2000_LOSSLESS"}
    assert all("losslessStorageFormat" not in s for s in summaries)  # not in the summary shape
