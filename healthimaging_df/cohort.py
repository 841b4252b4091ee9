"""Cohort rollups of an image-set frame: studies, patients, ages, counts.

Every function is pure: it reads the frame, returns a new one, and copies the frame's ``attrs``
(provenance) onto the result. Naming follows the frame's: DICOM values keep their DICOM keyword
(``PatientSex``, ``NumberOfStudyRelatedInstances``), values we derive are camelCase like the AWS
fields (``imageSetCount``, ``modalities``, ``ageAtStudy``).

Drawing lives in ``healthimaging_df.plot``, which reads a ``CohortSummary``: this module never
imports it (imports follow the data); ``df.ahi.plot()`` joins the two.

A study's or patient's attributes (name, sex, description...) are taken from the most recently
updated image set that has a value, so a correction made by a later update wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import pyarrow as pa

from healthimaging_df import schema
from healthimaging_df.core import checks
from healthimaging_df.core.derived import age_at_study, study_year
from healthimaging_df.core.frames import require, with_attrs

__all__ = [
    "AGE_BAND_WIDTH",
    "CohortSummary",
    "age_at_study",
    "latest",
    "patients",
    "primary",
    "studies",
    "summary",
]

AGE_BAND_WIDTH = 10
_OLDEST_BAND = 90
# From the schema's levels: a study carries its patient's attributes and its own; counts the
# study declares (integers) are aggregated separately.
_STUDY_ATTRIBUTES = tuple(
    c
    for c in schema.PATIENT_COLUMNS + schema.STUDY_COLUMNS
    if c != "StudyInstanceUID" and schema.BY_NAME[c].kind != "int"
)
_STUDY_COUNTS = tuple(c for c in schema.STUDY_COLUMNS if schema.BY_NAME[c].kind == "int")
_PATIENT_ATTRIBUTES = tuple(c for c in schema.PATIENT_COLUMNS if c != "PatientID")
_MODALITIES = pa.list_(pa.string())


def _latest_values(frame: pd.DataFrame, key: str, columns: Iterable[str]) -> pd.DataFrame:
    """Per *key*: each column's value from the most recently updated row that has one."""
    present = [c for c in columns if c in frame.columns and c != key]
    if "updatedAt" in frame.columns:
        frame = frame.sort_values("updatedAt", kind="stable", na_position="first")
    # GroupBy.last skips missing values: the latest non-null value of each column.
    return frame.groupby(key, sort=True)[present].last()


def _modalities(frame: pd.DataFrame, key: str, index: pd.Index) -> pd.Series:
    """Per *key* (in *index* order): the sorted distinct modalities, as a list column."""
    if "Modality" not in frame.columns:
        lists: list[list[str]] = [[] for _ in range(len(index))]
    else:
        pairs = frame[[key, "Modality"]].dropna().drop_duplicates()
        grouped = pairs.sort_values([key, "Modality"]).groupby(key, sort=True)["Modality"]
        found = {k: [str(m) for m in v] for k, v in grouped.agg(list).items()}
        lists = [found.get(k, []) for k in index]
    values = pd.array(pa.array(lists, type=_MODALITIES), dtype=pd.ArrowDtype(_MODALITIES))
    result: pd.Series = pd.Series(values, index=index, name="modalities")
    return result


def _int(series: pd.Series) -> pd.Series:
    return series.astype("Int64")


def studies(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per StudyInstanceUID (rows without one are left out).

    Columns: StudyInstanceUID; the patient and study attributes (PatientID, PatientName,
    PatientSex, PatientBirthDate, StudyDateTime, StudyDate, StudyTime, StudyID, AccessionNumber,
    StudyDescription, those the frame has); ``modalities`` (sorted, distinct); ``imageSetCount``
    and ``seriesCount`` (distinct image sets and series in the frame); NumberOfStudyRelatedSeries
    and NumberOfStudyRelatedInstances as the study declares them (its instance total);
    ``firstUpdatedAt`` and ``lastUpdatedAt``. Sorted by PatientID, StudyDateTime, then UID.
    """
    key = "StudyInstanceUID"
    require(frame, (key, "imageSetId", "updatedAt"), "studies()")
    rows = frame[frame[key].notna()]
    result = _latest_values(rows, key, _STUDY_ATTRIBUTES)
    grouped = rows.groupby(key, sort=True)
    result["modalities"] = _modalities(rows, key, result.index)
    result["imageSetCount"] = _int(grouped["imageSetId"].nunique())
    if "SeriesInstanceUID" in rows.columns:
        result["seriesCount"] = _int(grouped["SeriesInstanceUID"].nunique())
    for declared in _STUDY_COUNTS:
        if declared in rows.columns:
            result[declared] = grouped[declared].max()
    result["firstUpdatedAt"] = grouped["updatedAt"].min()
    result["lastUpdatedAt"] = grouped["updatedAt"].max()
    result = result.reset_index()
    order = [c for c in ("PatientID", "StudyDateTime") if c in result.columns] + [key]
    result = result.sort_values(order, kind="stable", na_position="last").reset_index(drop=True)
    return with_attrs(result, frame)


def patients(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per PatientID (rows without one are left out).

    Columns: PatientID, PatientName, PatientSex, PatientBirthDate (each the latest known value),
    ``studyCount`` (distinct StudyInstanceUIDs), ``imageSetCount``, ``firstStudyDateTime`` and
    ``lastStudyDateTime`` (studies with an unreadable or partial date do not count),
    ``modalities`` (sorted, distinct). Sorted by PatientID.
    """
    key = "PatientID"
    require(frame, (key, "imageSetId", "StudyInstanceUID"), "patients()")
    rows = frame[frame[key].notna()]
    result = _latest_values(rows, key, _PATIENT_ATTRIBUTES)
    grouped = rows.groupby(key, sort=True)
    result["studyCount"] = _int(grouped["StudyInstanceUID"].nunique())
    result["imageSetCount"] = _int(grouped["imageSetId"].nunique())
    if "StudyDateTime" in rows.columns:
        result["firstStudyDateTime"] = grouped["StudyDateTime"].min()
        result["lastStudyDateTime"] = grouped["StudyDateTime"].max()
    result["modalities"] = _modalities(rows, key, result.index)
    return with_attrs(result.reset_index(), frame)


def primary(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ``isPrimary`` is not False.

    A missing isPrimary (botocore older than the 2025-06 field) counts as primary: before
    non-primary image sets existed, every image set was primary.
    """
    require(frame, ("isPrimary",), "primary()")
    keep = frame["isPrimary"].astype("boolean").fillna(True).to_numpy(dtype=bool)
    return with_attrs(frame[keep].copy(), frame)


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per imageSetId: its highest version (then latest updatedAt), in frame order."""
    order = ["imageSetId", "version"] + (["updatedAt"] if "updatedAt" in frame.columns else [])
    positions = pd.RangeIndex(len(frame))
    ranked = frame[order].set_axis(positions).sort_values(order, kind="stable", na_position="first")
    winners = ranked.drop_duplicates("imageSetId", keep="last").index.to_numpy()
    keep = np.zeros(len(frame), dtype=bool)
    keep[winners] = True
    return with_attrs(frame[keep].copy(), frame)


def age_band(age: pd.Series, width: int = AGE_BAND_WIDTH) -> pd.Series:
    """Label ages with bands ``"0-9"``, ``"10-19"``, ..., ``"90+"`` (NA stays NA).

    >>> age_band(pd.Series([4, 45, 97, None], dtype="Int64")).tolist()
    ['0-9', '40-49', '90+', <NA>]
    """
    checks.positive_int("width", width)
    low = (age // width * width).clip(upper=_OLDEST_BAND)
    labels = {b: f"{b}-{b + width - 1}" for b in range(0, _OLDEST_BAND, width)}
    labels[_OLDEST_BAND] = f"{_OLDEST_BAND}+"
    text = low.map(labels, na_action="ignore")
    bands: pd.Series = text.astype("string").rename("ageBand")
    return bands


@dataclass(frozen=True)
class CohortSummary:
    """Counts of a cohort by category, one frame per category.

    Each frame has the category column (missing values kept as their own row), then
    ``imageSetCount``, ``studyCount`` and ``patientCount``: the distinct image sets, studies and
    patients with that value. Modality and body part are ordered by image sets, most first;
    sex by patients; study year and age band by their value.
    """

    modality: pd.DataFrame
    body_part: pd.DataFrame
    sex: pd.DataFrame
    study_year: pd.DataFrame
    age_band: pd.DataFrame
    image_sets: int
    studies: int
    patients: int

    def frames(self) -> dict[str, pd.DataFrame]:
        """The count frames by name (``modality``, ``body_part``, ``sex``...)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), pd.DataFrame)
        }

    def __repr__(self) -> str:
        return (
            f"CohortSummary({self.image_sets} image sets, {self.studies} studies, "
            f"{self.patients} patients; frames: {', '.join(self.frames())})"
        )


_COUNTS = {
    "imageSetCount": ("imageSetId", "nunique"),
    "studyCount": ("StudyInstanceUID", "nunique"),
    "patientCount": ("PatientID", "nunique"),
}


def _counts(
    frame: pd.DataFrame, by: pd.Series, rank: str | None, source: pd.DataFrame
) -> pd.DataFrame:
    keyed = frame[["imageSetId", "StudyInstanceUID", "PatientID"]].assign(**{str(by.name): by})
    counts = keyed.groupby(str(by.name), dropna=False, sort=True).agg(**_COUNTS)
    counts = counts.astype("Int64").reset_index()
    if rank is not None:
        counts = counts.sort_values(
            [rank, str(by.name)], ascending=[False, True], kind="stable", na_position="last"
        ).reset_index(drop=True)
    return with_attrs(counts, source)


def summary(frame: pd.DataFrame) -> CohortSummary:
    """Counts by Modality, BodyPartExamined, PatientSex, study year and age band."""
    require(
        frame,
        ("Modality", "BodyPartExamined", "PatientSex", "StudyDate", "PatientBirthDate"),
        "summary()",
    )
    bands = age_band(age_at_study(frame))
    by_band = _counts(frame, bands, None, frame)
    band_order = by_band["ageBand"].str.extract(r"^([0-9]+)")[0].astype("float64")
    by_band = by_band.iloc[np.argsort(band_order.fillna(np.inf).to_numpy(), kind="stable")]
    return CohortSummary(
        modality=_counts(frame, frame["Modality"], "imageSetCount", frame),
        body_part=_counts(frame, frame["BodyPartExamined"], "imageSetCount", frame),
        sex=_counts(frame, frame["PatientSex"], "patientCount", frame),
        study_year=_counts(frame, study_year(frame), None, frame),
        age_band=by_band.reset_index(drop=True),
        image_sets=int(frame["imageSetId"].nunique()),
        studies=int(frame["StudyInstanceUID"].nunique()),
        patients=int(frame["PatientID"].nunique()),
    )
