"""A lean SearchImageSets page path: the body parsed with orjson straight into Arrow, checked first.

botocore spends most of a page's client CPU turning the JSON body into dicts of datetimes, which
the frame stage then turns into columns again. Here a handler on the client's
``before-parse.medical-imaging.SearchImageSets`` event takes a successful (2xx) body, parses and
validates it into a table of :func:`healthimaging_df.schema.arrow_schema`, and hands botocore an
empty ``{}`` to parse instead. Everything else stays botocore's: credentials, endpoint resolution,
signing, retries (throttling, 5xx, connection errors) and error responses, which botocore parses
and raises as ``ClientError`` as usual.

The handler only acts while :func:`fetch_page` is calling on the same thread (a thread-local
flag), so a user's own client keeps working unchanged for every other call, including their own
``search_image_sets``. The body is never logged: botocore's DEBUG line for the response body
shows the ``{}`` it was given.

Every page is checked against the service model before it counts; a page that breaks it (cut
short, not JSON, wrong types) raises :class:`~healthimaging_df.errors.MalformedResponseError`,
which names the rule and never a value. It may have been damaged in transit: retry it like a 5xx.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import aws, schema
from healthimaging_df.core import logs
from healthimaging_df.errors import MalformedResponseError, SearchError

__all__ = [
    "EVENT",
    "MalformedResponseError",
    "ParsedPage",
    "fetch_page",
    "hooked",
    "parse_page",
    "wallclock_us",
]

OPERATION = "SearchImageSets"
EVENT = "before-parse.medical-imaging.SearchImageSets"
"""The botocore event the parser is registered for (``before-parse.{service-id}.{operation}``)."""

_RESULT_KEY = "healthimaging_df.engine.pages.result"
_UNIQUE_ID = "healthimaging_df.engine.pages.before_parse"
_ID_RE = re.compile(r"[0-9a-z]{32}")
_MAX_TOKEN = 8192
# datetime's range, in epoch seconds: 0001-01-01 to 9999-12-31 23:59:59.999999.
_MIN_SECONDS = -62135596800.0
_MAX_SECONDS = 253402300800.0

_NUMBER = frozenset({int, float})
_TYPES: dict[schema.Kind, frozenset[type]] = {
    "string": frozenset({str}),
    "int": frozenset({int}),  # bool is not int here: type() is checked, not isinstance()
    "bool": frozenset({bool}),
    "timestamp": _NUMBER,
}
_WORDS: dict[schema.Kind, str] = {
    "string": "a string",
    "int": "an integer",
    "bool": "a boolean",
    "timestamp": "a number (epoch seconds)",
}
# Beyond the model (which requires imageSetId only): what every real summary has and what
# deduplication (version) and createdAt windows need.
_REQUIRED = frozenset({"imageSetId", "version", "createdAt", "updatedAt"})
_TOP = [c for c in schema.COLUMNS if len(c.source) == 1]
_TAGS = [c for c in schema.COLUMNS if c.source[:1] == ("DICOMTags",)]
_TIMESTAMPS = [c.name for c in _TOP if c.kind == "timestamp"]
_TOP_SPECS = [
    (c.name, c.source[0], _TYPES[c.kind], _WORDS[c.kind], c.name in _REQUIRED) for c in _TOP
]
_TAG_SPECS = [(c.name, c.source[1], _TYPES[c.kind], _WORDS[c.kind]) for c in _TAGS]
_SCHEMA = schema.arrow_schema()
_DICT: frozenset[type] = frozenset({dict})
_DICT_OR_NONE: frozenset[type] = frozenset({dict, type(None)})
_NONE: frozenset[type] = frozenset({type(None)})
_EMPTY: dict[str, Any] = {}
_LEN_32 = frozenset({32})
_ID_CHARS = re.compile(r"[0-9a-z]*").fullmatch
# The wire shape as Arrow converts it: timestamps as float64 epoch seconds.
_WIRE_TYPES: dict[schema.Kind, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "bool": pa.bool_(),
    "timestamp": pa.float64(),
}
_WIRE_TOP = [c.source[0] for c in _TOP] + ["DICOMTags"]
_WIRE_TAGS = [c.source[1] for c in _TAGS]
_WIRE = pa.struct(
    [pa.field(c.source[0], _WIRE_TYPES[c.kind]) for c in _TOP]
    + [
        pa.field(
            "DICOMTags",
            pa.struct([pa.field(c.source[1], _WIRE_TYPES[c.kind]) for c in _TAGS]),
        )
    ]
)
# Where Arrow's conversion is lenient (1.5 -> int64 1, True -> float64 1.0): checked in Python.
_STRICT_TOP = [
    (c.source[0], _TYPES[c.kind], _WORDS[c.kind]) for c in _TOP if c.kind in ("int", "timestamp")
]
_STRICT_TAGS = [(c.source[1], _TYPES[c.kind], _WORDS[c.kind]) for c in _TAGS if c.kind == "int"]
_DIGITS = re.compile(r"[0-9]{8}").fullmatch
_TIME_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?").fullmatch
_TYPES_BY_NAME = {f.name: f.type for f in _SCHEMA}


@dataclass(frozen=True)
class ParsedPage:
    """One validated SearchImageSets page.

    Attributes
    ----------
    table
        The page's summaries as a table of exactly ``schema.arrow_schema()`` (PHI).
    next_token
        The page's ``nextToken``, or None on a chain's last page.
    retry_attempts
        How many times botocore retried the request (throttling, 5xx) before this page.
    """

    table: pa.Table = field(repr=False)
    next_token: str | None = field(repr=False)
    retry_attempts: int = 0

    @property
    def num_rows(self) -> int:
        """Image sets on the page."""
        return int(self.table.num_rows)


# -- parsing -------------------------------------------------------------------------------------


def parse_page(body: bytes, content_length: int | None = None) -> ParsedPage:
    """Parse and validate one SearchImageSets response body (HTTP 2xx).

    Parameters
    ----------
    body
        The raw response body.
    content_length
        The response's ``Content-Length``, when it had one: a body of another length was cut
        short (or padded) in transit.

    Raises
    ------
    MalformedResponseError
        The body breaks the service model; the message names the rule, never a value.
    """
    if content_length is not None and content_length != len(body):
        raise MalformedResponseError("the body is not as long as its Content-Length")
    if not body:
        raise MalformedResponseError("the body is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedResponseError("the body is not JSON") from None
    if type(document) is not dict:
        raise MalformedResponseError("the body is not a JSON object")
    items = document.get("imageSetsMetadataSummaries")
    if items is None:
        raise MalformedResponseError("imageSetsMetadataSummaries is missing")
    if type(items) is not list:
        raise MalformedResponseError("imageSetsMetadataSummaries is not a list")
    token = document.get("nextToken")
    if token is not None and not (
        type(token) is str and 1 <= len(token) <= _MAX_TOKEN and token.isascii()
    ):
        raise MalformedResponseError("nextToken is not a string of 1 to 8192 ASCII characters")
    return ParsedPage(_table(items), token)


def _table(items: list[Any]) -> pa.Table:
    """Validate summaries and build their table.

    One C++ conversion of the summaries as a struct of the wire types checks most rules (strings,
    booleans, objects); what it would let through (a float or boolean where an integer or a
    number is declared) is checked per column in Python, where ``type()`` is exact.
    """
    try:
        summaries = pa.array(items, type=_WIRE)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError):
        _diagnose(items)
        raise MalformedResponseError(
            "a value is out of its type's range or not encodable"
        ) from None
    if summaries.null_count:
        bad = summaries.is_null().to_pylist().index(True)
        raise MalformedResponseError(f"summary #{bad} is not an object")
    top = dict(zip(_WIRE_TOP, summaries.flatten(), strict=True))
    tags = dict(zip(_WIRE_TAGS, top.pop("DICOMTags").flatten(), strict=True))
    for name in _REQUIRED:
        if top[name].null_count:
            bad = top[name].is_null().to_pylist().index(True)
            raise MalformedResponseError(f"summary #{bad} has no {name}")
    _check_ids(top["imageSetId"].to_pylist())
    for key, types, words in _STRICT_TOP:
        _check([item.get(key) for item in items], types, False, key, words)
    dicoms = [item.get("DICOMTags") or _EMPTY for item in items]
    for key, types, words in _STRICT_TAGS:
        _check([d.get(key) for d in dicoms], types, False, f"DICOMTags.{key}", words)

    arrays: dict[str, pa.Array] = {}
    for column in _TOP:
        if column.kind == "timestamp":
            arrays[column.name] = _timestamp(top[column.source[0]], column.name)
        else:
            arrays[column.name] = top[column.source[0]]
    for column in _TAGS:
        arrays[column.name] = tags[column.source[1]]
    arrays["StudyDateTime"] = pa.array(
        list(
            map(
                _wallclock_cached,
                arrays["StudyDate"].to_pylist(),
                arrays["StudyTime"].to_pylist(),
            )
        ),
        type=pa.int64(),
    ).view(_TYPES_BY_NAME["StudyDateTime"])
    return pa.Table.from_arrays([arrays[n] for n in schema.COLUMN_NAMES], schema=_SCHEMA)


def _timestamp(seconds_array: pa.Array, name: str) -> pa.Array:
    """Epoch seconds to UTC microseconds, rounded as ``datetime.fromtimestamp`` (botocore) does."""
    mask = None
    if seconds_array.null_count:
        mask = seconds_array.is_null().to_numpy(zero_copy_only=False)
        seconds_array = pc.fill_null(seconds_array, 0.0)
    seconds = seconds_array.to_numpy()
    if not ((seconds >= _MIN_SECONDS) & (seconds < _MAX_SECONDS)).all():
        raise MalformedResponseError(f"{name}: a timestamp is outside years 1 to 9999")
    # CPython's fromtimestamp: split off the whole seconds, round the fraction half to even.
    whole = np.trunc(seconds)
    micros = whole.astype(np.int64) * 1_000_000
    micros += np.rint((seconds - whole) * 1e6).astype(np.int64)
    return pa.array(micros, type=pa.int64(), mask=mask).view(_TYPES_BY_NAME[name])


def _diagnose(items: list[Any]) -> None:
    """Check every rule in Python, field by field, and raise for the first summary breaking one."""
    if not set(map(type, items)) <= _DICT:
        raise MalformedResponseError(f"summary #{_first(items, _DICT)} is not an object")
    columns: dict[str, list[Any]] = {}
    for name, key, types, words, required in _TOP_SPECS:
        values = [item.get(key) for item in items]
        _check(values, types, required, key, words)
        columns[name] = values
    _check_ids(columns["imageSetId"])
    dicoms = [item.get("DICOMTags") for item in items]
    if not set(map(type, dicoms)) <= _DICT_OR_NONE:
        raise MalformedResponseError(
            f"summary #{_first(dicoms, _DICT_OR_NONE)}: DICOMTags is not an object"
        )
    dicoms = [_EMPTY if d is None else d for d in dicoms]
    for name, key, types, words in _TAG_SPECS:
        values = [d.get(key) for d in dicoms]
        _check(values, types, False, f"DICOMTags.{key}", words)
        columns[name] = values


def _check_ids(ids: list[str]) -> None:
    """Every imageSetId is 32 characters [0-9a-z] (one regex over them all when they are)."""
    if set(map(len, ids)) - _LEN_32 or not _ID_CHARS("".join(ids)):
        bad = next(i for i, v in enumerate(ids) if not _ID_RE.fullmatch(v))
        raise MalformedResponseError(f"summary #{bad}: imageSetId is not 32 characters [0-9a-z]")


def _check(values: list[Any], types: frozenset[type], required: bool, key: str, words: str) -> None:
    """Raise unless every value is of *types* (or None, unless *required*)."""
    allowed = types if required else types | _NONE
    if set(map(type, values)) <= allowed:
        return
    position = _first(values, allowed)
    if values[position] is None:
        raise MalformedResponseError(f"summary #{position} has no {key}")
    raise MalformedResponseError(f"summary #{position}: {key} is not {words}")


def _first(values: list[Any], allowed: frozenset[type]) -> int:
    return next(i for i, v in enumerate(values) if type(v) not in allowed)


def wallclock_us(study_date: str | None, study_time: str | None) -> int | None:
    """StudyDate + StudyTime as wall-clock microseconds since 1970, exactly as ``flatten.study_datetime``.

    Pure Python for one pair (the Arrow version costs about a millisecond per call): a real
    YYYYMMDD date (proleptic Gregorian, year 0000 included, as Arrow reads it), and a DICOM TM
    time (HH, HHMM, HHMMSS, HHMMSS.f{1,6}); no time is midnight; anything else is None.
    """
    if study_date is None or len(study_date) != 8 or not _DIGITS(study_date):
        return None
    year, month, day = int(study_date[:4]), int(study_date[4:6]), int(study_date[6:])
    if not 1 <= month <= 12 or not 1 <= day <= _month_days(year, month):
        return None
    micros = _days_from_civil(year, month, day) * 86_400_000_000
    if not study_time:
        return micros
    match = _TIME_RE(study_time)
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    h, m, s = int(hours), int(minutes or 0), int(seconds or 0)
    if h >= 24 or m >= 60 or s >= 60:
        return None
    return micros + (h * 3600 + m * 60 + s) * 1_000_000 + int((fraction or "").ljust(6, "0"))


_wallclock_cached = functools.lru_cache(maxsize=4096)(wallclock_us)


def _month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


# -- the botocore hook ---------------------------------------------------------------------------

_state = threading.local()


def _before_parse(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    """Take a 2xx body while :func:`fetch_page` is calling on this thread; leave errors alone."""
    if not getattr(_state, "armed", False):
        return
    status = response_dict.get("status_code")
    if not isinstance(status, int) or not 200 <= status < 300:
        return  # botocore parses the error: codes, retries and ClientError stay its own
    body = response_dict.get("body")
    response_dict["body"] = b"{}"
    result: ParsedPage | MalformedResponseError
    try:
        if not isinstance(body, bytes):
            raise MalformedResponseError("the body is not bytes")
        result = parse_page(body, _content_length(response_dict.get("headers")))
    except MalformedResponseError as exc:
        exc.status = status
        result = exc
    customized_response_dict[_RESULT_KEY] = result


def _content_length(headers: Any) -> int | None:
    if headers is None:
        return None
    raw = headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise MalformedResponseError("the Content-Length header is not a number") from None


def hooked(client: Any) -> AbstractContextManager[None]:
    """The page handler on *client*'s events for the block (gone after it; inert until armed).

    :func:`fetch_page` enters it itself; a run wraps its whole life in it, so each page only
    counts (:func:`healthimaging_df.aws.hooked`).
    """
    logs.refresh()
    return aws.hooked(client, EVENT, _before_parse, _UNIQUE_ID)


def fetch_page(
    client: Any,
    kwargs: Mapping[str, Any],
    *,
    request_index: int | None = None,
) -> ParsedPage:
    """Call ``client.search_image_sets(**kwargs)`` and return the page, parsed and validated.

    Parameters
    ----------
    client
        A boto3 ``medical-imaging`` client (the user's own or ours).
    kwargs
        The request, exactly as ``search_image_sets`` takes it.
    request_index
        The chain's index, named in errors.

    Pacing is the caller's: wrap the call in ``aws.paced(client, limiter)``.

    Raises
    ------
    MalformedResponseError
        A 2xx page broke the service model, or its body was cut short in transit.
    botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError
        As ``search_image_sets`` raises them (after botocore's own retries).
    """
    from botocore.exceptions import ConnectionClosedError, IncompleteReadError

    previous = getattr(_state, "armed", False)
    _state.armed = True
    try:
        with hooked(client):
            response: dict[str, Any] = client.search_image_sets(**kwargs)
    except (IncompleteReadError, ConnectionClosedError) as exc:
        if isinstance(exc, ConnectionClosedError) and not _cut_body(exc):
            raise
        raise MalformedResponseError("the body was cut short", request_index) from None
    finally:
        _state.armed = previous
    result = response.pop(_RESULT_KEY, None)
    if isinstance(result, MalformedResponseError):
        result.request_index = request_index
        raise MalformedResponseError(result.rule, request_index, result.status) from None
    if result is None:  # the handler never ran: a botocore without the before-parse event
        raise SearchError(
            OPERATION,
            request_index,
            "LeanPathUnavailable",
            detail="this botocore does not emit before-parse events",
        )
    meta = response.get("ResponseMetadata") or {}
    attempts = meta.get("RetryAttempts", 0)
    return ParsedPage(result.table, result.next_token, attempts if isinstance(attempts, int) else 0)


def _cut_body(exc: Exception) -> bool:
    """Whether a ConnectionClosedError came from a body cut short (not a refused connection)."""
    from http.client import IncompleteRead

    from urllib3.exceptions import IncompleteRead as Urllib3IncompleteRead
    from urllib3.exceptions import InvalidChunkLength

    error = getattr(exc, "kwargs", {}).get("error")
    seen: list[BaseException] = []
    stack: list[Any] = [error]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or item in seen:
            continue
        seen.append(item)
        if isinstance(item, (IncompleteRead, Urllib3IncompleteRead, InvalidChunkLength)):
            return True
        stack.extend(a for a in item.args if isinstance(a, BaseException))
        stack.extend([item.__cause__, item.__context__])
    return False
