"""An independent brute-force model of SearchImageSets, to check the local service against."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

# the contract checks shipped in the package read study date-times the same way
from healthimaging_df.conformance import record_study_datetime, request_study_datetime

UTC = timezone.utc


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return value.astimezone(UTC)


def matches(record: dict[str, Any], criteria: dict[str, Any]) -> bool:
    for flt in criteria.get("filters", []):
        values = flt["values"]
        (attribute,) = values[0]
        if flt["operator"] == "EQUAL":
            wanted = values[0][attribute]
            actual = (
                record["isPrimary"]
                if attribute == "isPrimary"
                else record["DICOMTags"].get(attribute)
            )
            if actual != wanted:
                return False
        elif attribute == "DICOMStudyDateAndTime":
            moment = record_study_datetime(record["DICOMTags"])
            low = request_study_datetime(values[0][attribute])
            high = request_study_datetime(values[1][attribute])
            if moment is None or not low <= moment <= high:
                return False
        else:
            # botocore sends whole epoch seconds: truncate the bounds the same way.
            low = _utc(values[0][attribute]).replace(microsecond=0)
            high = _utc(values[1][attribute]).replace(microsecond=0)
            if not low <= record[attribute] <= high:
                return False
    return True


def expected_ids(records: list[dict[str, Any]], criteria: dict[str, Any] | None) -> list[str]:
    """Ids of matching records in the documented order (default updatedAt DESC)."""
    criteria = criteria or {}
    sort = criteria.get("sort", {"sortField": "updatedAt", "sortOrder": "DESC"})
    field, descending = sort["sortField"], sort["sortOrder"] == "DESC"
    hits = [r for r in records if matches(r, criteria)]

    def key(record: dict[str, Any]) -> Any:
        if field == "DICOMStudyDateAndTime":
            return record_study_datetime(record["DICOMTags"])
        return record[field]

    dated = sorted(
        (r for r in hits if key(r) is not None),
        key=lambda r: (key(r), r["imageSetId"]),
        reverse=descending,
    )
    undated = sorted((r for r in hits if key(r) is None), key=lambda r: r["imageSetId"])
    return [r["imageSetId"] for r in dated + undated]
