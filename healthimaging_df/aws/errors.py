"""AWS errors to the package's typed errors, without botocore's text (it can quote PHI).

The one translation of a failed AWS call: botocore's ``ClientError`` / ``BotoCoreError`` (and an
HTTP error answered to a signed request of our own, as DICOMweb's) become a code, an HTTP status
and the service's message (kept on the error, never in its text), and from those one typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from healthimaging_df.errors import SearchError, ThrottledError

THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)

FATAL_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "NoCredentialsError",
        "NoRegionError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "PartialCredentialsError",
    }
    | THROTTLING_CODES
)
"""Codes that say nothing about one request but about every call (credentials, region, endpoint,
a throttle that outlasted botocore's retries): a loop over many items stops at the first, instead
of failing each item alike."""


@dataclass(frozen=True)
class Failure:
    """What is known of a failed call: its *code*, HTTP *status*, and the service's *message*.

    *message* is the service's own text (it may echo request values): kept for a debugger,
    never put in an error's ``str``.
    """

    code: str
    status: int | None = None
    message: str | None = None

    @property
    def throttled(self) -> bool:
        """The service asked us to slow down (a throttling code, or HTTP 429)."""
        return self.code in THROTTLING_CODES or self.status == 429

    @property
    def fatal(self) -> bool:
        """Every later call would fail the same way (see :data:`FATAL_CODES`)."""
        return self.code in FATAL_CODES or self.status == 429


def aws_errors() -> tuple[type[Exception], ...]:
    """The two roots of botocore's errors (``ClientError``, ``BotoCoreError``), for an ``except`` clause."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def failure(exc: BaseException) -> Failure:
    """The :class:`Failure` of a botocore error; the class name for anything else.

    A ``BotoCoreError`` (no credentials, an unreachable endpoint) has no response: its class name
    is its code, and its text, which can quote a URL or request values, is dropped.
    """
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.get("Message")
        return Failure(
            str(error.get("Code", "Unknown")),
            status if isinstance(status, int) else None,
            message if isinstance(message, str) else None,
        )
    return Failure(type(exc).__name__)


def http_failure(status: int, headers: Mapping[str, str], body: str | None = None) -> Failure:
    """The :class:`Failure` of an HTTP error answered to a request we signed ourselves.

    The code is read as botocore reads it: the ``x-amzn-ErrorType`` header up to its first ``:``;
    ``HTTP<status>`` when there is none.
    """
    code = (headers.get("x-amzn-ErrorType") or "").split(":")[0].split("#")[0]
    return Failure(code or f"HTTP{status}", status, body[:1000] if body else None)


def error_code(exc: BaseException) -> tuple[str, int | None, str | None]:
    """``(code, HTTP status, server message)`` of a botocore error; the class name otherwise."""
    found = failure(exc)
    return found.code, found.status, found.message


def service_error(
    operation: str, index: int | None, exc: BaseException | Failure, detail: str = ""
) -> SearchError:
    """The typed error of a failed call: ``ThrottledError`` when throttled, else ``SearchError``.

    *index* is the request chain or item the call was for; *detail* words of ours (no values).
    """
    found = exc if isinstance(exc, Failure) else failure(exc)
    cls = ThrottledError if found.throttled else SearchError
    return cls(operation, index, found.code, found.status, found.message, detail)


def search_error(operation: str, index: int | None, exc: BaseException) -> SearchError:
    """The typed error for a botocore failure (:func:`service_error` without detail)."""
    return service_error(operation, index, exc)


def describe(exc: BaseException) -> str:
    """One line for a person: ``<operation> failed with <code>``; no botocore text, no values."""
    found = failure(exc)
    if getattr(exc, "response", None) is None:
        return f"AWS SDK error: {found.code}"
    operation = getattr(exc, "operation_name", None) or "request"
    return f"{operation} failed with {found.code}"


def is_aws_error(exc: BaseException) -> bool:
    """Whether *exc* is one of botocore's errors (botocore imported lazily)."""
    return isinstance(exc, aws_errors())


__all__ = [
    "FATAL_CODES",
    "THROTTLING_CODES",
    "Failure",
    "aws_errors",
    "describe",
    "error_code",
    "failure",
    "http_failure",
    "is_aws_error",
    "search_error",
    "service_error",
]
