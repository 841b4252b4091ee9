"""QIDO-RS vocabulary: search keys per level, query parameters (pure), DICOM JSON to typed frames.

Keywords, tags, VRs and VMs come from pydicom's data dictionary; the documented search keys per
level from HealthImaging's developer guide (see ``docs/dicomweb.md``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
from pydicom import datadict

from healthimaging_df.errors import QueryValidationError
from healthimaging_df.schema import pandas_type

Level = Literal["studies", "series", "instances"]
LEVELS: tuple[Level, ...] = ("studies", "series", "instances")
OPERATIONS: dict[Level, str] = {
    "studies": "SearchDICOMStudies",
    "series": "SearchDICOMSeries",
    "instances": "SearchDICOMInstances",
}
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000
MAX_INCLUDEFIELD = 50
OLDER_RECORD_CAP = 10_000

STUDY_KEYS: tuple[str, ...] = (
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
SERIES_KEYS: tuple[str, ...] = (
    *STUDY_KEYS,
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_KEYS: tuple[str, ...] = (*SERIES_KEYS, "SOPClassUID", "SOPInstanceUID")
SEARCH_KEYS: dict[Level, tuple[str, ...]] = {
    "studies": STUDY_KEYS,
    "series": SERIES_KEYS,
    "instances": INSTANCE_KEYS,
}
FUZZY_KEYS = frozenset({"PatientName", "ReferringPhysicianName"})

# Columns every frame of a level has, typed, in this order (more follow as they come back).
COLUMNS: dict[Level, tuple[str, ...]] = {
    "studies": (
        "StudyInstanceUID",
        *(k for k in STUDY_KEYS if k != "StudyInstanceUID"),
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "series": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "NumberOfSeriesRelatedInstances",
    ),
    "instances": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
    ),
}
ROW_KEY: dict[Level, str] = {
    "studies": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "instances": "SOPInstanceUID",
}

MatchValue = str | int | date | tuple[str | date | None, str | date | None]

_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_DA_RE = re.compile(r"[0-9]{8}")
_TM_RE = re.compile(r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?")
_MAX_VALUE = 1024
_INT_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"DS", "FD", "FL"})


def keyword(name: str, field: str = "keyword") -> str:
    """The DICOM keyword of *name* (a keyword, or a tag as 8 hex digits ``GGGGEEEE``).

    >>> keyword("00080060"), keyword("PatientName")
    ('Modality', 'PatientName')
    """
    if not isinstance(name, str):
        raise QueryValidationError(field, "must be a DICOM keyword or an 8-hex-digit tag")
    if _TAG_RE.fullmatch(name):
        found = datadict.keyword_for_tag(int(name, 16))
        if found:
            return str(found)
        return name.upper()  # a private or unknown tag keeps its number
    if datadict.tag_for_keyword(name) is None:
        raise QueryValidationError(field, "is not a DICOM keyword in pydicom's dictionary")
    return name


def vr_of(name: str) -> str:
    """The dictionary VR of a keyword (or ``GGGGEEEE`` tag); ``UN`` when unknown."""
    tag = int(name, 16) if _TAG_RE.fullmatch(name) else datadict.tag_for_keyword(name)
    try:
        return str(datadict.dictionary_VR(tag)) if tag is not None else "UN"
    except KeyError:
        return "UN"


def multi_valued(name: str) -> bool:
    """Whether the dictionary allows more than one value (VM other than ``1``)."""
    tag = int(name, 16) if _TAG_RE.fullmatch(name) else datadict.tag_for_keyword(name)
    try:
        return tag is not None and str(datadict.dictionary_VM(tag)) != "1"
    except KeyError:
        return False


def _text(value: str | date | None, vr: str, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, date):
        if vr != "DA":
            raise QueryValidationError(field, "takes a date only when its VR is DA")
        return value.strftime("%Y%m%d")
    if isinstance(value, str):
        return value
    raise QueryValidationError(field, "a range bound must be a string, a date or None")


def _match_value(name: str, value: MatchValue) -> str:
    """One match value as QIDO-RS text, validated by VR (the message never holds the value)."""
    vr = vr_of(name)
    if isinstance(value, bool):
        raise QueryValidationError(name, "takes a string, an integer, a date or a (low, high) pair")
    if isinstance(value, tuple):
        if len(value) != 2 or vr not in ("DA", "TM"):
            raise QueryValidationError(name, "a (low, high) range applies to DA and TM keys only")
        low, high = (_text(v, vr, name) for v in value)
        if not low and not high:
            raise QueryValidationError(name, "a range needs at least one bound")
        text = f"{low}-{high}"
    elif isinstance(value, int):
        if vr not in _INT_VRS:
            raise QueryValidationError(name, "takes an integer only when its VR is IS or US")
        text = str(value)
    elif isinstance(value, (str, date)):
        text = _text(value, vr, name)
    else:
        raise QueryValidationError(name, "takes a string, an integer, a date or a (low, high) pair")
    if len(text) > _MAX_VALUE or any(ord(c) < 32 for c in text):
        raise QueryValidationError(name, f"must be at most {_MAX_VALUE} printable characters")
    if text == "":
        return text  # universal matching
    _check_by_vr(name, vr, text)
    return text


def _check_by_vr(name: str, vr: str, text: str) -> None:
    """Refuse match text its VR cannot hold (dates, times, UIDs, integers; no wildcards)."""
    if vr in ("DA", "TM"):
        pattern = _DA_RE if vr == "DA" else _TM_RE
        parts = text.split("-")
        if len(parts) > 2 or not all(p == "" or pattern.fullmatch(p) for p in parts):
            raise QueryValidationError(
                name, f"must be a {vr} value or range A-B, A- or -B (no wildcards)"
            )
    elif vr == "UI":
        if _UID_RE.fullmatch(text) is None:
            raise QueryValidationError(name, "must be a UID: digits and dots, no wildcards")
    elif vr in _INT_VRS and not (text.isascii() and text.lstrip("+-").isdigit()):
        raise QueryValidationError(name, "must be an integer")


def query_params(
    level: Level,
    match: Mapping[str, MatchValue] | None = None,
    *,
    fuzzymatching: bool = False,
    includefield: Sequence[str] | Literal["all"] = (),
) -> dict[str, Any]:
    """The QIDO-RS query parameters of a search, validated; deterministic (sorted keys).

    Paging (``limit``/``offset``) is added per request by the client.

    >>> query_params("series", {"00080060": "CT"}, includefield=["Manufacturer"])
    {'Modality': 'CT', 'includefield': ['Manufacturer']}
    >>> query_params("studies", {"StudyDate": ("20200101", None)}, fuzzymatching=True)
    {'StudyDate': '20200101-', 'fuzzymatching': 'true'}
    """
    if level not in LEVELS:
        raise QueryValidationError("level", f"must be one of {', '.join(LEVELS)}")
    if not isinstance(fuzzymatching, bool):
        raise QueryValidationError("fuzzymatching", "must be True or False")
    params: dict[str, Any] = {}
    allowed = SEARCH_KEYS[level]
    for name, value in (match or {}).items():
        key = keyword(name)
        if key not in allowed:
            raise QueryValidationError(
                key, f"is not a documented QIDO-RS search key at the {level} level"
            )
        if key in params:
            raise QueryValidationError(key, "is given twice (as a keyword and as a tag)")
        params[key] = _match_value(key, value)
    if fuzzymatching:
        params["fuzzymatching"] = "true"
    fields = include_fields(includefield)
    if fields:
        params["includefield"] = fields
    return dict(sorted(params.items()))


def include_fields(includefield: Sequence[str] | Literal["all"]) -> list[str]:
    """Validated ``includefield`` values: ``["all"]``, or sorted distinct keywords/tags."""
    if includefield == "all":
        return ["all"]
    if isinstance(includefield, str) or not isinstance(includefield, Sequence):
        raise QueryValidationError("includefield", "must be 'all' or a list of keywords")
    fields = sorted({keyword(name, "includefield") for name in includefield})
    if len(fields) > MAX_INCLUDEFIELD:
        raise QueryValidationError("includefield", f"takes at most {MAX_INCLUDEFIELD} attributes")
    return fields


# -- DICOM JSON ----------------------------------------------------------------------------------


def decode_dataset(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """One DICOM JSON object as ``{keyword: value}``; PN as its Alphabetic text.

    Single-valued attributes (dictionary VM 1) hold a scalar, others a list; an attribute
    without ``Value`` is None.

    >>> decode_dataset({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
    ...                 "00080061": {"vr": "CS", "Value": ["CT", "SR"]}})
    {'PatientName': 'DOE^JANE', 'ModalitiesInStudy': ['CT', 'SR']}
    """
    row: dict[str, Any] = {}
    for tag, element in dataset.items():
        name = keyword(tag) if _TAG_RE.fullmatch(tag) else tag
        if not isinstance(element, Mapping):
            continue
        values = element.get("Value")
        vr = element.get("vr", "UN")
        if not isinstance(values, list) or not values:
            row[name] = None
            continue
        if vr == "PN":
            values = [v.get("Alphabetic") if isinstance(v, Mapping) else v for v in values]
        elif vr == "SQ":
            values = [json.dumps(v, sort_keys=True) for v in values]
        row[name] = values if multi_valued(name) else values[0]
    return row


def _arrow_type(name: str) -> pa.DataType:
    vr = vr_of(name)
    if vr == "DA":
        base: pa.DataType = pa.date32()
    elif vr in _INT_VRS:
        base = pa.int64()
    elif vr in _FLOAT_VRS:
        base = pa.float64()
    else:
        base = pa.string()
    return pa.list_(base) if multi_valued(name) else base


def _date(value: Any) -> date | None:
    if isinstance(value, str) and _DA_RE.fullmatch(value):
        try:
            return date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            return None
    return None  # partial dates ("2019") and other malformed text are NA


def _scalar(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_date32(arrow_type):
        return _date(value)
    if pa.types.is_int64(arrow_type):
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if pa.types.is_float64(arrow_type):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return value if isinstance(value, str) else json.dumps(value)


def _array(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_list(arrow_type):
        inner = arrow_type.value_type
        converted: list[Any] = [
            None if v is None else [_scalar(x, inner) for x in (v if isinstance(v, list) else [v])]
            for v in values
        ]
    else:
        converted = [_scalar(v[0] if isinstance(v, list) else v, arrow_type) for v in values]
    return pa.array(converted, type=arrow_type)


def rows_to_frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A frame of decoded rows: *columns* first (always present), then any others, typed by VR.

    DA -> ``date32[pyarrow]`` (NA for partial dates), IS/US -> ``Int64``, DS -> ``Float64``,
    PN/CS/LO/SH/UI/TM... -> ``string``; multi-valued attributes -> Arrow lists.
    """
    names: dict[str, None] = dict.fromkeys(columns)
    for row in rows:
        for name in row:
            names.setdefault(name, None)
    arrays = []
    for name in names:
        arrow_type = _arrow_type(name)
        arrays.append(_array([row.get(name) for row in rows], arrow_type))
    table = pa.Table.from_arrays(arrays, names=list(names))
    frame: pd.DataFrame = table.to_pandas(types_mapper=pandas_type)
    return frame
