"""``LocalService``: the local HealthImaging endpoint on 127.0.0.1, reachable by plain boto3.

A threaded werkzeug server runs in a daemon thread, so concurrent clients overlap (added
latency is slept per request, in parallel) and peak concurrency is measurable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import fields, replace
from types import TracebackType
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from healthimaging_df.local.backend import Backend
from healthimaging_df.local.documents import SeriesShape
from healthimaging_df.local.faults import Faults, Stats, StatsRecorder
from healthimaging_df.local.generate import NON_PRIMARY, generate_image_sets
from healthimaging_df.local.qido import QidoSettings
from healthimaging_df.local.values import REGION
from healthimaging_df.local.wire import (
    BODY_CONSUMED_KEY,
    DECLARED_LENGTH_KEY,
    MAX_BODY_BYTES,
    WireApp,
)

__all__ = ["DUMMY_ACCESS_KEY", "DUMMY_SECRET_KEY", "LocalService"]

logger = logging.getLogger(__name__)

DUMMY_ACCESS_KEY = "AKIALOCALHEALTHIMAGING"
DUMMY_SECRET_KEY = "local-healthimaging-secret"
_FAULT_FIELDS = frozenset(f.name for f in fields(Faults))


class _KeepAliveHandler(WSGIRequestHandler):
    """Request handler with HTTP/1.1 keep-alive and no per-request log line.

    werkzeug's own ``run_wsgi`` always answers ``Connection: close`` and then drains the
    socket, which would swallow the next request of a kept-alive connection. boto3 pools
    connections as it does with AWS, so paging over a fresh TCP connection per request would
    understate throughput. Our application always reads the whole request body (it flags
    that in the environ) and returns a complete byte string, so the response can be written
    with a Content-Length and the connection kept.
    """

    disable_nagle_algorithm = True  # status line, headers and body go out in separate writes
    timeout = 30  # idle keep-alive connections are closed after this many seconds

    def run_wsgi(self) -> None:
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.environ = environ = self.make_environ()
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return None

        try:
            chunks = self.server.app(environ, start_response)
            try:
                body = b"".join(chunks)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            status, headers = started
        except Exception:
            logger.exception("local service handler failed")
            body = b'{"message": "The local service failed unexpectedly"}'
            status = "500 INTERNAL SERVER ERROR"
            headers = [
                ("Content-Type", "application/json"),
                ("x-amzn-ErrorType", "InternalServerException"),
            ]
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason)
        for key, value in headers:
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(key, value)
        declared = environ.get(DECLARED_LENGTH_KEY)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        if declared is not None:
            self.close_connection = True  # cut in transit: no "Connection: close" warning
        elif not environ.get(BODY_CONSUMED_KEY):
            self.send_header("Connection", "close")
        elif not self.close_connection:
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if environ["REQUEST_METHOD"] != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        """Send http.server's complaints (idle keep-alive timeouts) to DEBUG, not stderr."""
        logger.debug("local service connection: " + format, *args)


class _Server(ThreadedWSGIServer):
    """Threaded WSGI server that can close its keep-alive connections on shutdown."""

    daemon_threads = True

    def __init__(self, host: str, port: int, app: WireApp) -> None:
        self.open_sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()
        super().__init__(host, port, app, handler=_KeepAliveHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every connection still open (idle keep-alive ones included)."""
        with self._sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class LocalService:
    """A local stand-in for the ``medical-imaging`` API over HTTP on 127.0.0.1.

    Parameters
    ----------
    backend
        The state to serve; a new empty :class:`Backend` when None.
    host
        Interface to bind; loopback by default (the service has no authentication).
    port
        TCP port; 0 picks a free one (see :attr:`endpoint_url` after :meth:`start`).
    faults
        Initial fault settings; none by default.
    max_body_bytes
        Request body cap (default 1 MiB): larger bodies get HTTP 413 ``ValidationException``.

    Examples
    --------
    >>> with LocalService.seeded(image_sets=60, seed=1) as svc:
    ...     page = svc.client().search_image_sets(datastoreId=svc.datastore_id, maxResults=5)
    >>> len(page["imageSetsMetadataSummaries"])
    5
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.backend = backend if backend is not None else Backend()
        self.host = host
        self.port = port
        self.datastore_id: str | None = None
        self._recorder = StatsRecorder(faults if faults is not None else Faults())
        self._app = WireApp(self.backend, self._recorder, max_body_bytes=max_body_bytes)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def seeded(
        cls,
        image_sets: int = 1000,
        seed: int = 0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        instances_per_series: int | None = None,
        attributes_per_instance: int | None = None,
        non_primary: float = NON_PRIMARY,
        **fault_kwargs: Any,
    ) -> LocalService:
        """A service with one datastore named ``seeded`` holding generated image sets.

        ``fault_kwargs`` are :class:`Faults` fields (``latency_ms``, ``tps``, ``window_tps``,
        ``malformed_rate``, ``update_rate``, ...; ``seed`` is taken by the data, so use
        ``fault_seed`` for the faults' generators). ``instances_per_series`` and
        ``attributes_per_instance`` make GetImageSetMetadata documents realistic in size
        (:class:`~healthimaging_df.local.documents.SeriesShape`). ``non_primary`` is the
        generator's share of non-primary copies (:func:`generate_image_sets`). The service is
        not started.
        """
        fault_seed = fault_kwargs.pop("fault_seed", 0)
        faults = Faults(seed=fault_seed, **fault_kwargs)
        backend = Backend(series_shape=SeriesShape(instances_per_series, attributes_per_instance))
        datastore_id = backend.create_datastore("seeded")
        backend.add_image_sets(datastore_id, generate_image_sets(image_sets, seed, non_primary))
        service = cls(backend, host=host, port=port, faults=faults)
        service.datastore_id = datastore_id
        return service

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalService:
        """Bind and serve in a daemon thread; return self. Idempotent."""
        if self._server is not None:
            return self
        server = _Server(self.host, self.port, self._app)
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"healthimaging-local:{self.port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and release the port. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        """Whether the server is accepting requests."""
        return self._server is not None

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.endpoint_url if self.running else "stopped"
        return f"<LocalService {state} datastore_id={self.datastore_id!r}>"

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the bound port once started)."""
        return f"http://{self.host}:{self.port}"

    # -- faults and counters ------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The live fault settings; assigning their fields takes effect on the next request."""
        return self._recorder.faults

    def set_faults(self, **changes: Any) -> Faults:
        """Replace fault fields (unnamed ones keep their value).

        Also resets the rate limiters and reseeds the fault generators, so a run after
        ``set_faults`` repeats exactly for a serial client.
        """
        unknown = set(changes) - _FAULT_FIELDS
        if unknown:
            raise TypeError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        faults = replace(self._recorder.faults, **changes)
        self._recorder.replace_faults(faults)
        return faults

    def reset_faults(self) -> None:
        """Back to no faults at all (QIDO-RS settings included)."""
        self._recorder.replace_faults(Faults())
        self._app.qido.settings = QidoSettings()

    @property
    def qido(self) -> QidoSettings:
        """The live QIDO-RS fault settings, e.g. ``svc.qido.record_cap = 10_000``."""
        return self._app.qido.settings

    @property
    def stats(self) -> Stats:
        """A snapshot of the request counters."""
        return self._recorder.snapshot()

    def reset_stats(self) -> None:
        """Zero the request counters."""
        self._recorder.reset()

    # -- clients --------------------------------------------------------------------------------

    def client(self, **config_kwargs: Any) -> Any:
        """A real boto3 ``medical-imaging`` client pointed at this service.

        Credentials and region are passed explicitly (nothing read from ``~/.aws`` or the
        environment); host-prefix injection is off (the model's ``runtime-`` prefix would
        break a loopback endpoint); standard retries with 10 attempts. ``config_kwargs``
        override :class:`botocore.config.Config` fields.
        """
        import boto3
        import botocore.session
        from botocore.config import Config

        settings: dict[str, Any] = {
            "inject_host_prefix": False,
            "retries": {"mode": "standard", "max_attempts": 10},
            "max_pool_connections": 32,
        }
        settings.update(config_kwargs)
        # Ignore AWS_PROFILE and the shared config file: a user's profile settings (or a
        # missing profile) must not leak into a client for a loopback test service.
        isolated = botocore.session.Session(
            session_vars={
                "profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
                "credentials_file": (None, None, os.devnull, None),
            }
        )
        session = boto3.session.Session(
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
            aws_session_token=None,
            region_name=REGION,
            botocore_session=isolated,
        )
        return session.client(
            "medical-imaging",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
            config=Config(**settings),
        )

    def env(self) -> dict[str, str]:
        """Environment variables pointing an unmodified boto3 client at this service.

        For ``boto3.client("medical-imaging")`` in a subprocess, e.g. a CLI under test.
        """
        return {
            "AWS_ENDPOINT_URL_MEDICAL_IMAGING": self.endpoint_url,
            "AWS_DISABLE_HOST_PREFIX_INJECTION": "true",
            "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }
