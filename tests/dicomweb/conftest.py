"""Fixtures: the plugin's session service (2,000 image sets) read over signed loopback HTTP.

QIDO-RS is found where the library finds it for a custom endpoint: through
``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING``, set to the service's DICOMweb address for each test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from healthimaging_df.dicomweb import ENV_VAR, QidoClient, make_qido_client
from healthimaging_df.local import LocalService


def dicomweb_url(service: LocalService) -> str:
    """Where the service answers QIDO-RS (its own DICOMweb address, when it has one)."""
    return str(getattr(service, "dicomweb_endpoint_url", service.endpoint_url))


@pytest.fixture
def ahi_local(ahi_local: LocalService, monkeypatch: pytest.MonkeyPatch) -> LocalService:
    """The plugin's service, its DICOMweb address named in the environment for the test."""
    monkeypatch.setenv(ENV_VAR, dicomweb_url(ahi_local))
    return ahi_local


@pytest.fixture
def ahi_service_factory(
    ahi_service_factory: Callable[..., LocalService], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., LocalService]:
    """The plugin's factory; the latest service's DICOMweb address named in the environment."""

    def factory(*args: Any, **kwargs: Any) -> LocalService:
        service = ahi_service_factory(*args, **kwargs)
        monkeypatch.setenv(ENV_VAR, dicomweb_url(service))
        return service

    return factory


@pytest.fixture
def qido(ahi_local: LocalService) -> QidoClient:
    """A QIDO-RS client with the credentials and endpoint of the local boto3 client."""
    return make_qido_client(ahi_local.client(), max_tps=None)


@pytest.fixture(scope="session")
def truth(ahi_service: LocalService) -> dict[str, Any]:
    """Brute-force ground truth: primary image sets grouped by study and by series."""
    assert ahi_service.datastore_id is not None
    records = ahi_service.backend.image_sets(ahi_service.datastore_id)
    primary = [r for r in records if r["isPrimary"]]
    studies: dict[str, list[dict[str, Any]]] = {}
    series: dict[str, dict[str, Any]] = {}
    for record in primary:
        tags = record["DICOMTags"]
        studies.setdefault(tags["DICOMStudyInstanceUID"], []).append(record)
        series[tags["DICOMSeriesInstanceUID"]] = record
    return {"records": records, "primary": primary, "studies": studies, "series": series}
