"""GetImageSetMetadata documents, generated deterministically from an image set's summary.

The layout is the service's: ``{SchemaVersion, DatastoreID, ImageSetID, Patient{DICOM},
Study{DICOM, Series{uid: {DICOM, Instances{uid: {DICOM, ImageFrames[]}}}}}}``, DICOM
attributes keyed by keyword. Everything random derives from a hash of the imageSetId, so
repeated calls (and other servers) give the same document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from typing import Any

__all__ = ["gzip_document", "metadata_document"]

_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "SR": "1.2.840.10008.5.1.4.1.1.88.22",
}
_MATRIX = {"CT": 512, "MR": 256, "PT": 128, "NM": 128, "US": 640, "CR": 2048, "DX": 2048}
_MANUFACTURERS = ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "CANON_MEC", "FUJIFILM"]


def metadata_document(datastore_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """Build the GetImageSetMetadata JSON document of one image-set version.

    Deterministic: instance UIDs, frame ids and checksums derive from a hash of the image-set
    id, so repeated calls (and other servers) give the same document.
    """
    image_set_id = record["imageSetId"]
    tags = record.get("DICOMTags") or {}
    rng = random.Random(int(hashlib.sha256(image_set_id.encode()).hexdigest(), 16))
    modality = str(tags.get("DICOMSeriesModality", "OT"))
    series_uid = str(tags.get("DICOMSeriesInstanceUID", "1.2.826.0.1.3680043.8.498.1"))
    matrix = _MATRIX.get(modality, 512)
    instances: dict[str, Any] = {}
    thickness = rng.choice([0.625, 1.0, 1.25, 2.5, 3.0, 5.0])  # one per series, as scanners write
    for number in range(1, rng.randint(2, 5) + 1):
        sop_uid = f"{series_uid}.{number}.{rng.randrange(10**8, 10**9)}"
        dicom: dict[str, Any] = {
            "SOPClassUID": _SOP_CLASSES.get(modality, "1.2.840.10008.5.1.4.1.1.7"),
            "SOPInstanceUID": sop_uid,
            "InstanceNumber": number,
        }
        if modality != "SR":
            dicom.update(Rows=matrix, Columns=matrix, BitsAllocated=16, BitsStored=12)
            dicom.update(PhotometricInterpretation="MONOCHROME2", SamplesPerPixel=1)
        if modality in ("CT", "MR"):
            dicom["SliceThickness"] = thickness
            dicom["ImagePositionPatient"] = [-250.0, -250.0, round(-number * 2.5, 2)]
        frames = []
        if modality != "SR":
            frames.append(
                {
                    "ID": f"{rng.getrandbits(128):032x}",
                    "PixelDataChecksumFromBaseToFullResolution": [
                        {"Width": matrix, "Height": matrix, "Checksum": rng.getrandbits(31)}
                    ],
                    "MinPixelValue": 0,
                    "MaxPixelValue": rng.randrange(1000, 4096),
                    "FrameSizeInBytes": matrix * matrix * 2,
                }
            )
        instances[sop_uid] = {"DICOM": dicom, "ImageFrames": frames}
    series_dicom: dict[str, Any] = {
        "SeriesInstanceUID": series_uid,
        "Modality": modality,
        "SeriesDescription": f"{modality} {tags.get('DICOMSeriesBodyPart', '')}".strip(),
        "Manufacturer": rng.choice(_MANUFACTURERS),
    }
    if "DICOMSeriesBodyPart" in tags:
        series_dicom["BodyPartExamined"] = tags["DICOMSeriesBodyPart"]
    if "DICOMSeriesNumber" in tags:
        series_dicom["SeriesNumber"] = tags["DICOMSeriesNumber"]
    patient = {
        keyword: tags[tag]
        for keyword, tag in (
            ("PatientID", "DICOMPatientId"),
            ("PatientName", "DICOMPatientName"),
            ("PatientBirthDate", "DICOMPatientBirthDate"),
            ("PatientSex", "DICOMPatientSex"),
        )
        if tag in tags
    }
    study = {
        keyword: tags[tag]
        for keyword, tag in (
            ("StudyInstanceUID", "DICOMStudyInstanceUID"),
            ("StudyID", "DICOMStudyId"),
            ("StudyDate", "DICOMStudyDate"),
            ("StudyTime", "DICOMStudyTime"),
            ("AccessionNumber", "DICOMAccessionNumber"),
            ("StudyDescription", "DICOMStudyDescription"),
        )
        if tag in tags
    }
    return {
        "SchemaVersion": "1.1",
        "DatastoreID": datastore_id,
        "ImageSetID": image_set_id,
        "Patient": {"DICOM": patient},
        "Study": {
            "DICOM": study,
            "Series": {series_uid: {"DICOM": series_dicom, "Instances": instances}},
        },
    }


def gzip_document(document: dict[str, Any]) -> bytes:
    """Serialize and gzip a metadata document as the service sends it."""
    return gzip.compress(json.dumps(document, ensure_ascii=False).encode("utf-8"), mtime=0)
