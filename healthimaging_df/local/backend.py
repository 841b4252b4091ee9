"""The local HealthImaging service's state and semantics behind one lock: :class:`Backend`.

No HTTP here (that is :mod:`healthimaging_df.local.wire`): the backend can be driven from
Python directly, which keeps the search rules unit-testable and lets tests seed and mutate a
datastore while a boto3 client reads it over HTTP. Every public method takes one lock, so a
threaded server may call it concurrently.

The rules live in small modules by concern: :mod:`~healthimaging_df.local.state` (records,
versions, indexes), :mod:`~healthimaging_df.local.search` (criteria and keyset paging),
:mod:`~healthimaging_df.local.tokens` (signed nextTokens),
:mod:`~healthimaging_df.local.documents` (metadata documents). Their public names used to
live here and are re-exported.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from healthimaging_df.local.changes import Change
from healthimaging_df.local.churn import random_update
from healthimaging_df.local.documents import (
    SeriesShape,
    gzip_document,
    gzip_json,
    metadata_document,
    metadata_json,
)
from healthimaging_df.local.errors import (
    BackendError,
    ConflictError,
    ResourceNotFound,
    ValidationError,
)
from healthimaging_df.local.search import Query, check_max_results, page, parse_criteria
from healthimaging_df.local.state import (
    FREQUENT,
    Datastore,
    copy_summary,
    normalize_record,
    properties,
)
from healthimaging_df.local.tokens import TokenSigner
from healthimaging_df.local.updates import parse_dicom_updates
from healthimaging_df.local.values import (
    ACCOUNT,
    BETWEEN_ATTRIBUTES,
    EQUAL_ATTRIBUTES,
    ID_RE,
    LOSSLESS_STORAGE_FORMATS,
    MAX_RESULTS,
    MAX_STRING,
    MAX_TOKEN,
    NAME_RE,
    REGION,
    SORT_FIELDS,
    SORT_ORDERS,
    UTC,
    load_json,
    parse_timestamp,
    study_datetime,
)

__all__ = [
    "ACCOUNT",
    "BETWEEN_ATTRIBUTES",
    "EQUAL_ATTRIBUTES",
    "GROUPING_TAGS",
    "MAX_RESULTS",
    "MAX_STRING",
    "MAX_TOKEN",
    "REGION",
    "SORT_FIELDS",
    "SORT_ORDERS",
    "Backend",
    "BackendError",
    "Change",
    "ConflictError",
    "ResourceNotFound",
    "SeriesShape",
    "ValidationError",
    "gzip_document",
    "metadata_document",
    "parse_criteria",
    "parse_timestamp",
    "study_datetime",
]

GROUPING_TAGS = (
    "DICOMPatientId",
    "DICOMStudyInstanceUID",
    "DICOMStudyId",
    "DICOMAccessionNumber",
    "DICOMStudyDate",
    "DICOMSeriesInstanceUID",
)
"""Summary tags of the elements HealthImaging groups image sets by (developer guide,
"DICOM elements used for image set creation"): a copy into an image set that disagrees on one
of them needs ``force``."""

Listener = Callable[[list[Change]], None]


def _conflicts(source: dict[str, Any], target: dict[str, Any]) -> bool:
    return any(
        source.get(tag) is not None
        and target.get(tag) is not None
        and source.get(tag) != target.get(tag)
        for tag in GROUPING_TAGS
    )


class Backend:
    """Thread-safe in-memory HealthImaging state: datastores, versioned image sets, search.

    Parameters
    ----------
    secret
        HMAC key for ``nextToken`` signatures; a random one per backend when None, so tokens
        from another server are rejected.
    clock
        Returns "now" (aware UTC) for new versions, accesses and datastore timestamps.
    series_shape
        Size of generated GetImageSetMetadata series (:class:`SeriesShape`); small by
        default. The attribute ``series_shape`` may be reassigned at runtime.
    metadata_cache_size
        How many gzipped metadata documents to keep (least recently used first out), so
        repeated reads of large series cost the server nothing; 0 turns the cache off.

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
        series_shape: SeriesShape | None = None,
        metadata_cache_size: int = 256,
    ) -> None:
        self.series_shape = series_shape or SeriesShape()
        # Where image sets without a value of the sort field (undated studies) go: last in both
        # orders by default; first in both when True (as one independent endpoint does). The real
        # service's placement is unconfirmed, so clients must be right either way.
        self.undated_first = False
        # refuse two BETWEEN filters in one request (AWS documents an ID or series UID with one
        # date range; whether it takes two ranges is unconfirmed): a service that does not
        self.one_range_filter = False
        self._blobs: collections.OrderedDict[tuple[Any, ...], bytes] = collections.OrderedDict()
        self._blobs_size = metadata_cache_size
        self._blobs_lock = threading.Lock()
        self._lock = threading.RLock()
        self._tokens = TokenSigner(secret if secret is not None else os.urandom(32))
        self._clock = clock or (lambda: datetime.now(UTC))
        self._datastores: dict[str, Datastore] = {}
        self._created = 0
        self._endless = 0
        self._copies = 0
        self._listeners: list[Listener] = []

    # -- change listeners -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(changes)`` after every write, in write order, outside the lock."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not subscribed)."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _publish(self, changes: list[Change]) -> None:
        if not changes:
            return
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(changes)

    @staticmethod
    def _change(kind: str, datastore_id: str, record: dict[str, Any], **extra: Any) -> Change:
        return Change(
            kind,
            datastore_id,
            record["imageSetId"],
            record["version"],
            bool(record.get("isPrimary", True)),
            **extra,
        )

    # -- datastores -----------------------------------------------------------------------

    def create_datastore(
        self,
        name: str,
        lossless_storage_format: str = "HTJ2K",
        *,
        datastore_id: str | None = None,
    ) -> str:
        """Create an empty ACTIVE datastore; return its id.

        The id is ``datastore_id`` when given (32 ``[0-9a-z]``; ``LocalService.seeded`` derives
        one from the data's seed and size), else deterministic in creation order and name.
        ``lossless_storage_format`` (HTJ2K, the service default, or JPEG_2000_LOSSLESS) is
        reported by GetDatastore.
        """
        if datastore_id is not None and (
            not isinstance(datastore_id, str) or ID_RE.fullmatch(datastore_id) is None
        ):
            raise ValueError("datastore_id must be 32 characters [0-9a-z]")
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            raise ValueError("datastore name must match [A-Za-z0-9._/#-]{1,256}")
        if lossless_storage_format not in LOSSLESS_STORAGE_FORMATS:
            raise ValueError(f"lossless_storage_format must be one of {LOSSLESS_STORAGE_FORMATS}")
        with self._lock:
            self._created += 1
            if datastore_id is None:
                digest = hashlib.sha256(f"datastore:{self._created}:{name}".encode()).hexdigest()
                datastore_id = digest[:32]
            if datastore_id in self._datastores:
                raise ValueError("a datastore with that id already exists")
            now = self._clock()
            self._datastores[datastore_id] = Datastore(
                datastore_id, name, now, now, lossless_storage_format=lossless_storage_format
            )
            return datastore_id

    def _datastore(self, datastore_id: str) -> Datastore:
        store = self._datastores.get(datastore_id)
        if store is None:
            raise ResourceNotFound("datastore not found")
        return store

    def _datastore_properties(self, store: Datastore) -> dict[str, Any]:
        return {
            "datastoreId": store.datastore_id,
            "datastoreName": store.name,
            "datastoreStatus": "ACTIVE",
            "datastoreArn": store.arn,
            "createdAt": store.created_at,
            "updatedAt": store.updated_at,
        }

    def get_datastore(self, datastore_id: str) -> dict[str, Any]:
        """Return the GetDatastore ``datastoreProperties`` (with ``losslessStorageFormat``)."""
        with self._lock:
            store = self._datastore(datastore_id)
            result = self._datastore_properties(store)
            result["losslessStorageFormat"] = store.lossless_storage_format
            return result

    def list_datastores(
        self,
        status: str | None = None,
        max_results: int = MAX_RESULTS,
        next_token: str | None = None,
    ) -> dict[str, Any]:
        """Return a ListDatastores page (``datastoreSummaries`` and maybe ``nextToken``)."""
        check_max_results(max_results)
        scope = json.dumps(["datastores", status])
        start = 0 if next_token is None else self._tokens.decode_offset(next_token, scope)
        with self._lock:
            rows = [
                self._datastore_properties(store)
                for _, store in sorted(self._datastores.items())
                if status in (None, "ACTIVE")
            ]
        result: dict[str, Any] = {"datastoreSummaries": rows[start : start + max_results]}
        if start + max_results < len(rows):
            result["nextToken"] = self._tokens.encode_offset(start + max_results, scope)
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
        prepared = [normalize_record(record) for record in records]
        with self._lock:
            self._datastore(datastore_id).add(prepared, self._clock())
            watched = bool(self._listeners)
        if watched:
            self._publish([self._change("created", datastore_id, r) for r in prepared])

    def image_sets(self, datastore_id: str) -> list[dict[str, Any]]:
        """Return copies of every current summary (for brute-force checks in tests)."""
        with self._lock:
            store = self._datastore(datastore_id)
            return [copy_summary(record) for record in store.current.values()]

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
            new = store.update(
                image_set_id, is_primary=is_primary, tags=tags, now=now, clock_now=self._clock()
            )
            result = copy_summary(new)
        self._publish(
            [self._change("updated", datastore_id, new, previous_version=new["version"] - 1)]
        )
        return result

    def get_image_set(
        self, datastore_id: str, image_set_id: str, version: int | str | None = None
    ) -> dict[str, Any]:
        """Return the GetImageSet response for the current or a given version."""
        with self._lock:
            store = self._datastore(datastore_id)
            record = store.version(image_set_id, version)
            current = store.image_set(image_set_id)
            result = properties(record)
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
        """Return a ListImageSetVersions page, newest version first (as in every AWS example)."""
        check_max_results(max_results)
        scope = json.dumps(["versions", datastore_id, image_set_id])
        start = 0 if next_token is None else self._tokens.decode_offset(next_token, scope)
        with self._lock:
            store = self._datastore(datastore_id)
            rows = [properties(record) for record in reversed(store.versions(image_set_id))]
        result: dict[str, Any] = {"imageSetPropertiesList": rows[start : start + max_results]}
        if start + max_results < len(rows):
            result["nextToken"] = self._tokens.encode_offset(start + max_results, scope)
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
            record = store.version(image_set_id, version)
            store.touch(image_set_id, self._clock())
        return metadata_document(datastore_id, record, self.series_shape)

    def get_image_set_metadata_gzip(
        self, datastore_id: str, image_set_id: str, version: int | str | None = None
    ) -> bytes:
        """:meth:`get_image_set_metadata` as the gzipped bytes the wire sends (an access too)."""
        with self._lock:
            store = self._datastore(datastore_id)
            record = store.version(image_set_id, version)
            store.touch(image_set_id, self._clock())
        shape = self.series_shape
        key = (datastore_id, image_set_id, record["version"], shape)
        with self._blobs_lock:
            blob = self._blobs.get(key)
            if blob is not None:
                self._blobs.move_to_end(key)
                return blob
        if shape.default:
            blob = gzip_document(metadata_document(datastore_id, record))
        else:
            blob = gzip_json(metadata_json(datastore_id, record, shape))
        if self._blobs_size > 0:
            with self._blobs_lock:
                self._blobs[key] = blob
                while len(self._blobs) > self._blobs_size:
                    self._blobs.popitem(last=False)
        return blob

    def update_image_set_metadata(
        self,
        datastore_id: str,
        image_set_id: str,
        latest_version: str,
        *,
        updatable: bytes | None = None,
        removable: bytes | None = None,
        revert_to_version: str | None = None,
        force: bool = False,
        include_study_image_sets: bool = False,
    ) -> dict[str, Any]:
        """UpdateImageSetMetadata: a new version from DICOMUpdates or a revert; an access.

        Applied at once (the response shows the final ACTIVE / UPDATED state). Without
        ``include_study_image_sets`` only this image set changes, study- and patient-level
        attributes included, so a study's image sets may disagree afterwards (as AWS allows).
        With it, the patient- and study-level changes are applied atomically to every other
        *primary* image set of the same study too (series-level ones name this image set's
        series only), each getting a new version; it cannot be combined with a revert. Each
        updated image set is accessed: ``lastAccessedAt`` = its new ``updatedAt``, tier
        FREQUENT_ACCESS.

        Raises
        ------
        ConflictError
            ``latest_version`` is not the current version.
        ValidationError
            Malformed updates, a forced attribute without ``force``, both or neither of
            DICOMUpdates and a revert, or a revert with ``include_study_image_sets``.
        ResourceNotFound
            Unknown datastore, image set or revert version.
        """
        if (revert_to_version is None) == (updatable is None and removable is None):
            raise ValidationError(
                "updateImageSetMetadataUpdates must set exactly one of DICOMUpdates and "
                "revertToVersionId"
            )
        if revert_to_version is not None and include_study_image_sets:
            raise ValidationError("includeStudyImageSets is not supported with revertToVersionId")
        if not (
            isinstance(latest_version, str)
            and latest_version.isascii()
            and latest_version.isdigit()
        ):
            raise ValidationError("latestVersion must match \\d+")
        changes: list[Change] = []
        with self._lock:
            store = self._datastore(datastore_id)
            current = store.image_set_at(image_set_id, latest_version, "latestVersion")
            tags = current["DICOMTags"]
            series: dict[str, Any] = {}
            if revert_to_version is not None:
                target = store.version(image_set_id, revert_to_version)["DICOMTags"]
                study = {name: None for name in tags if name not in target}
                study.update(target)
            else:
                parsed = parse_dicom_updates(
                    updatable, removable, tags.get("DICOMSeriesInstanceUID")
                )
                if parsed.needs_force and not force:
                    raise ValidationError(
                        "updating StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID or "
                        "StudyID requires force=true"
                    )
                study, series = parsed.study, parsed.series
            siblings: list[str] = []
            study_uid = tags.get("DICOMStudyInstanceUID")
            if include_study_image_sets and isinstance(study_uid, str):
                primary = store.equal_index["isPrimary"].get(True, set())
                same = store.equal_index["DICOMStudyInstanceUID"].get(study_uid, set())
                siblings = sorted((same & primary) - {image_set_id})
            now = self._clock()
            result = store.update(
                image_set_id,
                is_primary=None,
                tags={**study, **series},
                now=None,
                clock_now=now,
                accessed=True,
            )
            changes.append(
                self._change("updated", datastore_id, result, previous_version=current["version"])
            )
            for sibling in siblings:
                updated = store.update(
                    sibling, is_primary=None, tags=study, now=None, clock_now=now, accessed=True
                )
                changes.append(
                    self._change(
                        "updated", datastore_id, updated, previous_version=updated["version"] - 1
                    )
                )
        self._publish(changes)
        return {
            "datastoreId": datastore_id,
            "imageSetId": image_set_id,
            "latestVersionId": str(result["version"]),
            "imageSetState": "ACTIVE",
            "imageSetWorkflowStatus": "UPDATED",
            "createdAt": result["createdAt"],
            "updatedAt": result["updatedAt"],
        }

    def delete_image_set(self, datastore_id: str, image_set_id: str) -> dict[str, Any]:
        """DeleteImageSet: the image set and its versions are gone at once.

        Later reads answer ``ResourceNotFound``, searches no longer return it, and its id is
        never reused. The response shows the final state (DELETED / DELETED; the real service
        answers LOCKED / DELETING and finishes asynchronously).
        """
        with self._lock:
            store = self._datastore(datastore_id)
            record = store.delete(image_set_id, self._clock())
        self._publish([self._change("deleted", datastore_id, record)])
        return {
            "datastoreId": datastore_id,
            "imageSetId": image_set_id,
            "imageSetState": "DELETED",
            "imageSetWorkflowStatus": "DELETED",
        }

    def copy_image_set(
        self,
        datastore_id: str,
        source_image_set_id: str,
        source_latest_version: str,
        *,
        destination: tuple[str, str] | None = None,
        copiable_attributes: str | None = None,
        force: bool = False,
        promote_to_primary: bool = False,
    ) -> dict[str, Any]:
        """CopyImageSet, applied at once (local semantics, documented in docs/local-service.md).

        - ``source_latest_version`` must be the source's current version (else
          :class:`ConflictError`); the source is read (an access), not changed.
        - ``copiable_attributes`` (a JSON document in the metadata layout selecting instances)
          is validated; every summary tag is copied whatever it selects.
        - Without ``destination``: a new image set (version 1, the source's tags), non-primary;
          with ``promote_to_primary``, merged into the primary image set of the same series
          (version + 1) if one exists, else a new primary image set.
        - With ``destination`` ``(imageSetId, latestVersionId)``: that image set, at that
          version (else :class:`ConflictError`), gets version + 1 with the source's tags;
          ``promote_to_primary`` makes it primary.
        - Copying into an image set that disagrees on a grouping element
          (:data:`GROUPING_TAGS`) needs ``force`` (else :class:`ConflictError`).
        """
        with self._lock:
            store = self._datastore(datastore_id)
            source = store.image_set_at(
                source_image_set_id, source_latest_version, "sourceImageSet.latestVersionId"
            )
            tags = source["DICOMTags"]
            if copiable_attributes is not None:
                self._check_copiable(copiable_attributes, tags.get("DICOMSeriesInstanceUID"))
            now = self._clock()
            target_id: str | None = None
            if destination is not None:
                target_id, target_version = destination
                if target_id == source_image_set_id:
                    raise ValidationError("the destination image set must differ from the source")
                store.image_set_at(target_id, target_version, "destinationImageSet.latestVersionId")
            elif promote_to_primary:
                series_uid = tags.get("DICOMSeriesInstanceUID")
                same = store.equal_index["DICOMSeriesInstanceUID"].get(series_uid, set())
                primary = store.equal_index["isPrimary"].get(True, set())
                target_id = min(((same & primary) - {source_image_set_id}), default=None)
            changes = [self._change("copy_source", datastore_id, source)]
            if target_id is not None:
                target = store.image_set(target_id)
                if _conflicts(tags, target["DICOMTags"]) and not force:
                    raise ConflictError(
                        "the source and destination disagree on Patient, Study or Series "
                        "grouping attributes; set force=true to copy anyway"
                    )
                removed = {name: None for name in target["DICOMTags"] if name not in tags}
                result = store.update(
                    target_id,
                    is_primary=True if promote_to_primary else None,
                    tags={**removed, **tags},
                    now=None,
                    clock_now=now,
                    accessed=True,
                )
                previous: int | None = target["version"]
            else:
                self._copies += 1
                seed = (
                    f"copy:{datastore_id}:{source_image_set_id}:{source['version']}:{self._copies}"
                )
                new_id = hashlib.sha256(seed.encode()).hexdigest()[:32]
                moment = max(now, source["createdAt"])
                result = normalize_record(
                    {
                        "imageSetId": new_id,
                        "version": 1,
                        "createdAt": moment,
                        "updatedAt": moment,
                        "lastAccessedAt": moment,
                        "storageTier": FREQUENT,
                        "isPrimary": promote_to_primary,
                        "DICOMTags": dict(tags),
                    }
                )
                store.add([result], now)
                previous = None
            store.touch(source_image_set_id, now)
            source = store.image_set(source_image_set_id)
            changes.append(
                self._change(
                    "copied",
                    datastore_id,
                    result,
                    previous_version=previous,
                    source_image_set_id=source_image_set_id,
                )
            )
        self._publish(changes)
        return {
            "datastoreId": datastore_id,
            "sourceImageSetProperties": self._copy_properties(store, source),
            "destinationImageSetProperties": self._copy_properties(store, result),
        }

    @staticmethod
    def _copy_properties(store: Datastore, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "imageSetId": record["imageSetId"],
            "latestVersionId": str(record["version"]),
            "imageSetState": "ACTIVE",
            "imageSetWorkflowStatus": "COPIED",
            "createdAt": record["createdAt"],
            "updatedAt": record["updatedAt"],
            "imageSetArn": f"{store.arn}/imageset/{record['imageSetId']}",
        }

    @staticmethod
    def _check_copiable(text: str, series_uid: Any) -> None:
        document = load_json(text, "copiableAttributes")
        if not isinstance(document, dict):
            raise ValidationError("copiableAttributes must be a JSON object")
        if set(document) - {"SchemaVersion", "Patient", "Study"}:
            raise ValidationError("copiableAttributes has unknown member(s)")
        study = document.get("Study", {})
        if not isinstance(study, dict):
            raise ValidationError("copiableAttributes.Study must be an object")
        series = study.get("Series", {})
        if not isinstance(series, dict):
            raise ValidationError("copiableAttributes.Study.Series must be an object")
        if any(uid != series_uid for uid in series):
            raise ValidationError("copiableAttributes names a series not in the source image set")

    # -- search ------------------------------------------------------------------------------

    def search(
        self,
        datastore_id: str,
        criteria: dict[str, Any] | None,
        max_results: int = MAX_RESULTS,
        next_token: str | None = None,
        before_page: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Run SearchImageSets; return ``imageSetsMetadataSummaries`` and maybe ``nextToken``/``sort``.

        ``before_page`` is called once the request is validated and before the page is
        computed (the local server injects updates there).

        Raises
        ------
        ValidationError
            Bad criteria, ``max_results`` outside 1..50, or a forged, foreign or malformed token.
        ResourceNotFound
            Unknown datastore.
        """
        query = self._search_request(datastore_id, criteria, max_results)
        cursor = (
            None if next_token is None else self._tokens.decode_cursor(next_token, query.canonical)
        )
        if before_page is not None:
            before_page()
        with self._lock:
            store = self._datastore(datastore_id)
            entries = page(store, query, cursor, max_results + 1, self.undated_first)
            rows = [copy_summary(store.current[entry[2]]) for entry in entries[:max_results]]
        token = None
        if len(entries) > max_results:
            token = self._tokens.encode_cursor(entries[max_results - 1], query.canonical)
        return _answer(rows, token, query)

    def _search_request(
        self, datastore_id: str, criteria: dict[str, Any] | None, max_results: int
    ) -> Query:
        """A SearchImageSets request checked in the service's order: datastore, size, criteria."""
        with self._lock:
            self._datastore(datastore_id)
        check_max_results(max_results)
        return parse_criteria(criteria, datastore_id, self.one_range_filter)

    # -- fault support ------------------------------------------------------------------------

    def endless_page(
        self,
        datastore_id: str,
        criteria: dict[str, Any] | None,
        max_results: int,
        next_token: str | None,
        *,
        stuck: bool = False,
    ) -> dict[str, Any]:
        """A validated SearchImageSets answer with a fresh, never-repeated token.

        No items (``endless_empty_pages``), or with *stuck* the query's first page again
        (``stuck_cursor``). The request is checked as :meth:`search` checks it; a token must be
        one this backend issued for the same query (a cursor or an earlier endless page's).
        """
        query = self._search_request(datastore_id, criteria, max_results)
        if next_token is not None:
            self._tokens.check_scope(next_token, query.canonical)
        rows: list[dict[str, Any]] = []
        if stuck:
            rows = self.search(datastore_id, criteria, max_results)["imageSetsMetadataSummaries"]
        return _answer(rows, self._endless_token(query), query)

    def start_page(
        self, datastore_id: str, criteria: dict[str, Any] | None, max_results: int = MAX_RESULTS
    ) -> dict[str, Any]:
        """An empty first page whose token resumes at the query's start (``empty_first_page``).

        Legal: the service may answer an empty page with a nextToken. Checked as :meth:`search`.
        """
        query = self._search_request(datastore_id, criteria, max_results)
        return _answer([], self._tokens.encode_start(query.canonical), query)

    def _endless_token(self, query: Query) -> str:
        """A fresh, never-repeated token of *query* (an endless or stuck page's)."""
        with self._lock:
            self._endless += 1
            serial = self._endless
        return self._tokens.encode_endless(serial, query.canonical)

    def apply_random_updates(
        self,
        datastore_id: str,
        count: int,
        rng: random.Random,
        change_tags: Sequence[str] = (),
        change_rate: float = 1.0,
    ) -> list[tuple[str, bool]]:
        """Give ``count`` random image sets a new version; return ``(imageSetId, changed)``.

        ``changed`` says whether ``change_tags`` were changed (each update changes them with
        probability ``change_rate``); see :mod:`~healthimaging_df.local.churn`.
        """
        out: list[tuple[str, bool]] = []
        changes: list[Change] = []
        with self._lock:
            store = self._datastore(datastore_id)
            for _ in range(count):
                done = random_update(store, rng, change_tags, change_rate, self._clock())
                if done is not None:
                    out.append(done)
                    record = store.current[done[0]]
                    changes.append(
                        self._change(
                            "updated",
                            datastore_id,
                            record,
                            previous_version=record["version"] - 1,
                        )
                    )
        self._publish(changes)
        return out


def _answer(rows: list[dict[str, Any]], token: str | None, query: Query) -> dict[str, Any]:
    """A SearchImageSets answer: the rows, the token when there is one, the sort when asked."""
    result: dict[str, Any] = {"imageSetsMetadataSummaries": rows}
    if token is not None:
        result["nextToken"] = token
    if query.sort_given is not None:
        result["sort"] = dict(query.sort_given)
    return result
