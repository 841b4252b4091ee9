"""The same QIDO-RS client against real AWS HealthImaging (only with AHI_LIVE_DATASTORE_ID set)."""

from __future__ import annotations

import os
import re

import pytest

from healthimaging_df import dicomweb

pytestmark = pytest.mark.live


@pytest.fixture
def live_datastore() -> str:
    datastore_id = os.environ.get("AHI_LIVE_DATASTORE_ID")
    if not datastore_id:
        pytest.skip("set AHI_LIVE_DATASTORE_ID (and AWS credentials) to run against real AWS")
    return datastore_id


def test_live_paths_model_and_paging(live_datastore: str) -> None:
    qido = dicomweb.make_qido_client(max_tps=5)
    assert qido.endpoint_url.startswith("https://dicom-medical-imaging.")
    page, _ = qido.get(live_datastore, "studies", {}, limit=3)
    assert len(page) <= 3
    for dataset in page:
        assert all(re.fullmatch(r"[0-9A-F]{8}", tag) for tag in dataset)
        assert dataset["0020000D"]["vr"] == "UI"
    if page:
        study = page[0]["0020000D"]["Value"][0]
        series = dicomweb.search_series(live_datastore, study_instance_uid=study, qido=qido)
        numbers = series["SeriesNumber"].dropna().tolist()
        assert numbers == sorted(numbers)  # documented: SeriesNumber ascending
        two, _ = qido.get(live_datastore, "studies", {}, limit=2)
        one, _ = qido.get(live_datastore, "studies", {}, limit=1, offset=1)
        assert two[1:] == one
