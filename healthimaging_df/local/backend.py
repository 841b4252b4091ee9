"""State and semantics of the local HealthImaging service: datastores, image sets, search.

No HTTP here (that is :mod:`healthimaging_df.local.wire`): this module can be driven from
Python directly, which keeps the search rules unit-testable and lets tests seed and mutate a
datastore while a boto3 client reads it over HTTP. Every public method takes one lock, so a
threaded server may call it concurrently.

Search is indexed, not scanned: a dict per EQUAL attribute and one sorted list of
``(key, imageSetId)`` per sort field, so a page costs a bisect plus a short walk even at
100,000 image sets.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import gzip
import hashlib
import hmac
import json
import os
import random
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "BETWEEN_ATTRIBUTES",
    "EQUAL_ATTRIBUTES",
    "SORT_FIELDS",
    "Backend",
    "BackendError",
    "ConflictError",
    "ResourceNotFound",
    "ValidationError",
    "parse_timestamp",
    "study_datetime",
]

UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1, 1, 1)
_ONE_US = timedelta(microseconds=1)
ACCOUNT = "123456789012"
REGION = "us-east-1"

EQUAL_ATTRIBUTES = (
    "DICOMPatientId",
    "DICOMAccessionNumber",
    "DICOMStudyId",
    "DICOMStudyInstanceUID",
    "DICOMSeriesInstanceUID",
    "isPrimary",
)
_TAG_EQUAL_ATTRIBUTES = EQUAL_ATTRIBUTES[:5]
_UID_ATTRIBUTES = ("DICOMStudyInstanceUID", "DICOMSeriesInstanceUID")
BETWEEN_ATTRIBUTES = ("createdAt", "updatedAt", "DICOMStudyDateAndTime")
SORT_FIELDS = BETWEEN_ATTRIBUTES
SORT_ORDERS = ("ASC", "DESC")
_ALL_ATTRIBUTES = frozenset(EQUAL_ATTRIBUTES + BETWEEN_ATTRIBUTES)
MAX_STRING = 512
MAX_RESULTS = 50
MAX_TOKEN = 8192
# Materialize-and-sort a candidate set this small rather than walk a sort index.
_MATERIALIZE_LIMIT = 5000

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_ID_RE = re.compile(r"[0-9a-z]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9._/#-]{1,256}")
# ASCII digits only: Python's \d also matches other scripts' digits, which DICOM never allows.
_REQ_DATE_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_REQ_TIME_RE = re.compile(r"([0-9]{2})([0-9]{2})([0-9]{2})(?:\.([0-9]{1,6}))?")
_REC_TIME_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")


class BackendError(Exception):
    """A service error with the wire ``code`` and HTTP ``status`` botocore maps to ClientError.

    Messages name the offending request element, never its value: search values are PHI.
    """

    code = "InternalServerException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(BackendError):
    """The request breaks a rule of the service model or of the search semantics (HTTP 400)."""

    code = "ValidationException"
    status = 400


class ResourceNotFound(BackendError):
    """The datastore, image set or version does not exist (HTTP 404)."""

    code = "ResourceNotFoundException"
    status = 404


class ConflictError(BackendError):
    """The request conflicts with the current state, e.g. a duplicate image-set id (HTTP 409)."""

    code = "ConflictException"
    status = 409


def _to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def parse_timestamp(value: Any, where: str) -> datetime:
    """Parse a request timestamp: a datetime, epoch seconds, or an ISO-8601 string; return UTC.

    botocore sends whole epoch seconds; hand-written requests may send ISO-8601 text.

    Examples
    --------
    >>> parse_timestamp(0, "x").isoformat()
    '1970-01-01T00:00:00+00:00'
    >>> parse_timestamp("2024-03-11T15:00:05.074000-07:00", "x").isoformat()
    '2024-03-11T22:00:05.074000+00:00'
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return _EPOCH + timedelta(microseconds=round(value * 1_000_000))
        except (OverflowError, ValueError):
            raise ValidationError(f"{where} is not a valid timestamp") from None
    if isinstance(value, str) and len(value) <= 64:
        text = value.strip()
        try:
            return parse_timestamp(float(text), where)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValidationError(
                f"{where} must be an ISO-8601 timestamp or epoch seconds"
            ) from None
        return parse_timestamp(parsed, where)
    raise ValidationError(f"{where} must be an ISO-8601 timestamp or epoch seconds")


def study_datetime(tags: dict[str, Any]) -> datetime | None:
    """A record's study date and time as a naive wall-clock datetime, or None if unusable.

    DICOMStudyDate must be a full ``YYYYMMDD`` calendar date; DICOMStudyTime may be ``HH``,
    ``HHMM``, ``HHMMSS`` or ``HHMMSS.f`` (1-6 digits); a missing or empty time is midnight.
    Partial or empty dates, or an unparsable time, give None: such an image set never matches a
    DICOMStudyDateAndTime filter and sorts after all dated ones.

    Examples
    --------
    >>> study_datetime({"DICOMStudyDate": "20240229", "DICOMStudyTime": "0930"})
    datetime.datetime(2024, 2, 29, 9, 30)
    >>> study_datetime({"DICOMStudyDate": "201903"}) is None
    True
    """
    date_text = tags.get("DICOMStudyDate")
    if not isinstance(date_text, str):
        return None
    match = _REQ_DATE_RE.fullmatch(date_text)
    if match is None:
        return None
    time_text = tags.get("DICOMStudyTime")
    hour = minute = second = micro = 0
    if isinstance(time_text, str) and time_text != "":
        tmatch = _REC_TIME_RE.fullmatch(time_text)
        if tmatch is None:
            return None
        hour = int(tmatch.group(1))
        minute = int(tmatch.group(2) or 0)
        second = int(tmatch.group(3) or 0)
        micro = int((tmatch.group(4) or "0").ljust(6, "0"))
    elif time_text is not None and not isinstance(time_text, str):
        return None
    try:
        return datetime(
            int(match.group(1)),
            int(match.group(2)),
            int(match.group(3)),
            hour,
            minute,
            second,
            micro,
        )
    except ValueError:
        return None


def _study_key(tags: dict[str, Any]) -> int | None:
    moment = study_datetime(tags)
    return None if moment is None else (moment - _NAIVE_EPOCH) // _ONE_US


# ---------------------------------------------------------------------------------------------
# Query parsing


@dataclass(frozen=True)
class _Query:
    """A validated search: EQUAL constraints, inclusive key ranges, and the effective sort."""

    equal: dict[str, Any]
    ranges: dict[str, tuple[int, int]]
    sort_field: str
    descending: bool
    sort_given: dict[str, str] | None
    canonical: str


def _require_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be an object")
    return value


def _check_members(value: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = set(value) - set(allowed)
    if unknown:
        raise ValidationError(f"{where} has {len(unknown)} unknown member(s)")


def _parse_equal_value(attribute: str, value: Any, where: str) -> Any:
    if attribute == "isPrimary":
        if not isinstance(value, bool):
            raise ValidationError(f"{where}: isPrimary must be a boolean")
        return value
    if not isinstance(value, str):
        raise ValidationError(f"{where}: {attribute} must be a string")
    if value == "":
        raise ValidationError(f"{where}: {attribute} must not be empty")
    if len(value) > MAX_STRING:
        raise ValidationError(f"{where}: {attribute} must be at most {MAX_STRING} characters")
    if attribute in _UID_ATTRIBUTES and _UID_RE.fullmatch(value) is None:
        raise ValidationError(
            f"{where}: {attribute} must match [0-9.]+ (digits and dots, no leading, trailing "
            "or doubled dot)"
        )
    return value


def _parse_study_value(value: Any, where: str) -> int:
    item = _require_dict(value, f"{where}.DICOMStudyDateAndTime")
    _check_members(item, ("DICOMStudyDate", "DICOMStudyTime"), f"{where}.DICOMStudyDateAndTime")
    date_text = item.get("DICOMStudyDate")
    if not isinstance(date_text, str):
        raise ValidationError(f"{where}: DICOMStudyDateAndTime.DICOMStudyDate is required")
    date_match = _REQ_DATE_RE.fullmatch(date_text)
    if date_match is None:
        raise ValidationError(f"{where}: DICOMStudyDate must be 8 digits YYYYMMDD")
    time_text = item.get("DICOMStudyTime")
    hour = minute = second = micro = 0
    if time_text is not None:
        time_match = _REQ_TIME_RE.fullmatch(time_text) if isinstance(time_text, str) else None
        if time_match is None:
            raise ValidationError(f"{where}: DICOMStudyTime must be HHMMSS or HHMMSS.ffffff")
        hour, minute, second = (int(time_match.group(i)) for i in (1, 2, 3))
        micro = int((time_match.group(4) or "0").ljust(6, "0"))
    try:
        year, month, day = (int(date_match.group(i)) for i in (1, 2, 3))
        moment = datetime(year, month, day)
    except ValueError:
        raise ValidationError(f"{where}: DICOMStudyDate is not a calendar date") from None
    try:
        moment = moment.replace(hour=hour, minute=minute, second=second, microsecond=micro)
    except ValueError:
        raise ValidationError(f"{where}: DICOMStudyTime is not a valid time of day") from None
    return (moment - _NAIVE_EPOCH) // _ONE_US


def _parse_between_value(attribute: str, value: Any, where: str) -> int:
    if attribute == "DICOMStudyDateAndTime":
        return _parse_study_value(value, where)
    return _to_us(parse_timestamp(value, f"{where}.{attribute}"))


def parse_criteria(criteria: Any, datastore_id: str) -> _Query:
    """Validate ``searchCriteria`` (already JSON-decoded) into a :class:`_Query`.

    Raises
    ------
    ValidationError
        On any rule of the service model or the documented search semantics.
    """
    if criteria is None:
        criteria = {}
    criteria = _require_dict(criteria, "searchCriteria")
    _check_members(criteria, ("filters", "sort"), "searchCriteria")
    equal: dict[str, Any] = {}
    ranges: dict[str, tuple[int, int]] = {}
    canonical_filters: list[list[Any]] = []
    if "filters" in criteria:
        filters = criteria["filters"]
        if not isinstance(filters, list) or not 1 <= len(filters) <= 2:
            raise ValidationError(
                "searchCriteria.filters must be a list of 1 to 2 filters "
                "(omit searchCriteria to list every image set)"
            )
        for f_index, raw_filter in enumerate(filters):
            where = f"filters[{f_index}]"
            flt = _require_dict(raw_filter, where)
            _check_members(flt, ("values", "operator"), where)
            operator = flt.get("operator")
            if operator not in ("EQUAL", "BETWEEN"):
                raise ValidationError(f"{where}.operator must be EQUAL or BETWEEN")
            values = flt.get("values")
            if not isinstance(values, list) or not 1 <= len(values) <= 2:
                raise ValidationError(f"{where}.values must be a list of 1 to 2 values")
            attributes: list[str] = []
            for v_index, raw_value in enumerate(values):
                vwhere = f"{where}.values[{v_index}]"
                item = _require_dict(raw_value, vwhere)
                if len(item) != 1:
                    raise ValidationError(f"{vwhere} must set exactly one attribute")
                (attribute,) = item
                if attribute not in _ALL_ATTRIBUTES:
                    raise ValidationError(f"{vwhere} names an unknown attribute")
                attributes.append(attribute)
            attribute = attributes[0]
            if any(a != attribute for a in attributes):
                raise ValidationError(
                    f"{where}: every value of a filter must use the same attribute"
                )
            if attribute in equal or attribute in ranges:
                raise ValidationError(f"{where}: {attribute} is already filtered by another filter")
            if operator == "EQUAL":
                if attribute not in EQUAL_ATTRIBUTES:
                    raise ValidationError(
                        f"{where}: EQUAL applies to {', '.join(EQUAL_ATTRIBUTES)} only"
                    )
                if len(values) != 1:
                    raise ValidationError(f"{where}: EQUAL takes exactly one value")
                value = _parse_equal_value(attribute, values[0][attribute], f"{where}.values[0]")
                equal[attribute] = value
                canonical_filters.append([attribute, "EQUAL", value])
            else:
                if attribute not in BETWEEN_ATTRIBUTES:
                    raise ValidationError(
                        f"{where}: BETWEEN applies to {', '.join(BETWEEN_ATTRIBUTES)} only"
                    )
                if len(values) != 2:
                    raise ValidationError(f"{where}: BETWEEN takes exactly two values")
                low = _parse_between_value(attribute, values[0][attribute], f"{where}.values[0]")
                high = _parse_between_value(attribute, values[1][attribute], f"{where}.values[1]")
                if low > high:
                    raise ValidationError(f"{where}: the lower bound is after the upper bound")
                ranges[attribute] = (low, high)
                canonical_filters.append([attribute, "BETWEEN", low, high])
    sort_given: dict[str, str] | None = None
    sort_field, descending = "updatedAt", True
    if "sort" in criteria:
        sort = _require_dict(criteria["sort"], "searchCriteria.sort")
        _check_members(sort, ("sortField", "sortOrder"), "searchCriteria.sort")
        if sort.get("sortField") not in SORT_FIELDS:
            raise ValidationError(f"sort.sortField must be one of {', '.join(SORT_FIELDS)}")
        if sort.get("sortOrder") not in SORT_ORDERS:
            raise ValidationError("sort.sortOrder must be ASC or DESC")
        sort_field, descending = sort["sortField"], sort["sortOrder"] == "DESC"
        sort_given = {"sortField": sort_field, "sortOrder": sort["sortOrder"]}
    canonical = json.dumps(
        [datastore_id, canonical_filters, sort_field, descending],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return _Query(equal, ranges, sort_field, descending, sort_given, canonical)


# ---------------------------------------------------------------------------------------------
# Indexes


class _SortIndex:
    """Ascending ``(key, imageSetId)`` pairs for one sort field, plus unkeyed ids (sorted)."""

    def __init__(self, keyed: list[tuple[int, str]], unkeyed: list[str]) -> None:
        keyed.sort()
        unkeyed.sort()
        self.keyed = keyed
        self.unkeyed = unkeyed

    def add(self, key: int | None, image_set_id: str) -> None:
        if key is None:
            bisect.insort(self.unkeyed, image_set_id)
        else:
            bisect.insort(self.keyed, (key, image_set_id))

    def remove(self, key: int | None, image_set_id: str) -> None:
        if key is None:
            del self.unkeyed[bisect.bisect_left(self.unkeyed, image_set_id)]
        else:
            del self.keyed[bisect.bisect_left(self.keyed, (key, image_set_id))]

    def span(self, bounds: tuple[int, int] | None) -> tuple[int, int]:
        """Index range of keyed entries within inclusive ``bounds`` (all when None)."""
        if bounds is None:
            return 0, len(self.keyed)
        low = bisect.bisect_left(self.keyed, (bounds[0], ""))
        high = bisect.bisect_right(self.keyed, (bounds[1], "\uffff"))
        return low, max(low, high)


# A position in a result order: (group, key, imageSetId); group 1 holds records without a key.
_Entry = tuple[int, int, str]


@dataclass
class _Datastore:
    datastore_id: str
    name: str
    created_at: datetime
    updated_at: datetime
    current: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    keys: dict[str, dict[str, int | None]] = field(default_factory=dict)
    equal_index: dict[str, dict[Any, set[str]]] = field(
        default_factory=lambda: {attribute: {} for attribute in EQUAL_ATTRIBUTES}
    )
    sort_index: dict[str, _SortIndex] = field(default_factory=dict)

    @property
    def arn(self) -> str:
        return f"arn:aws:medical-imaging:{REGION}:{ACCOUNT}:datastore/{self.datastore_id}"


def _record_keys(record: dict[str, Any]) -> dict[str, int | None]:
    return {
        "createdAt": _to_us(record["createdAt"]),
        "updatedAt": _to_us(record["updatedAt"]),
        "DICOMStudyDateAndTime": _study_key(record.get("DICOMTags") or {}),
    }


def _equal_values(record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    tags = record.get("DICOMTags") or {}
    for attribute in _TAG_EQUAL_ATTRIBUTES:
        value = tags.get(attribute)
        if isinstance(value, str):
            yield attribute, value
    yield "isPrimary", bool(record.get("isPrimary", True))


def _copy_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Copy deep enough that callers cannot alter stored state (datetimes are immutable)."""
    copy = dict(record)
    if "DICOMTags" in copy:
        copy["DICOMTags"] = dict(copy["DICOMTags"])
    return copy


_REQUIRED_FIELDS = ("imageSetId", "version", "createdAt", "updatedAt")


def _normalize_record(raw: dict[str, Any]) -> dict[str, Any]:
    record = _copy_summary(raw)
    for name in _REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(f"image set record lacks {name}")
    if not isinstance(record["imageSetId"], str) or _ID_RE.fullmatch(record["imageSetId"]) is None:
        raise ValueError("imageSetId must be 32 characters [0-9a-z]")
    for name in ("createdAt", "updatedAt", "lastAccessedAt"):
        if name in record:
            record[name] = parse_timestamp(record[name], name)
    if record["updatedAt"] < record["createdAt"]:
        raise ValueError("updatedAt must not be before createdAt")
    if not isinstance(record["version"], int) or record["version"] < 1:
        raise ValueError("version must be an int >= 1")
    record.setdefault("lastAccessedAt", record["updatedAt"])
    record.setdefault("storageTier", "FREQUENT_ACCESS")
    record.setdefault("isPrimary", True)
    record.setdefault("DICOMTags", {})
    return record


# ---------------------------------------------------------------------------------------------
# The backend


class Backend:
    """Thread-safe in-memory HealthImaging state: datastores, versioned image sets, search.

    Parameters
    ----------
    secret
        HMAC key for ``nextToken`` signatures; a random one per backend when None, so tokens
        from another server are rejected.
    clock
        Returns "now" (aware UTC) for new versions, accesses and datastore timestamps.

    Examples
    --------
    >>> from healthimaging_df.local import generate_image_sets
    >>> backend = Backend()
    >>> ds = backend.create_datastore("demo")
    >>> backend.add_image_sets(ds, generate_image_sets(120, seed=3))
    >>> page = backend.search(ds, None, max_results=50)
    >>> len(page["imageSetsMetadataSummaries"]), "nextToken" in page
    (50, True)
    """

    def __init__(
        self,
        secret: bytes | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._secret = secret if secret is not None else os.urandom(32)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._datastores: dict[str, _Datastore] = {}
        self._created = 0

    # -- datastores -----------------------------------------------------------------------

    def create_datastore(self, name: str) -> str:
        """Create an empty ACTIVE datastore; return its id (deterministic in creation order)."""
        if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
            raise ValueError("datastore name must match [A-Za-z0-9._/#-]{1,256}")
        with self._lock:
            self._created += 1
            digest = hashlib.sha256(f"datastore:{self._created}:{name}".encode()).hexdigest()
            datastore_id = digest[:32]
            now = self._clock()
            self._datastores[datastore_id] = _Datastore(datastore_id, name, now, now)
            return datastore_id

    def _datastore(self, datastore_id: str) -> _Datastore:
        store = self._datastores.get(datastore_id)
        if store is None:
            raise ResourceNotFound("datastore not found")
        return store

    def _datastore_properties(self, store: _Datastore) -> dict[str, Any]:
        return {
            "datastoreId": store.datastore_id,
            "datastoreName": store.name,
            "datastoreStatus": "ACTIVE",
            "datastoreArn": store.arn,
            "createdAt": store.created_at,
            "updatedAt": store.updated_at,
        }

    def get_datastore(self, datastore_id: str) -> dict[str, Any]:
        """Return the GetDatastore ``datastoreProperties``."""
        with self._lock:
            return self._datastore_properties(self._datastore(datastore_id))

    def list_datastores(
        self,
        status: str | None = None,
        max_results: int = MAX_RESULTS,
        next_token: str | None = None,
    ) -> dict[str, Any]:
        """Return a ListDatastores page (``datastoreSummaries`` and maybe ``nextToken``)."""
        _check_max_results(max_results)
        scope = json.dumps(["datastores", status])
        start = 0 if next_token is None else self._decode_offset(next_token, scope)
        with self._lock:
            rows = [
                self._datastore_properties(store)
                for _, store in sorted(self._datastores.items())
                if status in (None, "ACTIVE")
            ]
        result: dict[str, Any] = {"datastoreSummaries": rows[start : start + max_results]}
        if start + max_results < len(rows):
            result["nextToken"] = self._encode_offset(start + max_results, scope)
        return result

    # -- image sets -------------------------------------------------------------------------

    def add_image_sets(self, datastore_id: str, records: Iterable[dict[str, Any]]) -> None:
        """Insert image-set summaries (API shape, e.g. from ``generate_image_sets``).

        Raises
        ------
        ConflictError
            If an ``imageSetId`` already exists in the datastore or repeats in ``records``.
        ValueError
            If a record lacks a required field or has malformed values.
        """
        prepared = [_normalize_record(record) for record in records]
        with self._lock:
            store = self._datastore(datastore_id)
            ids = [record["imageSetId"] for record in prepared]
            if len(set(ids)) != len(ids) or any(i in store.current for i in ids):
                raise ConflictError("image set id already exists in the datastore")
            incremental = bool(store.sort_index) and len(prepared) <= 1000
            if not incremental:
                store.sort_index.clear()
            for record in prepared:
                image_set_id = record["imageSetId"]
                store.current[image_set_id] = record
                store.history[image_set_id] = [record]
                keys = _record_keys(record)
                store.keys[image_set_id] = keys
                for attribute, value in _equal_values(record):
                    store.equal_index[attribute].setdefault(value, set()).add(image_set_id)
                if incremental:
                    for name, index in store.sort_index.items():
                        index.add(keys[name], image_set_id)
            store.updated_at = self._clock()

    def image_sets(self, datastore_id: str) -> list[dict[str, Any]]:
        """Return copies of every current summary (for brute-force checks in tests)."""
        with self._lock:
            store = self._datastore(datastore_id)
            return [_copy_summary(record) for record in store.current.values()]

    def _image_set(self, store: _Datastore, image_set_id: str) -> dict[str, Any]:
        record = store.current.get(image_set_id)
        if record is None:
            raise ResourceNotFound("image set not found")
        return record

    def update_image_set(
        self,
        datastore_id: str,
        image_set_id: str,
        *,
        is_primary: bool | None = None,
        tags: dict[str, Any] | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Create a new version: ``version + 1``, ``updatedAt = now``, ``tags`` merged.

        A tag given as None is removed. ``now`` defaults to the clock, nudged 1 µs past the
        previous ``updatedAt`` if the clock is behind it; an explicit ``now`` that is not later
        raises ``ValueError``. Returns a copy of the new summary.
        """
        with self._lock:
            store = self._datastore(datastore_id)
            old = self._image_set(store, image_set_id)
            if now is None:
                moment = max(self._clock(), old["updatedAt"] + _ONE_US)
            else:
                moment = parse_timestamp(now, "now")
                if moment <= old["updatedAt"]:
                    raise ValueError("now must be later than the current updatedAt")
            new = _copy_summary(old)
            new["version"] = old["version"] + 1
            new["updatedAt"] = moment
            if is_primary is not None:
                new["isPrimary"] = bool(is_primary)
            for name, value in (tags or {}).items():
                if value is None:
                    new["DICOMTags"].pop(name, None)
                else:
                    new["DICOMTags"][name] = value
            old_keys = store.keys[image_set_id]
            new_keys = _record_keys(new)
            for attribute, value in _equal_values(old):
                store.equal_index[attribute][value].discard(image_set_id)
            for attribute, value in _equal_values(new):
                store.equal_index[attribute].setdefault(value, set()).add(image_set_id)
            for name, index in store.sort_index.items():
                index.remove(old_keys[name], image_set_id)
                index.add(new_keys[name], image_set_id)
            store.keys[image_set_id] = new_keys
            store.current[image_set_id] = new
            store.history[image_set_id].append(new)
            store.updated_at = self._clock()
            return _copy_summary(new)

    def _versions(self, store: _Datastore, image_set_id: str) -> list[dict[str, Any]]:
        """Every version oldest first; versions before the first stored one are synthesized."""
        stored = store.history.get(image_set_id)
        if stored is None:
            raise ResourceNotFound("image set not found")
        first = stored[0]
        earlier = [
            {**first, "version": number, "updatedAt": first["createdAt"]}
            for number in range(1, first["version"])
        ]
        return earlier + stored

    def _version(
        self, store: _Datastore, image_set_id: str, version: int | str | None
    ) -> dict[str, Any]:
        if version is None:
            return self._image_set(store, image_set_id)
        if isinstance(version, str):
            if not version.isdigit():
                raise ValidationError("version must match \\d+")
            version = int(version)
        for record in self._versions(store, image_set_id):
            if record["version"] == version:
                return record
        raise ResourceNotFound("image set version not found")

    def get_image_set(
        self, datastore_id: str, image_set_id: str, version: int | str | None = None
    ) -> dict[str, Any]:
        """Return the GetImageSet response for the current or a given version."""
        with self._lock:
            store = self._datastore(datastore_id)
            record = self._version(store, image_set_id, version)
            current = self._image_set(store, image_set_id)
            result = _properties(record)
            result.update(
                datastoreId=datastore_id,
                imageSetArn=f"{store.arn}/imageset/{image_set_id}",
                lastAccessedAt=current["lastAccessedAt"],
                storageTier=current["storageTier"],
            )
            result["imageSetWorkflowStatus"] = result.pop("ImageSetWorkflowStatus")
            return result

    def list_image_set_versions(
        self,
        datastore_id: str,
        image_set_id: str,
        max_results: int = MAX_RESULTS,
        next_token: str | None = None,
    ) -> dict[str, Any]:
        """Return a ListImageSetVersions page, oldest version first."""
        _check_max_results(max_results)
        scope = json.dumps(["versions", datastore_id, image_set_id])
        start = 0 if next_token is None else self._decode_offset(next_token, scope)
        with self._lock:
            store = self._datastore(datastore_id)
            rows = [_properties(record) for record in self._versions(store, image_set_id)]
        result: dict[str, Any] = {"imageSetPropertiesList": rows[start : start + max_results]}
        if start + max_results < len(rows):
            result["nextToken"] = self._encode_offset(start + max_results, scope)
        return result

    def get_image_set_metadata(
        self, datastore_id: str, image_set_id: str, version: int | str | None = None
    ) -> dict[str, Any]:
        """Return the metadata document (not gzipped) of the current or a given version.

        This counts as an access, as in the real service: ``lastAccessedAt`` becomes now and an
        ARCHIVE_INSTANT_ACCESS image set moves to FREQUENT_ACCESS (no new version).
        """
        with self._lock:
            store = self._datastore(datastore_id)
            record = self._version(store, image_set_id, version)
            current = self._image_set(store, image_set_id)
            accessed = dict(current)
            accessed["lastAccessedAt"] = max(self._clock(), current["lastAccessedAt"])
            accessed["storageTier"] = "FREQUENT_ACCESS"
            store.current[image_set_id] = accessed
            store.history[image_set_id][-1] = accessed
            return metadata_document(datastore_id, record)

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        datastore_id: str,
        criteria: dict[str, Any] | None,
        max_results: int = MAX_RESULTS,
        next_token: str | None = None,
    ) -> dict[str, Any]:
        """Run SearchImageSets; return ``imageSetsMetadataSummaries`` and maybe ``nextToken``/``sort``.

        Raises
        ------
        ValidationError
            Bad criteria, ``max_results`` outside 1..50, or a forged, foreign or malformed token.
        ResourceNotFound
            Unknown datastore.
        """
        with self._lock:
            self._datastore(datastore_id)
        _check_max_results(max_results)
        query = parse_criteria(criteria, datastore_id)
        cursor = None if next_token is None else self._decode_cursor(next_token, query)
        with self._lock:
            store = self._datastore(datastore_id)
            entries = self._page(store, query, cursor, max_results + 1)
            rows = [_copy_summary(store.current[entry[2]]) for entry in entries[:max_results]]
        result: dict[str, Any] = {"imageSetsMetadataSummaries": rows}
        if len(entries) > max_results:
            result["nextToken"] = self._encode_cursor(entries[max_results - 1], query)
        if query.sort_given is not None:
            result["sort"] = dict(query.sort_given)
        return result

    def _index(self, store: _Datastore, name: str) -> _SortIndex:
        index = store.sort_index.get(name)
        if index is None:
            keyed: list[tuple[int, str]] = []
            unkeyed: list[str] = []
            for image_set_id, keys in store.keys.items():
                key = keys[name]
                if key is None:
                    unkeyed.append(image_set_id)
                else:
                    keyed.append((key, image_set_id))
            index = store.sort_index[name] = _SortIndex(keyed, unkeyed)
        return index

    def _matcher(self, store: _Datastore, query: _Query) -> Callable[[str], bool]:
        tag_equal = [(a, v) for a, v in query.equal.items() if a != "isPrimary"]
        primary = query.equal.get("isPrimary")
        ranges = list(query.ranges.items())
        current, keys = store.current, store.keys

        def matches(image_set_id: str) -> bool:
            record = current[image_set_id]
            if primary is not None and bool(record.get("isPrimary", True)) is not primary:
                return False
            tags = record["DICOMTags"]
            for attribute, value in tag_equal:
                if tags.get(attribute) != value:
                    return False
            record_keys = keys[image_set_id]
            for name, (low, high) in ranges:
                key = record_keys[name]
                if key is None or not low <= key <= high:
                    return False
            return True

        return matches

    def _page(
        self, store: _Datastore, query: _Query, cursor: _Entry | None, limit: int
    ) -> list[_Entry]:
        """The next ``limit`` matching entries after ``cursor`` in the query's order."""
        matches = self._matcher(store, query)
        sort_name = query.sort_field
        candidates: set[str] | None = None
        id_sets = [
            store.equal_index[a].get(v, set()) for a, v in query.equal.items() if a != "isPrimary"
        ]
        if id_sets:
            candidates = min(id_sets, key=len)
        else:
            best: tuple[int, str] | None = None
            for name, bounds in query.ranges.items():
                if name == sort_name:
                    continue
                low, high = self._index(store, name).span(bounds)
                if best is None or high - low < best[0]:
                    best = (high - low, name)
            if "isPrimary" in query.equal:
                size = len(store.equal_index["isPrimary"].get(query.equal["isPrimary"], ()))
                if best is None or size < best[0]:
                    best = (size, "isPrimary")
            sort_low, sort_high = self._index(store, sort_name).span(query.ranges.get(sort_name))
            walk = sort_high - sort_low + len(store.sort_index[sort_name].unkeyed)
            # Walking the sort index costs about limit * walk / matches steps per page;
            # materializing costs the candidate count (and a sort) on every page.
            if best is not None and best[0] <= _MATERIALIZE_LIMIT and best[0] ** 2 <= limit * walk:
                if best[1] == "isPrimary":
                    candidates = store.equal_index["isPrimary"].get(query.equal["isPrimary"], set())
                else:
                    index = self._index(store, best[1])
                    low, high = index.span(query.ranges[best[1]])
                    candidates = {image_set_id for _, image_set_id in index.keyed[low:high]}
        if candidates is not None:
            return self._materialized(store, query, candidates, matches, cursor, limit)
        return self._walk(store, query, matches, cursor, limit)

    def _materialized(
        self,
        store: _Datastore,
        query: _Query,
        candidates: set[str],
        matches: Callable[[str], bool],
        cursor: _Entry | None,
        limit: int,
    ) -> list[_Entry]:
        keyed: list[tuple[int, str]] = []
        unkeyed: list[str] = []
        for image_set_id in candidates:
            if not matches(image_set_id):
                continue
            key = store.keys[image_set_id][query.sort_field]
            if key is None:
                unkeyed.append(image_set_id)
            else:
                keyed.append((key, image_set_id))
        keyed.sort(reverse=query.descending)
        unkeyed.sort()
        ordered: list[_Entry] = [(0, k, i) for k, i in keyed] + [(1, 0, i) for i in unkeyed]
        if cursor is not None:
            ordered = [entry for entry in ordered if _after(entry, cursor, query.descending)]
        return ordered[:limit]

    def _walk(
        self,
        store: _Datastore,
        query: _Query,
        matches: Callable[[str], bool],
        cursor: _Entry | None,
        limit: int,
    ) -> list[_Entry]:
        index = self._index(store, query.sort_field)
        low, high = index.span(query.ranges.get(query.sort_field))
        keyed = index.keyed
        out: list[_Entry] = []
        if cursor is None or cursor[0] == 0:
            if query.descending:
                start = high if cursor is None else min(high, bisect.bisect_left(keyed, cursor[1:]))
                positions: Iterable[int] = range(start - 1, low - 1, -1)
            else:
                start = low if cursor is None else max(low, bisect.bisect_right(keyed, cursor[1:]))
                positions = range(start, high)
            for position in positions:
                key, image_set_id = keyed[position]
                if matches(image_set_id):
                    out.append((0, key, image_set_id))
                    if len(out) >= limit:
                        return out
        if query.sort_field in query.ranges:
            return out  # a range on the sort field excludes records without a key
        # Records without a key (undated studies) come last in both orders, by id.
        unkeyed = index.unkeyed
        first = 0 if cursor is None or cursor[0] == 0 else bisect.bisect_right(unkeyed, cursor[2])
        for image_set_id in unkeyed[first:]:
            if matches(image_set_id):
                out.append((1, 0, image_set_id))
                if len(out) >= limit:
                    break
        return out

    # -- tokens ------------------------------------------------------------------------------

    def _sign(self, payload: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(
            b"="
        )
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()[:18]
        return (body + b"." + base64.urlsafe_b64encode(mac)).decode("ascii")

    def _verify(self, token: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN or not token.isascii():
            raise ValidationError("nextToken is malformed")
        body, sep, mac_text = token.partition(".")
        try:
            mac = base64.urlsafe_b64decode(mac_text.encode() + b"=" * (-len(mac_text) % 4))
        except (binascii.Error, ValueError):
            raise ValidationError("nextToken is malformed") from None
        if not sep or not body:
            raise ValidationError("nextToken is malformed")
        expected = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()[:18]
        if not hmac.compare_digest(mac, expected):
            raise ValidationError("nextToken is invalid: it was not issued by this service")
        try:
            raw = base64.urlsafe_b64decode(body.encode() + b"=" * (-len(body) % 4))
            payload = json.loads(raw)
        except (binascii.Error, ValueError):
            raise ValidationError("nextToken is malformed") from None
        if not isinstance(payload, dict):
            raise ValidationError("nextToken is malformed")
        return payload

    @staticmethod
    def _scope_digest(scope: str) -> str:
        return hashlib.sha256(scope.encode()).hexdigest()[:24]

    def _encode_cursor(self, entry: _Entry, query: _Query) -> str:
        return self._sign({"q": self._scope_digest(query.canonical), "c": list(entry)})

    def _decode_cursor(self, token: str, query: _Query) -> _Entry:
        payload = self._verify(token)
        if payload.get("q") != self._scope_digest(query.canonical):
            raise ValidationError("nextToken was issued for a different query")
        entry = payload.get("c")
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or entry[0] not in (0, 1)
            or not isinstance(entry[1], int)
            or not isinstance(entry[2], str)
        ):
            raise ValidationError("nextToken is malformed")
        return (entry[0], entry[1], entry[2])

    def _encode_offset(self, offset: int, scope: str) -> str:
        return self._sign({"q": self._scope_digest(scope), "o": offset})

    def _decode_offset(self, token: str, scope: str) -> int:
        payload = self._verify(token)
        if payload.get("q") != self._scope_digest(scope):
            raise ValidationError("nextToken was issued for a different request")
        offset = payload.get("o")
        if not isinstance(offset, int) or offset < 0:
            raise ValidationError("nextToken is malformed")
        return offset


def _after(entry: _Entry, cursor: _Entry, descending: bool) -> bool:
    """Whether ``entry`` comes strictly after ``cursor`` in the result order."""
    if entry[0] != cursor[0]:
        return entry[0] > cursor[0]
    if entry[0] == 1 or not descending:
        return entry[1:] > cursor[1:]
    return entry[1:] < cursor[1:]


def _check_max_results(max_results: Any) -> None:
    if (
        not isinstance(max_results, int)
        or isinstance(max_results, bool)
        or not 1 <= max_results <= MAX_RESULTS
    ):
        raise ValidationError(f"maxResults must be an integer from 1 to {MAX_RESULTS}")


def _properties(record: dict[str, Any]) -> dict[str, Any]:
    """ImageSetProperties of one version (ListImageSetVersions row)."""
    first = record["version"] == 1
    return {
        "imageSetId": record["imageSetId"],
        "versionId": str(record["version"]),
        "imageSetState": "ACTIVE",
        "ImageSetWorkflowStatus": "IMPORTED" if first else "UPDATED",
        "createdAt": record["createdAt"],
        "updatedAt": record["updatedAt"],
        "isPrimary": bool(record.get("isPrimary", True)),
    }


# ---------------------------------------------------------------------------------------------
# Metadata documents

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
