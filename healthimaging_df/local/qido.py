"""DICOMweb QIDO-RS for the local service: studies, series and instances in the DICOM JSON model.

Serves ``/datastore/{id}/studies``, ``/studies/{S}/series``, ``/studies/{S}/instances``,
``/studies/{S}/series/{Se}/instances``, ``/series`` and ``/instances`` over the same image sets
SearchImageSets reads, primary ones only, as HealthImaging documents it (see
``docs/dicomweb.md``). Summary tags give the study and series keys; series attributes beyond the
summaries (SeriesDescription, Manufacturer...) and instances come from the generated metadata
document that GetImageSetMetadata serves, read here without counting as an access.

Choices where the service's documentation is silent are marked "local choice" below; a test
pins each of them so a change is deliberate.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from healthimaging_df.local.backend import Backend, ValidationError, metadata_document

__all__ = [
    "MAX_INCLUDEFIELD",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "OLDER_RECORD_CAP",
    "RULES",
    "QidoApp",
    "QidoSettings",
]

MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000
MAX_INCLUDEFIELD = 50
OLDER_RECORD_CAP = 10_000
SERVICE = "medical-imaging"
_INSTANCE_CACHE = 20_000

STUDIES, SERIES, INSTANCES = "SearchDICOMStudies", "SearchDICOMSeries", "SearchDICOMInstances"

RULES = [
    Rule("/datastore/<datastore_id>/studies", methods=["GET"], endpoint=STUDIES),
    Rule("/datastore/<datastore_id>/series", methods=["GET"], endpoint=SERIES),
    Rule("/datastore/<datastore_id>/instances", methods=["GET"], endpoint=INSTANCES),
    Rule("/datastore/<datastore_id>/studies/<study_uid>/series", methods=["GET"], endpoint=SERIES),
    Rule(
        "/datastore/<datastore_id>/studies/<study_uid>/instances",
        methods=["GET"],
        endpoint=INSTANCES,
    ),
    Rule(
        "/datastore/<datastore_id>/studies/<study_uid>/series/<series_uid>/instances",
        methods=["GET"],
        endpoint=INSTANCES,
    ),
]

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
_KEYS = {STUDIES: STUDY_KEYS, SERIES: SERIES_KEYS, INSTANCES: INSTANCE_KEYS}

_STUDY_RETURN = (*STUDY_KEYS, "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
_SERIES_RETURN = (
    "StudyInstanceUID",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "NumberOfSeriesRelatedInstances",
)
_INSTANCE_RETURN = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
)
_STUDY_ALL = (*_STUDY_RETURN, "PatientSex")
_SERIES_ALL = (*_SERIES_RETURN, "SeriesDescription", "Manufacturer", "BodyPartExamined")
_INSTANCE_ALL = tuple(k for k in ATTRIBUTES if k not in _STUDY_ALL and k not in _SERIES_ALL)
# Attributes only the metadata document knows (reading them costs a document per image set).
_FROM_METADATA = frozenset(
    {
        "SeriesDescription",
        "Manufacturer",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "NumberOfSeriesRelatedInstances",
        "NumberOfStudyRelatedInstances",
    }
)

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_DATE_RE = re.compile(r"[0-9]{8}")
_TIME_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_WORD_RE = re.compile(r"[\^\s=,]+")
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=[^/\s]+/[0-9]{8}/(?P<region>[^/\s]+)/(?P<service>[^/\s]+)/"
    r"aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?Signature=[0-9a-f]{64}"
)


class AuthError(ValidationError):
    """The request is not SigV4-signed for ``medical-imaging`` (HTTP 403)."""

    code = "InvalidSignatureException"
    status = 403


@dataclass
class QidoSettings:
    """QIDO-RS fault settings of one local server; mutable at runtime.

    Attributes
    ----------
    record_cap
        The older revision's limit: at most this many records per query (10,000 there), the
        rest unreachable at any offset. None (the default) serves the newer revision.
    refuse_past_cap
        With a cap, answer an offset at or past it with 400 instead of an empty page (which of
        the two the older revision does is undocumented).
    """

    record_cap: int | None = None
    refuse_past_cap: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot be honoured."""
        if self.record_cap is not None and self.record_cap < 1:
            raise ValueError("record_cap must be >= 1 (or None for no cap)")


# ---------------------------------------------------------------------------------------------
# The index: studies and series of the primary image sets, rebuilt when the datastore changes


@dataclass
class _Series:
    uid: str
    study_uid: str
    record: dict[str, Any]


@dataclass
class _Study:
    uid: str
    record: dict[str, Any]
    updated: datetime
    series: list[_Series] = field(default_factory=list)


@dataclass
class _Index:
    stamp: Any
    studies: dict[str, _Study]
    series: dict[str, _Series]


def _build_index(records: Iterable[dict[str, Any]], stamp: Any) -> _Index:
    series: dict[str, _Series] = {}
    for record in records:
        if record.get("isPrimary", True) is not True:
            continue  # QIDO sees primary image sets only
        tags = record.get("DICOMTags") or {}
        study_uid, series_uid = (
            tags.get("DICOMStudyInstanceUID"),
            tags.get("DICOMSeriesInstanceUID"),
        )
        if not isinstance(study_uid, str) or not isinstance(series_uid, str):
            continue
        old = series.get(series_uid)
        # Local choice: two primary image sets of one series show the latest updated one.
        if old is None or (record["updatedAt"], record["imageSetId"]) > (
            old.record["updatedAt"],
            old.record["imageSetId"],
        ):
            series[series_uid] = _Series(series_uid, study_uid, record)
    studies: dict[str, _Study] = {}
    for entry in series.values():
        record = entry.record
        study = studies.get(entry.study_uid)
        if study is None:
            studies[entry.study_uid] = _Study(entry.study_uid, record, record["updatedAt"], [entry])
            continue
        study.series.append(entry)
        if record["updatedAt"] > study.updated:
            study.updated, study.record = record["updatedAt"], record
    return _Index(stamp, studies, series)


# ---------------------------------------------------------------------------------------------
# Matching


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


Matcher = Callable[[Any], bool]


def _matcher(keyword: str, vr: str, value: str, fuzzy: bool) -> Matcher | None:
    """A predicate over one attribute's stored value; None for universal matching."""
    if value == "" or (vr not in ("DA", "TM", "UI", "IS", "US") and value.strip("*") == ""):
        return None  # universal matching (PS3.4 C.2.2.2.3; "*" alone is the same, C.2.2.2.4)
    if vr in ("DA", "TM"):
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
    if vr in ("IS", "US"):
        if not (value.isascii() and value.lstrip("+-").isdigit()):
            raise ValidationError(f"{keyword} must be an integer")
        number = int(value)
        return lambda stored: isinstance(stored, int) and stored == number
    if vr == "UI":
        if _UID_RE.fullmatch(value) is None:
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


def _resolve(name: str) -> str | None:
    if _TAG_RE.fullmatch(name):
        return _BY_TAG.get(name.upper())
    return name if name in ATTRIBUTES else None


# ---------------------------------------------------------------------------------------------
# The application


@dataclass
class _Request:
    level: str
    match: dict[str, Matcher | None]
    include: set[str]
    include_all: bool
    limit: int
    offset: int


class QidoApp:
    """QIDO-RS handlers over one :class:`Backend` (``handlers()`` plugs them into the wire layer)."""

    def __init__(self, backend: Backend, settings: QidoSettings | None = None) -> None:
        self.backend = backend
        self.settings = settings if settings is not None else QidoSettings()
        self._lock = threading.Lock()
        self._indexes: dict[str, _Index] = {}
        # Series attributes and instance counts of every document read (small, kept); the
        # instances themselves only for the most recent _INSTANCE_CACHE image sets.
        self._series_cache: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
        self._instance_cache: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()

    def handlers(self) -> dict[str, Callable[..., Response]]:
        """Operation name -> handler(request, body, **path arguments)."""
        return {STUDIES: self._studies, SERIES: self._series, INSTANCES: self._instances}

    # -- state ------------------------------------------------------------------------------

    def _index(self, datastore_id: str) -> _Index:
        # get_datastore's updatedAt moves on every add and update: rebuild only then.
        stamp = self.backend.get_datastore(datastore_id)["updatedAt"]
        with self._lock:
            index = self._indexes.get(datastore_id)
        if index is not None and index.stamp == stamp:
            return index
        index = _build_index(self.backend.image_sets(datastore_id), stamp)
        with self._lock:
            self._indexes[datastore_id] = index
        return index

    def _read(self, datastore_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
        key = (record["imageSetId"], record["version"])
        document = metadata_document(datastore_id, record)
        (series,) = document["Study"]["Series"].values()
        instances = [i["DICOM"] for i in series["Instances"].values()]
        instances.sort(key=lambda d: (d.get("InstanceNumber", 1 << 62), d["SOPInstanceUID"]))
        with self._lock:
            self._series_cache[key] = (dict(series["DICOM"]), len(instances))
            self._instance_cache[key] = instances
            while len(self._instance_cache) > _INSTANCE_CACHE:
                self._instance_cache.popitem(last=False)
        return instances

    def _series_document(
        self, datastore_id: str, record: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        """Series attributes and instance count of one image set's metadata (cached)."""
        key = (record["imageSetId"], record["version"])
        with self._lock:
            cached = self._series_cache.get(key)
        if cached is None:
            self._read(datastore_id, record)
            cached = self._series_cache[key]
        return cached

    def _instances_of(self, datastore_id: str, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The instances (DICOM attributes) of one image set, InstanceNumber ascending."""
        key = (record["imageSetId"], record["version"])
        with self._lock:
            cached = self._instance_cache.get(key)
            if cached is not None:
                self._instance_cache.move_to_end(key)
                return cached
        return self._read(datastore_id, record)

    # -- attribute values -------------------------------------------------------------------

    def _study_value(self, ds: str, study: _Study, keyword: str) -> Any:
        if keyword == "ModalitiesInStudy":
            found = {s.record["DICOMTags"].get("DICOMSeriesModality") for s in study.series}
            return sorted(m for m in found if isinstance(m, str)) or None
        if keyword == "NumberOfStudyRelatedSeries":
            return len(study.series)
        if keyword == "NumberOfStudyRelatedInstances":
            return sum(self._series_document(ds, s.record)[1] for s in study.series)
        return self._tag(study.record, keyword)

    def _series_value(self, ds: str, series: _Series, keyword: str) -> Any:
        if keyword == "NumberOfSeriesRelatedInstances":
            return self._series_document(ds, series.record)[1]
        if keyword in _FROM_METADATA:
            return self._series_document(ds, series.record)[0].get(keyword)
        return self._tag(series.record, keyword)

    @staticmethod
    def _tag(record: dict[str, Any], keyword: str) -> Any:
        summary_tag = ATTRIBUTES[keyword][2]
        return None if summary_tag is None else record["DICOMTags"].get(summary_tag)

    # -- requests ---------------------------------------------------------------------------

    def _parse(self, request: Request, level: str, allowed: tuple[str, ...]) -> _Request:
        _check_signature(request)
        args = request.args
        fuzzy_text = args.get("fuzzymatching", "false")
        if fuzzy_text not in ("true", "false"):
            raise ValidationError("fuzzymatching must be true or false")
        fuzzy = fuzzy_text == "true"
        limit = _integer(args, "limit", MAX_LIMIT, 1, MAX_LIMIT)
        offset = _integer(args, "offset", 0, 0, MAX_OFFSET)
        include: set[str] = set()
        include_all = False
        names = [n for value in args.getlist("includefield") for n in value.split(",") if n]
        if len(names) > MAX_INCLUDEFIELD:
            raise ValidationError(f"includefield takes at most {MAX_INCLUDEFIELD} attributes")
        for name in names:
            if name == "all":
                include_all = True
            elif (keyword := _resolve(name)) is not None:
                include.add(keyword)  # unknown tags are silently omitted
        match: dict[str, Matcher | None] = {}
        for name in args:
            if name in ("fuzzymatching", "limit", "offset", "includefield"):
                continue
            keyword = _resolve(name)
            if keyword is None or keyword not in allowed:
                raise ValidationError(f"{name} is not a search key of this QIDO-RS resource")
            values = args.getlist(name)
            if len(values) != 1 or keyword in match:
                raise ValidationError(f"{name} is given more than once")
            match[keyword] = _matcher(keyword, ATTRIBUTES[keyword][1], values[0], fuzzy)
        return _Request(level, match, include, include_all, limit, offset)

    def _page(self, rows: list[Any], parsed: _Request) -> list[Any]:
        cap = self.settings.record_cap
        if cap is not None:
            if self.settings.refuse_past_cap and parsed.offset >= cap:
                raise ValidationError(f"offset must be below {cap} (the per-query record cap)")
            rows = rows[:cap]
        return rows[parsed.offset : parsed.offset + parsed.limit]

    def _studies(self, request: Request, body: bytes, datastore_id: str) -> Response:
        parsed = self._parse(request, STUDIES, STUDY_KEYS)
        index = self._index(datastore_id)
        rows = [s for s in index.studies.values() if self._study_matches(datastore_id, s, parsed)]
        # Documented: last update, newest first (local choice: ties by StudyInstanceUID).
        rows.sort(key=lambda s: s.uid)
        rows.sort(key=lambda s: s.updated, reverse=True)
        keywords = self._returned(parsed, _STUDY_RETURN, _STUDY_ALL)
        out = [
            _dataset({k: self._study_value(datastore_id, s, k) for k in keywords}, keywords)
            for s in self._page(rows, parsed)
        ]
        return _dicom_json(out)

    def _series(
        self, request: Request, body: bytes, datastore_id: str, study_uid: str | None = None
    ) -> Response:
        parsed = self._parse(request, SERIES, SERIES_KEYS)
        index = self._index(datastore_id)
        studies = self._scope(index, study_uid)
        rows = [
            (study, series)
            for study in studies
            if self._study_matches(datastore_id, study, parsed)
            for series in study.series
            if self._series_matches(datastore_id, series, parsed)
        ]
        # Documented: SeriesNumber ascending (local choice: missing numbers last, then by UID).
        rows.sort(
            key=lambda pair: _number_key(
                pair[1].record["DICOMTags"].get("DICOMSeriesNumber"), pair[1].uid
            )
        )
        study_part = () if study_uid is not None else _STUDY_RETURN
        keywords = self._returned(
            parsed, (*study_part, *_SERIES_RETURN), (*_STUDY_ALL, *_SERIES_ALL)
        )
        out = [
            _dataset(self._values(datastore_id, study, series, None, keywords), keywords)
            for study, series in self._page(rows, parsed)
        ]
        return _dicom_json(out)

    def _instances(
        self,
        request: Request,
        body: bytes,
        datastore_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> Response:
        parsed = self._parse(request, INSTANCES, INSTANCE_KEYS)
        index = self._index(datastore_id)
        if series_uid is not None and _UID_RE.fullmatch(series_uid) is None:
            raise ValidationError("SeriesInstanceUID in the path must be a UID")
        rows: list[tuple[_Study, _Series, dict[str, Any]]] = []
        for study in self._scope(index, study_uid):
            if not self._study_matches(datastore_id, study, parsed):
                continue
            for series in study.series:
                if series_uid is not None and series.uid != series_uid:
                    continue
                if not self._series_matches(datastore_id, series, parsed):
                    continue
                for instance in self._instances_of(datastore_id, series.record):
                    if all(
                        matcher is None or matcher(instance.get(keyword))
                        for keyword, matcher in parsed.match.items()
                        if keyword in ("SOPClassUID", "SOPInstanceUID")
                    ):
                        rows.append((study, series, instance))
        # Documented: InstanceNumber ascending (local choice: then SOPInstanceUID).
        rows.sort(
            key=lambda row: _number_key(row[2].get("InstanceNumber"), row[2]["SOPInstanceUID"])
        )
        upper: tuple[str, ...] = ()
        if series_uid is None:
            upper = _SERIES_RETURN if study_uid is not None else (*_STUDY_RETURN, *_SERIES_RETURN)
        keywords = self._returned(
            parsed, (*upper, *_INSTANCE_RETURN), (*_STUDY_ALL, *_SERIES_ALL, *_INSTANCE_ALL)
        )
        out = [
            _dataset(self._values(datastore_id, study, series, instance, keywords), keywords)
            for study, series, instance in self._page(rows, parsed)
        ]
        return _dicom_json(out)

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _scope(index: _Index, study_uid: str | None) -> list[_Study]:
        if study_uid is None:
            return list(index.studies.values())
        if _UID_RE.fullmatch(study_uid) is None:
            raise ValidationError("StudyInstanceUID in the path must be a UID")
        study = index.studies.get(study_uid)
        return [] if study is None else [study]  # local choice: an unknown study is no match

    @staticmethod
    def _returned(
        parsed: _Request, default: tuple[str, ...], everything: tuple[str, ...]
    ) -> list[str]:
        chosen = dict.fromkeys(default)
        chosen.update(dict.fromkeys(k for k in parsed.match if k in everything))
        for keyword in everything if parsed.include_all else parsed.include:
            if keyword in everything:
                chosen[keyword] = None
        return list(chosen)

    def _study_matches(self, ds: str, study: _Study, parsed: _Request) -> bool:
        for keyword, matcher in parsed.match.items():
            if matcher is None or keyword not in STUDY_KEYS:
                continue
            if not _any(matcher, self._study_value(ds, study, keyword)):
                return False
        return True

    def _series_matches(self, ds: str, series: _Series, parsed: _Request) -> bool:
        for keyword, matcher in parsed.match.items():
            if matcher is None or keyword in STUDY_KEYS or keyword not in SERIES_KEYS:
                continue
            if not _any(matcher, self._series_value(ds, series, keyword)):
                return False
        return True

    def _values(
        self,
        ds: str,
        study: _Study,
        series: _Series,
        instance: dict[str, Any] | None,
        keywords: list[str],
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for keyword in keywords:
            if keyword in _STUDY_ALL:
                values[keyword] = self._study_value(ds, study, keyword)
            elif keyword in _SERIES_ALL:
                values[keyword] = self._series_value(ds, series, keyword)
            elif instance is not None:
                values[keyword] = instance.get(keyword)
        return values


def _any(matcher: Matcher, stored: Any) -> bool:
    """Multi-valued attributes match when any value does."""
    if isinstance(stored, list):
        return any(matcher(v) for v in stored)
    return matcher(stored)


def _number_key(number: Any, uid: str) -> tuple[int, int, str]:
    if isinstance(number, int):
        return (0, number, uid)
    return (1, 0, uid)


def _integer(args: Any, name: str, default: int, low: int, high: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 8) or not low <= int(raw) <= high:
        raise ValidationError(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _check_signature(request: Request) -> None:
    """Require a SigV4 ``Authorization`` for ``medical-imaging``; the signature is not verified.

    The local service, like the rest of it, does not check secrets; it does check that a QIDO
    request is signed at all, for the right service, with the host and date signed.
    """
    header = request.headers.get("Authorization")
    if header is None or request.headers.get("X-Amz-Date") is None:
        raise AuthError("the request is not signed: Authorization and X-Amz-Date are required")
    match = _AUTH_RE.fullmatch(header.strip())
    if match is None:
        raise AuthError("Authorization is not an AWS4-HMAC-SHA256 signature")
    if match.group("service") != SERVICE:
        raise AuthError(f"the credential scope must name the service {SERVICE}")
    signed = match.group("signed").split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        raise AuthError("SignedHeaders must include host and x-amz-date")


def _dataset(values: dict[str, Any], keywords: list[str]) -> dict[str, Any]:
    """One DICOM JSON object (PS3.18 Annex F): ``{tag: {"vr": VR, "Value": [...]}}``."""
    out: dict[str, Any] = {}
    for keyword in keywords:
        tag, vr, _ = ATTRIBUTES[keyword]
        value = values.get(keyword)
        element: dict[str, Any] = {"vr": vr}
        items = value if isinstance(value, list) else [value]
        items = [v for v in items if v is not None and v != ""]
        if items:
            if vr == "PN":
                items = [{"Alphabetic": v} for v in items]
            element["Value"] = items
        out[tag] = element
    return dict(sorted(out.items()))


def _dicom_json(datasets: list[dict[str, Any]]) -> Response:
    # Local choice: no match is 200 with [] (PS3.18 also allows 204).
    body = json.dumps(datasets, ensure_ascii=False).encode("utf-8")
    return Response(body, status=200, content_type="application/dicom+json")
