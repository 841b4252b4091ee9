"""botocore errors to the package's typed errors, without botocore's text (it can quote PHI)."""

from __future__ import annotations

from healthimaging_df.errors import SearchError, ThrottledError

THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)


def error_code(exc: BaseException) -> tuple[str, int | None, str | None]:
    """``(code, HTTP status, server message)`` of a botocore error; the class name otherwise."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code", "Unknown")), status, error.get("Message")
    return type(exc).__name__, None, None


def search_error(operation: str, index: int | None, exc: BaseException) -> SearchError:
    """The typed error for a botocore failure; botocore's text (which can quote PHI) is dropped."""
    code, status, message = error_code(exc)
    cls = ThrottledError if code in THROTTLING_CODES else SearchError
    return cls(operation, index, code, status, server_message=message)
