"""An independent brute-force model of SearchImageSets, to check the local service against."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

UTC = timezone.utc


def record_study_datetime(tags: dict[str, Any]) -> datetime | None:
    date = tags.get("DICOMStudyDate")
    if not isinstance(date, str) or not re.fullmatch(r"\d{8}", date):
        return None
    time = tags.get("DICOMStudyTime") or ""
    m = re.fullmatch(r"(\d\d)(\d\d)?(\d\d)?(?:\.(\d{1,6}))?", time) if time else None
    if time and m is None:
        return None
    try:
        day = datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return None
    if m is None:
        return day
    return day.replace(
        hour=int(m[1]),
        minute=int(m[2] or 0),
        second=int(m[3] or 0),
        microsecond=int((m[4] or "0").ljust(6, "0")),
    )


def request_study_datetime(value: dict[str, str]) -> datetime:
    day = datetime.strptime(value["DICOMStudyDate"], "%Y%m%d")
    time = value.get("DICOMStudyTime", "000000")
    whole, _, frac = time.partition(".")
    return day.replace(
        hour=int(whole[:2]),
        minute=int(whole[2:4]),
        second=int(whole[4:6]),
        microsecond=int(frac.ljust(6, "0")) if frac else 0,
    )


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
