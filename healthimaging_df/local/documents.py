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
from dataclasses import dataclass
from typing import Any

__all__ = ["SeriesShape", "gzip_document", "gzip_json", "metadata_document", "metadata_json"]


@dataclass(frozen=True)
class SeriesShape:
    """How big generated series are; the defaults give small documents (2-5 instances).

    Attributes
    ----------
    instances_per_series
        Exactly this many instances per image set (a CT series has hundreds); None keeps the
        default of 2-5.
    attributes_per_instance
        Exactly this many DICOM attributes per instance (a real CT instance has several
        dozen): up to 58 realistic keywords (identity, position, times, acquisition and
        pixel attributes), then private tags (``"0019xxxx"``). None keeps the default set (about 12), or 44
        when ``instances_per_series`` is given.

    Examples
    --------
    >>> SeriesShape(instances_per_series=300).attributes
    44
    """

    instances_per_series: int | None = None
    attributes_per_instance: int | None = None

    def __post_init__(self) -> None:
        if self.instances_per_series is not None and self.instances_per_series < 1:
            raise ValueError("instances_per_series must be >= 1 (or None)")
        if self.attributes_per_instance is not None and self.attributes_per_instance < 3:
            raise ValueError("attributes_per_instance must be >= 3 (or None)")

    @property
    def default(self) -> bool:
        """Whether this is the small default shape."""
        return self.instances_per_series is None and self.attributes_per_instance is None

    @property
    def attributes(self) -> int:
        """Attributes per instance in the realistic shape."""
        return self.attributes_per_instance or 44


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


def metadata_document(
    datastore_id: str, record: dict[str, Any], shape: SeriesShape | None = None
) -> dict[str, Any]:
    """Build the GetImageSetMetadata JSON document of one image-set version.

    Deterministic: instance UIDs, frame ids and checksums derive from a hash of the image-set
    id, so repeated calls (and other servers) give the same document. ``shape`` asks for
    realistic series (hundreds of instances, dozens of attributes each).
    """
    if shape is not None and not shape.default:
        document: dict[str, Any] = json.loads(metadata_json(datastore_id, record, shape))
        return document
    image_set_id, tags, rng, modality, series_uid = _start(record)
    instances = _small_instances(rng, series_uid, modality)
    return _document(datastore_id, image_set_id, tags, rng, series_uid, modality, instances)


def metadata_json(datastore_id: str, record: dict[str, Any], shape: SeriesShape) -> bytes:
    """The UTF-8 JSON text of :func:`metadata_document`, written directly for large series.

    Realistic series are written as text from per-series templates: building and dumping
    dicts of hundreds of instances would make the server, not the client, the bottleneck of
    a metadata benchmark.
    """
    image_set_id, tags, rng, modality, series_uid = _start(record)
    if shape.default:
        instances = _small_instances(rng, series_uid, modality)
        document = _document(datastore_id, image_set_id, tags, rng, series_uid, modality, instances)
        return json.dumps(document, ensure_ascii=False).encode("utf-8")
    instances_text = _realistic_instances(rng, series_uid, modality, tags, shape)
    placeholder = "\u0000INSTANCES\u0000"
    document = _document(
        datastore_id, image_set_id, tags, rng, series_uid, modality, {placeholder: None}
    )
    text = json.dumps(document, ensure_ascii=False)
    marker = json.dumps({placeholder: None})
    return text.replace(marker, instances_text, 1).encode("utf-8")


def _start(record: dict[str, Any]) -> tuple[str, dict[str, Any], random.Random, str, str]:
    image_set_id = record["imageSetId"]
    tags = record.get("DICOMTags") or {}
    rng = random.Random(int(hashlib.sha256(image_set_id.encode()).hexdigest(), 16))
    modality = str(tags.get("DICOMSeriesModality", "OT"))
    series_uid = str(tags.get("DICOMSeriesInstanceUID", "1.2.826.0.1.3680043.8.498.1"))
    return image_set_id, tags, rng, modality, series_uid


def _small_instances(rng: random.Random, series_uid: str, modality: str) -> dict[str, Any]:
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
    return instances


# (DICOM keyword, summary tag) of the Patient and Study modules, copied from the summary
_LEVEL_TAGS = {
    "Patient": (
        ("PatientID", "DICOMPatientId"),
        ("PatientName", "DICOMPatientName"),
        ("PatientBirthDate", "DICOMPatientBirthDate"),
        ("PatientSex", "DICOMPatientSex"),
    ),
    "Study": (
        ("StudyInstanceUID", "DICOMStudyInstanceUID"),
        ("StudyID", "DICOMStudyId"),
        ("StudyDate", "DICOMStudyDate"),
        ("StudyTime", "DICOMStudyTime"),
        ("AccessionNumber", "DICOMAccessionNumber"),
        ("StudyDescription", "DICOMStudyDescription"),
    ),
}


def _document(
    datastore_id: str,
    image_set_id: str,
    tags: dict[str, Any],
    rng: random.Random,
    series_uid: str,
    modality: str,
    instances: dict[str, Any],
) -> dict[str, Any]:
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
    levels = {
        level: {keyword: tags[tag] for keyword, tag in pairs if tag in tags}
        for level, pairs in _LEVEL_TAGS.items()
    }
    return {
        "SchemaVersion": "1.1",
        "DatastoreID": datastore_id,
        "ImageSetID": image_set_id,
        "Patient": {"DICOM": levels["Patient"]},
        "Study": {
            "DICOM": levels["Study"],
            "Series": {series_uid: {"DICOM": series_dicom, "Instances": instances}},
        },
    }


def gzip_document(document: dict[str, Any]) -> bytes:
    """Serialize and gzip a metadata document as the service sends it."""
    return gzip_json(json.dumps(document, ensure_ascii=False).encode("utf-8"))


def gzip_json(raw: bytes) -> bytes:
    """Gzip JSON text; large texts at level 1 (benchmarks measure the client, not our zlib)."""
    return gzip.compress(raw, compresslevel=9 if len(raw) < _FAST_GZIP_BYTES else 1, mtime=0)


# ---------------------------------------------------------------------------------------------
# Realistic series

_FAST_GZIP_BYTES = 256 * 1024
_KERNELS = {"CT": ["B30f", "STANDARD", "FC03", "Br40d"], "MR": ["", ""], "PT": ["VPFX"]}
_SERIES_CONSTANTS: list[tuple[str, Any]] = [
    ("SpecificCharacterSet", "ISO_IR 192"),
    ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
    ("PatientPosition", "HFS"),
    ("PixelRepresentation", 0),
    ("HighBit", 11),
    ("RescaleIntercept", -1024.0),
    ("RescaleSlope", 1.0),
    ("RescaleType", "HU"),
    ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
    ("PositionReferenceIndicator", ""),
    ("LossyImageCompression", "00"),
    ("BurnedInAnnotation", "NO"),
    ("PresentationLUTShape", "IDENTITY"),
    ("ScanOptions", "HELICAL MODE"),
    ("RotationDirection", "CW"),
    ("FilterType", "BODY FILTER"),
    ("FocalSpots", [1.2]),
    ("GantryDetectorTilt", 0.0),
    ("DistanceSourceToDetector", 1085.6),
    ("DistanceSourceToPatient", 595.0),
    ("ContrastBolusAgent", ""),
    ("AcquisitionNumber", 1),
]
# Filled per series from the generator (name, choices).
_SERIES_DRAWN: list[tuple[str, list[Any]]] = [
    ("KVP", [80.0, 100.0, 120.0, 140.0]),
    ("XRayTubeCurrent", [120, 180, 250, 300, 420]),
    ("ExposureTime", [500, 750, 1000]),
    ("GeneratorPower", [24, 36, 48, 60]),
    ("DataCollectionDiameter", [500.0]),
    ("ReconstructionDiameter", [350.0, 380.0, 420.0, 500.0]),
    ("TableHeight", [120.5, 140.0, 155.0, 170.5]),
    ("SoftwareVersions", ["syngo CT VA48A", "LightSpeed 14.4", "V3.5.2"]),
    ("DeviceSerialNumber", ["12345", "70012", "CT9931"]),
    ("StationName", ["CTAWP01", "RADCT2", "MRC25"]),
    ("ProtocolName", ["ROUTINE", "LOW DOSE", "ANGIO"]),
]
# Per-instance or per-series values computed below, in the order the budget takes them.
_INSTANCE_VARYING = (
    "SliceLocation",
    "ImagePositionPatient",
    "AcquisitionTime",
    "ContentTime",
    "InstanceCreationTime",
    "WindowCenter",
    "WindowWidth",
    "Exposure",
    "CTDIvol",
    "FrameOfReferenceUID",
    "AcquisitionDate",
    "ContentDate",
    "InstanceCreationDate",
    "PixelSpacing",
)


def _realistic_instances(
    rng: random.Random,
    series_uid: str,
    modality: str,
    tags: dict[str, Any],
    shape: SeriesShape,
) -> str:
    """JSON text of ``Instances``: ``instances_per_series`` with ``attributes`` attributes each.

    One format string per series holds everything constant (escaped JSON); each instance
    fills in its UID, number, position, times and frame with a single ``str.format``.
    """
    count = shape.instances_per_series or rng.randint(2, 5)
    matrix = _MATRIX.get(modality, 512)
    thickness = rng.choice([0.625, 1.0, 1.25, 2.5, 3.0, 5.0])
    spacing = round(rng.uniform(0.5, 0.98), 6)
    study_date = str(tags.get("DICOMStudyDate") or "20240101")
    start_us = rng.randrange(7 * 3600, 19 * 3600) * 1_000_000 + rng.randrange(1_000_000)
    center, width = rng.choice([(40, 400), (-600, 1500), (50, 350), (300, 1500)])
    base_exposure = rng.randrange(50, 400)
    per_series: dict[str, Any] = {
        "WindowCenter": center,
        "WindowWidth": width,
        "FrameOfReferenceUID": f"{series_uid}.9999.{rng.randrange(10**6, 10**7)}",
        "AcquisitionDate": study_date,
        "ContentDate": study_date,
        "InstanceCreationDate": study_date,
        "InstanceCreationTime": _clock_time(start_us + count * 350_000 + 2_000_000),
        "PixelSpacing": [spacing, spacing],
    }
    per_instance = {
        "SliceLocation": "{z}",
        "AcquisitionTime": '"{t}"',
        "ContentTime": '"{t}"',
        "Exposure": "{e}",
        "CTDIvol": "{c}",
        "ImagePositionPatient": "[-250.0, -250.0, {z}]",
    }
    constant: dict[str, Any] = {
        "Rows": matrix,
        "Columns": matrix,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "PhotometricInterpretation": "MONOCHROME2",
        "SamplesPerPixel": 1,
        "SliceThickness": thickness,
    }
    constant["ConvolutionKernel"] = rng.choice(_KERNELS.get(modality, ["STANDARD"]))
    for name, choices in _SERIES_DRAWN:
        constant[name] = rng.choice(choices)
    constant.update(_SERIES_CONSTANTS)
    # Attribute budget: 3 identifying, then the varying ones, then constants, then private
    # tags; trimmed from the end so the identifying ones always stay.
    room = shape.attributes - 3
    varying = _INSTANCE_VARYING[: max(0, room)]
    room -= len(varying)
    constant_items = list(constant.items())[: max(0, room)]
    room -= len(constant_items)
    constant_items += [(f"0019{0x1000 + i:04X}", f"PRIVATE {i}") for i in range(max(0, room))]

    def escaped(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False).replace("{", "{{").replace("}", "}}")

    fields = "".join(
        f',"{name}":{per_instance[name]}'
        if name in per_instance
        else f',"{name}":{escaped(per_series[name])}'
        for name in varying
    )
    fields += "".join(f",{escaped(name)}:{escaped(value)}" for name, value in constant_items)
    sop_class = escaped(_SOP_CLASSES.get(modality, "1.2.840.10008.5.1.4.1.1.7"))
    size = str(matrix)
    fmt = (  # str.format template: literal braces doubled
        '"{u}":{{"DICOM":{{"SOPInstanceUID":"{u}","InstanceNumber":{n},"SOPClassUID":'
        + sop_class
        + fields
        + '}},"ImageFrames":[{{"ID":"{f}","PixelDataChecksumFromBaseToFullResolution":'
        + '[{{"Width":'
        + size
        + ',"Height":'
        + size
        + ',"Checksum":{k}}}],'
        + '"MinPixelValue":0,"MaxPixelValue":{m},"FrameSizeInBytes":'
        + str(matrix * matrix * 2)
        + "}}]}}"
    )
    getrandbits = rng.getrandbits
    parts = []
    for number in range(1, count + 1):
        parts.append(
            fmt.format(
                u=f"{series_uid}.{number}.{100_000_000 + getrandbits(29)}",
                n=number,
                z=repr(round(-number * thickness, 3)),
                t=_clock_time(start_us + number * 350_000),
                e=base_exposure + getrandbits(5) - 16,
                c=repr(round(5.0 + 10.0 * rng.random(), 4)),
                f=f"{getrandbits(128):032x}",
                k=getrandbits(31),
                m=1000 + getrandbits(11),
            )
        )
    return "{" + ",".join(parts) + "}"


def _clock_time(us: int) -> str:
    """DICOM TM ``HHMMSS.ffffff`` of microseconds since midnight (wrapping at 24 h)."""
    seconds, fraction = divmod(us, 1_000_000)
    hours, rest = divmod(seconds % 86_400, 3600)
    return f"{hours:02d}{rest // 60:02d}{rest % 60:02d}.{fraction:06d}"
