"""DeleteImageSet and CopyImageSet through a real boto3 client (model shapes, aws-facts.md §2)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from healthimaging_df.local import ConflictError, LocalService


@pytest.fixture
def service(ahi_service_factory: Callable[..., LocalService]) -> LocalService:
    return ahi_service_factory(image_sets=80, seed=21)


def by_id(service: LocalService) -> dict[str, dict[str, Any]]:
    return {r["imageSetId"]: r for r in service.backend.image_sets(str(service.datastore_id))}


def code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def search_ids(client: Any, datastore_id: str, **criteria: Any) -> set[str]:
    pages = client.get_paginator("search_image_sets").paginate(datastoreId=datastore_id, **criteria)
    return {i["imageSetId"] for page in pages for i in page["imageSetsMetadataSummaries"]}


def test_delete_image_set(service: LocalService) -> None:
    client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
    ds = str(service.datastore_id)
    target = next(r for r in by_id(service).values() if r["isPrimary"])
    answer = client.delete_image_set(datastoreId=ds, imageSetId=target["imageSetId"])
    assert {k: answer[k] for k in ("datastoreId", "imageSetId")} == {
        "datastoreId": ds,
        "imageSetId": target["imageSetId"],
    }
    assert (answer["imageSetState"], answer["imageSetWorkflowStatus"]) == ("DELETED", "DELETED")
    assert target["imageSetId"] not in search_ids(client, ds)
    uid = target["DICOMTags"]["DICOMSeriesInstanceUID"]
    equal = {"filters": [{"operator": "EQUAL", "values": [{"DICOMSeriesInstanceUID": uid}]}]}
    assert target["imageSetId"] not in search_ids(client, ds, searchCriteria=equal)
    for call in (client.get_image_set, client.delete_image_set, client.list_image_set_versions):
        with pytest.raises(ClientError) as caught:
            call(datastoreId=ds, imageSetId=target["imageSetId"])
        assert code(caught) == "ResourceNotFoundException"
    with pytest.raises(ConflictError, match="already exists"):  # the id is never reused
        service.backend.add_image_sets(ds, [target])


def test_a_deleted_image_set_leaves_qido(service: LocalService) -> None:
    from healthimaging_df.dicomweb import make_qido_client

    qido = make_qido_client(service.client(), max_tps=None)
    ds = str(service.datastore_id)
    target = next(r for r in by_id(service).values() if r["isPrimary"])
    uid = target["DICOMTags"]["DICOMSeriesInstanceUID"]
    series = lambda: {  # noqa: E731
        r["0020000E"]["Value"][0] for r in qido.get(ds, "series", {}, limit=1000)[0]
    }
    assert uid in series()
    service.client().delete_image_set(datastoreId=ds, imageSetId=target["imageSetId"])
    assert uid not in series()


def _copy(client: Any, ds: str, source: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    information: dict[str, Any] = {
        "sourceImageSet": {"latestVersionId": str(source["version"])},
        **kwargs.pop("information", {}),
    }
    return dict(
        client.copy_image_set(
            datastoreId=ds,
            sourceImageSetId=source["imageSetId"],
            copyImageSetInformation=information,
            **kwargs,
        )
    )


def test_copy_to_a_new_image_set(service: LocalService) -> None:
    client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
    ds = str(service.datastore_id)
    before = by_id(service)
    source = next(r for r in before.values() if r["isPrimary"])
    answer = _copy(client, ds, source)
    destination = answer["destinationImageSetProperties"]
    assert answer["datastoreId"] == ds
    assert answer["sourceImageSetProperties"]["imageSetId"] == source["imageSetId"]
    assert answer["sourceImageSetProperties"]["latestVersionId"] == str(source["version"])
    assert destination["latestVersionId"] == "1"
    assert destination["imageSetArn"].endswith(f"/imageset/{destination['imageSetId']}")
    after = by_id(service)
    new = after[destination["imageSetId"]]
    assert destination["imageSetId"] not in before
    assert new["DICOMTags"] == source["DICOMTags"]
    assert new["isPrimary"] is False  # a copy without promoteToPrimary is not primary
    assert after[source["imageSetId"]]["version"] == source["version"]  # the source is read only
    assert after[source["imageSetId"]]["storageTier"] == "FREQUENT_ACCESS"  # ... an access
    with pytest.raises(ClientError) as caught:  # a stale source version
        _copy(client, ds, dict(source, version=source["version"] + 5))
    assert code(caught) == "ConflictException"


def test_promote_to_primary_merges_into_the_series_primary(service: LocalService) -> None:
    client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
    ds = str(service.datastore_id)
    records = by_id(service)
    copy = next(r for r in records.values() if not r["isPrimary"])
    uid = copy["DICOMTags"]["DICOMSeriesInstanceUID"]
    primary = next(
        r for r in records.values()
        if r["isPrimary"] and r["DICOMTags"]["DICOMSeriesInstanceUID"] == uid
    )  # fmt: skip
    answer = _copy(client, ds, copy, promoteToPrimary=True, force=True)
    destination = answer["destinationImageSetProperties"]
    assert destination["imageSetId"] == primary["imageSetId"]
    assert destination["latestVersionId"] == str(primary["version"] + 1)
    # a series without a primary image set gets a new one
    client.delete_image_set(datastoreId=ds, imageSetId=primary["imageSetId"])
    copy = by_id(service)[copy["imageSetId"]]
    answer = _copy(client, ds, copy, promoteToPrimary=True)
    new = by_id(service)[answer["destinationImageSetProperties"]["imageSetId"]]
    assert new["isPrimary"] is True
    assert new["imageSetId"] not in records


def test_copy_into_a_given_destination_needs_its_version_and_force(service: LocalService) -> None:
    client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
    ds = str(service.datastore_id)
    records = list(by_id(service).values())
    source = records[0]
    other = next(
        r for r in records
        if r["DICOMTags"].get("DICOMPatientId") != source["DICOMTags"].get("DICOMPatientId")
        and r["DICOMTags"].get("DICOMPatientId") and source["DICOMTags"].get("DICOMPatientId")
    )  # fmt: skip
    target = {"imageSetId": other["imageSetId"], "latestVersionId": str(other["version"])}
    with pytest.raises(ClientError) as caught:  # another patient: inconsistent without force
        _copy(client, ds, source, information={"destinationImageSet": target})
    assert code(caught) == "ConflictException"
    stale = dict(target, latestVersionId=str(other["version"] + 1))
    with pytest.raises(ClientError) as caught:
        _copy(client, ds, source, force=True, information={"destinationImageSet": stale})
    assert code(caught) == "ConflictException"
    answer = _copy(client, ds, source, force=True, information={"destinationImageSet": target})
    assert answer["destinationImageSetProperties"]["latestVersionId"] == str(other["version"] + 1)
    assert by_id(service)[other["imageSetId"]]["DICOMTags"] == source["DICOMTags"]


def test_copiable_attributes_are_validated(service: LocalService) -> None:
    client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
    ds = str(service.datastore_id)
    source = next(iter(by_id(service).values()))
    uid = source["DICOMTags"]["DICOMSeriesInstanceUID"]
    good = {"SchemaVersion": 1.1, "Study": {"Series": {uid: {"Instances": {}}}}}
    copies = {"latestVersionId": str(source["version"]), "DICOMCopies": {}}
    for document, ok in (
        (good, True),
        ({"SchemaVersion": 1.1, "Study": {"Series": {"1.2.3": {}}}}, False),
        ({"Nope": 1}, False),
        ("[" * 200 + "]" * 200, False),
    ):
        text = document if isinstance(document, str) else json.dumps(document)
        copies["DICOMCopies"] = {"copiableAttributes": text}
        request = {
            "datastoreId": ds,
            "sourceImageSetId": source["imageSetId"],
            "copyImageSetInformation": {"sourceImageSet": copies},
        }
        if ok:
            answer = client.copy_image_set(**request)
            assert answer["destinationImageSetProperties"]["latestVersionId"] == "1"
        else:
            with pytest.raises(ClientError) as caught:
                client.copy_image_set(**request)
            assert code(caught) == "ValidationException"
            source = by_id(service)[source["imageSetId"]]
            copies["latestVersionId"] = str(source["version"])
