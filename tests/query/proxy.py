"""A real HTTP proxy on loopback in front of the local service that can damage answers.

It forwards each request to the service and returns the service's answer, unless a test asks it to
answer request *n* with a malformed 200 (the kinds seen in production), or to run a hook first (an
update between two pages). A raw ``http.server`` handler, so a body can be cut short of its
Content-Length and the connection closed, as a proxy or a dropped connection would.
"""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

KINDS = ("truncated", "short", "html", "empty", "null", "bad_item", "bad_timestamp", "no_token")


class Proxy:
    """Settings and counters of one damaging proxy (mutable while it runs)."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.damage: Callable[[int], str | None] = lambda n: None
        self.before: Callable[[int], None] = lambda n: None
        self.endless_empty = False
        self.requests = 0
        self.damaged = 0
        self.lock = threading.Lock()
        self.url = ""

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def damaged_body(kind: str, body: bytes) -> tuple[bytes, str, int | None]:
    """(body, content type, declared length or None for the true one) of a damaged 200."""
    if kind == "truncated":
        return body[: max(1, len(body) // 2)], "application/json", None
    if kind == "short":
        return body[: max(1, len(body) // 2)], "application/json", len(body)
    if kind == "html":
        return b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html", None
    if kind == "empty":
        return b"", "application/json", None
    data = json.loads(body)
    if kind == "null":
        data["imageSetsMetadataSummaries"] = None
    elif kind == "bad_item":
        data["imageSetsMetadataSummaries"][0]["version"] = "two"
    elif kind == "bad_timestamp":
        data["imageSetsMetadataSummaries"][0]["createdAt"] = "yesterday at noon"
    elif kind == "no_token":
        data.pop("nextToken", None)
        data["imageSetsMetadataSummaries"] = []
        data["nextToken"] = ""
    return json.dumps(data).encode(), "application/json", None


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def do_POST(self) -> None:
            self._serve("POST")

        def do_GET(self) -> None:
            self._serve("GET")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with proxy.lock:
                proxy.requests += 1
                number = proxy.requests
            proxy.before(number)
            search = urlparse(self.path).path.endswith("/searchImageSets")
            if search and proxy.endless_empty:
                payload = {"imageSetsMetadataSummaries": [], "nextToken": uuid.uuid4().hex}
                self._send(200, "application/json", json.dumps(payload).encode(), None)
                return
            # Host goes through unchanged, as a transparent proxy's must: it is signed (SigV4).
            headers = dict(self.headers.items())
            status, reply_headers, reply = proxy.forward(method, self.path, headers, body)
            kind = proxy.damage(number) if search and status == 200 else None
            if kind is None:
                ctype = {k.lower(): v for k, v in reply_headers}.get(
                    "content-type", "application/json"
                )
                extra = [(k, v) for k, v in reply_headers if k.lower().startswith("x-amz")]
                self._send(status, ctype, reply, None, extra)
                return
            with proxy.lock:
                proxy.damaged += 1
            data, ctype, declared = damaged_body(kind, reply)
            self._send(200, ctype, data, declared)
            if declared is not None:
                self.close_connection = True

        def _send(
            self,
            status: int,
            ctype: str,
            data: bytes,
            declared: int | None,
            extra: list[tuple[str, str]] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(declared if declared is not None else len(data)))
            for key, value in extra or []:
                self.send_header(key, value)
            if declared is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    return Handler


@contextmanager
def damaging_proxy(upstream: str) -> Iterator[Proxy]:
    """Run a :class:`Proxy` in front of *upstream* for the duration of the block."""
    proxy = Proxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
