"""The service contract checks shipped in the package (``healthimaging_df.conformance``).

The same checks ``healthimaging-df doctor --conformance`` runs against a live datastore run here
against the strict local service (and against AWS when AHI_LIVE_DATASTORE_ID is set): every one
must hold on the stand-in, or the stand-in is kinder than AWS or the check is wrong.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pytest

from healthimaging_df import conformance
from healthimaging_df.dicomweb import ENV_VAR, make_qido_client
from healthimaging_df.local import LocalService


def dicomweb_url(service: LocalService) -> str:
    return str(getattr(service, "dicomweb_endpoint_url", service.endpoint_url))


@pytest.fixture(scope="module")
def contract_service() -> Any:
    with LocalService.seeded(image_sets=600, seed=11) as service:
        yield service


@pytest.fixture(params=["local", pytest.param("live", marks=pytest.mark.live)])
def contract_target(request: pytest.FixtureRequest) -> conformance.Target:
    if request.param == "local":
        service: LocalService = request.getfixturevalue("contract_service")
        service.reset_faults()
        client = service.client()
        qido = make_qido_client(client, dicomweb_endpoint_url=dicomweb_url(service), max_tps=None)
        assert service.datastore_id is not None
        return conformance.Target(client, service.datastore_id, qido)
    datastore_id = os.environ.get("AHI_LIVE_DATASTORE_ID")
    if not datastore_id:
        pytest.skip("set AHI_LIVE_DATASTORE_ID (and AWS credentials) to run against real AWS")
    import boto3

    client = boto3.client("medical-imaging")
    return conformance.Target(client, datastore_id, make_qido_client(client, max_tps=5))


@pytest.mark.parametrize("name", sorted(conformance.CHECKS))
def test_every_contract_check_holds(contract_target: conformance.Target, name: str) -> None:
    (check,) = conformance.run(contract_target, [name])
    assert check.name == name
    assert check.status == "ok", check.detail


def test_checks_say_no_values(contract_target: conformance.Target) -> None:
    found = conformance.run(contract_target)
    text = json.dumps([c.to_dict() for c in found])
    for record in contract_target.page():
        for value in record["DICOMTags"].values():
            if isinstance(value, str) and len(value) > 3:
                assert value not in text


def test_a_study_that_disagrees_is_reported(ahi_service_factory: Any) -> None:
    """What ``assume_consistent_studies`` asserts, checked: an update of one image set breaks it."""
    service = ahi_service_factory(image_sets=300, seed=12)
    client = service.client()
    target = conformance.Target(client, service.datastore_id)
    (before,) = conformance.run(target, ["studies.consistent"])
    assert before.status == "ok", before.detail
    counts = Counter(
        r["DICOMTags"].get("DICOMStudyInstanceUID")
        for r in target.page()
        if r.get("isPrimary") is not False
    )
    study = next(uid for uid, n in counts.items() if uid and n > 1)
    record = next(r for r in target.page() if r["DICOMTags"].get("DICOMStudyInstanceUID") == study)
    client.update_image_set_metadata(
        datastoreId=service.datastore_id,
        imageSetId=record["imageSetId"],
        latestVersionId=str(record["version"]),
        updateImageSetMetadataUpdates={
            "DICOMUpdates": {
                "updatableAttributes": json.dumps(
                    {"SchemaVersion": 1.1, "Study": {"DICOM": {"StudyDescription": "OTHER Y"}}}
                )
            }
        },
    )
    (after,) = conformance.run(
        conformance.Target(client, service.datastore_id), ["studies.consistent"]
    )
    assert after.status == "warn"
    assert "assume_consistent_studies would lose rows here" in after.detail
    assert ENV_VAR  # the QIDO-RS checks find DICOMweb through it when no client is given
