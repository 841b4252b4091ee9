"""Fixtures: the plugin's session service (2,000 image sets) read over signed loopback HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from healthimaging_df.dicomweb import QidoClient, make_qido_client
from healthimaging_df.local import LocalService


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
