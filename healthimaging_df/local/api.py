"""The ``medical-imaging`` REST-JSON operations of the API address: routes, parameters, handlers.

Routes and status codes follow the botocore service model ``medical-imaging/2023-07-19``
(``http.requestUri`` / ``http.method`` of each operation). Each handler validates what the
model says about its parameters and calls the :class:`~healthimaging_df.local.backend.Backend`;
malformed pages, endless empty pages and updates between pages (faults) are applied around the
SearchImageSets call. Signing, IAM and rate limits are the wire layer's
(:mod:`~healthimaging_df.local.wire`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from healthimaging_df.local.backend import Backend
from healthimaging_df.local.errors import ValidationError
from healthimaging_df.local.faults import StatsRecorder
from healthimaging_df.local.malformed import malformed_body
from healthimaging_df.local.values import MAX_RESULTS, MAX_TOKEN
from healthimaging_df.local.wire import (
    DECLARED_LENGTH_KEY,
    Handler,
    json_response,
    load_json,
    route_map,
)

__all__ = ["RULES", "URL_MAP", "ApiHandlers"]

_ID_RE = re.compile(r"[0-9a-z]{32}")
_STATUSES = ("CREATING", "CREATE_FAILED", "ACTIVE", "DELETING", "DELETED")
_IMAGE_SET = "/datastore/<datastore_id>/imageSet/<image_set_id>"

RULES = [
    Rule("/datastore", methods=["GET"], endpoint="ListDatastores"),
    Rule("/datastore/<datastore_id>", methods=["GET"], endpoint="GetDatastore"),
    Rule("/datastore/<datastore_id>/searchImageSets", methods=["POST"], endpoint="SearchImageSets"),
    Rule(f"{_IMAGE_SET}/getImageSetMetadata", methods=["POST"], endpoint="GetImageSetMetadata"),
    Rule(f"{_IMAGE_SET}/getImageSet", methods=["POST"], endpoint="GetImageSet"),
    Rule(f"{_IMAGE_SET}/listImageSetVersions", methods=["POST"], endpoint="ListImageSetVersions"),
    Rule(
        f"{_IMAGE_SET}/updateImageSetMetadata", methods=["POST"], endpoint="UpdateImageSetMetadata"
    ),
    Rule(f"{_IMAGE_SET}/deleteImageSet", methods=["POST"], endpoint="DeleteImageSet"),
    # The model names the path parameter sourceImageSetId; the IAM resource is that image set.
    Rule(f"{_IMAGE_SET}/copyImageSet", methods=["POST"], endpoint="CopyImageSet"),
]
URL_MAP = route_map(RULES)
"""The API address's routes (a werkzeug map binds its rules once)."""


def _path_id(value: str, name: str) -> str:
    if _ID_RE.fullmatch(value) is None:
        raise ValidationError(f"{name} must match [0-9a-z]{{32}}")
    return value


def _image_set_path(datastore_id: str, image_set_id: str) -> tuple[str, str]:
    """An image set's path IDs, each checked (the datastore's first, as the service does)."""
    return _path_id(datastore_id, "datastoreId"), _path_id(image_set_id, "imageSetId")


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


def _digits(value: Any, where: str) -> str:
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        raise ValidationError(f"{where} must match \\d+")
    return value


def _object(body: bytes, where: str, required: bool) -> dict[str, Any] | None:
    if not body.strip():
        if required:
            raise ValidationError(f"{where} is required")
        return None
    document = load_json(body, "the request body")
    if not isinstance(document, dict):
        raise ValidationError(f"{where} must be an object")
    return document


class ApiHandlers:
    """The API address's operations over one :class:`Backend`."""

    def __init__(self, backend: Backend, recorder: StatsRecorder) -> None:
        self.backend = backend
        self.recorder = recorder

    def handlers(self) -> dict[str, Handler]:
        """Operation name -> handler(request, body, **path arguments)."""
        return {
            "SearchImageSets": self._search_image_sets,
            "GetImageSetMetadata": self._get_image_set_metadata,
            "GetImageSet": self._get_image_set,
            "ListImageSetVersions": self._list_image_set_versions,
            "UpdateImageSetMetadata": self._update_image_set_metadata,
            "DeleteImageSet": self._delete_image_set,
            "CopyImageSet": self._copy_image_set,
            "GetDatastore": self._get_datastore,
            "ListDatastores": self._list_datastores,
        }

    def _search_image_sets(self, request: Request, body: bytes, datastore_id: str) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        max_results = _int_param(request, "maxResults", MAX_RESULTS)
        token = _token_param(request)
        criteria = _object(body, "searchCriteria", required=False)
        recorder = self.recorder
        faults = recorder.faults
        if faults.endless_empty_pages:
            result = self.backend.endless_page(datastore_id, criteria, max_results, token)
            recorder.record_empty_page()
            return json_response(result)
        if faults.empty_first_page and token is None:
            return json_response(self.backend.start_page(datastore_id, criteria, max_results))
        if faults.stuck_cursor:
            return json_response(
                self.backend.endless_page(datastore_id, criteria, max_results, token, stuck=True)
            )

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
            return json_response(result)
        kind, rng = spoil
        bad = malformed_body(kind, result, rng)
        if bad.declared_length is not None:
            request.environ[DECLARED_LENGTH_KEY] = bad.declared_length
        return Response(bad.body, status=200, content_type=bad.content_type)

    def _get_image_set_metadata(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id, image_set_id = _image_set_path(datastore_id, image_set_id)
        blob = self.backend.get_image_set_metadata_gzip(
            datastore_id, image_set_id, _version_param(request)
        )
        response = Response(blob, status=200, content_type="application/json")
        response.headers["Content-Encoding"] = "gzip"
        return response

    def _get_image_set(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id, image_set_id = _image_set_path(datastore_id, image_set_id)
        result = self.backend.get_image_set(datastore_id, image_set_id, _version_param(request))
        return json_response(result)

    def _list_image_set_versions(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id, image_set_id = _image_set_path(datastore_id, image_set_id)
        result = self.backend.list_image_set_versions(
            datastore_id,
            image_set_id,
            _int_param(request, "maxResults", MAX_RESULTS),
            _token_param(request),
        )
        return json_response(result)

    def _update_image_set_metadata(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id, image_set_id = _image_set_path(datastore_id, image_set_id)
        latest = request.args.get("latestVersion")
        if latest is None:
            raise ValidationError("latestVersion is required")
        updates = _object(body, "updateImageSetMetadataUpdates", required=True)
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
        else:
            revert = _digits(revert, "revertToVersionId")
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
        return json_response(result)

    def _delete_image_set(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id, image_set_id = _image_set_path(datastore_id, image_set_id)
        return json_response(self.backend.delete_image_set(datastore_id, image_set_id))

    def _copy_image_set(
        self, request: Request, body: bytes, datastore_id: str, image_set_id: str
    ) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        source_id = _path_id(image_set_id, "sourceImageSetId")
        information = _object(body, "copyImageSetInformation", required=True)
        assert information is not None
        unknown = set(information) - {"sourceImageSet", "destinationImageSet"}
        if unknown:
            raise ValidationError(f"copyImageSetInformation has {len(unknown)} unknown member(s)")
        source = information.get("sourceImageSet")
        if not isinstance(source, dict):
            raise ValidationError("copyImageSetInformation.sourceImageSet is required")
        if set(source) - {"latestVersionId", "DICOMCopies"}:
            raise ValidationError("sourceImageSet has unknown members")
        source_version = _digits(source.get("latestVersionId"), "sourceImageSet.latestVersionId")
        copiable: str | None = None
        if "DICOMCopies" in source:
            copies = source["DICOMCopies"]
            if not isinstance(copies, dict) or set(copies) != {"copiableAttributes"}:
                raise ValidationError("DICOMCopies must hold copiableAttributes only")
            copiable = copies["copiableAttributes"]
            if not isinstance(copiable, str) or not 1 <= len(copiable) <= 260_000:
                raise ValidationError("copiableAttributes must be 1 to 260000 characters")
        destination: tuple[str, str] | None = None
        if "destinationImageSet" in information:
            target = information["destinationImageSet"]
            if not isinstance(target, dict) or set(target) != {"imageSetId", "latestVersionId"}:
                raise ValidationError(
                    "destinationImageSet must hold exactly imageSetId and latestVersionId"
                )
            if not isinstance(target["imageSetId"], str):
                raise ValidationError("destinationImageSet.imageSetId must match [0-9a-z]{32}")
            destination = (
                _path_id(target["imageSetId"], "destinationImageSet.imageSetId"),
                _digits(target["latestVersionId"], "destinationImageSet.latestVersionId"),
            )
        result = self.backend.copy_image_set(
            datastore_id,
            source_id,
            source_version,
            destination=destination,
            copiable_attributes=copiable,
            force=_bool_param(request, "force"),
            promote_to_primary=_bool_param(request, "promoteToPrimary"),
        )
        return json_response(result)

    def _get_datastore(self, request: Request, body: bytes, datastore_id: str) -> Response:
        datastore_id = _path_id(datastore_id, "datastoreId")
        return json_response({"datastoreProperties": self.backend.get_datastore(datastore_id)})

    def _list_datastores(self, request: Request, body: bytes) -> Response:
        status = request.args.get("datastoreStatus")
        if status is not None and status not in _STATUSES:
            raise ValidationError(f"datastoreStatus must be one of {', '.join(_STATUSES)}")
        result = self.backend.list_datastores(
            status, _int_param(request, "maxResults", MAX_RESULTS), _token_param(request)
        )
        return json_response(result)
