"""Turn the dates users type into exact bounds, and bounds into what the API accepts.

Users write ``"2020-01-01"``, ``date(2020, 1, 1)``, ``"2020"``, ISO strings with or without zones, or
``pd.Timestamp``. A bound with no time of day means the whole day: a date-only *upper* bound ends at
23:59:59.999999, and a year or month alone covers that whole period (dateutil fills the missing
parts). AWS timestamps (``createdAt``...) are instants: naive input is taken as UTC. ``StudyDateTime``
is DICOM wall-clock time with no zone, so its bounds must be naive.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import pandas as pd
from dateutil import parser as dateutil_parser

_START = datetime(2000, 1, 1)
_END = datetime(2000, 12, 31, 23, 59, 59, 999999)


class BoundError(ValueError):
    """A value could not be read as a date bound; the message holds no value (it may be PHI)."""


def parse_bound(value: Any, *, upper: bool, wallclock: bool) -> datetime:
    """Read *value* as the lower or upper bound of a range, exact to the microsecond.

    Returns an aware UTC datetime, or a naive one when *wallclock* (DICOM study date-time).
    """
    if isinstance(value, pd.Timestamp):
        if value is pd.NaT:
            raise BoundError("is NaT")
        value = value.to_pydatetime()
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time.max if upper else time.min)
    elif isinstance(value, str):
        moment = _parse_text(value, upper=upper)
    else:
        raise BoundError(f"must be a date, datetime or string, not {type(value).__name__}")
    if wallclock:
        if moment.tzinfo is not None:
            raise BoundError(
                "StudyDateTime is DICOM wall-clock time with no zone: give a naive datetime or a date"
            )
        return moment
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def parse_instant(value: Any, *, wallclock: bool) -> datetime:
    """Read *value* as one exact moment (for equality); a date alone means its midnight."""
    return parse_bound(value, upper=False, wallclock=wallclock)


def _parse_text(text: str, *, upper: bool) -> datetime:
    try:
        start = dateutil_parser.parse(text, default=_START)
        end = dateutil_parser.parse(text, default=_END)
    except (ValueError, OverflowError):
        raise BoundError("is not a date or date-time dateutil can read") from None
    has_time = start.hour == end.hour and start.minute == end.minute
    if has_time:
        return start  # an explicit time is taken literally; missing seconds are zero
    return end if upper else start


def floor_second(moment: datetime) -> datetime:
    """The whole second at or before *moment* (botocore drops fractions when sending)."""
    return moment.replace(microsecond=0)


def ceil_second(moment: datetime) -> datetime:
    """The whole second at or after *moment*."""
    floored = moment.replace(microsecond=0)
    return floored if floored == moment else floored + timedelta(seconds=1)


def study_date_and_time(moment: datetime) -> dict[str, str]:
    """The API's ``DICOMStudyDateAndTime`` for a naive wall-clock bound (YYYYMMDD, HHMMSS.ffffff)."""
    clock = f"{moment.hour:02d}{moment.minute:02d}{moment.second:02d}"
    if moment.microsecond:
        clock += f".{moment.microsecond:06d}"
    # Formatted by hand: strftime("%Y") does not pad years before 1000 to four digits.
    day = f"{moment.year:04d}{moment.month:02d}{moment.day:02d}"
    return {"DICOMStudyDate": day, "DICOMStudyTime": clock}
