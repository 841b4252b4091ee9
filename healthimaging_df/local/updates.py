"""UpdateImageSetMetadata's ``DICOMUpdates``: parse the attribute documents into summary tags.

``updatableAttributes`` and ``removableAttributes`` are JSON documents in the metadata
layout (``{"SchemaVersion": 1.1, "Patient": {"DICOM": {...}}, "Study": {"DICOM": {...},
"Series": {uid: {"DICOM": {...}}}}}``), sent as blobs of 1 to 30,000 bytes. Attributes that
appear in SearchImageSets summaries change the summary; others are accepted and change
nothing we keep (the generated metadata documents are derived from the summary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from healthimaging_df.local.errors import ValidationError
from healthimaging_df.local.values import load_json

__all__ = ["MAX_ATTRIBUTES_BYTES", "TagChanges", "parse_dicom_updates"]

MAX_ATTRIBUTES_BYTES = 30_000  # model: DICOMUpdates blobs, min 1, max 30000

_PATIENT = {
    "PatientID": "DICOMPatientId",
    "PatientName": "DICOMPatientName",
    "PatientBirthDate": "DICOMPatientBirthDate",
    "PatientSex": "DICOMPatientSex",
}
_STUDY = {
    "StudyInstanceUID": "DICOMStudyInstanceUID",
    "StudyID": "DICOMStudyId",
    "StudyDescription": "DICOMStudyDescription",
    "AccessionNumber": "DICOMAccessionNumber",
    "StudyDate": "DICOMStudyDate",
    "StudyTime": "DICOMStudyTime",
}
_SERIES = {
    "SeriesInstanceUID": "DICOMSeriesInstanceUID",
    "Modality": "DICOMSeriesModality",
    "BodyPartExamined": "DICOMSeriesBodyPart",
    "SeriesNumber": "DICOMSeriesNumber",
}
# The developer guide: these need ``force=true``.
_FORCED = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyID"})


@dataclass
class TagChanges:
    """Summary-tag changes (value None = remove) at study/patient and at series level."""

    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    needs_force: bool = False


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be a JSON object")
    return value


def _dicom(level: Any, where: str) -> dict[str, Any]:
    level = _object(level, where)
    unknown = set(level) - {"DICOM", "Series"}
    if unknown:
        raise ValidationError(f"{where} has {len(unknown)} unknown member(s)")
    return _object(level.get("DICOM", {}), f"{where}.DICOM")


def _apply(
    changes: TagChanges, blob: bytes, where: str, series_uid: str | None, remove: bool
) -> None:
    if not 1 <= len(blob) <= MAX_ATTRIBUTES_BYTES:
        raise ValidationError(f"{where} must be 1 to {MAX_ATTRIBUTES_BYTES} bytes")
    document = _object(load_json(blob, where), where)
    unknown = set(document) - {"SchemaVersion", "Patient", "Study"}
    if unknown:
        raise ValidationError(f"{where} has {len(unknown)} unknown member(s)")
    levels: list[tuple[dict[str, Any], dict[str, str], dict[str, Any]]] = []
    if "Patient" in document:
        levels.append((_dicom(document["Patient"], f"{where}.Patient"), _PATIENT, changes.study))
    if "Study" in document:
        study = _object(document["Study"], f"{where}.Study")
        levels.append((_dicom(study, f"{where}.Study"), _STUDY, changes.study))
        series = _object(study.get("Series", {}), f"{where}.Study.Series")
        for uid, level in series.items():
            if uid != series_uid:
                raise ValidationError(f"{where}.Study.Series names a series not in the image set")
            levels.append((_dicom(level, f"{where}.Study.Series"), _SERIES, changes.series))
    for attributes, mapping, target in levels:
        for keyword, value in attributes.items():
            if keyword in _FORCED:
                changes.needs_force = True
            tag = mapping.get(keyword)
            if tag is None:
                continue
            if remove:
                target[tag] = None
            elif tag == "DICOMSeriesNumber":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValidationError(f"{where}: SeriesNumber must be an integer")
                target[tag] = value
            elif not isinstance(value, str):
                raise ValidationError(f"{where}: {keyword} must be a string")
            else:
                target[tag] = value


def parse_dicom_updates(
    updatable: bytes | None, removable: bytes | None, series_uid: str | None
) -> TagChanges:
    """Turn the two attribute documents into summary-tag changes.

    Raises
    ------
    ValidationError
        Not JSON, not the metadata layout, a series other than the image set's, a value of
        the wrong type, or neither document given.
    """
    if updatable is None and removable is None:
        raise ValidationError("DICOMUpdates must set updatableAttributes or removableAttributes")
    changes = TagChanges()
    if removable is not None:
        _apply(changes, removable, "removableAttributes", series_uid, remove=True)
    if updatable is not None:
        _apply(changes, updatable, "updatableAttributes", series_uid, remove=False)
    return changes
