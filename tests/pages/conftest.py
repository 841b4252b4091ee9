"""A raw HTTP server on 127.0.0.1 that answers SearchImageSets with whatever bytes a test gives it.

The local service only sends well-formed pages; these tests need truncated, HTML, empty and
mistyped 200 bodies, and bodies shorter than their Content-Length, sent over a real socket to a
real boto3 client.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Reply:
    """One canned response: status, body, and optionally a lying Content-Length or chunking."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # None: the body's true length
    chunked_cut: bool = False  # announce a chunk longer than the body, send the body, hang up


class RawServer:
    """Serves queued :class:`Reply` objects in order (the last one repeats)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests = 0
        self._clients: dict[int, Any] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests += 1
                reply = owner.replies.pop(0) if len(owner.replies) > 1 else owner.replies[0]
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunked_cut:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s" % (len(reply.body) + 50, reply.body))
                    self.wfile.flush()
                    self.close_connection = True
                    return
                length = len(reply.body) if reply.content_length is None else reply.content_length
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(reply.body)
                self.wfile.flush()
                if length != len(reply.body):
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def client(self, max_attempts: int = 1) -> Any:
        """A real boto3 client for this server (dummy credentials, no host prefix), made once."""
        if max_attempts in self._clients:
            return self._clients[max_attempts]
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "medical-imaging",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(
                inject_host_prefix=False,
                retries={"mode": "standard", "total_max_attempts": max_attempts},
            ),
        )
        self._clients[max_attempts] = client
        return client

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def _raw_server() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.stop()


@pytest.fixture
def raw_server(_raw_server: RawServer) -> RawServer:
    """The module's raw server with its queue emptied."""
    _raw_server.replies = []
    _raw_server.requests = 0
    return _raw_server
