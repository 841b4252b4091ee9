"""Check a SearchImageSets response against the service model before any of it counts.

A 200 whose body was cut in transit, is not JSON, or is someone else's page comes out of botocore as
a dict without summaries and without a ``nextToken``: read naively, that is "the last page", and the
rest of the chain is lost without a word. Every page is therefore checked here; a failure is a
:class:`~healthimaging_df.errors.MalformedResponseError` (retried by the fetcher like a 5xx).
Messages name the rule, never the value (responses are PHI).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from healthimaging_df import schema
from healthimaging_df.errors import MalformedResponseError

OPERATION = "SearchImageSets"
_IMAGE_SET_ID = re.compile(r"[0-9a-z]{32}")
_TAG_KINDS = {c.source[1]: c.kind for c in schema.COLUMNS if c.source[:1] == ("DICOMTags",)}
_TOP_KINDS = {c.source[0]: c.kind for c in schema.COLUMNS if len(c.source) == 1}
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "bool": (bool,),
    "timestamp": (datetime,),
}


def malformed(index: int | None, rule: str) -> MalformedResponseError:
    """The error for a page that broke *rule* (words of ours, no response values)."""
    return MalformedResponseError(rule, index, operation=OPERATION)


def check_page(response: Any, index: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Return ``(summaries, nextToken)`` of a botocore-parsed page, or raise if it breaks the model."""
    if not isinstance(response, dict):
        raise malformed(index, "the response is not an object")
    items = response.get("imageSetsMetadataSummaries")
    if not isinstance(items, list):
        raise malformed(index, "imageSetsMetadataSummaries is missing or not a list")
    token = response.get("nextToken")
    if token is not None and (not isinstance(token, str) or not token):
        raise malformed(index, "nextToken is present but not a non-empty string")
    for position, item in enumerate(items, start=1):
        _check_item(item, position, index)
    return items, token


def _check_item(item: Any, position: int, index: int | None) -> None:
    where = f"summary #{position}"
    if not isinstance(item, dict):
        raise malformed(index, f"{where} is not an object")
    image_set_id = item.get("imageSetId")
    if not isinstance(image_set_id, str) or not _IMAGE_SET_ID.fullmatch(image_set_id):
        raise malformed(index, f"{where}: imageSetId is not 32 characters of [0-9a-z]")
    for name in ("createdAt", "updatedAt"):
        if not isinstance(item.get(name), datetime):
            raise malformed(index, f"{where}: {name} is missing or not a timestamp")
    for name, kind in _TOP_KINDS.items():
        _check_value(item.get(name), kind, f"{where}: {name}", index)
    tags = item.get("DICOMTags")
    if tags is None:
        return
    if not isinstance(tags, dict):
        raise malformed(index, f"{where}: DICOMTags is not an object")
    for name, kind in _TAG_KINDS.items():
        _check_value(tags.get(name), kind, f"{where}: DICOMTags.{name}", index)


def _check_value(value: Any, kind: str, where: str, index: int | None) -> None:
    if value is None or kind not in _PYTHON_TYPES:
        return
    expected = _PYTHON_TYPES[kind]
    if not isinstance(value, expected) or (kind == "int" and isinstance(value, bool)):
        raise malformed(index, f"{where} has the wrong type")
