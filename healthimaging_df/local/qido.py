"""DICOMweb QIDO-RS on the wire: routes, query parsing, paging, the record cap, DICOM JSON.

Serves ``/datastore/{id}/studies``, ``/studies/{S}/series``, ``/studies/{S}/instances``,
``/studies/{S}/series/{Se}/instances``, ``/series`` and ``/instances`` over the same image sets
SearchImageSets reads, primary ones only, as HealthImaging documents it (``docs/dicomweb.md``),
on the service's DICOMweb address only (the API address answers 404 for these paths, as AWS's
``runtime-`` host does). What a record holds and how it matches is
:mod:`~healthimaging_df.local.qido_index`; the vocabulary and matchers are
:mod:`~healthimaging_df.local.qido_match`. Signing and IAM are checked before a handler runs
(:mod:`~healthimaging_df.local.wire`).

Choices where the service's documentation is silent are marked "local choice"; a test pins each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from healthimaging_df.local.backend import Backend
from healthimaging_df.local.errors import ValidationError
from healthimaging_df.local.faults import StatsRecorder
from healthimaging_df.local.malformed import malformed_qido_body
from healthimaging_df.local.qido_index import SERIES_STUDY_VALUES, QidoIndex
from healthimaging_df.local.qido_match import (
    ATTRIBUTES,
    INSTANCE_ALL,
    INSTANCE_KEYS,
    INSTANCE_RETURN,
    INSTANCES,
    SERIES,
    SERIES_ALL,
    SERIES_KEYS,
    SERIES_RETURN,
    STUDIES,
    STUDY_ALL,
    STUDY_KEYS,
    STUDY_RETURN,
    UID_RE,
    Matcher,
    matcher,
    resolve,
)
from healthimaging_df.local.wire import route_map

__all__ = [
    "MAX_INCLUDEFIELD",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "OLDER_RECORD_CAP",
    "RULES",
    "URL_MAP",
    "QidoApp",
    "QidoSettings",
]

MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000
MAX_INCLUDEFIELD = 50
OLDER_RECORD_CAP = 10_000

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

URL_MAP = route_map(RULES)
"""The DICOMweb address's routes."""

_LEVEL_UID = {STUDIES: "0020000D", SERIES: "0020000E", INSTANCES: "00080018"}


@dataclass
class QidoSettings:
    """QIDO-RS behaviour of one local server where AWS's is unconfirmed; mutable at runtime.

    Attributes
    ----------
    record_cap
        At most this many records per query, the rest unreachable at any offset: 10,000 by
        default, as the older developer-guide revision states (the newest no longer does:
        ``aws-facts.md`` §0). None serves every record.
    refuse_past_cap
        With a cap, answer an offset at or past it with 400 instead of an empty page (which of
        the two the older revision does is undocumented).
    series_study_values
        ``"own"`` (default): series- and instance-level records report and match study and
        patient attributes of their own image set; ``"study"``: the study's single value (that
        of its most recently updated primary image set), as ``/studies`` reports.
    """

    record_cap: int | None = OLDER_RECORD_CAP
    refuse_past_cap: bool = False
    series_study_values: str = "own"

    def __setattr__(self, name: str, value: Any) -> None:
        """Check a setting as it is assigned (settings change at runtime)."""
        if (
            name == "record_cap"
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
        ):
            raise ValueError("record_cap must be an int >= 1 (or None for no cap)")
        if name == "series_study_values" and value not in SERIES_STUDY_VALUES:
            raise ValueError(f"series_study_values must be one of {SERIES_STUDY_VALUES}")
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot be honoured."""
        for name in ("record_cap", "series_study_values"):
            setattr(self, name, getattr(self, name))


@dataclass
class _Request:
    match: dict[str, Matcher | None]
    include: set[str]
    include_all: bool
    limit: int
    offset: int


def _integer(args: Any, name: str, default: int, low: int, high: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 8) or not low <= int(raw) <= high:
        raise ValidationError(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _parse(request: Request, allowed: tuple[str, ...]) -> _Request:
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
        elif (keyword := resolve(name)) is not None:
            include.add(keyword)  # unknown tags are silently omitted
    match: dict[str, Matcher | None] = {}
    for name in args:
        if name in ("fuzzymatching", "limit", "offset", "includefield"):
            continue
        keyword = resolve(name)
        if keyword is None or keyword not in allowed:
            raise ValidationError(f"{name} is not a search key of this QIDO-RS resource")
        values = args.getlist(name)
        if len(values) != 1 or keyword in match:
            raise ValidationError(f"{name} is given more than once")
        match[keyword] = matcher(keyword, ATTRIBUTES[keyword][1], values[0], fuzzy)
    return _Request(match, include, include_all, limit, offset)


def _returned(parsed: _Request, default: tuple[str, ...], everything: tuple[str, ...]) -> list[str]:
    chosen = dict.fromkeys(default)
    chosen.update(dict.fromkeys(k for k in parsed.match if k in everything))
    for keyword in everything if parsed.include_all else parsed.include:
        if keyword in everything:
            chosen[keyword] = None
    return list(chosen)


def _uid(value: str | None, name: str) -> str | None:
    if value is not None and UID_RE.fullmatch(value) is None:
        raise ValidationError(f"{name} in the path must be a UID")
    return value


def dataset(values: dict[str, Any], keywords: list[str]) -> dict[str, Any]:
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


class QidoApp:
    """QIDO-RS handlers over one :class:`Backend` (``handlers()`` plugs them into the wire layer).

    ``recorder`` makes the QIDO fault decisions (malformed and short pages, ``Faults.qido_*``).
    """

    def __init__(
        self,
        backend: Backend,
        settings: QidoSettings | None = None,
        recorder: StatsRecorder | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings if settings is not None else QidoSettings()
        self.settings.validate()
        self.index = QidoIndex(backend)
        self.recorder = recorder

    def handlers(self) -> dict[str, Callable[..., Response]]:
        """Operation name -> handler(request, body, **path arguments)."""
        return {STUDIES: self._studies, SERIES: self._series, INSTANCES: self._instances}

    def _settle(self) -> None:
        """Hand the index its part of the live settings."""
        self.index.series_study_values = self.settings.series_study_values

    def _page(self, rows: list[Any], parsed: _Request) -> list[Any]:
        settings = self.settings
        cap = settings.record_cap
        if cap is not None:
            if settings.refuse_past_cap and parsed.offset >= cap:
                raise ValidationError(f"offset must be below {cap} (the per-query record cap)")
            rows = rows[:cap]
        page = rows[parsed.offset : parsed.offset + parsed.limit]
        if self.recorder is not None and len(page) > 1:
            keep = self.recorder.draw_qido_short(len(page))
            if keep is not None:
                page = page[:keep]  # silently fewer than limit while more exist
        return page

    def _answer(self, operation: str, datasets: list[dict[str, Any]]) -> Response:
        spoil = None if self.recorder is None else self.recorder.draw_qido_malformed()
        if spoil is not None:
            kind, rng = spoil
            bad = malformed_qido_body(kind, datasets, _LEVEL_UID[operation], rng)
            return Response(bad.body, status=200, content_type=bad.content_type)
        # Local choice: no match is 200 with [] (PS3.18 also allows 204).
        body = json.dumps(datasets, ensure_ascii=False).encode("utf-8")
        return Response(body, status=200, content_type="application/dicom+json")

    def _studies(self, request: Request, body: bytes, datastore_id: str) -> Response:
        parsed = _parse(request, STUDY_KEYS)
        self._settle()
        rows = self.index.studies(datastore_id, parsed.match)
        keywords = _returned(parsed, STUDY_RETURN, STUDY_ALL)
        out = [
            dataset(self.index.values(datastore_id, s, None, None, keywords), keywords)
            for s in self._page(rows, parsed)
        ]
        return self._answer(STUDIES, out)

    def _series(
        self, request: Request, body: bytes, datastore_id: str, study_uid: str | None = None
    ) -> Response:
        parsed = _parse(request, SERIES_KEYS)
        self._settle()
        rows = self.index.series(datastore_id, _uid(study_uid, "StudyInstanceUID"), parsed.match)
        study_part = () if study_uid is not None else STUDY_RETURN
        keywords = _returned(parsed, (*study_part, *SERIES_RETURN), (*STUDY_ALL, *SERIES_ALL))
        out = [
            dataset(self.index.values(datastore_id, study, series, None, keywords), keywords)
            for study, series in self._page(rows, parsed)
        ]
        return self._answer(SERIES, out)

    def _instances(
        self,
        request: Request,
        body: bytes,
        datastore_id: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> Response:
        parsed = _parse(request, INSTANCE_KEYS)
        self._settle()
        rows = self.index.instances(
            datastore_id,
            _uid(study_uid, "StudyInstanceUID"),
            _uid(series_uid, "SeriesInstanceUID"),
            parsed.match,
        )
        upper: tuple[str, ...] = ()
        if series_uid is None:
            upper = SERIES_RETURN if study_uid is not None else (*STUDY_RETURN, *SERIES_RETURN)
        keywords = _returned(
            parsed, (*upper, *INSTANCE_RETURN), (*STUDY_ALL, *SERIES_ALL, *INSTANCE_ALL)
        )
        out = [
            dataset(self.index.values(datastore_id, study, series, instance, keywords), keywords)
            for study, series, instance in self._page(rows, parsed)
        ]
        return self._answer(INSTANCES, out)
