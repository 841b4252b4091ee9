"""The REST-JSON wire layer of the local service: routing, request parsing, error encoding.

Routes and status codes follow the botocore service model ``medical-imaging/2023-07-19``
(``http.requestUri`` / ``http.method`` of each operation). Errors carry the code in the
``x-amzn-ErrorType`` header and ``{"message": ...}`` in the body, which is what botocore reads
to raise ``ClientError`` with that code. Fault injection (latency, throttling, random 500s)
happens here, before the backend is called; malformed pages, endless empty pages and updates
between pages are applied around the SearchImageSets call.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from healthimaging_df.local.backend import Backend
from healthimaging_df.local.errors import BackendError, ValidationError
from healthimaging_df.local.faults import StatsRecorder
from healthimaging_df.local.malformed import malformed_body
from healthimaging_df.local.qido import RULES as QIDO_RULES
from healthimaging_df.local.qido import QidoApp
from healthimaging_df.local.values import MAX_RESULTS, MAX_TOKEN

__all__ = [
    "BODY_CONSUMED_KEY",
    "DECLARED_LENGTH_KEY",
    "MAX_BODY_BYTES",
    "UNKNOWN_OPERATION",
    "WireApp",
    "encode_json",
]

logger = logging.getLogger(__name__)

UNKNOWN_OPERATION = "Unknown"
BODY_CONSUMED_KEY = "healthimaging_df.local.body_consumed"
# Set by the ``short`` malformed kind: the Content-Length to declare; the server sends fewer
# bytes and closes the connection.
DECLARED_LENGTH_KEY = "healthimaging_df.local.declared_length"
_ID_RE = re.compile(r"[0-9a-z]{32}")
_STATUSES = ("CREATING", "CREATE_FAILED", "ACTIVE", "DELETING", "DELETED")
MAX_BODY_BYTES = 1 << 20
"""Default request body cap: larger bodies get HTTP 413 ``ValidationException``."""

_URL_MAP = Map(
    [
        Rule("/datastore", methods=["GET"], endpoint="ListDatastores"),
        Rule("/datastore/<datastore_id>", methods=["GET"], endpoint="GetDatastore"),
        Rule(
            "/datastore/<datastore_id>/searchImageSets",
            methods=["POST"],
            endpoint="SearchImageSets",
        ),
        Rule(
            "/datastore/<datastore_id>/imageSet/<image_set_id>/getImageSetMetadata",
            methods=["POST"],
            endpoint="GetImageSetMetadata",
        ),
        Rule(
            "/datastore/<datastore_id>/imageSet/<image_set_id>/getImageSet",
            methods=["POST"],
            endpoint="GetImageSet",
        ),
        Rule(
            "/datastore/<datastore_id>/imageSet/<image_set_id>/listImageSetVersions",
            methods=["POST"],
            endpoint="ListImageSetVersions",
        ),
        Rule(
            "/datastore/<datastore_id>/imageSet/<image_set_id>/updateImageSetMetadata",
            methods=["POST"],
            endpoint="UpdateImageSetMetadata",
        ),
        *QIDO_RULES,
    ],
    strict_slashes=False,
    merge_slashes=False,
)


def _timestamp(value: Any) -> float:
    """JSON default hook: datetimes become epoch seconds with microseconds (REST-JSON style)."""
    if isinstance(value, datetime):
        return value.timestamp()
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_json(document: Any) -> bytes:
    """Encode a response document; datetimes as epoch seconds, as the service does."""
    return json.dumps(document, default=_timestamp, ensure_ascii=False).encode("utf-8")


def _json_response(document: Any, status: int = 200) -> Response:
    return Response(encode_json(document), status=status, content_type="application/json")


def error_response(code: str, message: str, status: int) -> Response:
    """An AWS REST-JSON error: ``x-amzn-ErrorType`` header plus ``{"message": ...}``."""
    response = _json_response({"message": message}, status)
    response.headers["x-amzn-ErrorType"] = code
    return response


def _path_id(value: str, name: str) -> str:
    if _ID_RE.fullmatch(value) is None:
        raise ValidationError(f"{name} must match [0-9a-z]{{32}}")
    return value


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_RESULTS:
        raise ValidationError(f"{name} must be an integer from 1 to {MAX_RESULTS}")
    return int(raw)


def _token_param(request: Request) -> str | None:
    token = request.args.get("nextToken")
    if token is not None and not (1 <= len(token) <= MAX_TOKEN and token.isascii()):
        raise ValidationError(f"nextToken must be 1 to {MAX_TOKEN} ASCII characters")
    return token


def _bool_param(request: Request, name: str) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw not in ("true", "false"):
        raise ValidationError(f"{name} must be true or false")
    return raw == "true"


def _blob(value: Any, where: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{where} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"{where} must be base64 text") from None


def _version_param(request: Request) -> str | None:
    version = request.args.get("version")
    if version is not None and not (version.isascii() and version.isdigit()):
        raise ValidationError("version must match \\d+")
    return version


class WireApp:
    """A WSGI application serving one :class:`Backend` with fault injection.

    Parameters
    ----------
    backend
        The state to serve.
    recorder
        Counters and fault decisions; its ``faults`` are read on every request.
    sleep
        Called with seconds of injected latency (replaceable in tests).
    max_body_bytes
        Request bodies above this size are answered HTTP 413 ``ValidationException`` without
        being read (and the connection closed).
    """

    def __init__(
        self,
        backend: Backend,
        recorder: StatsRecorder,
        sleep: Callable[[float], None] = time.sleep,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.backend = backend
        self.recorder = recorder
        self._sleep = sleep
        self.max_body_bytes = max_body_bytes
        self._handlers: dict[str, Callable[..., Response]] = {
            "SearchImageSets": self._search_image_sets,
            "GetImageSetMetadata": self._get_image_set_metadata,
            "GetImageSet": self._get_image_set,
            "ListImageSetVersions": self._list_image_set_versions,
            "UpdateImageSetMetadata": self._update_image_set_metadata,
            "GetDatastore": self._get_datastore,
            "ListDatastores": self._list_datastores,
        }
        self.qido = QidoApp(backend)
        self._handlers.update(self.qido.handlers())

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """Serve one WSGI request."""
        request = Request(environ)
        response = self.dispatch(request)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        """Route, inject faults, call the backend and encode the outcome."""
        declared = request.content_length
        too_large = declared is not None and declared > self.max_body_bytes
        body = b""
        # Read the whole body first so keep-alive connections stay in sync whatever we
        # answer; an oversized one is drained unkept, so the client still gets our 413.
        if too_large:
            while request.stream.read(1 << 16):
                pass
        else:
            body = request.get_data(cache=True)
            too_large = len(body) > self.max_body_bytes
        request.environ[BODY_CONSUMED_KEY] = True
        adapter = _URL_MAP.bind_to_environ(request.environ)
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
            if too_large:
                response = error_response(
                    "ValidationException",
                    f"The request body exceeds {self.max_body_bytes} bytes",
                    413,
                )
            elif recorder.should_throttle(operation):
                response = error_response("ThrottlingException", "Rate exceeded", 429)
            else:
                latency = recorder.faults.latency_ms
                if latency > 0:
                    self._sleep(latency / 1000.0)
                if recorder.should_fail():
                    response = error_response(
                        "InternalServerException",
                        "Injected fault: the local service failed this request on purpose",
                        500,
                    )
                elif operation == UNKNOWN_OPERATION:
                    response = error_response(
                        "UnknownOperationException",
                        f"No medical-imaging operation for {request.method} {request.path}",
                        404,
                    )
                else:
                    response = self._call(operation, request, body, arguments)
        finally:
            recorder.end()
        response.headers["x-amzn-RequestId"] = str(uuid.uuid4())
        return response

    def _call(
        self, operation: str, request: Request, body: bytes, arguments: dict[str, Any]
    ) -> Response:
        try:
            return self._handlers[operation](request, body, **arguments)
        except BackendError as error:
            return error_response(error.code, error.message, error.status)
        except Exception:
            logger.exception("local service failed on %s", operation)
            return error_response(
                "InternalServerException", "The local service failed unexpectedly", 500
            )

    # -- operations -------------------------------------------------------------------------

    def _search_image_sets(self, request: Request, body: bytes, datastore_id: str) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        max_results = _int_param(request, "maxResults", MAX_RESULTS)
        token = _token_param(request)
        criteria: Any = None
        if body.strip():
            try:
                criteria = json.loads(body)
            except ValueError:
                raise ValidationError("the request body is not valid JSON") from None
            if not isinstance(criteria, dict):
                raise ValidationError("searchCriteria must be an object")
        recorder = self.recorder
        faults = recorder.faults
        if faults.endless_empty_pages:
            result = self.backend.empty_page(datastore_id, criteria, max_results, token)
            recorder.record_empty_page()
            return _json_response(result)

        def updates() -> None:
            count, rng = recorder.draw_updates()
            if count:
                changes = self.backend.apply_random_updates(
                    datastore_id, count, rng, faults.update_tags, faults.update_tags_rate
                )
                recorder.record_updates(changes)

        result = self.backend.search(datastore_id, criteria, max_results, token, updates)
        spoil = recorder.draw_malformed()
        if spoil is None:
            return _json_response(result)
        kind, rng = spoil
        bad = malformed_body(kind, result, rng)
        if bad.declared_length is not None:
            request.environ[DECLARED_LENGTH_KEY] = bad.declared_length
        return Response(bad.body, status=200, content_type=bad.content_type)

    def _get_image_set_metadata(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        image_set_id = _path_id(image_set_id, "imageSetId")
        blob = self.backend.get_image_set_metadata_gzip(
            datastore_id, image_set_id, _version_param(request)
        )
        response = Response(blob, status=200, content_type="application/json")
        response.headers["Content-Encoding"] = "gzip"
        return response

    def _get_image_set(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        image_set_id = _path_id(image_set_id, "imageSetId")
        result = self.backend.get_image_set(datastore_id, image_set_id, _version_param(request))
        return _json_response(result)

    def _list_image_set_versions(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        image_set_id = _path_id(image_set_id, "imageSetId")
        result = self.backend.list_image_set_versions(
            datastore_id,
            image_set_id,
            _int_param(request, "maxResults", MAX_RESULTS),
            _token_param(request),
        )
        return _json_response(result)

    def _update_image_set_metadata(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        image_set_id = _path_id(image_set_id, "imageSetId")
        latest = request.args.get("latestVersion")
        if latest is None:
            raise ValidationError("latestVersion is required")
        try:
            updates = json.loads(body) if body.strip() else None
        except ValueError:
            raise ValidationError("the request body is not valid JSON") from None
        if not isinstance(updates, dict) or len(updates) != 1:
            raise ValidationError(
                "updateImageSetMetadataUpdates must set exactly one of DICOMUpdates and "
                "revertToVersionId"
            )
        revert = updates.get("revertToVersionId")
        updatable = removable = None
        if "DICOMUpdates" in updates:
            dicom = updates["DICOMUpdates"]
            if not isinstance(dicom, dict) or set(dicom) - {
                "updatableAttributes",
                "removableAttributes",
            }:
                raise ValidationError("DICOMUpdates has unknown members")
            updatable = _blob(dicom.get("updatableAttributes"), "updatableAttributes")
            removable = _blob(dicom.get("removableAttributes"), "removableAttributes")
        elif not (isinstance(revert, str) and revert.isascii() and revert.isdigit()):
            raise ValidationError("revertToVersionId must match \\d+")
        result = self.backend.update_image_set_metadata(
            datastore_id,
            image_set_id,
            latest,
            updatable=updatable,
            removable=removable,
            revert_to_version=revert,
            force=_bool_param(request, "force"),
            include_study_image_sets=_bool_param(request, "includeStudyImageSets"),
        )
        return _json_response(result)

    def _get_datastore(self, request: Request, body: bytes, datastore_id: str) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        return _json_response({"datastoreProperties": self.backend.get_datastore(datastore_id)})

    def _list_datastores(self, request: Request, body: bytes) -> Response:
        status = request.args.get("datastoreStatus")
        if status is not None and status not in _STATUSES:
            raise ValidationError(f"datastoreStatus must be one of {', '.join(_STATUSES)}")
        result = self.backend.list_datastores(
            status, _int_param(request, "maxResults", MAX_RESULTS), _token_param(request)
        )
        return _json_response(result)
