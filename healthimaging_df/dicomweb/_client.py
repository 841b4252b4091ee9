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
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from healthimaging_df.aws import RateLimiter
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
    DICOMwebThrottledError,
    DICOMwebTruncatedError,
    QueryValidationError,
)

__all__ = ["SERVICE", "QidoClient", "QidoResult", "dicomweb_endpoint", "make_qido_client"]

log = logging.getLogger(__name__)

SERVICE = "medical-imaging"
ACCEPT = "application/dicom+json"
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


_STANDARD_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")


DICOMWEB_ENDPOINT_ENV = "AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING"
"""The DICOMweb address's environment variable, in the style of ``AWS_ENDPOINT_URL_*``."""


def dicomweb_endpoint(
    client: Any = None, region: str | None = None, dicomweb_endpoint_url: str | None = None
) -> str:
    """The DICOMweb base URL: the override, the environment, the client's endpoint, the AWS host.

    The environment variable is ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING``
    (:data:`DICOMWEB_ENDPOINT_ENV`), as botocore reads ``AWS_ENDPOINT_URL_MEDICAL_IMAGING``.

    >>> dicomweb_endpoint(region="eu-west-1")
    'https://dicom-medical-imaging.eu-west-1.amazonaws.com'
    """
    if dicomweb_endpoint_url:
        return dicomweb_endpoint_url.rstrip("/")
    from_env = os.environ.get(DICOMWEB_ENDPOINT_ENV)
    if from_env:
        return from_env.rstrip("/")
    meta = getattr(client, "meta", None)
    endpoint = getattr(meta, "endpoint_url", None)
    region = region or getattr(meta, "region_name", None)
    if isinstance(endpoint, str):
        host = urlsplit(endpoint).hostname or ""
        if not host.endswith(_STANDARD_HOST_SUFFIXES):
            return endpoint.rstrip("/")  # a custom endpoint (the local service): same base URL
    if not region:
        raise QueryValidationError("region", "no AWS region: set one on the boto3 session")
    return f"https://dicom-medical-imaging.{region}.amazonaws.com"


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
        Attempts per request on 429 and 5xx (and connection errors), as botocore's standard mode.
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
        max_tps: float | None = 25.0,
        max_attempts: int = 10,
        timeout: float = 30.0,
        retry_base: float = 1.0,
        record_cap: int = OLDER_RECORD_CAP,
    ) -> None:
        if max_tps is not None and not (isinstance(max_tps, (int, float)) and max_tps > 0):
            raise QueryValidationError("max_tps", "must be a positive number or None")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise QueryValidationError("max_attempts", "must be a positive integer")
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
            from dicomweb_client.api import DICOMwebClient

            session = requests.Session()
            session.auth = _requests_auth()(self._frozen, self.region)
            session.hooks["response"].append(self._remember)
            web = DICOMwebClient(
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
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page: the DICOM JSON objects and the response's ``Warning`` header (or None)."""
        import requests

        operation = OPERATIONS[level]
        web = self._web(datastore_id)
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
            with self._lock:
                self._sent += 1
            self._local.warning = None
            status: int | None = None
            code: str
            try:
                if level == "studies":
                    page = web.search_for_studies(**kwargs)
                elif level == "series":
                    page = web.search_for_series(study_instance_uid=study_uid, **kwargs)
                else:
                    page = web.search_for_instances(
                        study_instance_uid=study_uid, series_instance_uid=series_uid, **kwargs
                    )
            except requests.HTTPError as exc:
                response = exc.response
                status = response.status_code if response is not None else None
                code = (
                    response.headers.get("x-amzn-ErrorType", "").split(":")[0]
                    if response is not None
                    else ""
                ) or f"HTTP{status}"
                server_message = response.text[:1000] if response is not None else None
            except (requests.ConnectionError, requests.Timeout) as exc:
                code, server_message = type(exc).__name__, None
            except requests.RequestException as exc:  # the message quotes the URL: PHI
                raise DICOMwebError(operation, None, type(exc).__name__) from None
            except ValueError:  # a body that is not JSON
                raise DICOMwebError(operation, None, "InvalidResponse") from None
            else:
                if not isinstance(page, list) or not all(isinstance(r, dict) for r in page):
                    raise DICOMwebError(operation, None, "InvalidResponse")
                return page, getattr(self._local, "warning", None)
            if status in THROTTLE_STATUSES and self._limiter is not None:
                self._limiter.throttled()  # leave the service more room from now on
            retriable = status is None or status in RETRY_STATUSES
            if not retriable or attempt == self.max_attempts:
                throttled = status in THROTTLE_STATUSES
                cls = DICOMwebThrottledError if throttled else DICOMwebError
                detail = f"after {attempt} attempt(s)" if retriable else ""
                raise cls(operation, None, code, status, server_message, detail) from None
            delay = random.random() * min(20.0, self._retry_base * 2 ** (attempt - 1))
            log.debug("%s: HTTP %s, retry %d in %.2f s", operation, status, attempt, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

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
    ) -> QidoResult:
        """Every page of one search (limit/offset), with truncation detection.

        A result "may be truncated" when the service stops at exactly the older revision's
        10,000-record cap, when a full page arrives at the largest offset (1,000,000), or when
        a page carries a ``Warning`` header (PS3.18 6.7.1.2). ``on_truncation="raise"`` raises
        :class:`DICOMwebTruncatedError`; ``"report"`` returns ``truncated=True``. Reaching
        *max_records* (the caller's own limit) is not truncation.
        """
        if on_truncation not in ("raise", "report"):
            raise QueryValidationError("on_truncation", "must be 'raise' or 'report'")
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise QueryValidationError("page_size", f"must be an integer from 1 to {MAX_LIMIT}")
        if not 1 <= page_size <= MAX_LIMIT:
            raise QueryValidationError("page_size", f"must be an integer from 1 to {MAX_LIMIT}")
        operation = OPERATIONS[level]
        key_tag = _tag(ROW_KEY[level])
        records: list[dict[str, Any]] = []
        seen: set[Any] = set()
        before = self._sent
        offset = 0
        reason: str | None = None
        while True:
            limit = page_size if max_records is None else min(page_size, max_records - offset)
            try:
                page, warning = self.get(
                    datastore_id,
                    level,
                    params,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    limit=limit,
                    offset=offset,
                )
            except DICOMwebError as error:
                # The older revision may refuse offsets past its cap rather than answer [].
                if error.status != 400 or offset != self.record_cap:
                    raise
                reason = f"an offset past {self.record_cap} records was refused (the older cap)"
                break
            for record in page:
                uid = _first(record.get(key_tag))
                if uid is None or uid not in seen:
                    seen.add(uid)
                    records.append(record)
            offset += len(page)
            if warning is not None:
                reason = "the service sent a Warning header with the page"
            if max_records is not None and offset >= max_records:
                break
            if len(page) < limit:
                if offset == self.record_cap:
                    reason = f"exactly {self.record_cap} records, the older revision's cap"
                break
            if offset > MAX_OFFSET:
                reason = f"a full page at the largest offset ({MAX_OFFSET})"
                break
        result = QidoResult(records, self._sent - before, reason is not None, reason)
        log.debug(
            "%s: %d record(s) in %d request(s)%s",
            operation,
            len(records),
            result.requests,
            ", maybe truncated" if result.truncated else "",
        )
        if reason is not None and on_truncation == "raise":
            raise DICOMwebTruncatedError(operation, len(records), reason)
        return result


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
    max_tps: float | None = 25.0,
    max_attempts: int = 10,
) -> QidoClient:
    """A :class:`QidoClient` with the credentials and region of the search client.

    Credentials come from *client* (a boto3 ``medical-imaging`` client) when given, else from
    *boto3_session* (the default session when None), and are frozen per request. The endpoint
    is *dicomweb_endpoint_url*, else the client's custom endpoint (the local service), else
    ``https://dicom-medical-imaging.{region}.amazonaws.com``.
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
        import boto3

        session = boto3_session if boto3_session is not None else boto3.Session()
        credentials = session.get_credentials
        region = getattr(getattr(client, "meta", None), "region_name", None) or session.region_name
    endpoint = dicomweb_endpoint(client, region, dicomweb_endpoint_url)
    if not region:
        raise QueryValidationError("region", "no AWS region: set one on the boto3 session")
    return QidoClient(endpoint, region, credentials, max_tps=max_tps, max_attempts=max_attempts)
