"""Service errors of the local HealthImaging backend, each with its wire code and HTTP status."""

from __future__ import annotations

__all__ = ["BackendError", "ConflictError", "ResourceNotFound", "ValidationError"]


class BackendError(Exception):
    """A service error with the wire ``code`` and HTTP ``status`` botocore maps to ClientError.

    Messages name the offending request element, never its value: search values are PHI.
    """

    code = "InternalServerException"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(BackendError):
    """The request breaks a rule of the service model or of the search semantics (HTTP 400)."""

    code = "ValidationException"
    status = 400


class ResourceNotFound(BackendError):
    """The datastore, image set or version does not exist (HTTP 404)."""

    code = "ResourceNotFoundException"
    status = 404


class ConflictError(BackendError):
    """The request conflicts with the current state, e.g. a duplicate image-set id (HTTP 409)."""

    code = "ConflictException"
    status = 409
