"""GetImageSetMetadata documents and GetImageSet tiers: the calls, gunzip, parse, shape, typed failures.

A document is gzip JSON (``Patient``, ``Study``, ``Study.Series[uid].Instances[uid]``, each with a
``DICOM`` object keyed by keyword). :func:`get_document_blob` calls for one and gunzips it,
:func:`parse_document` parses it (orjson) and checks its shape, so that a document of another
shape is a :class:`DocumentError` ("InvalidMetadataDocument"), never an ``AttributeError`` deep in
the flattening. Errors carry botocore's code only: its text can quote request values.

:data:`collector_paused` defers Python's cyclic garbage collector while a document is parsed and
flattened (process-wide, so scoped to the parse and counted across threads: docs/architecture.md,
"Side effects").
"""

from __future__ import annotations

import gc
import gzip
import json
import threading
from typing import Any

import orjson

from healthimaging_df.aws.errors import aws_errors, failure, service_error
from healthimaging_df.errors import QueryValidationError

__all__ = [
    "DOCUMENT_OPERATION",
    "INVALID_DOCUMENT",
    "TIER_OPERATION",
    "DocumentError",
    "collector_paused",
    "get_document_blob",
    "get_tier",
    "parse_document",
]

DOCUMENT_OPERATION = "GetImageSetMetadata"
TIER_OPERATION = "GetImageSet"  # returns storageTier and is not an access
INVALID_DOCUMENT = "InvalidMetadataDocument"


class DocumentError(Exception):
    """One document could not be had: its error *code*; *fatal* when every call would fail alike."""

    def __init__(self, code: str, fatal: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.fatal = fatal


def _loads(blob: bytes) -> Any:
    """orjson, falling back to the stdlib for what it refuses and json reads (NaN, huge ints)."""
    try:
        return orjson.loads(blob)
    except orjson.JSONDecodeError:
        return json.loads(blob)


def get_document_blob(
    client: Any, datastore_id: str, image_set_id: str, version: int | None
) -> bytes:
    """The document's JSON bytes, gunzipped (zlib releases the GIL while it inflates)."""
    kwargs: dict[str, Any] = {"datastoreId": datastore_id, "imageSetId": image_set_id}
    if version is not None:
        kwargs["versionId"] = str(version)
    try:
        response = client.get_image_set_metadata(**kwargs)
        blob: bytes = response["imageSetMetadataBlob"].read()
    except aws_errors() as exc:  # botocore's text can quote request values: the code only
        found = failure(exc)
        raise DocumentError(found.code, found.fatal) from None
    try:
        if blob[:2] == b"\x1f\x8b" or response.get("contentEncoding") == "gzip":
            blob = gzip.decompress(blob)
    except (OSError, EOFError, ValueError):
        raise DocumentError(INVALID_DOCUMENT) from None
    return blob


def parse_document(blob: bytes) -> dict[str, Any]:
    """The parsed document, its shape checked; :class:`DocumentError` if it is not one.

    The shape the flattening relies on: objects where the service model has objects (the
    document, ``Study``, ``Series`` and each series, its ``DICOM``, ``Instances`` and each
    instance with its ``DICOM``); each may be missing or null.
    """
    try:
        document = _loads(blob)
    except ValueError:
        raise DocumentError(INVALID_DOCUMENT) from None
    if not _well_formed(document):
        raise DocumentError(INVALID_DOCUMENT)
    result: dict[str, Any] = document
    return result


def _object(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def _well_formed(document: Any) -> bool:
    if not isinstance(document, dict) or not _object(document.get("Study")):
        return False
    series_map = (document.get("Study") or {}).get("Series")
    if not _object(series_map):
        return False
    for series in (series_map or {}).values():
        if not isinstance(series, dict) or not _object(series.get("DICOM")):
            return False
        instances = series.get("Instances")
        if not _object(instances):
            return False
        for instance in (instances or {}).values():
            if not isinstance(instance, dict) or not _object(instance.get("DICOM")):
                return False
    return True


class CollectorPause:
    """Defers Python's cyclic garbage collector while any thread parses a document.

    A parsed JSON document holds no reference cycles, so the collector can never free any of
    it; but its thousands of containers trigger young collections that walk it, promote it,
    and then full collections that walk the whole heap again (measured: more than half of the
    CPU of a 500-instance document). Pausing while a document is alive lets reference counting
    free it first. Collection is only deferred: the allocation counts carry on and the first
    allocation after the pause collects whatever other threads made meanwhile. A collector
    the process had disabled stays disabled (one disabled by another thread during a pause is
    enabled again at its end).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                if self._resume:
                    gc.disable()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


collector_paused = CollectorPause()


def get_tier(client: Any, datastore_id: str, image_set_id: str, position: int) -> str | None:
    """The image set's storageTier from GetImageSet (not an access); None if there is no such set."""
    try:
        response = client.get_image_set(datastoreId=datastore_id, imageSetId=image_set_id)
    except aws_errors() as exc:
        found = failure(exc)
        if found.code == "ResourceNotFoundException":  # nothing to access; its metadata call too
            return None
        raise service_error(
            TIER_OPERATION,
            position,
            found,
            detail="the storage tier could not be checked (allow_archive_access=True skips the "
            "check, and reads archived image sets too)",
        ) from None
    tier = response.get("storageTier")
    if not isinstance(tier, str):
        raise QueryValidationError(
            "allow_archive_access",
            f"{TIER_OPERATION} answered without storageTier (a botocore older than the service "
            "model of 2025-11 drops it), so the tier cannot be checked: upgrade botocore, give a "
            "frame with a current storageTier, or pass allow_archive_access=True",
        )
    return tier
