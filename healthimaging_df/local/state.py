"""Datastore state: versioned image-set records and the indexes kept in step with them.

A :class:`Datastore` holds the current summary of each image set, its version history, the
search keys of each record, a dict per EQUAL attribute and a sorted ``(key, imageSetId)`` list
per sort field (:class:`SortIndex`, built lazily, maintained on insert and update). It does no
locking: :class:`~healthimaging_df.local.backend.Backend` serializes access.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from healthimaging_df.local.errors import ConflictError, ResourceNotFound, ValidationError
from healthimaging_df.local.values import (
    ACCOUNT,
    EQUAL_ATTRIBUTES,
    ID_RE,
    ONE_US,
    REGION,
    TAG_EQUAL_ATTRIBUTES,
    parse_timestamp,
    study_key,
    to_us,
)

__all__ = [
    "Datastore",
    "Entry",
    "SortIndex",
    "copy_summary",
    "normalize_record",
    "properties",
]

# A position in a result order: (group, key, imageSetId); group 1 holds records without a key.
Entry = tuple[int, int, str]

ARCHIVE = "ARCHIVE_INSTANT_ACCESS"
FREQUENT = "FREQUENT_ACCESS"


class SortIndex:
    """Ascending ``(key, imageSetId)`` pairs for one sort field, plus unkeyed ids (sorted)."""

    def __init__(self, keyed: list[tuple[int, str]], unkeyed: list[str]) -> None:
        keyed.sort()
        unkeyed.sort()
        self.keyed = keyed
        self.unkeyed = unkeyed

    def add(self, key: int | None, image_set_id: str) -> None:
        """Insert one entry in order."""
        if key is None:
            bisect.insort(self.unkeyed, image_set_id)
        else:
            bisect.insort(self.keyed, (key, image_set_id))

    def remove(self, key: int | None, image_set_id: str) -> None:
        """Remove one entry (it must be present)."""
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


def record_keys(record: dict[str, Any]) -> dict[str, int | None]:
    """The sort keys of one record, by sort field."""
    return {
        "createdAt": to_us(record["createdAt"]),
        "updatedAt": to_us(record["updatedAt"]),
        "DICOMStudyDateAndTime": study_key(record.get("DICOMTags") or {}),
    }


def equal_values(record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The ``(attribute, value)`` pairs one record has in the EQUAL indexes."""
    tags = record.get("DICOMTags") or {}
    for attribute in TAG_EQUAL_ATTRIBUTES:
        value = tags.get(attribute)
        if isinstance(value, str):
            yield attribute, value
    yield "isPrimary", bool(record.get("isPrimary", True))


def copy_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Copy deep enough that callers cannot alter stored state (datetimes are immutable)."""
    copy = dict(record)
    if "DICOMTags" in copy:
        copy["DICOMTags"] = dict(copy["DICOMTags"])
    return copy


_REQUIRED_FIELDS = ("imageSetId", "version", "createdAt", "updatedAt")


def normalize_record(raw: dict[str, Any]) -> dict[str, Any]:
    """Check an API-shaped summary and fill the defaults; raise ``ValueError`` if malformed."""
    record = copy_summary(raw)
    for name in _REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(f"image set record lacks {name}")
    if not isinstance(record["imageSetId"], str) or ID_RE.fullmatch(record["imageSetId"]) is None:
        raise ValueError("imageSetId must be 32 characters [0-9a-z]")
    for name in ("createdAt", "updatedAt", "lastAccessedAt"):
        if name in record:
            record[name] = parse_timestamp(record[name], name)
    if record["updatedAt"] < record["createdAt"]:
        raise ValueError("updatedAt must not be before createdAt")
    if not isinstance(record["version"], int) or record["version"] < 1:
        raise ValueError("version must be an int >= 1")
    record.setdefault("lastAccessedAt", record["updatedAt"])
    record.setdefault("storageTier", FREQUENT)
    record.setdefault("isPrimary", True)
    record.setdefault("DICOMTags", {})
    return record


def properties(record: dict[str, Any]) -> dict[str, Any]:
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


@dataclass
class Datastore:
    """One datastore's records, history and indexes (not thread-safe on its own)."""

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
    sort_index: dict[str, SortIndex] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # ids in insertion order, for random picks
    lossless_storage_format: str = "HTJ2K"
    deleted: set[str] = field(default_factory=set)  # ids of deleted image sets (never reused)

    @property
    def arn(self) -> str:
        """The datastore ARN (fixed account and region)."""
        return f"arn:aws:medical-imaging:{REGION}:{ACCOUNT}:datastore/{self.datastore_id}"

    def index(self, name: str) -> SortIndex:
        """The sort index of ``name``, built on first use."""
        index = self.sort_index.get(name)
        if index is None:
            keyed: list[tuple[int, str]] = []
            unkeyed: list[str] = []
            for image_set_id, keys in self.keys.items():
                key = keys[name]
                if key is None:
                    unkeyed.append(image_set_id)
                else:
                    keyed.append((key, image_set_id))
            index = self.sort_index[name] = SortIndex(keyed, unkeyed)
        return index

    def add(self, prepared: Iterable[dict[str, Any]], now: datetime) -> None:
        """Insert normalized records; raise :class:`ConflictError` on a repeated id."""
        prepared = list(prepared)
        ids = [record["imageSetId"] for record in prepared]
        if len(set(ids)) != len(ids) or any(i in self.current or i in self.deleted for i in ids):
            raise ConflictError("image set id already exists in the datastore")
        incremental = bool(self.sort_index) and len(prepared) <= 1000
        if not incremental:
            self.sort_index.clear()
        for record in prepared:
            image_set_id = record["imageSetId"]
            self.current[image_set_id] = record
            self.history[image_set_id] = [record]
            self.order.append(image_set_id)
            keys = record_keys(record)
            self.keys[image_set_id] = keys
            for attribute, value in equal_values(record):
                self.equal_index[attribute].setdefault(value, set()).add(image_set_id)
            if incremental:
                for name, index in self.sort_index.items():
                    index.add(keys[name], image_set_id)
        self.updated_at = now

    def image_set(self, image_set_id: str) -> dict[str, Any]:
        """The current record of an image set, or :class:`ResourceNotFound`."""
        record = self.current.get(image_set_id)
        if record is None:
            raise ResourceNotFound("image set not found")
        return record

    def image_set_at(self, image_set_id: str, latest_version: str, field: str) -> dict[str, Any]:
        """The current record of an image set a write names with its latest version.

        :class:`ResourceNotFound` if there is none; :class:`ConflictError` naming the request's
        *field* if *latest_version* is not the current one.
        """
        record = self.image_set(image_set_id)
        if int(latest_version) != record["version"]:
            raise ConflictError(f"{field} is not the image set's latest version")
        return record

    def update(
        self,
        image_set_id: str,
        *,
        is_primary: bool | None,
        tags: dict[str, Any] | None,
        now: datetime | None,
        clock_now: datetime,
        accessed: bool = False,
    ) -> dict[str, Any]:
        """Store version + 1 (see ``Backend.update_image_set``); return the stored record.

        ``accessed`` also makes it an access: ``lastAccessedAt`` = the new ``updatedAt`` and
        the tier FREQUENT_ACCESS, as UpdateImageSetMetadata does.
        """
        old = self.image_set(image_set_id)
        if now is None:
            moment = max(clock_now, old["updatedAt"] + ONE_US)
        else:
            moment = parse_timestamp(now, "now")
            if moment <= old["updatedAt"]:
                raise ValueError("now must be later than the current updatedAt")
        new = copy_summary(old)
        new["version"] = old["version"] + 1
        new["updatedAt"] = moment
        if accessed:
            new["lastAccessedAt"] = max(moment, old["lastAccessedAt"])
            new["storageTier"] = FREQUENT
        if is_primary is not None:
            new["isPrimary"] = bool(is_primary)
        for name, value in (tags or {}).items():
            if value is None:
                new["DICOMTags"].pop(name, None)
            else:
                new["DICOMTags"][name] = value
        old_keys = self.keys[image_set_id]
        new_keys = record_keys(new)
        for attribute, value in equal_values(old):
            self.equal_index[attribute][value].discard(image_set_id)
        for attribute, value in equal_values(new):
            self.equal_index[attribute].setdefault(value, set()).add(image_set_id)
        for name, index in self.sort_index.items():
            index.remove(old_keys[name], image_set_id)
            index.add(new_keys[name], image_set_id)
        self.keys[image_set_id] = new_keys
        self.current[image_set_id] = new
        self.history[image_set_id].append(new)
        self.updated_at = clock_now
        return new

    def delete(self, image_set_id: str, now: datetime) -> dict[str, Any]:
        """Remove an image set, its history and its index entries; return its last record.

        Its id stays taken (:attr:`deleted`): a later insert of the same id conflicts.
        """
        record = self.image_set(image_set_id)
        keys = self.keys.pop(image_set_id)
        for attribute, value in equal_values(record):
            self.equal_index[attribute][value].discard(image_set_id)
        for name, index in self.sort_index.items():
            index.remove(keys[name], image_set_id)
        del self.current[image_set_id]
        del self.history[image_set_id]
        self.order.remove(image_set_id)
        self.deleted.add(image_set_id)
        self.updated_at = now
        return record

    def touch(self, image_set_id: str, now: datetime) -> None:
        """Record an access: ``lastAccessedAt`` = now (never earlier), tier FREQUENT_ACCESS."""
        current = self.image_set(image_set_id)
        accessed = dict(current)
        accessed["lastAccessedAt"] = max(now, current["lastAccessedAt"])
        accessed["storageTier"] = FREQUENT
        self.current[image_set_id] = accessed
        self.history[image_set_id][-1] = accessed

    def versions(self, image_set_id: str) -> list[dict[str, Any]]:
        """Every version oldest first; versions before the first stored one are synthesized."""
        stored = self.history.get(image_set_id)
        if stored is None:
            raise ResourceNotFound("image set not found")
        first = stored[0]
        earlier = [
            {**first, "version": number, "updatedAt": first["createdAt"]}
            for number in range(1, first["version"])
        ]
        return earlier + stored

    def version(self, image_set_id: str, version: int | str | None) -> dict[str, Any]:
        """One version of an image set (the current one when ``version`` is None)."""
        if version is None:
            return self.image_set(image_set_id)
        if isinstance(version, str):
            if not version.isdigit():
                raise ValidationError("version must match \\d+")
            version = int(version)
        for record in self.versions(image_set_id):
            if record["version"] == version:
                return record
        raise ResourceNotFound("image set version not found")
