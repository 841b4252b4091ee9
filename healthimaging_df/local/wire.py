"""The wire layer of the local service: one request pipeline for both of its addresses.

Every request, on the API address and on the DICOMweb address alike, goes through the same
steps, in the order AWS's front ends apply them:

1. the body is read as it streams (``Content-Length`` or chunked), capped at
   ``max_body_bytes``: past the cap the answer is HTTP 413 ``ValidationException`` and no more
   than the cap is ever held in memory;
2. routing (an unknown path is HTTP 404 ``UnknownOperationException``: the API address does not
   know the DICOMweb paths, as AWS's ``runtime-`` host does not, and the DICOMweb address knows
   nothing else);
3. SigV4 (:mod:`~healthimaging_df.local.sigv4`): 403 for an unsigned or wrongly signed request;
4. the deny list (:mod:`~healthimaging_df.local.iam`): 403 ``AccessDeniedException``;
5. rate limits, latency and injected 500s (:mod:`~healthimaging_df.local.faults`);
6. the operation's handler (:mod:`~healthimaging_df.local.api`, :mod:`~healthimaging_df.local.qido`),
   whose :class:`~healthimaging_df.local.errors.BackendError` becomes an AWS REST-JSON error:
   the code in ``x-amzn-ErrorType`` and ``{"message": ...}`` in the body, which botocore reads.

Request JSON is parsed by :func:`load_json`: malformed or nested deeper than
:data:`MAX_JSON_DEPTH` levels is a 400 ``ValidationException``, never a ``RecursionError``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from healthimaging_df.local.errors import BackendError
from healthimaging_df.local.faults import StatsRecorder
from healthimaging_df.local.iam import AccessDenied, resource_arn
from healthimaging_df.local.sigv4 import AuthFailure, Verifier
from healthimaging_df.local.values import MAX_JSON_DEPTH, load_json

__all__ = [
    "BODY_CONSUMED_KEY",
    "DECLARED_LENGTH_KEY",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "UNKNOWN_OPERATION",
    "Gate",
    "WireApp",
    "encode_json",
    "error_response",
    "json_response",
    "load_json",
    "route_map",
]

logger = logging.getLogger(__name__)

UNKNOWN_OPERATION = "Unknown"
BODY_CONSUMED_KEY = "healthimaging_df.local.body_consumed"
# Set by the ``short`` malformed kind: the Content-Length to declare; the server sends fewer
# bytes and closes the connection.
DECLARED_LENGTH_KEY = "healthimaging_df.local.declared_length"
MAX_BODY_BYTES = 1 << 20
"""Default request body cap: larger bodies get HTTP 413 ``ValidationException``."""
_DRAIN_BYTES = 16 << 20  # past the cap, read and discard at most this much, then close
_CHUNK = 1 << 16


def _timestamp(value: Any) -> float:
    """JSON default hook: datetimes become epoch seconds with microseconds (REST-JSON style)."""
    if isinstance(value, datetime):
        return value.timestamp()
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_json(document: Any) -> bytes:
    """Encode a response document; datetimes as epoch seconds, as the service does."""
    return json.dumps(document, default=_timestamp, ensure_ascii=False).encode("utf-8")


def json_response(document: Any, status: int = 200) -> Response:
    """A REST-JSON answer."""
    return Response(encode_json(document), status=status, content_type="application/json")


def error_response(code: str, message: str, status: int) -> Response:
    """An AWS REST-JSON error: ``x-amzn-ErrorType`` header plus ``{"message": ...}``."""
    response = json_response({"message": message}, status)
    response.headers["x-amzn-ErrorType"] = code
    return response


def route_map(rules: list[Rule]) -> Map:
    """A route table as the service matches paths (no slash merging, no redirects)."""
    return Map(rules, strict_slashes=False, merge_slashes=False)


@dataclass
class Gate:
    """Who may call: the signature verifier and the denied IAM actions (shared by both apps)."""

    verifier: Verifier
    deny: frozenset[str] = field(default_factory=frozenset)


@dataclass
class _Body:
    data: bytes
    too_large: bool
    consumed: bool
    broken: bool = False


def read_body(request: Request, cap: int) -> _Body:
    """Read the request body as it streams, never holding more than ``cap`` + one chunk.

    A declared ``Content-Length`` past the cap is read and discarded up to a bound, so the
    client, still sending, reads our 413 on a kept connection. A chunked body is read until
    it passes the cap, then the connection is given up (its length is unknown: draining it
    could take forever).
    """
    declared = request.content_length
    stream = request.stream
    if declared is not None and declared > cap:
        drained = 0
        while drained < _DRAIN_BYTES:
            chunk = stream.read(_CHUNK)
            if not chunk:
                return _Body(b"", True, True)
            drained += len(chunk)
        return _Body(b"", True, False)
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = stream.read(min(_CHUNK, cap + 1 - size))
            if not chunk:
                return _Body(b"".join(parts), False, True)
            size += len(chunk)
            if size > cap:
                return _Body(b"", True, False)
            parts.append(chunk)
    except (OSError, ValueError, HTTPException):  # bad chunks, or a body cut short
        return _Body(b"", False, False, broken=True)


Handler = Callable[..., Response]


@dataclass(eq=False)
class WireApp:
    """A WSGI application: the pipeline above over one route table.

    Parameters
    ----------
    url_map
        The routes of this address; each endpoint is an operation name (its IAM action).
    handlers
        Operation name -> ``handler(request, body, **path arguments)``.
    recorder
        Counters and fault decisions; its ``faults`` are read on every request.
    gate
        The verifier and deny list (shared with the service's other address).
    sleep
        Called with seconds of injected latency (replaceable in tests).
    max_body_bytes
        The body cap.
    """

    url_map: Map
    handlers: dict[str, Handler]
    recorder: StatsRecorder
    gate: Gate
    sleep: Callable[[float], None] = time.sleep
    max_body_bytes: int = MAX_BODY_BYTES

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """Serve one WSGI request."""
        request = Request(environ)
        response = self.dispatch(request)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        """Read, route, authenticate, authorise, inject faults, call the handler, encode."""
        body = read_body(request, self.max_body_bytes)
        if body.consumed:
            request.environ[BODY_CONSUMED_KEY] = True
        adapter = self.url_map.bind_to_environ(request.environ)
        operation = UNKNOWN_OPERATION
        arguments: dict[str, Any] = {}
        try:
            endpoint, matched = adapter.match()
            operation, arguments = str(endpoint), dict(matched)
        except HTTPException:
            pass
        recorder = self.recorder
        recorder.begin(operation)
        try:
            response = self._respond(request, body, operation, arguments)
        finally:
            recorder.end()
        response.headers["x-amzn-RequestId"] = str(uuid.uuid4())
        return response

    def _respond(
        self, request: Request, body: _Body, operation: str, arguments: dict[str, Any]
    ) -> Response:
        if body.broken:
            return error_response("ValidationException", "The request body is malformed", 400)
        if body.too_large:
            return error_response(
                "ValidationException", f"The request body exceeds {self.max_body_bytes} bytes", 413
            )
        raw_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
        if not raw_uri:
            query = request.environ.get("QUERY_STRING", "")
            raw_uri = request.environ.get("PATH_INFO", "/") + (f"?{query}" if query else "")
        try:
            self.gate.verifier.verify(request.method, raw_uri, request.headers, body.data)
        except AuthFailure as failure:
            self.recorder.record_auth_failure(failure.code)
            return error_response(failure.code, failure.message, failure.status)
        if operation == UNKNOWN_OPERATION:
            return error_response(
                "UnknownOperationException",
                f"No medical-imaging operation for {request.method} {request.path}",
                404,
            )
        if operation in self.gate.deny:
            self.recorder.record_denied(operation)
            resource = resource_arn(arguments.get("datastore_id"), arguments.get("image_set_id"))
            denied = AccessDenied(operation, resource)
            return error_response(denied.code, denied.message, denied.status)
        recorder = self.recorder
        if recorder.should_throttle(operation):
            return error_response("ThrottlingException", "Rate exceeded", 429)
        latency = recorder.faults.latency_ms
        if latency > 0:
            self.sleep(latency / 1000.0)
        if recorder.should_fail():
            return error_response(
                "InternalServerException",
                "Injected fault: the local service failed this request on purpose",
                500,
            )
        return self._call(operation, request, body.data, arguments)

    def _call(
        self, operation: str, request: Request, body: bytes, arguments: dict[str, Any]
    ) -> Response:
        try:
            return self.handlers[operation](request, body, **arguments)
        except BackendError as error:
            return error_response(error.code, error.message, error.status)
        except Exception:
            logger.exception("local service failed on %s", operation)
            return error_response(
                "InternalServerException", "The local service failed unexpectedly", 500
            )
