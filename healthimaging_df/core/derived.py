"""Values derived from DICOM dates, one definition for filters, partitions and rollups.

``ageAtStudy`` and ``StudyYear`` mean the same thing wherever they appear: in a query's
``where``, as a snapshot's partition column, and in ``df.ahi`` cohort tables.
"""

from __future__ import annotations

import pandas as pd

from healthimaging_df.core.frames import require


def _days_in_month(year: pd.Series, month: pd.Series) -> pd.Series:
    """Days in each (year, month); NA when either is missing or the month is not 1-12."""
    first = (year * 10000 + month * 100 + 1).astype("string")
    stamps = pd.to_datetime(first, format="%Y%m%d", errors="coerce")
    days: pd.Series = pd.Series(stamps.dt.days_in_month, index=year.index).astype("Int64")
    return days


def _date_bounds(raw: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Earliest and latest (year, month, day) a DICOM DA value can mean; NA when unreadable.

    ``YYYYMMDD`` is exact, ``YYYYMM`` spans its month, ``YYYY`` its year; ACR-NEMA dots
    (``YYYY.MM.DD``) are tolerated.
    """
    text = raw.astype("string").str.strip().str.replace(".", "", regex=False)
    parts = text.str.extract(r"^(?P<y>[0-9]{4})(?P<m>[0-9]{2})?(?P<d>[0-9]{2})?$")
    year, month, day = (pd.to_numeric(parts[c]).astype("Int64") for c in ("y", "m", "d"))
    last_month = month.fillna(12)
    last_day = _days_in_month(year, last_month)
    valid = year.notna() & last_day.notna()
    valid &= day.isna() | ((day >= 1) & (day <= last_day)).fillna(False)
    first = pd.DataFrame({"year": year, "month": month.fillna(1), "day": day.fillna(1)})
    last = pd.DataFrame({"year": year, "month": last_month, "day": day.fillna(last_day)})
    keep = pd.Series(valid.to_numpy(dtype=bool), index=raw.index)
    return first.where(keep, axis=0), last.where(keep, axis=0)


def _age(born: pd.DataFrame, on: pd.DataFrame) -> pd.Series:
    """Whole years from *born* to *on* (each a year/month/day frame)."""
    before_birthday = (on["month"] < born["month"]) | (
        (on["month"] == born["month"]) & (on["day"] < born["day"])
    )
    return on["year"] - born["year"] - before_birthday.astype("Int64")


def age_at_study(frame: pd.DataFrame) -> pd.Series:
    """Age in whole years at StudyDate, from PatientBirthDate, as a nullable ``Int64`` Series.

    Partial dates are used when they still fix the age: born ``197305`` and studied on
    ``20240606`` is 51 whatever the days; born ``1973`` that day is 50 or 51, so NA. Missing,
    unreadable or impossible dates, and studies dated before the birth, give NA.
    """
    require(frame, ("PatientBirthDate", "StudyDate"), "age_at_study()")
    born_first, born_last = _date_bounds(frame["PatientBirthDate"])
    study_first, study_last = _date_bounds(frame["StudyDate"])
    youngest = _age(born_last, study_first)
    oldest = _age(born_first, study_last)
    known = (youngest == oldest) & (youngest >= 0)
    age = youngest.where(known.fillna(False)).astype("Int64")
    result: pd.Series = pd.Series(
        age.to_numpy(), index=frame.index, name="ageAtStudy", dtype="Int64"
    )
    return result


def study_year(frame: pd.DataFrame) -> pd.Series:
    """The year of StudyDate (partial dates included) as nullable ``Int64``; NA when unreadable."""
    require(frame, ("StudyDate",), "study_year()")
    first, _ = _date_bounds(frame["StudyDate"])
    result: pd.Series = pd.Series(
        first["year"].to_numpy(), index=frame.index, name="studyYear", dtype="Int64"
    )
    return result
