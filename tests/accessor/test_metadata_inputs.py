"""Issue 26: bad input to the enrichment and the query's own JSON fail typed, before any request."""

from __future__ import annotations

import gzip
from typing import Any

import pandas as pd
import pytest

import healthimaging_df  # noqa: F401  (registers df.ahi)
from healthimaging_df import Query
from healthimaging_df.errors import MetadataFetchError, QueryValidationError
from healthimaging_df.local import LocalService
from healthimaging_df.metadata import ERROR_COLUMN, fetch_metadata

DS = "0" * 32


@pytest.mark.parametrize("op", ["nope", "EQ", None, 5])
def test_from_dict_refuses_an_unknown_op_when_it_builds(op: Any) -> None:
    data = Query(DS).where(PatientID="P1").to_dict()
    data["predicates"][0]["op"] = op
    with pytest.raises(QueryValidationError) as info:
        Query.from_dict(data)
    assert info.value.field == "op"
    assert info.value.position == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"datastore_id": "not-a-datastore"}, "datastore_id"),
        ({"datastore_id": "A" * 32}, "datastore_id"),
        ({"imageSetId": "../etc/passwd"}, "imageSetId"),
        ({"imageSetId": "x" * 33}, "imageSetId"),
    ],
)
def test_fetch_metadata_checks_ids_before_any_request(
    ahi_local: LocalService, change: dict[str, str], field: str
) -> None:
    frame = pd.DataFrame({"imageSetId": ["a" * 32, "b" * 32], "version": [1, 1]})
    if "imageSetId" in change:
        frame.loc[1, "imageSetId"] = change["imageSetId"]
    datastore_id = change.get("datastore_id", ahi_local.datastore_id)
    ahi_local.reset_stats()
    with pytest.raises(QueryValidationError) as info:
        fetch_metadata(
            frame, client=ahi_local.client(), datastore_id=datastore_id, allow_archive_access=True
        )
    assert info.value.field == field
    assert ahi_local.stats.requests == 0
    assert "passwd" not in str(info.value)


@pytest.mark.parametrize("document", ['{"Study": 5}', '{"Study": {"Series": [1]}}'])
def test_a_document_of_the_wrong_shape_is_a_failed_row_not_a_crash(
    metadata_service: LocalService,
    metadata_frame: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    document: str,
) -> None:
    """The service answers one GetImageSetMetadata with JSON of the wrong shape, over the wire."""
    frame = metadata_frame[metadata_frame["storageTier"] == "FREQUENT_ACCESS"].head(3)
    bad = str(frame["imageSetId"].iloc[1])
    backend = metadata_service.backend
    real = backend.get_image_set_metadata_gzip

    def served(datastore_id: str, image_set_id: str, version: Any = None) -> bytes:
        if image_set_id == bad:
            return gzip.compress(document.encode())
        return real(datastore_id, image_set_id, version)

    monkeypatch.setattr(backend, "get_image_set_metadata_gzip", served)
    client = metadata_service.client()
    got = frame.ahi.fetch_metadata(client=client, on_error="report", max_tps=None)
    failed = got[got["imageSetId"] == bad]
    assert failed[ERROR_COLUMN].tolist() == ["InvalidMetadataDocument"]
    assert got[got["imageSetId"] != bad][ERROR_COLUMN].isna().all()
    with pytest.raises(MetadataFetchError) as info:
        frame.ahi.fetch_metadata(client=client, max_tps=None)
    assert info.value.failures == {bad: "InvalidMetadataDocument"}
