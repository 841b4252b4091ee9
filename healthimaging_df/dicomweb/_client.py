"""The QIDO-RS client: SigV4-signed GETs through dicomweb-client, paged, paced, retried, typed errors.

HealthImaging's DICOMweb has no SDK operation: each request is an HTTP GET signed with SigV4 for
the ``medical-imaging`` service, sent to ``https://dicom-medical-imaging.{region}.amazonaws.com``.
``dicomweb-client`` builds the QIDO-RS URLs and decodes the DICOM JSON; a ``requests`` auth
hook signs every request it sends with botocore's ``SigV4Auth``, using credentials frozen at
that moment from the boto3 session (so refreshed credentials are picked up as boto3 refreshes
them). Its own retries are off: ours pace every attempt through the rate limiter.

dicomweb-client logs request URLs (query values: PHI) and UIDs; a filter installed on its
logger rewrites those records, as ``healthimaging_df.core.logs`` does for botocore.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import orjson

from healthimaging_df.aws import MAX_CONCURRENCY, RateLimiter
from healthimaging_df.aws.errors import http_failure
from healthimaging_df.aws.quotas import QIDO_TPS
from healthimaging_df.aws.retry import SERVICE_BACKOFF, Backoff
from healthimaging_df.core import checks
from healthimaging_df.dicomweb._endpoint import resolve_endpoint
from healthimaging_df.dicomweb._model import (
    MAX_LIMIT,
    MAX_OFFSET,
    OLDER_RECORD_CAP,
    OPERATIONS,
    ROW_KEY,
    Level,
    keyword,
)
from healthimaging_df.errors import (
    DICOMwebError,
    DICOMwebMalformedError,
    DICOMwebThrottledError,
    DICOMwebTruncatedError,
    QueryValidationError,
)

__all__ = [
    "SERVICE",
    "QidoClient",
    "QidoResult",
    "check_page",
    "dicomweb_endpoint",
    "make_qido_client",
    "unavailable",
]

log = logging.getLogger(__name__)

SERVICE = "medical-imaging"
ACCEPT = "application/dicom+json"
ACCEPT_HEADER = "application/dicom+json, application/json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
THROTTLE_STATUSES = frozenset({429, 503})
_SAFE = "-_.~"
_REDACTED = "<redacted by healthimaging_df: may contain PHI>"


class _DicomwebClientFilter(logging.Filter):
    """Rewrite dicomweb-client's records: they quote URLs with query values, and UIDs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"dicomweb_client: {_REDACTED}"
        record.args = ()
        return True


_FILTER = _DicomwebClientFilter()


def _install_log_filter() -> None:
    for name in ("dicomweb_client", "dicomweb_client.web", "dicomweb_client.uri"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def canonical_url(url: str) -> str:
    """*url* with its query re-encoded as SigV4 canonicalizes it (RFC 3986, space as ``%20``).

    dicomweb-client encodes with ``quote_plus`` (space as ``+``); a server computing the
    canonical request from decoded values would then disagree with our signature.

    >>> canonical_url("https://h/p?StudyDescription=CT+HEAD%2A&limit=5")
    'https://h/p?StudyDescription=CT%20HEAD%2A&limit=5'
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(f"{quote(k, safe=_SAFE)}={quote(v, safe=_SAFE)}" for k, v in pairs)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _requests_auth() -> type:
    import requests.auth

    class SigV4RequestsAuth(requests.auth.AuthBase):
        """Sign each ``requests`` request with SigV4 (``medical-imaging``) as it is sent."""

        def __init__(self, credentials: Callable[[], Any], region: str) -> None:
            self.credentials = credentials
            self.region = region

        def __call__(self, request: Any) -> Any:
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest

            request.url = canonical_url(request.url)
            host = request.headers.get("Host") or urlsplit(request.url).netloc
            # Sign only what no proxy or HTTP layer rewrites: host, accept and the x-amz headers.
            signed = AWSRequest(
                method=request.method,
                url=request.url,
                headers={"Host": host, "Accept": request.headers.get("Accept", ACCEPT)},
            )
            frozen = self.credentials()
            if frozen is None:
                raise DICOMwebError("SearchDICOM", None, "NoCredentialsError")
            SigV4Auth(frozen, SERVICE, self.region).add_auth(signed)
            for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
                if name in signed.headers:
                    request.headers[name] = signed.headers[name]
            request.headers["Host"] = host
            request.headers["Accept"] = signed.headers["Accept"]
            return request

    return SigV4RequestsAuth


@dataclass
class QidoResult:
    """Records of one QIDO-RS search (every page), and whether more may exist.

    Attributes
    ----------
    records
        DICOM JSON objects, deduplicated on the level's UID (offset paging over a changing
        order can repeat a row).
    requests
        HTTP requests sent, retries included.
    truncated
        True when the service may hold more matches than it gave (see ``reason``).
    reason
        Why the result may be incomplete, or None.
    """

    records: list[dict[str, Any]] = field(repr=False)  # PHI
    requests: int = 0
    truncated: bool = False
    reason: str | None = None


def dicomweb_endpoint(
    client: Any = None, region: str | None = None, dicomweb_endpoint_url: str | None = None
) -> str:
    """The DICOMweb base URL (see :func:`~healthimaging_df.dicomweb.resolve_endpoint`).

    Raises :class:`QueryValidationError` when it is unknown (a custom ``endpoint_url`` without
    ``dicomweb_endpoint_url`` or ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING``).

    >>> dicomweb_endpoint(region="eu-west-1")
    'https://dicom-medical-imaging.eu-west-1.amazonaws.com'
    """
    found = resolve_endpoint(client, region, dicomweb_endpoint_url)
    if found.url is None:
        raise QueryValidationError("dicomweb_endpoint_url", found.why or "unknown")
    return found.url


class _Malformed(Exception):
    """A page that is not DICOM JSON (retried like a 5xx); ``rule`` names what was broken."""

    def __init__(self, rule: str, status: int | None = None) -> None:
        super().__init__(rule)
        self.rule = rule
        self.status = status


_TAG = re.compile(r"[0-9A-F]{8}")


def check_page(status: int, body: bytes, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A QIDO-RS response body as DICOM JSON objects, or :class:`_Malformed` naming the rule.

    A 204 (PS3.18: no matches) is an empty page; a 200 must carry a JSON list of DICOM JSON
    objects (keys ``GGGGEEEE``, each an object with a ``vr``), each holding a non-empty string
    for every tag in *required* (the UIDs the caller resolves by). A zero-byte 200, ``{}`` or an
    object without the UID is not "no more matches": it is retried, then a typed error.

    >>> check_page(204, b"")
    []
    >>> check_page(200, b'[{"0020000D": {"vr": "UI", "Value": ["1.2"]}}]', ["0020000D"])
    [{'0020000D': {'vr': 'UI', 'Value': ['1.2']}}]
    """
    if status == 204:
        if body.strip():
            raise _Malformed("a 204 (no content) with a body", status)
        return []
    if not body.strip():
        raise _Malformed(f"an empty body with HTTP {status} (a JSON list was expected)", status)
    try:
        page = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Malformed("a body that is not JSON", status) from None
    if not isinstance(page, list):
        raise _Malformed("a JSON body that is not a list of DICOM JSON objects", status)
    for record in page:
        if not isinstance(record, dict) or not all(
            isinstance(tag, str) and _TAG.fullmatch(tag) and isinstance(e, dict) and "vr" in e
            for tag, e in record.items()
        ):
            raise _Malformed("an element that is not a DICOM JSON object", status)
    return _required(page, tuple(required))


def _keyword(tag: str) -> str:
    from pydicom import datadict

    return str(datadict.keyword_for_tag(int(tag, 16)) or tag)


def unavailable(error: DICOMwebError) -> str | None:
    """Why *error* says QIDO-RS is unavailable to this caller here, or None when it may pass.

    403 (a role without ``SearchDICOM*``, or a signature the endpoint refuses), 401, 404 (an
    address without DICOMweb) and failures to connect (DNS, TLS, refused, timed out) are
    remembered; throttling, 5xx and malformed pages after every retry are not.
    """
    if error.status in (401, 403, 404):
        return f"{error.code} (HTTP {error.status})"
    if error.status is None and not isinstance(error, DICOMwebMalformedError):
        return error.code
    return None


def _web_class() -> type:
    """dicomweb-client's DICOMwebClient, its JSON reader replaced by :func:`check_page`."""
    from dicomweb_client.api import DICOMwebClient

    class CheckedClient(DICOMwebClient):
        """Builds and sends QIDO-RS requests as dicomweb-client does; reads bodies strictly."""

        def _http_get_application_json(
            self,
            url: str,
            params: dict[str, Any] | None = None,
            stream: bool = False,
            get_remaining: bool = False,
        ) -> list[dict[str, Any]]:
            response = self._http_get(
                url, params=params, headers={"Accept": ACCEPT_HEADER}, stream=stream
            )
            return check_page(response.status_code, response.content)

    return CheckedClient


@dataclass
class _Failure:
    """One failed attempt: what to report, and whether another attempt may help."""

    code: str
    status: int | None = None
    server_message: str | None = None
    retriable: bool = True
    malformed: str | None = None  # the rule a malformed page broke


class QidoClient:
    """QIDO-RS searches against one DICOMweb endpoint, paged and paced; thread-safe.

    Parameters
    ----------
    endpoint_url
        Base URL (``https://dicom-medical-imaging.{region}.amazonaws.com`` on AWS).
    region
        The SigV4 signing region.
    credentials
        Returns botocore credentials (frozen, or with ``get_frozen_credentials``) per request.
    max_tps
        Requests per second across threads, retries included; None for no client-side limit.
    max_attempts
        Attempts per request on 429, 5xx, a malformed page and connection errors, as botocore's
        standard mode (DNS and TLS failures are not retried: they do not pass).
    timeout
        Seconds to connect and to read each response.
    retry_base
        Backoff scale in seconds: attempt *n* waits up to ``min(20, retry_base * 2**(n-1))``,
        with full jitter (botocore's standard mode uses 1).
    record_cap
        The older revision's per-query cap: a result ending at exactly this many records may
        be truncated.
    """

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        credentials: Callable[[], Any],
        *,
        max_tps: float | None = QIDO_TPS,
        max_attempts: int = 10,
        timeout: float = 30.0,
        retry_base: float = 1.0,
        record_cap: int = OLDER_RECORD_CAP,
    ) -> None:
        if max_tps is not None and not (isinstance(max_tps, (int, float)) and max_tps > 0):
            raise QueryValidationError("max_tps", "must be a positive number or None")
        checks.positive_int("max_attempts", max_attempts)
        self.endpoint_url = endpoint_url.rstrip("/")
        self.region = region
        self._credentials = credentials
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._retry_base = retry_base
        self.record_cap = record_cap
        self._limiter = RateLimiter(max_tps) if max_tps else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sent = 0
        _install_log_filter()

    def __repr__(self) -> str:
        return f"<QidoClient {self.endpoint_url} region={self.region}>"

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent so far (retries included)."""
        return self._sent

    def _frozen(self) -> Any:
        credentials = self._credentials()
        if credentials is None:
            return None
        freeze = getattr(credentials, "get_frozen_credentials", None)
        return freeze() if freeze is not None else credentials

    def _web(self, datastore_id: str) -> Any:
        """The dicomweb-client of this thread for *datastore_id* (one requests session each)."""
        cache: dict[str, Any] = getattr(self._local, "clients", None) or {}
        self._local.clients = cache
        web = cache.get(datastore_id)
        if web is None:
            import requests

            session = requests.Session()
            session.auth = _requests_auth()(self._frozen, self.region)
            session.hooks["response"].append(self._remember)
            web = _web_class()(
                f"{self.endpoint_url}/datastore/{datastore_id}",
                session=session,
                timeout=self.timeout,
            )
            web.set_http_retry_params(retry=False)  # ours retry, paced by the limiter
            cache[datastore_id] = web
        return web

    def _remember(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        self._local.warning = response.headers.get("Warning")
        return response

    def get(
        self,
        datastore_id: str,
        level: Level,
        params: dict[str, Any],
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        limit: int = MAX_LIMIT,
        offset: int = 0,
        required: Sequence[str] | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One checked page: the DICOM JSON objects and the ``Warning`` header (or None).

        Every record must carry the *required* tags (default: the level's UID). A malformed
        page, 429, 5xx or a connection error is retried (paced by the limiter); then a typed
        :class:`DICOMwebError` (``DICOMwebMalformedError``, ``DICOMwebThrottledError``...).
        """
        operation = OPERATIONS[level]
        needed = tuple(required) if required is not None else (_tag(ROW_KEY[level]),)
        filters = {k: v for k, v in params.items() if k not in ("includefield", "fuzzymatching")}
        kwargs: dict[str, Any] = {
            "limit": limit,
            "offset": offset,
            "search_filters": filters,
            "fields": params.get("includefield"),
            "fuzzymatching": True if params.get("fuzzymatching") == "true" else None,
        }
        for attempt in range(1, self.max_attempts + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            granted = time.monotonic()
            with self._lock:
                self._sent += 1
            self._local.warning = None
            failure = self._attempt(datastore_id, level, kwargs, study_uid, series_uid, needed)
            if self._limiter is not None:
                self._limiter.observe(time.monotonic() - granted)
            if not isinstance(failure, _Failure):
                return failure, getattr(self._local, "warning", None)
            self._after_failure(operation, failure, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self,
        datastore_id: str,
        level: Level,
        kwargs: dict[str, Any],
        study_uid: str | None,
        series_uid: str | None,
        needed: tuple[str, ...],
    ) -> list[dict[str, Any]] | _Failure:
        """One request: its checked page, or what went wrong."""
        import requests

        web = self._web(datastore_id)
        try:
            if level == "studies":
                page = web.search_for_studies(**kwargs)
            elif level == "series":
                page = web.search_for_series(study_instance_uid=study_uid, **kwargs)
            else:
                page = web.search_for_instances(
                    study_instance_uid=study_uid, series_instance_uid=series_uid, **kwargs
                )
            return _required(page or [], needed)
        except _Malformed as bad:
            return _Failure("MalformedResponse", bad.status, malformed=bad.rule)
        except requests.HTTPError as exc:
            response = exc.response
            if response is None:
                return _Failure("HTTPError")
            found = http_failure(response.status_code, response.headers, response.text)
            retriable = found.status is None or found.status in RETRY_STATUSES
            return _Failure(found.code, found.status, found.message, retriable)
        except requests.exceptions.SSLError:
            return _Failure("SSLError", retriable=False)
        except (requests.ConnectionError, requests.Timeout) as exc:
            return _Failure(type(exc).__name__, retriable=not _name_not_resolved(exc))
        except requests.RequestException as exc:  # the message quotes the URL: PHI
            return _Failure(type(exc).__name__, retriable=False)

    def _after_failure(self, operation: str, failure: _Failure, attempt: int) -> None:
        """Raise the typed error when no attempt is left, else wait out the backoff."""
        if failure.status in THROTTLE_STATUSES and self._limiter is not None:
            self._limiter.throttled()  # leave the service more room from now on
        if not failure.retriable or attempt == self.max_attempts:
            detail = f"after {attempt} attempt(s)" if failure.retriable else ""
            if failure.malformed is not None:
                raise DICOMwebMalformedError(
                    operation, f"{failure.malformed} ({detail})", failure.status
                ) from None
            cls = DICOMwebThrottledError if failure.status in THROTTLE_STATUSES else DICOMwebError
            raise cls(
                operation, None, failure.code, failure.status, failure.server_message, detail
            ) from None
        delay = Backoff(self.max_attempts, self._retry_base, SERVICE_BACKOFF.cap).delay(attempt)
        log.debug("%s: %s, retry %d in %.2f s", operation, failure.code, attempt, delay)
        time.sleep(delay)

    def concurrency(self) -> int:
        """Searches worth having in flight: the paced rate x the round trips measured, bounded."""
        return self._limiter.concurrency() if self._limiter is not None else MAX_CONCURRENCY

    def search(
        self,
        datastore_id: str,
        level: Level,
        params: dict[str, Any],
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        page_size: int = MAX_LIMIT,
        max_records: int | None = None,
        on_truncation: str = "raise",
        required: Sequence[str] | None = None,
        wanted: Collection[str] | None = None,
        on_page: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> QidoResult:
        """Every page of one search (limit/offset), each checked, with truncation detection.

        The search ends on an empty page (200 ``[]`` or 204), never on a short one: a server
        that caps pages below ``limit`` costs one request more, never rows. Or on a proven
        final page: once every UID in *wanted* (the level's UIDs the caller needs) has come,
        nothing it needs is left to read. *on_page* sees the records after each page (it may
        raise to stop the search: the caller's own budget). A result "may be
        truncated" when the service stops at exactly the older revision's 10,000-record cap,
        when the largest offset (1,000,000) is passed, or when a page carries a ``Warning``
        header (PS3.18 6.7.1.2). ``on_truncation="raise"`` raises
        :class:`DICOMwebTruncatedError`; ``"report"`` returns ``truncated=True``. Reaching
        *max_records* (the caller's own limit) is not truncation.
        """
        if on_truncation not in ("raise", "report"):
            raise QueryValidationError("on_truncation", "must be 'raise' or 'report'")
        checks.integer("page_size", page_size, minimum=1, maximum=MAX_LIMIT)
        operation = OPERATIONS[level]
        key_tag = _tag(ROW_KEY[level])
        pages = _Pages(key_tag)
        before = self._sent
        while pages.reason is None:
            limit = page_size if max_records is None else min(page_size, max_records - pages.offset)
            if limit <= 0:
                break
            try:
                page, warning = self.get(
                    datastore_id,
                    level,
                    params,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    limit=limit,
                    offset=pages.offset,
                    required=required,
                )
            except DICOMwebError as error:
                # The older revision may refuse offsets past its cap rather than answer [].
                if error.status != 400 or pages.offset != self.record_cap:
                    raise
                pages.reason = (
                    f"an offset past {self.record_cap} records was refused (the older cap)"
                )
                break
            if not pages.add(page, warning, self.record_cap):
                break
            if on_page is not None:
                on_page(pages.records)
            if wanted is not None and pages.seen.issuperset(wanted):
                break  # a proven final page: nothing the caller needs is left
        result = QidoResult(
            pages.records, self._sent - before, pages.reason is not None, pages.reason
        )
        log.debug(
            "%s: %d record(s) in %d request(s)%s",
            operation,
            len(pages.records),
            result.requests,
            ", maybe truncated" if result.truncated else "",
        )
        if result.reason is not None and on_truncation == "raise":
            raise DICOMwebTruncatedError(operation, len(pages.records), result.reason)
        return result


class _Pages:
    """The records of one search so far, deduplicated on the level's UID, and its offset."""

    def __init__(self, key_tag: str) -> None:
        self.key_tag = key_tag
        self.records: list[dict[str, Any]] = []
        self.seen: set[Any] = set()
        self.offset = 0
        self.reason: str | None = None

    def add(self, page: list[dict[str, Any]], warning: str | None, record_cap: int) -> bool:
        """Take *page*; False when the search has ended (an empty page)."""
        if warning is not None:
            self.reason = "the service sent a Warning header with the page"
        if not page:
            if self.offset and self.offset == record_cap:
                self.reason = f"exactly {record_cap} records, the older revision's cap"
            return False
        for record in page:
            uid = _first(record.get(self.key_tag))
            if uid not in self.seen:  # offset paging over a changing order can repeat a row
                self.seen.add(uid)
                self.records.append(record)
        self.offset += len(page)
        if self.offset > MAX_OFFSET and self.reason is None:
            self.reason = f"more records past the largest offset ({MAX_OFFSET})"
        return True


def _required(page: list[dict[str, Any]], needed: tuple[str, ...]) -> list[dict[str, Any]]:
    for record in page:
        for tag in needed:
            value = _first(record.get(tag))
            if not isinstance(value, str) or not value:
                raise _Malformed(f"a record without {_keyword(tag)}", 200)
    return page


def _name_not_resolved(exc: Exception) -> bool:
    """Whether a connection error is a failed DNS lookup (which retrying does not mend)."""
    text = repr(exc.args)
    return "NameResolutionError" in text or "Name or service not known" in text


def _tag(name: str) -> str:
    from pydicom import datadict

    tag = datadict.tag_for_keyword(keyword(name))
    assert tag is not None
    return f"{tag:08X}"


def _first(element: Any) -> Any:
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values:
            return values[0]
    return None


def make_qido_client(
    client: Any = None,
    boto3_session: Any = None,
    *,
    dicomweb_endpoint_url: str | None = None,
    max_tps: float | None = QIDO_TPS,
    max_attempts: int = 10,
    retry_base: float = 1.0,
) -> QidoClient:
    """A :class:`QidoClient` with the credentials and region of the search client.

    Credentials come from *client* (a boto3 ``medical-imaging`` client) when given, else from
    *boto3_session* (the default session when None), and are frozen per request. The endpoint
    is *dicomweb_endpoint_url*, else ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING``, else
    ``https://dicom-medical-imaging.{region}.amazonaws.com`` when *client* talks to AWS itself;
    a client with a custom ``endpoint_url`` and neither of the first two is refused.
    """
    from healthimaging_df.core import logs

    logs.refresh()
    credentials: Callable[[], Any]
    region: str | None = None
    get_credentials = getattr(client, "_get_credentials", None)
    if client is not None and callable(get_credentials):
        credentials = get_credentials
        region = getattr(client.meta, "region_name", None)
    else:
        from healthimaging_df.aws import session as aws_session

        session = aws_session.resolve(boto3_session)
        credentials = session.get_credentials
        region = getattr(getattr(client, "meta", None), "region_name", None) or session.region_name
    endpoint = dicomweb_endpoint(client, region, dicomweb_endpoint_url)
    if not region:
        raise QueryValidationError("region", "no AWS region: set one on the boto3 session")
    return QidoClient(
        endpoint,
        region,
        credentials,
        max_tps=max_tps,
        max_attempts=max_attempts,
        retry_base=retry_base,
    )
