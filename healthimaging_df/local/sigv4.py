"""SigV4 verification of every request the local service receives, as AWS canonicalises it.

The canonical request is rebuilt from what arrived on the wire and signed again with botocore's
own :class:`botocore.auth.SigV4Auth`, with the secret of the access key the request names:

- the path as sent, re-encoded once more (botocore double-encodes paths for every service but
  S3, so ``%2F`` is signed as ``%252F``), dot segments removed;
- the query decoded and re-encoded with RFC 3986 (space as ``%20``, every byte but
  ``A-Za-z0-9-._~`` percent-encoded, upper-case hex), sorted by name, then value. A client that
  signed ``+`` for a space, or a raw ``*``, computed another string and gets 403;
- exactly the headers the request's ``SignedHeaders`` names (``host`` and ``x-amz-date`` are
  required), values trimmed and inner spaces collapsed;
- the payload hashed here (``x-amz-content-sha256`` is honoured only as ``UNSIGNED-PAYLOAD``;
  any other value is replaced by the true hash, so a lying header fails the signature).

Failures answer HTTP 403 with the codes other REST-JSON AWS services use (``aws-facts.md`` §6):
``MissingAuthenticationTokenException`` (no ``Authorization``), ``IncompleteSignatureException``
(a malformed one), ``UnrecognizedClientException`` (an unknown access key or session token),
``InvalidSignatureException`` (a wrong signature, scope, or a date outside the skew window).
Messages and logs never quote the request (its query and path may hold PHI), so unlike AWS's
``InvalidSignatureException`` the message does not show the canonical request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from healthimaging_df.local.errors import BackendError

__all__ = [
    "ACCESS_KEY_ID",
    "DEFAULT_MAX_SKEW",
    "SECRET_ACCESS_KEY",
    "SERVICE",
    "AuthFailure",
    "KeyRing",
    "Verifier",
    "canonical_query",
    "sign_request",
]

SERVICE = "medical-imaging"
ACCESS_KEY_ID = "AKIALOCALHEALTHIMAGING"
"""The local service's documented access key id (``LocalService.client()`` signs with it)."""
SECRET_ACCESS_KEY = "local-healthimaging-secret"
"""The secret of :data:`ACCESS_KEY_ID`."""
DEFAULT_MAX_SKEW = timedelta(minutes=15)
"""How far ``x-amz-date`` may be from the server's clock: 15 minutes, the documented SigV4 rule."""

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_ALGORITHM = "AWS4-HMAC-SHA256"
_SAFE = "-_.~"
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_PART_RE = re.compile(r"\s*([A-Za-z]+)=([^,]*)\s*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AuthFailure(BackendError):
    """A request that fails authentication: HTTP 403 with an AWS authentication error code."""

    status = 403

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _missing() -> AuthFailure:
    return AuthFailure("MissingAuthenticationTokenException", "Missing Authentication Token")


def _incomplete(message: str) -> AuthFailure:
    return AuthFailure("IncompleteSignatureException", message)


def _invalid(message: str) -> AuthFailure:
    return AuthFailure("InvalidSignatureException", message)


def _unrecognized() -> AuthFailure:
    return AuthFailure(
        "UnrecognizedClientException", "The security token included in the request is invalid."
    )


_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def canonical_query(raw: str) -> str:
    """The SigV4 canonical query of a raw query string, as AWS computes it from what it received.

    Each name and value is percent-decoded (RFC 3986: ``+`` stays a plus) and re-encoded with
    every byte but ``A-Za-z0-9-._~`` escaped; pairs are sorted by name, then by value.

    >>> canonical_query("b=2&a=x+y&a=%2a&c")
    'a=%2A&a=x%2By&b=2&c='
    """
    if not raw:
        return ""
    pairs = []
    for part in raw.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append(
            (
                quote(
                    unquote(name, errors="surrogateescape"), safe=_SAFE, errors="surrogateescape"
                ),
                quote(
                    unquote(value, errors="surrogateescape"), safe=_SAFE, errors="surrogateescape"
                ),
            )
        )
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


class _Exact(SigV4Auth):
    """botocore's signer, told which headers the client signed (it would pick its own set)."""

    def __init__(self, credentials: Credentials, region: str, signed: list[str]) -> None:
        super().__init__(credentials, SERVICE, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        chosen = HTTPHeaders()
        for name in self._signed:
            for value in request.headers.get_all(name) or []:
                chosen[name] = value
        return chosen


@dataclass(frozen=True)
class _Key:
    secret: str
    token: str | None


class KeyRing:
    """The access keys the service knows: ``{access key id: (secret, session token or None)}``.

    Thread-safe; keys may be added while the service runs (rotated credentials in a test).
    """

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()

    def add(
        self, access_key_id: str, secret_access_key: str, session_token: str | None = None
    ) -> None:
        """Accept requests signed with this key (and carrying exactly this session token)."""
        if not isinstance(access_key_id, str) or not re.fullmatch(
            r"[A-Za-z0-9]{1,128}", access_key_id
        ):
            raise ValueError("access_key_id must be 1 to 128 letters and digits")
        if not isinstance(secret_access_key, str) or not secret_access_key:
            raise ValueError("secret_access_key must be a non-empty string")
        if session_token is not None and (not isinstance(session_token, str) or not session_token):
            raise ValueError("session_token must be a non-empty string or None")
        with self._lock:
            self._keys[access_key_id] = _Key(secret_access_key, session_token)

    def get(self, access_key_id: str) -> _Key | None:
        """The key of ``access_key_id``, or None."""
        with self._lock:
            return self._keys.get(access_key_id)

    def ids(self) -> list[str]:
        """The known access key ids."""
        with self._lock:
            return list(self._keys)


def _authorization(header: str) -> tuple[str, list[str], str]:
    """``(credential, signed header names, signature)`` of an Authorization header."""
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != _ALGORITHM:
        raise _incomplete(
            "Authorization header requires the AWS4-HMAC-SHA256 algorithm with 'Credential', "
            "'SignedHeaders' and 'Signature' parameters."
        )
    parts: dict[str, str] = {}
    for item in rest.split(","):
        match = _PART_RE.fullmatch(item)
        if match is None:
            raise _incomplete(
                f"Authorization header has a malformed parameter near '{item.strip()[:20]}'."
            )
        parts[match.group(1)] = match.group(2)
    for name in ("Credential", "SignedHeaders", "Signature"):
        if not parts.get(name):
            raise _incomplete(f"Authorization header requires '{name}' parameter.")
    signed = parts["SignedHeaders"].split(";")
    if any(n != n.lower() or not n for n in signed) or signed != sorted(set(signed)):
        raise _incomplete(
            "SignedHeaders must be lower-case header names, sorted, separated by ';'."
        )
    return parts["Credential"], signed, parts["Signature"]


class Verifier:
    """Checks SigV4 signatures for one region against a :class:`KeyRing`.

    Parameters
    ----------
    keys
        The access keys the service knows.
    region
        The signing region requests must name (the service's region).
    max_skew
        How far ``x-amz-date`` may lie from the clock, either way.
    clock
        Returns "now" (aware UTC).
    """

    def __init__(
        self,
        keys: KeyRing,
        region: str,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if max_skew <= timedelta(0):
            raise ValueError("max_skew must be positive")
        self.keys = keys
        self.region = region
        self.max_skew = max_skew
        self._clock = clock or (lambda: datetime.now(timezone.utc))

    def verify(
        self,
        method: str,
        raw_uri: str,
        headers: Mapping[str, str] | Any,
        body: bytes,
    ) -> str:
        """Check one request; return its access key id, or raise :class:`AuthFailure`.

        ``raw_uri`` is the request target as received (path and query still percent-encoded);
        ``headers`` a case-insensitive mapping with ``get_all`` or ``getlist``, or a plain dict.
        """
        header = _first(headers, "Authorization")
        if header is None:
            raise _missing()
        credential, signed, signature = _authorization(header)
        scope = credential.split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise _incomplete(
                "Credential must have the form <access key id>/<date>/<region>/<service>/aws4_request."
            )
        access_key_id, scope_date, region, service, _ = scope
        if "host" not in signed:
            raise _invalid(
                "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
            )
        amz_date = _first(headers, "X-Amz-Date")
        if amz_date is None:
            raise _incomplete("Authorization header requires existence of a 'X-Amz-Date' header.")
        if "x-amz-date" not in signed:
            raise _invalid("'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization.")
        if _DATE_RE.fullmatch(amz_date) is None:
            raise _incomplete(
                "X-Amz-Date must be in the ISO-8601 basic format YYYYMMDD'T'HHMMSS'Z'."
            )
        try:
            moment = datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=timezone.utc)
        except ValueError:
            raise _incomplete("X-Amz-Date is not a valid date and time.") from None
        key = self.keys.get(access_key_id)
        if key is None:
            raise _unrecognized()
        token = _first(headers, "X-Amz-Security-Token")
        if token != key.token:
            raise _unrecognized()
        if token is not None and "x-amz-security-token" not in signed:
            raise _invalid(
                "'X-Amz-Security-Token' must be a 'SignedHeader' in the AWS Authorization."
            )
        if scope_date != amz_date[:8]:
            raise _invalid(
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                f"from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'."
            )
        if service != SERVICE:
            raise _invalid(f"Credential should be scoped to correct service: '{SERVICE}'.")
        if region != self.region:
            raise _invalid(f"Credential should be scoped to a valid region, not '{region}'.")
        now = self._clock()
        minutes = int(self.max_skew.total_seconds() // 60)
        if moment < now - self.max_skew:
            raise _invalid(
                f"Signature expired: {amz_date} is now earlier than "
                f"{(now - self.max_skew).strftime(_AMZ_DATE)} "
                f"({now.strftime(_AMZ_DATE)} - {minutes} min.)"
            )
        if moment > now + self.max_skew:
            raise _invalid(
                f"Signature not yet current: {amz_date} is still later than "
                f"{(now + self.max_skew).strftime(_AMZ_DATE)} "
                f"({now.strftime(_AMZ_DATE)} + {minutes} min.)"
            )
        expected = self._signature(
            method, raw_uri, headers, body, key, access_key_id, region, signed, amz_date
        )
        if _HEX64.fullmatch(signature) is None or not hmac.compare_digest(expected, signature):
            raise _invalid(_MISMATCH)
        return access_key_id

    def _signature(
        self,
        method: str,
        raw_uri: str,
        headers: Any,
        body: bytes,
        key: _Key,
        access_key_id: str,
        region: str,
        signed: list[str],
        amz_date: str,
    ) -> str:
        path, _, query = raw_uri.partition("?")
        rebuilt = HTTPHeaders()
        for name in signed:
            values = _all(headers, name)
            if not values:
                raise _invalid(f"SignedHeaders names '{name}', which the request does not carry.")
            # Repeated headers are joined with ',' (as http.server and botocore both do).
            rebuilt[name] = ",".join(values)
        claimed = _first(headers, "X-Amz-Content-SHA256")
        rebuilt_payload = (
            UNSIGNED_PAYLOAD if claimed == UNSIGNED_PAYLOAD else hashlib.sha256(body).hexdigest()
        )
        request = AWSRequest(
            method=method.upper(),
            url=f"http://local{path or '/'}" + (f"?{canonical_query(query)}" if query else ""),
            headers=rebuilt,  # type: ignore[arg-type]  # botocore's own header type
        )
        del request.headers["X-Amz-Content-SHA256"]
        request.headers["X-Amz-Content-SHA256"] = rebuilt_payload  # used, not signed unless named
        request.context["timestamp"] = amz_date
        signer = _Exact(Credentials(access_key_id, key.secret, key.token), region, signed)
        canonical = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical)
        return str(signer.signature(string_to_sign, request))


def _all(headers: Any, name: str) -> list[str]:
    for getter in ("get_all", "getlist"):
        method = getattr(headers, getter, None)
        if method is not None:
            return [str(v) for v in method(name) or []]
    for key, value in headers.items():
        if key.lower() == name.lower():
            return [str(value)]
    return []


def _first(headers: Any, name: str) -> str | None:
    values = _all(headers, name)
    return values[0] if values else None


def sign_request(
    method: str,
    url: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    credentials: tuple[str, str] = (ACCESS_KEY_ID, SECRET_ACCESS_KEY),
    region: str = "us-east-1",
    amz_date: str | None = None,
) -> dict[str, str]:
    """The headers of a request signed with SigV4 as botocore signs it, for hand-made requests.

    ``url`` is signed exactly as given (a query is not re-encoded: a ``+`` signed for a space
    fails, as on AWS); ``headers`` (``Host`` among them, else the URL's) are signed too.
    ``amz_date`` (``YYYYMMDDTHHMMSSZ``) defaults to now.
    """
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    signer = SigV4Auth(Credentials(*credentials), SERVICE, region)
    # SigV4Auth.add_auth, with the timestamp ours to choose.
    request.context["timestamp"] = amz_date or datetime.now(timezone.utc).strftime(_AMZ_DATE)
    signer._modify_request_before_signing(request)  # type: ignore[attr-defined]
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signer._inject_signature_to_request(request, signature)  # type: ignore[attr-defined]
    return {name: str(value) for name, value in request.headers.items()}
