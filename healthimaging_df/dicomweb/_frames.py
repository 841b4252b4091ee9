"""QIDO-RS as typed frames, and series attributes joined onto an image-set frame."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Literal

import pandas as pd

from healthimaging_df.aws.quotas import QIDO_TPS
from healthimaging_df.core import checks
from healthimaging_df.core.frames import provenance_datastore, require, with_attrs
from healthimaging_df.dicomweb._client import QidoClient, QidoResult, make_qido_client
from healthimaging_df.dicomweb._model import (
    COLUMNS,
    MAX_LIMIT,
    Level,
    MatchValue,
    decode_dataset,
    include_fields,
    query_params,
    rows_to_frame,
)
from healthimaging_df.errors import QueryValidationError

__all__ = [
    "ATTRS_KEY",
    "fetch_series_attributes",
    "search_instances",
    "search_series",
    "search_studies",
]

ATTRS_KEY = "healthimaging_df.dicomweb"
OnTruncation = Literal["raise", "report"]
_ID_RE = re.compile(r"[0-9a-z]{32}")
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_KEYS = ["StudyInstanceUID", "SeriesInstanceUID"]


def _check_datastore(datastore_id: Any) -> str:
    if not isinstance(datastore_id, str) or _ID_RE.fullmatch(datastore_id) is None:
        raise QueryValidationError("datastore_id", "must be 32 characters [0-9a-z]")
    return datastore_id


def _check_uid(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64 or _UID_RE.fullmatch(value) is None:
        raise QueryValidationError(field, "must be a UID: digits and dots, at most 64 characters")
    return value


def _check_limit(limit: Any) -> None:
    checks.optional_positive_int("limit", limit)


def _provenance(
    datastore_id: str, level: Level, qido: QidoClient, result: QidoResult
) -> dict[str, Any]:
    """What ``attrs`` records about a QIDO frame: no query values (they are PHI)."""
    from healthimaging_df._version import __version__

    return {
        "datastore_id": datastore_id,
        "level": level,
        "endpoint_url": qido.endpoint_url,
        "requests": result.requests,
        "truncated": result.truncated,
        "truncation_reason": result.reason,
        "fetched_at": datetime.now(timezone.utc).isoformat(),
        "library_version": __version__,
    }


def _search(
    level: Level,
    datastore_id: str,
    match: Mapping[str, MatchValue] | None,
    keywords: dict[str, MatchValue],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    fuzzymatching: bool,
    includefield: Sequence[str] | Literal["all"],
    limit: int | None,
    page_size: int,
    on_truncation: OnTruncation,
    client: Any,
    boto3_session: Any,
    dicomweb_endpoint_url: str | None,
    qido: QidoClient | None,
    max_tps: float | None,
) -> pd.DataFrame:
    datastore_id = _check_datastore(datastore_id)
    _check_limit(limit)
    both = dict(match or {})
    overlap = set(both) & set(keywords)
    if overlap:
        raise QueryValidationError(sorted(overlap)[0], "is given both in match and as a keyword")
    both.update(keywords)
    params = query_params(level, both, fuzzymatching=fuzzymatching, includefield=includefield)
    if on_truncation not in ("raise", "report"):
        raise QueryValidationError("on_truncation", "must be 'raise' or 'report'")
    checks.integer("page_size", page_size, minimum=1, maximum=MAX_LIMIT)
    if qido is None:
        qido = make_qido_client(
            client, boto3_session, dicomweb_endpoint_url=dicomweb_endpoint_url, max_tps=max_tps
        )
    result = qido.search(
        datastore_id,
        level,
        params,
        study_uid=study_uid,
        series_uid=series_uid,
        page_size=page_size,
        max_records=limit,
        on_truncation=on_truncation,
    )
    fields = [f for f in params.get("includefield", []) if f != "all"]
    frame = rows_to_frame([decode_dataset(r) for r in result.records], [*COLUMNS[level], *fields])
    frame.attrs[ATTRS_KEY] = _provenance(datastore_id, level, qido, result)
    return frame


_DOC_COMMON = """
    Parameters
    ----------
    datastore_id
        The datastore (32 characters [0-9a-z]).
    match
        Match keys by DICOM keyword or tag (``"00080060"``): a string in QIDO-RS syntax
        (wildcards ``*`` ``?``; ranges ``A-B``, ``A-``, ``-B`` for DA/TM), an int for IS keys,
        a ``datetime.date`` for DA keys, or a ``(low, high)`` pair (either may be None).
        Keyword arguments (``PatientName="DOE^*"``) are merged in.
    fuzzymatching
        Case-insensitive word-prefix matching on PatientName and ReferringPhysicianName.
    includefield
        More attributes to return, or ``"all"`` (at most 50; unknown ones come back empty).
    limit
        Stop after this many rows (not a truncation).
    page_size
        ``limit`` per request (1 to 1000).
    on_truncation
        ``"raise"`` :class:`~healthimaging_df.errors.DICOMwebTruncatedError` when the result
        may be incomplete, or ``"report"`` it in ``attrs["healthimaging_df.dicomweb"]``.
    client, boto3_session
        Where credentials, region and a custom endpoint come from (as for the search).
    dicomweb_endpoint_url
        Overrides the DICOMweb base URL.
    qido
        A :class:`~healthimaging_df.dicomweb.QidoClient` to reuse (its pacing and counters).
    max_tps
        Requests per second when a client is made here.

    Returns
    -------
    DataFrame
        One row per match, DICOM keyword columns typed by VR (DA -> ``date32[pyarrow]``,
        IS/US -> ``Int64``, PN -> Alphabetic ``string``, CS/LO/SH/UI/TM -> ``string``,
        multi-valued -> Arrow lists), in the service's order; ``attrs`` say how many requests
        were sent and whether the result may be truncated (never the query's values).

    Raises
    ------
    QueryValidationError
        Bad input (an unknown keyword, a key the level does not search, a malformed value),
        before any request.
    DICOMwebError
        A request failed after retries (:class:`DICOMwebThrottledError` when throttled).
"""


def search_studies(
    datastore_id: str,
    match: Mapping[str, MatchValue] | None = None,
    *,
    fuzzymatching: bool = False,
    includefield: Sequence[str] | Literal["all"] = (),
    limit: int | None = None,
    page_size: int = MAX_LIMIT,
    on_truncation: OnTruncation = "raise",
    client: Any = None,
    boto3_session: Any = None,
    dicomweb_endpoint_url: str | None = None,
    qido: QidoClient | None = None,
    max_tps: float | None = QIDO_TPS,
    **keywords: MatchValue,
) -> pd.DataFrame:
    """Search studies with QIDO-RS (``GET /datastore/{id}/studies``), primary image sets only."""
    return _search(
        "studies",
        datastore_id,
        match,
        keywords,
        fuzzymatching=fuzzymatching,
        includefield=includefield,
        limit=limit,
        page_size=page_size,
        on_truncation=on_truncation,
        client=client,
        boto3_session=boto3_session,
        dicomweb_endpoint_url=dicomweb_endpoint_url,
        qido=qido,
        max_tps=max_tps,
    )


def search_series(
    datastore_id: str,
    match: Mapping[str, MatchValue] | None = None,
    *,
    study_instance_uid: str | None = None,
    fuzzymatching: bool = False,
    includefield: Sequence[str] | Literal["all"] = (),
    limit: int | None = None,
    page_size: int = MAX_LIMIT,
    on_truncation: OnTruncation = "raise",
    client: Any = None,
    boto3_session: Any = None,
    dicomweb_endpoint_url: str | None = None,
    qido: QidoClient | None = None,
    max_tps: float | None = QIDO_TPS,
    **keywords: MatchValue,
) -> pd.DataFrame:
    """Search series: ``/studies/{study_instance_uid}/series``, or datastore-wide ``/series``."""
    return _search(
        "series",
        datastore_id,
        match,
        keywords,
        study_uid=_check_uid(study_instance_uid, "study_instance_uid"),
        fuzzymatching=fuzzymatching,
        includefield=includefield,
        limit=limit,
        page_size=page_size,
        on_truncation=on_truncation,
        client=client,
        boto3_session=boto3_session,
        dicomweb_endpoint_url=dicomweb_endpoint_url,
        qido=qido,
        max_tps=max_tps,
    )


def search_instances(
    datastore_id: str,
    match: Mapping[str, MatchValue] | None = None,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    fuzzymatching: bool = False,
    includefield: Sequence[str] | Literal["all"] = (),
    limit: int | None = None,
    page_size: int = MAX_LIMIT,
    on_truncation: OnTruncation = "raise",
    client: Any = None,
    boto3_session: Any = None,
    dicomweb_endpoint_url: str | None = None,
    qido: QidoClient | None = None,
    max_tps: float | None = QIDO_TPS,
    **keywords: MatchValue,
) -> pd.DataFrame:
    """Search instances: of a series, of a study, or datastore-wide ``/instances``."""
    if series_instance_uid is not None and study_instance_uid is None:
        raise QueryValidationError(
            "series_instance_uid", "needs study_instance_uid too (the path names both)"
        )
    return _search(
        "instances",
        datastore_id,
        match,
        keywords,
        study_uid=_check_uid(study_instance_uid, "study_instance_uid"),
        series_uid=_check_uid(series_instance_uid, "series_instance_uid"),
        fuzzymatching=fuzzymatching,
        includefield=includefield,
        limit=limit,
        page_size=page_size,
        on_truncation=on_truncation,
        client=client,
        boto3_session=boto3_session,
        dicomweb_endpoint_url=dicomweb_endpoint_url,
        qido=qido,
        max_tps=max_tps,
    )


for _function in (search_studies, search_series, search_instances):
    _function.__doc__ = (_function.__doc__ or "") + "\n" + _DOC_COMMON


# -- series enrichment ---------------------------------------------------------------------------


def _series_by_study(frame: pd.DataFrame) -> dict[str, set[str]]:
    """The frame's SeriesInstanceUIDs per StudyInstanceUID (rows missing either left out)."""
    pairs = frame[_KEYS].dropna().astype(str).drop_duplicates()
    found: dict[str, set[str]] = {}
    for study, series in zip(pairs["StudyInstanceUID"], pairs["SeriesInstanceUID"], strict=True):
        found.setdefault(study, set()).add(series)
    return found


def _frame_datastore(frame: pd.DataFrame, datastore_id: str | None) -> str:
    if datastore_id is not None:
        return _check_datastore(datastore_id)
    found = provenance_datastore(frame)
    if not found:
        raise QueryValidationError(
            "datastore_id", "the frame's attrs carry none: pass datastore_id=..."
        )
    return _check_datastore(str(found))


def fetch_series_attributes(
    frame: pd.DataFrame,
    fields: Sequence[str],
    *,
    client: Any = None,
    boto3_session: Any = None,
    dicomweb_endpoint_url: str | None = None,
    qido: QidoClient | None = None,
    datastore_id: str | None = None,
    max_tps: float | None = QIDO_TPS,
    max_concurrency: int | None = None,
    on_truncation: OnTruncation = "raise",
    scope: Literal["study", "datastore"] = "study",
) -> pd.DataFrame:
    """Join series attributes onto *frame* through QIDO-RS ``includefield``, many series a request.

    QIDO-RS is a search, not an access: unlike ``fetch_metadata`` (one GetImageSetMetadata per
    image set), it leaves archived image sets in ARCHIVE_INSTANT_ACCESS.

    Parameters
    ----------
    frame
        Rows with ``StudyInstanceUID`` and ``SeriesInstanceUID`` (an image-set frame).
    fields
        Series-level attributes by keyword or tag (SeriesDescription, Manufacturer,
        PerformedProcedureStepStartDate...), at most 50, none already a column of *frame*.
    client, boto3_session, dicomweb_endpoint_url, qido, max_tps
        As for :func:`search_series`.
    datastore_id
        Defaults to the one in the frame's provenance (``attrs``).
    max_concurrency
        Studies requested at once; None (the default): the paced rate times the round trip
        measured on the endpoint plus a margin, at most 64.
    on_truncation
        As for :func:`search_series`.
    scope
        ``"study"``: ``/studies/{S}/series`` once per distinct study of the frame (every series
        of a study in one request). ``"datastore"``: page through ``/series`` for the whole
        datastore (one request per 1,000 series), cheaper when the frame holds most of the
        datastore, but exposed to the older revision's 10,000-record cap.

    Returns
    -------
    DataFrame
        *frame* (same rows, same order, same ``attrs``) with one column per field, typed by
        VR; NA where QIDO-RS has no such series (non-primary image sets only) or no value.

    Raises
    ------
    QueryValidationError
        Bad input, before any request.
    DICOMwebError
        A request failed after retries.
    """
    if isinstance(fields, str) or not isinstance(fields, Sequence) or not fields:
        raise QueryValidationError("fields", "must be a non-empty list of DICOM keywords")
    wanted = include_fields(fields)
    taken = [f for f in wanted if f in frame.columns]
    if taken:
        raise QueryValidationError("fields", f"already column(s) of the frame: {', '.join(taken)}")
    if scope not in ("study", "datastore"):
        raise QueryValidationError("scope", "must be 'study' or 'datastore'")
    checks.optional_positive_int("max_concurrency", max_concurrency)
    require(frame, tuple(_KEYS), "fetch_series_attributes()")
    store = _frame_datastore(frame, datastore_id)
    studies = list(dict.fromkeys(frame["StudyInstanceUID"].dropna().astype(str).tolist()))
    for position, uid in enumerate(studies):
        if _UID_RE.fullmatch(uid) is None:
            raise QueryValidationError("StudyInstanceUID", "must be a UID", position)
    if qido is None:
        qido = make_qido_client(
            client, boto3_session, dicomweb_endpoint_url=dicomweb_endpoint_url, max_tps=max_tps
        )
    params = {"includefield": wanted}
    series = _series_by_study(frame)

    def one(study_uid: str | None) -> list[dict[str, Any]]:
        assert qido is not None
        # the frame's series are what is wanted: once all have come, the page was the last
        # needed (a study's series are mostly one page, so this spares the empty page after)
        needed = series.get(study_uid) if study_uid is not None else set().union(*series.values())
        result = qido.search(
            store,
            "series",
            params,
            study_uid=study_uid,
            on_truncation=on_truncation,
            wanted=needed,
        )
        rows = []
        for record in result.records:
            row = decode_dataset(record)
            if study_uid is not None:
                row.setdefault("StudyInstanceUID", study_uid)
            rows.append({k: row.get(k) for k in (*_KEYS, *wanted)})
        return rows

    rows: list[dict[str, Any]] = []
    if studies and scope == "datastore":
        rows = one(None)
    elif studies:
        workers = max_concurrency or qido.concurrency()  # None: rate x measured round trip
        with ThreadPoolExecutor(min(workers, len(studies)), "ahi-qido") as pool:
            for found in pool.map(one, studies):
                rows.extend(found)
    table = rows_to_frame(rows, [*_KEYS, *wanted]).drop_duplicates(_KEYS)
    left = frame.reset_index(drop=True)
    keys = left[_KEYS].astype(pd.StringDtype("pyarrow"))
    right = table.astype({k: pd.StringDtype("pyarrow") for k in _KEYS})
    joined = keys.merge(right, on=_KEYS, how="left", validate="many_to_one")
    result = pd.concat([left, joined[wanted]], axis=1)
    result.index = frame.index
    return with_attrs(result, frame)
