"""Turn the dates users type into exact bounds, and bounds into what the API accepts.

Users write ``"2020-01-01"``, ``date(2020, 1, 1)``, ``"2020"``, ISO strings with or without zones, or
``pd.Timestamp``. A bound with no time of day means the whole day: a date-only *upper* bound ends at
23:59:59.999999, and a year or month alone covers that whole period (dateutil fills the missing
parts). AWS timestamps (``createdAt``...) are instants: naive input is taken as UTC. ``StudyDateTime``
is DICOM wall-clock time with no zone, so its bounds must be naive.

Refused, with a ``BoundError``: text without a year (``"March"``, ``"12"``, ``"10:00"``: dateutil
would fill in a year silently), text whose day and month could be swapped (``"01/02/2021"``; ISO
``2021-02-01`` is never ambiguous, and ``"13/02/2021"`` is read day-first since 13 is no month),
``NaT``, years after 9998 (an upper bound must leave room to round up to the next second) and UTC
offsets of 24 hours or more.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from dateutil import parser as dateutil_parser

_START = datetime(2000, 1, 1)
_END = datetime(2000, 12, 31, 23, 59, 59, 999999)
_OTHER_YEAR = datetime(1999, 1, 1)  # a text whose year follows the default has none
MAX_YEAR = 9998
# How far the service's clock may stand from ours: a refresh's updatedAt bound below the last
# fetch's start, a sub-ranged run's catch-up read (``engine.run.catch_up``) go this far back.
CLOCK_MARGIN = timedelta(minutes=5)


class BoundError(ValueError):
    """A value could not be read as a date bound; the message holds no value (it may be PHI)."""


def parse_bound(value: Any, *, upper: bool, wallclock: bool) -> datetime:
    """Read *value* as the lower or upper bound of a range, exact to the microsecond.

    Returns an aware UTC datetime, or a naive one when *wallclock* (DICOM study date-time).
    """
    if isinstance(value, (date, datetime)) and value != value:  # pd.NaT is a datetime
        raise BoundError("is NaT (a missing date); leave the bound out or use is_null()")
    if hasattr(value, "to_pydatetime"):  # pd.Timestamp, without importing pandas here
        value = value.to_pydatetime()
    if type(value).__name__ == "datetime64":
        raise BoundError("must be a date, datetime or string, not numpy.datetime64")
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time.max if upper else time.min)
    elif isinstance(value, str):
        moment = _parse_text(value, upper=upper)
    else:
        raise BoundError(f"must be a date, datetime or string, not {type(value).__name__}")
    try:
        offset = moment.utcoffset()
    except ValueError:  # a tzinfo whose offset Python refuses (24 hours or more)
        raise BoundError("has a UTC offset of 24 hours or more") from None
    if moment.year > MAX_YEAR:
        raise BoundError(f"is after the year {MAX_YEAR}, the last one a bound can name")
    if wallclock:
        if offset is not None:
            raise BoundError(
                "StudyDateTime is DICOM wall-clock time with no zone: give a naive datetime or a date"
            )
        return moment
    if offset is None:
        return moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:
        raise BoundError("is outside the years 1 to 9998 in UTC") from None


def parse_instant(value: Any, *, wallclock: bool) -> datetime:
    """Read *value* as one exact moment (for equality); a date alone means its midnight."""
    return parse_bound(value, upper=False, wallclock=wallclock)


class TimestampError(ValueError):
    """A timestamp the library wrote (provenance, a checkpoint, a cache) is not ISO 8601 text."""


def read_iso(text: Any) -> datetime:
    """The timezone-aware instant in ISO 8601 *text* that the library wrote; naive text is UTC.

    The one reader of our own timestamps (provenance, checkpoints, cached statistics): anything
    else (not a string, not ISO 8601) raises :class:`TimestampError`, whose message holds no
    value; each caller says what a damaged file means for it.
    """
    if not isinstance(text, str):
        raise TimestampError(f"a timestamp must be ISO 8601 text, not {type(text).__name__}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TimestampError("a timestamp is not ISO 8601 text") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def read_iso_or_none(text: Any) -> datetime | None:
    """:func:`read_iso` of *text*, or None when *text* is None (a timestamp not recorded)."""
    return None if text is None else read_iso(text)


def whole_period(value: Any, *, wallclock: bool) -> tuple[datetime, datetime] | None:
    """The bounds of the day (month, year) *value* names, or None when it names one moment.

    A ``date`` or a text without a time of day is a period; a ``datetime`` is a moment.
    """
    low = parse_bound(value, upper=False, wallclock=wallclock)
    high = parse_bound(value, upper=True, wallclock=wallclock)
    return None if low == high else (low, high)


def _parse_text(text: str, *, upper: bool) -> datetime:
    try:
        iso = datetime.fromisoformat(text) if "-" in text[:8] or "T" in text else None
    except ValueError:
        iso = None
    try:
        start = dateutil_parser.parse(text, default=_START)
        end = dateutil_parser.parse(text, default=_END)
        other = dateutil_parser.parse(text, default=_OTHER_YEAR)
        swapped = iso or dateutil_parser.parse(text, default=_START, dayfirst=True)
    except (ValueError, OverflowError):
        raise BoundError("is not a date or date-time dateutil can read") from None
    if other.year != start.year:
        raise BoundError("has no year (e.g. 'March' or '10:00'); write 2021-03 or 2021-03-01T10:00")
    if swapped != start:
        raise BoundError("is ambiguous: day and month could be swapped; write it as ISO YYYY-MM-DD")
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
