"""to_parquet, refresh and redact delegate to the snapshot code; checked end to end here."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot
from healthimaging_df.store.redact import RedactionPolicy

KEY = "a test key of at least 32 bytes, 0123456789"


@pytest.fixture
def small_service() -> LocalService:
    service = LocalService.seeded(image_sets=150, seed=4).start()
    with service.dicomweb_environment():  # QIDO-RS is on the service's own DICOMweb address
        yield service  # type: ignore[misc]
    service.stop()


def _frame(service: LocalService, **where: object) -> pd.DataFrame:
    assert service.datastore_id is not None
    return (
        Query(service.datastore_id)
        .where(**where)
        .to_dataframe(client=service.client(), progress=False)
    )


def test_to_parquet_round_trips_rows_dtypes_and_provenance(
    small_service: LocalService, tmp_path: Path
) -> None:
    frame = _frame(small_service, Modality=["CT", "MR"])
    info = frame.ahi.to_parquet(tmp_path / "cohort.parquet")
    assert info.rows == len(frame) > 0
    back = read_snapshot(tmp_path / "cohort.parquet")
    pd.testing.assert_frame_equal(
        back.sort_values("imageSetId").reset_index(drop=True)[frame.columns],
        frame.sort_values("imageSetId").reset_index(drop=True),
    )
    assert back.attrs["healthimaging_df"]["datastore_id"] == small_service.datastore_id


def test_refresh_picks_up_updates_and_new_matches(small_service: LocalService) -> None:
    frame = _frame(small_service, Modality="CT")
    assert small_service.datastore_id is not None
    changed = frame["imageSetId"].iloc[0]
    small_service.backend.update_image_set(
        small_service.datastore_id, changed, tags={"DICOMStudyDescription": "AMENDED"}
    )
    others = [
        r["imageSetId"]
        for r in small_service.backend.image_sets(small_service.datastore_id)
        if r["DICOMTags"].get("DICOMSeriesModality") == "MR"
    ]
    small_service.backend.update_image_set(
        small_service.datastore_id, others[0], tags={"DICOMSeriesModality": "CT"}
    )
    refreshed, report = frame.ahi.refresh(client=small_service.client(), progress=False)
    assert set(report.updated) == {changed}
    assert set(report.added) == {others[0]}
    fresh = _frame(small_service, Modality="CT")
    assert set(refreshed["imageSetId"]) == set(fresh["imageSetId"])
    row = refreshed.set_index("imageSetId").loc[changed]
    assert row["StudyDescription"] == "AMENDED"
    assert row["version"] == frame.set_index("imageSetId").loc[changed, "version"] + 1


def test_redact_hashes_identifiers_and_scrubs_the_provenance(small_service: LocalService) -> None:
    frame = _frame(small_service)
    patient = frame["PatientID"].dropna().iloc[0]
    cohort = _frame(small_service, PatientID=patient)
    policy = RedactionPolicy(key=KEY)
    redacted = cohort.ahi.redact(policy)
    assert patient not in set(redacted["PatientID"].dropna())
    assert "PatientName" not in redacted.columns
    assert redacted["PatientID"].nunique() == 1
    provenance = redacted.attrs["healthimaging_df"]
    assert patient not in json.dumps(provenance)
    assert patient in cohort.attrs["healthimaging_df"]["query"]  # the original is untouched
    assert json.loads(provenance["redaction"]) == policy.describe()
    policy.check_fingerprints(
        provenance["redaction_fingerprints"], cohort.attrs["healthimaging_df"]["query"]
    )
    # The rollups still work on a redacted frame.
    assert len(redacted.ahi.studies()) == cohort["StudyInstanceUID"].nunique()
