"""Fixtures for the query layer: a seeded local service and an independent brute-force oracle."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from healthimaging_df.local import LocalService
from healthimaging_df.local.backend import study_datetime

# Written independently of healthimaging_df.schema: where each column lives in a summary.
TOP = [
    "imageSetId",
    "version",
    "createdAt",
    "updatedAt",
    "lastAccessedAt",
    "storageTier",
    "isPrimary",
]
TAGS = {
    "PatientID": "DICOMPatientId",
    "PatientName": "DICOMPatientName",
    "PatientBirthDate": "DICOMPatientBirthDate",
    "PatientSex": "DICOMPatientSex",
    "StudyInstanceUID": "DICOMStudyInstanceUID",
    "StudyID": "DICOMStudyId",
    "StudyDescription": "DICOMStudyDescription",
    "NumberOfStudyRelatedSeries": "DICOMNumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances": "DICOMNumberOfStudyRelatedInstances",
    "AccessionNumber": "DICOMAccessionNumber",
    "SeriesInstanceUID": "DICOMSeriesInstanceUID",
    "Modality": "DICOMSeriesModality",
    "BodyPartExamined": "DICOMSeriesBodyPart",
    "SeriesNumber": "DICOMSeriesNumber",
    "StudyDate": "DICOMStudyDate",
    "StudyTime": "DICOMStudyTime",
}


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
    tags = record.get("DICOMTags") or {}
    row = {k: record.get(k) for k in TOP}
    row.update({name: tags.get(key) for name, key in TAGS.items()})
    row["StudyDateTime"] = study_datetime(tags)
    return row


def holds(row: dict[str, Any], column: str, op: str, values: tuple[Any, ...], case: bool) -> bool:
    value = row[column]
    if op == "is_null":
        return value is None
    if op == "not_null":
        return value is not None
    if op in ("eq", "in"):
        return value is not None and value in values
    if op in ("ne", "not_in"):
        return value is None or value not in values
    if value is None:
        return False
    if op == "between":
        return values[0] <= value <= values[1]
    if op == "contains":
        return values[0].lower() in value.lower() if not case else values[0] in value
    if op == "regex":
        return re.search(values[0], value, 0 if case else re.IGNORECASE) is not None
    raise AssertionError(op)


def brute_force(records: list[dict[str, Any]], query: Any) -> list[str]:
    """The ids a query must return, in its order: filter, sort (nulls last, ties by id), limit."""
    rows = [flat_row(r) for r in records]
    kept = [
        r for r in rows if all(holds(r, p.column, p.op, p.values, p.case) for p in query.predicates)
    ]
    column = query.sort_column or "updatedAt"
    ascending = query.ascending if query.sort_column else False
    kept.sort(key=lambda r: r["imageSetId"])
    present = [r for r in kept if r[column] is not None]
    missing = [r for r in kept if r[column] is None]
    present.sort(key=lambda r: r[column], reverse=not ascending)
    ordered = [r["imageSetId"] for r in present + missing]
    return ordered[: query.row_limit] if query.row_limit else ordered


@pytest.fixture(scope="session")
def cohort_service() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=1500, seed=3) as service:
        yield service


@pytest.fixture
def service(
    cohort_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalService]:
    cohort_service.set_faults(latency_ms=0.0, tps=None, burst=None, error_rate=0.0)
    # QIDO-RS is served on the service's own DICOMweb address, found through the env.
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING", cohort_service.dicomweb_endpoint_url
    )
    cohort_service.reset_stats()
    yield cohort_service
    cohort_service.set_faults(latency_ms=0.0, tps=None, burst=None, error_rate=0.0)


@pytest.fixture
def records(service: LocalService) -> list[dict[str, Any]]:
    return service.backend.image_sets(service.datastore_id)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard-mode backoff shortened (10 ms doubling, at most 0.2 s) for fast tests.

    Zero would not do: retries would fire faster than a throttled bucket refills.
    """
    from botocore.retries import standard

    def short(self: object, context: standard.RetryContext) -> float:
        return min(0.01 * 2 ** (context.attempt_number - 1), 0.2)

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", short)


def utc(*parts: int) -> datetime:
    from datetime import timezone

    return datetime(*parts, tzinfo=timezone.utc)  # type: ignore[misc]


def first_requests(client: Any) -> list[dict[str, Any]]:
    """The first-page requests (no nextToken) *client* sends from now on, as botocore builds them."""
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if "nextToken" not in params:
            sent.append(params)

    client.meta.events.register("provide-client-params.medical-imaging.SearchImageSets", record)
    return sent


def serve(records: list[dict[str, Any]], name: str) -> LocalService:
    """A local service holding *records* in a datastore named *name* (its id on the service)."""
    from healthimaging_df.local.backend import Backend

    backend = Backend()
    datastore_id = backend.create_datastore(name)
    backend.add_image_sets(datastore_id, records)
    service = LocalService(backend)
    service.datastore_id = datastore_id
    return service


@pytest.fixture
def fresh_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No statistics cached, and no endpoint known to refuse the range + createdAt pair."""
    from healthimaging_df.engine.fetch import windows

    monkeypatch.setenv("HEALTHIMAGING_DF_CACHE", str(tmp_path))
    monkeypatch.setattr(windows, "_REFUSED_PAIRS", set())


def read_while_updating(service: LocalService, query: Any, client: Any, seed: int) -> Any:
    """*query*'s frame, read while the service gives image sets new versions (same tags).

    Checks that something changed meanwhile and that no image set came twice.
    """
    service.set_faults(update_rate=0.5, latency_ms=3.0, seed=seed)  # same tags: same match
    frame = query.to_dataframe(client=client, progress=False, max_concurrency=6, max_tps=None)
    updated = service.stats.updated_image_sets
    service.set_faults(update_rate=0.0, latency_ms=0.0)
    assert updated, "nothing changed while the query was read"
    assert frame["imageSetId"].is_unique
    return frame


def update_metadata(client: Any, datastore_id: str, record: dict[str, Any], **levels: Any) -> None:
    """UpdateImageSetMetadata through *client*: *levels* (``Study={...}``) on *record* alone."""
    attributes = {"SchemaVersion": 1.1, **{level: {"DICOM": d} for level, d in levels.items()}}
    client.update_image_set_metadata(
        datastoreId=datastore_id,
        imageSetId=record["imageSetId"],
        latestVersionId=str(record["version"]),
        updateImageSetMetadataUpdates={
            "DICOMUpdates": {"updatableAttributes": json.dumps(attributes)}
        },
    )
