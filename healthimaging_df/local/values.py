"""Constants of the service model and the value rules shared by state and search.

Timestamps are held as microseconds since the Unix epoch (``to_us``) in the indexes; study
date-times as microseconds since 0001-01-01 wall clock (``study_key``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from healthimaging_df.local.errors import ValidationError

__all__ = [
    "ACCOUNT",
    "BETWEEN_ATTRIBUTES",
    "EQUAL_ATTRIBUTES",
    "MAX_JSON_DEPTH",
    "MAX_RESULTS",
    "MAX_STRING",
    "MAX_TOKEN",
    "ONE_US",
    "REGION",
    "SORT_FIELDS",
    "SORT_ORDERS",
    "UTC",
    "from_us",
    "load_json",
    "parse_timestamp",
    "study_datetime",
    "study_key",
    "to_us",
]

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NAIVE_EPOCH = datetime(1, 1, 1)
ONE_US = timedelta(microseconds=1)
ACCOUNT = "123456789012"
REGION = "us-east-1"

EQUAL_ATTRIBUTES = (
    "DICOMPatientId",
    "DICOMAccessionNumber",
    "DICOMStudyId",
    "DICOMStudyInstanceUID",
    "DICOMSeriesInstanceUID",
    "isPrimary",
)
TAG_EQUAL_ATTRIBUTES = EQUAL_ATTRIBUTES[:5]
UID_ATTRIBUTES = ("DICOMStudyInstanceUID", "DICOMSeriesInstanceUID")
BETWEEN_ATTRIBUTES = ("createdAt", "updatedAt", "DICOMStudyDateAndTime")
SORT_FIELDS = BETWEEN_ATTRIBUTES
SORT_ORDERS = ("ASC", "DESC")
ALL_ATTRIBUTES = frozenset(EQUAL_ATTRIBUTES + BETWEEN_ATTRIBUTES)
MAX_STRING = 512
MAX_RESULTS = 50
MAX_TOKEN = 8192
LOSSLESS_STORAGE_FORMATS = ("HTJ2K", "JPEG_2000_LOSSLESS")
MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays a request JSON document may have (local choice)."""

UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
ID_RE = re.compile(r"[0-9a-z]{32}")
NAME_RE = re.compile(r"[A-Za-z0-9._/#-]{1,256}")
# ASCII digits only: Python's \d also matches other scripts' digits, which DICOM never allows.
REQ_DATE_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
REQ_TIME_RE = re.compile(r"([0-9]{2})([0-9]{2})([0-9]{2})(?:\.([0-9]{1,6}))?")
_REC_TIME_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")


def to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // ONE_US


def from_us(us: int) -> datetime:
    """The aware UTC datetime ``us`` microseconds after the Unix epoch."""
    return EPOCH + timedelta(microseconds=us)


def parse_timestamp(value: Any, where: str) -> datetime:
    """Parse a request timestamp: a datetime, epoch seconds, or an ISO-8601 string; return UTC.

    botocore sends whole epoch seconds; hand-written requests may send ISO-8601 text.

    Examples
    --------
    >>> parse_timestamp(0, "x").isoformat()
    '1970-01-01T00:00:00+00:00'
    >>> parse_timestamp("2024-03-11T15:00:05.074000-07:00", "x").isoformat()
    '2024-03-11T22:00:05.074000+00:00'
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return EPOCH + timedelta(microseconds=round(value * 1_000_000))
        except (OverflowError, ValueError):
            raise ValidationError(f"{where} is not a valid timestamp") from None
    if isinstance(value, str) and len(value) <= 64:
        text = value.strip()
        try:
            return parse_timestamp(float(text), where)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValidationError(
                f"{where} must be an ISO-8601 timestamp or epoch seconds"
            ) from None
        return parse_timestamp(parsed, where)
    raise ValidationError(f"{where} must be an ISO-8601 timestamp or epoch seconds")


def study_datetime(tags: dict[str, Any]) -> datetime | None:
    """A record's study date and time as a naive wall-clock datetime, or None if unusable.

    DICOMStudyDate must be a full ``YYYYMMDD`` calendar date; DICOMStudyTime may be ``HH``,
    ``HHMM``, ``HHMMSS`` or ``HHMMSS.f`` (1-6 digits); a missing or empty time is midnight.
    Partial or empty dates, or an unparsable time, give None: such an image set never matches a
    DICOMStudyDateAndTime filter and sorts after all dated ones.

    Examples
    --------
    >>> study_datetime({"DICOMStudyDate": "20240229", "DICOMStudyTime": "0930"})
    datetime.datetime(2024, 2, 29, 9, 30)
    >>> study_datetime({"DICOMStudyDate": "201903"}) is None
    True
    """
    date_text = tags.get("DICOMStudyDate")
    if not isinstance(date_text, str):
        return None
    match = REQ_DATE_RE.fullmatch(date_text)
    if match is None:
        return None
    time_text = tags.get("DICOMStudyTime")
    hour = minute = second = micro = 0
    if isinstance(time_text, str) and time_text != "":
        tmatch = _REC_TIME_RE.fullmatch(time_text)
        if tmatch is None:
            return None
        hour = int(tmatch.group(1))
        minute = int(tmatch.group(2) or 0)
        second = int(tmatch.group(3) or 0)
        micro = int((tmatch.group(4) or "0").ljust(6, "0"))
    elif time_text is not None and not isinstance(time_text, str):
        return None
    try:
        return datetime(
            int(match.group(1)),
            int(match.group(2)),
            int(match.group(3)),
            hour,
            minute,
            second,
            micro,
        )
    except ValueError:
        return None


def study_key(tags: dict[str, Any]) -> int | None:
    """The sort key of a record's study date-time (µs since 0001-01-01), or None if undated."""
    moment = study_datetime(tags)
    return None if moment is None else (moment - NAIVE_EPOCH) // ONE_US


def wall_clock_key(moment: datetime) -> int:
    """The :func:`study_key` of a naive wall-clock datetime."""
    return (moment - NAIVE_EPOCH) // ONE_US


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _json_depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside JSON strings."""
    depth = peak = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', text)):
        if match.group() in (b"[", b"{"):
            depth += 1
            peak = max(peak, depth)
        else:
            depth -= 1
    return peak


def load_json(text: bytes | str, where: str) -> Any:
    """Parse request JSON; :class:`ValidationError` naming ``where`` if malformed or too deep.

    Nesting deeper than :data:`MAX_JSON_DEPTH` is refused before parsing, so a hostile body
    costs a linear scan, never a ``RecursionError``.

    >>> load_json(b"[" * 65 + b"]" * 65, "body")
    Traceback (most recent call last):
    ...
    healthimaging_df.local.errors.ValidationError: body nests objects and arrays deeper than 64
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _json_depth(raw) > MAX_JSON_DEPTH:
        raise ValidationError(f"{where} nests objects and arrays deeper than {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ValidationError(f"{where} is not valid JSON") from None
