"""A small Iceberg REST catalog for tests: stdlib ``http.server`` in front of pyiceberg's SqlCatalog.

No REST catalog server installs from the package registries this project uses (Polaris,
Lakekeeper, Nessie, Gravitino and the reference ``iceberg-rest-fixture`` are Java or docker
images; the PyPI packages of those names are clients). This speaks the routes pyiceberg's
``RestCatalog`` uses, staged creates included (``create_table_transaction``), and maps catalog
errors to the REST status codes (409 for a failed commit), so the REST code path runs end to end.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

from pyiceberg.catalog.rest import CreateTableRequest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NamespaceNotEmptyError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.table import CommitTableRequest

_ERRORS: dict[type[Exception], tuple[int, str]] = {
    NoSuchTableError: (404, "NoSuchTableException"),
    NoSuchNamespaceError: (404, "NoSuchNamespaceException"),
    NamespaceAlreadyExistsError: (409, "AlreadyExistsException"),
    TableAlreadyExistsError: (409, "AlreadyExistsException"),
    CommitFailedException: (409, "CommitFailedException"),
    NamespaceNotEmptyError: (409, "NamespaceNotEmptyException"),
}


class _Named:
    """What ``SqlCatalog.commit_table`` needs of a table that does not exist yet: its name."""

    def __init__(self, identifier: tuple[str, ...]) -> None:
        self.identifier = identifier

    def name(self) -> tuple[str, ...]:
        return self.identifier


def _handler(catalog: SqlCatalog) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    def namespace(text: str) -> tuple[str, ...]:
        return tuple(unquote(text).split("\x1f"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any = None) -> None:
            data = (
                b""
                if body is None
                else body
                if isinstance(body, bytes)
                else json.dumps(body).encode()
            )
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b"{}"

        @staticmethod
        def _table(table: Any) -> dict[str, Any]:
            metadata = json.loads(table.metadata.model_dump_json(by_alias=True, exclude_none=True))
            return {
                "metadata-location": table.metadata_location,
                "metadata": metadata,
                "config": {},
            }

        def _route(self, method: str) -> None:
            path = urlparse(self.path).path
            try:
                with lock:
                    self._dispatch(method, path)
            except Exception as exc:  # a catalog error as the REST spec's error body
                code, kind = next(
                    ((c, k) for t, (c, k) in _ERRORS.items() if isinstance(exc, t)),
                    (500, type(exc).__name__),
                )
                self._send(code, {"error": {"message": str(exc), "type": kind, "code": code}})

        def _dispatch(self, method: str, path: str) -> None:
            if path == "/v1/config":
                return self._send(200, {"defaults": {}, "overrides": {}})
            if path == "/v1/namespaces":
                if method == "GET":
                    names = [list(n) for n in catalog.list_namespaces()]
                    return self._send(200, {"namespaces": names})
                body = json.loads(self._body())
                catalog.create_namespace(tuple(body["namespace"]), body.get("properties", {}))
                return self._send(
                    200, {"namespace": body["namespace"], "properties": body.get("properties", {})}
                )
            match = re.fullmatch(r"/v1/namespaces/([^/]+)", path)
            if match:
                if method == "DELETE":
                    catalog.drop_namespace(namespace(match[1]))
                    return self._send(204)
                props = catalog.load_namespace_properties(namespace(match[1]))
                if method == "HEAD":
                    return self._send(204)
                return self._send(
                    200, {"namespace": list(namespace(match[1])), "properties": props}
                )
            match = re.fullmatch(r"/v1/namespaces/([^/]+)/tables", path)
            if match:
                if method == "GET":
                    listed = catalog.list_tables(namespace(match[1]))
                    return self._send(
                        200,
                        {
                            "identifiers": [
                                {"namespace": list(i[:-1]), "name": i[-1]} for i in listed
                            ]
                        },
                    )
                body = json.loads(self._body())
                for key in ("location", "partition-spec", "write-order"):
                    body.setdefault(key, None)
                request = CreateTableRequest.model_validate(body)
                options = {
                    k: v
                    for k, v in {
                        "location": request.location,
                        "partition_spec": request.partition_spec,
                        "sort_order": request.write_order,
                    }.items()
                    if v is not None
                }
                identifier = (*namespace(match[1]), request.name)
                if body.get("stage-create"):
                    staged = catalog._create_staged_table(
                        identifier, request.table_schema, properties=request.properties, **options
                    )
                    return self._send(200, self._table(staged))
                table = catalog.create_table(
                    identifier,
                    schema=request.table_schema,
                    properties=request.properties,
                    **options,
                )
                return self._send(200, self._table(table))
            match = re.fullmatch(r"/v1/namespaces/([^/]+)/tables/([^/]+)", path)
            if match:
                identifier = (*namespace(match[1]), unquote(match[2]))
                if method == "DELETE":
                    catalog.drop_table(identifier)
                    return self._send(204)
                if method == "POST":
                    request = CommitTableRequest.model_validate_json(self._body())
                    try:
                        current: Any = catalog.load_table(identifier)
                    except NoSuchTableError:
                        current = _Named(identifier)  # a staged create's commit
                    response = catalog.commit_table(current, request.requirements, request.updates)
                    return self._send(
                        200, response.model_dump_json(by_alias=True, exclude_none=True).encode()
                    )
                table = catalog.load_table(identifier)
                return self._send(
                    204 if method == "HEAD" else 200,
                    None if method == "HEAD" else self._table(table),
                )
            return self._send(
                404, {"error": {"message": "no route", "type": "NotFound", "code": 404}}
            )

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


def serve(database_uri: str, warehouse: str) -> ThreadingHTTPServer:
    """Serve a REST catalog on 127.0.0.1 (a free port) until ``shutdown()``."""
    catalog = SqlCatalog("rest_backend", uri=database_uri, warehouse=warehouse)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(catalog))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
