"""Malformed HTTP 200 bodies: SearchImageSets pages (:data:`MALFORMED_KINDS`) and QIDO-RS pages.

Each is something a client meets in production: a body cut short by a proxy or a dropped
connection, an HTML error page from a load balancer, an empty body, and pages that parse as
JSON but break the service model (null list, wrong types, a non-numeric timestamp).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["MalformedBody", "malformed_body", "malformed_qido_body"]

_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class MalformedBody:
    """What to send: ``body``, its ``content_type``, and for ``short`` the declared length.

    ``declared_length`` larger than ``len(body)`` means: send that Content-Length, write the
    body, then close the connection (a response cut in transit).
    """

    body: bytes
    content_type: str = "application/json"
    declared_length: int | None = None


def _encode(document: Any) -> bytes:
    def default(value: Any) -> float:
        if isinstance(value, datetime):
            return value.timestamp()
        raise TypeError(f"cannot encode {type(value).__name__}")

    return json.dumps(document, default=default, ensure_ascii=False).encode("utf-8")


def _cut(full: bytes, rng: random.Random) -> bytes:
    """A proper prefix of a JSON object: never valid JSON itself (its braces do not close)."""
    return full[: max(1, int(len(full) * rng.uniform(0.2, 0.9)))]


def _victim(result: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of ``result`` and one item of it to spoil (a placeholder item if the page is empty)."""
    items = [dict(item) for item in result.get("imageSetsMetadataSummaries") or []]
    if not items:
        items.append({"imageSetId": "0" * 32, "version": 1, "createdAt": 0.0, "updatedAt": 0.0})
    spoiled = dict(result, imageSetsMetadataSummaries=items)
    return spoiled, items[rng.randrange(len(items))]


def malformed_body(kind: str, result: dict[str, Any], rng: random.Random) -> MalformedBody:
    """Spoil a SearchImageSets ``result`` the way ``kind`` says."""
    if kind == "truncated":
        return MalformedBody(_cut(_encode(result), rng))
    if kind == "short":
        full = _encode(result)
        return MalformedBody(_cut(full, rng), declared_length=len(full))
    if kind == "html":
        return MalformedBody(_HTML, content_type="text/html")
    if kind == "empty":
        return MalformedBody(b"")
    if kind == "null_summaries":
        return MalformedBody(_encode(dict(result, imageSetsMetadataSummaries=None)))
    if kind == "bad_item":
        spoiled, item = _victim(result, rng)
        item["imageSetId"] = str(item["imageSetId"])[:10]
        item["version"] = str(item["version"])
        return MalformedBody(_encode(spoiled))
    if kind == "bad_timestamp":
        spoiled, item = _victim(result, rng)
        item["createdAt"] = "not-a-timestamp"
        return MalformedBody(_encode(spoiled))
    raise ValueError(f"unknown malformed kind {kind!r}")


def malformed_qido_body(
    kind: str, datasets: list[dict[str, Any]], uid_tag: str, rng: random.Random
) -> MalformedBody:
    """Spoil a QIDO-RS page (a list of DICOM JSON objects) the way ``kind`` says.

    ``uid_tag`` is the level's row key (``0020000D`` studies, ``0020000E`` series, ``00080018``
    instances), the UID a client's next step needs.
    """
    dicom = "application/dicom+json"
    if kind == "empty":
        return MalformedBody(b"", content_type=dicom)
    if kind == "object":
        return MalformedBody(b"{}", content_type=dicom)
    if kind == "not_list":
        return MalformedBody(_encode({"results": datasets}), content_type=dicom)
    if kind == "truncated":
        return MalformedBody(_cut(_encode(datasets), rng), content_type=dicom)
    if kind == "html":
        return MalformedBody(_HTML, content_type="text/html")
    items = [dict(item) for item in datasets] or [{"00080060": {"vr": "CS", "Value": ["CT"]}}]
    victim = rng.randrange(len(items))
    if kind == "not_objects":
        items[victim] = None  # type: ignore[call-overload]
    elif kind == "missing_uid":
        items[victim].pop(uid_tag, None)
    elif kind == "missing_study_uid":
        items[victim].pop("0020000D", None)
    else:
        raise ValueError(f"unknown malformed QIDO-RS kind {kind!r}")
    return MalformedBody(_encode(items), content_type=dicom)
