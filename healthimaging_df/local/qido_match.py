"""QIDO-RS vocabulary and matching: attributes, search keys per level, matchers over stored values.

Pure: no HTTP and no state. The key tables are HealthImaging's documented search keys
(``docs/dicomweb.md``); ``tests/local/test_qido_tables.py`` ties them to the library's copy in
``healthimaging_df/dicomweb/_model.py`` (this package imports nothing from the library).
Choices where the service's documentation is silent are marked "local choice".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from healthimaging_df.local.errors import ValidationError

__all__ = [
    "ATTRIBUTES",
    "INSTANCES",
    "INSTANCE_ALL",
    "INSTANCE_KEYS",
    "INSTANCE_RETURN",
    "KEYS",
    "SERIES",
    "SERIES_ALL",
    "SERIES_KEYS",
    "SERIES_RETURN",
    "STUDIES",
    "STUDY_ALL",
    "STUDY_KEYS",
    "STUDY_RETURN",
    "UID_RE",
    "Matcher",
    "any_match",
    "matcher",
    "number_key",
    "resolve",
]

STUDIES, SERIES, INSTANCES = "SearchDICOMStudies", "SearchDICOMSeries", "SearchDICOMInstances"

# keyword: (tag, VR, summary tag or None)
ATTRIBUTES: dict[str, tuple[str, str, str | None]] = {
    "StudyDate": ("00080020", "DA", "DICOMStudyDate"),
    "StudyTime": ("00080030", "TM", "DICOMStudyTime"),
    "AccessionNumber": ("00080050", "SH", "DICOMAccessionNumber"),
    "ModalitiesInStudy": ("00080061", "CS", None),
    "ReferringPhysicianName": ("00080090", "PN", None),
    "StudyDescription": ("00081030", "LO", "DICOMStudyDescription"),
    "PatientName": ("00100010", "PN", "DICOMPatientName"),
    "PatientID": ("00100020", "LO", "DICOMPatientId"),
    "PatientBirthDate": ("00100030", "DA", "DICOMPatientBirthDate"),
    "PatientBirthTime": ("00100032", "TM", None),
    "PatientSex": ("00100040", "CS", "DICOMPatientSex"),
    "StudyInstanceUID": ("0020000D", "UI", "DICOMStudyInstanceUID"),
    "StudyID": ("00200010", "SH", "DICOMStudyId"),
    "NumberOfStudyRelatedSeries": ("00201206", "IS", None),
    "NumberOfStudyRelatedInstances": ("00201208", "IS", None),
    "Modality": ("00080060", "CS", "DICOMSeriesModality"),
    "SeriesInstanceUID": ("0020000E", "UI", "DICOMSeriesInstanceUID"),
    "SeriesNumber": ("00200011", "IS", "DICOMSeriesNumber"),
    "SeriesDescription": ("0008103E", "LO", None),
    "Manufacturer": ("00080070", "LO", None),
    "BodyPartExamined": ("00180015", "CS", "DICOMSeriesBodyPart"),
    "PerformedProcedureStepStartDate": ("00400244", "DA", None),
    "PerformedProcedureStepStartTime": ("00400245", "TM", None),
    "NumberOfSeriesRelatedInstances": ("00201209", "IS", None),
    "SOPClassUID": ("00080016", "UI", None),
    "SOPInstanceUID": ("00080018", "UI", None),
    "InstanceNumber": ("00200013", "IS", None),
    "Rows": ("00280010", "US", None),
    "Columns": ("00280011", "US", None),
    "BitsAllocated": ("00280100", "US", None),
    "BitsStored": ("00280101", "US", None),
    "SamplesPerPixel": ("00280002", "US", None),
    "PhotometricInterpretation": ("00280004", "CS", None),
    "SliceThickness": ("00180050", "DS", None),
    "ImagePositionPatient": ("00200032", "DS", None),
}
_BY_TAG = {tag: keyword for keyword, (tag, _, _) in ATTRIBUTES.items()}

STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "StudyInstanceUID",
    "StudyID",
)
SERIES_KEYS = (
    *STUDY_KEYS,
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_KEYS = (*SERIES_KEYS, "SOPClassUID", "SOPInstanceUID")
KEYS = {STUDIES: STUDY_KEYS, SERIES: SERIES_KEYS, INSTANCES: INSTANCE_KEYS}
"""The documented search keys of each QIDO-RS operation."""

STUDY_RETURN = (*STUDY_KEYS, "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_RETURN = (
    "StudyInstanceUID",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_RETURN = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
)
STUDY_ALL = (*STUDY_RETURN, "PatientSex")
SERIES_ALL = (*SERIES_RETURN, "SeriesDescription", "Manufacturer", "BodyPartExamined")
INSTANCE_ALL = tuple(k for k in ATTRIBUTES if k not in STUDY_ALL and k not in SERIES_ALL)

UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_DATE_RE = re.compile(r"[0-9]{8}")
_TIME_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_WORD_RE = re.compile(r"[\^\s=,]+")

Matcher = Callable[[Any], bool]


def _time_us(text: str) -> int | None:
    match = _TIME_RE.fullmatch(text)
    if match is None:
        return None
    hour, minute, second = (int(match.group(i) or 0) for i in (1, 2, 3))
    if hour > 23 or minute > 59 or second > 60:
        return None
    micro = int((match.group(4) or "0").ljust(6, "0"))
    return ((hour * 60 + minute) * 60 + second) * 1_000_000 + micro


def _wildcard(pattern: str, casefold: bool) -> re.Pattern[str]:
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL if casefold else re.DOTALL)


def _words(text: str) -> list[str]:
    return [w for w in _WORD_RE.split(text.casefold()) if w]


def _range_matcher(keyword: str, vr: str, value: str) -> Matcher:
    convert: Callable[[str], Any] = (lambda s: s) if vr == "DA" else _time_us
    pattern = _DATE_RE if vr == "DA" else _TIME_RE

    def bound(text: str) -> Any:
        if text == "":
            return None
        if pattern.fullmatch(text) is None or convert(text) is None:
            raise ValidationError(f"{keyword} must be a {vr} value or range A-B")
        return convert(text)

    low_text, dash, high_text = value.partition("-")
    low, high = bound(low_text), bound(high_text) if dash else bound(low_text)
    if dash and low is None and high is None:
        raise ValidationError(f"{keyword}: a range needs at least one bound")

    def in_range(stored: Any) -> bool:
        if not isinstance(stored, str) or pattern.fullmatch(stored) is None:
            return False
        key = convert(stored)
        if key is None:
            return False
        return (low is None or key >= low) and (high is None or key <= high)

    return in_range


def matcher(keyword: str, vr: str, value: str, fuzzy: bool) -> Matcher | None:
    """A predicate over one attribute's stored value; None for universal matching."""
    if value == "" or (vr not in ("DA", "TM", "UI", "IS", "US") and value.strip("*") == ""):
        return None  # universal matching (PS3.4 C.2.2.2.3; "*" alone is the same, C.2.2.2.4)
    if vr in ("DA", "TM"):
        return _range_matcher(keyword, vr, value)
    if vr in ("IS", "US"):
        if not (value.isascii() and value.lstrip("+-").isdigit()):
            raise ValidationError(f"{keyword} must be an integer")
        number = int(value)
        return lambda stored: isinstance(stored, int) and stored == number
    if vr == "UI":
        if UID_RE.fullmatch(value) is None:
            raise ValidationError(f"{keyword} must be a UID (digits and dots, no wildcards)")
        return lambda stored: stored == value
    if fuzzy and vr == "PN" and "*" not in value and "?" not in value:
        wanted = _words(value)

        def word_prefix(stored: Any) -> bool:
            if not isinstance(stored, str):
                return False
            have = _words(stored)
            return all(any(w.startswith(q) for w in have) for q in wanted)

        return word_prefix
    if "*" in value or "?" in value:
        regex = _wildcard(value, casefold=fuzzy and vr == "PN")
        return lambda stored: isinstance(stored, str) and regex.fullmatch(stored) is not None
    return lambda stored: stored == value


def resolve(name: str) -> str | None:
    """The keyword of a query parameter name (a keyword or an 8-hex-digit tag), or None."""
    if _TAG_RE.fullmatch(name):
        return _BY_TAG.get(name.upper())
    return name if name in ATTRIBUTES else None


def any_match(match: Matcher, stored: Any) -> bool:
    """Multi-valued attributes match when any value does."""
    if isinstance(stored, list):
        return any(match(v) for v in stored)
    return match(stored)


def number_key(number: Any, uid: str) -> tuple[int, int, str]:
    """Sort key: numbered rows by number, then rows without one (local choice), then by UID."""
    if isinstance(number, int):
        return (0, number, uid)
    return (1, 0, uid)
