"""``LocalService``: the local HealthImaging service on 127.0.0.1, reachable by plain boto3.

Two threaded werkzeug servers run in daemon threads, as AWS has two hosts: the API address
(``endpoint_url``, the ``runtime-medical-imaging`` host's operations) and the DICOMweb address
(``dicomweb_endpoint_url``, the ``dicom-medical-imaging`` host's QIDO-RS). Both share one
backend, one set of counters and faults, the known credentials and the deny list. Concurrent
clients overlap (added latency is slept per request, in parallel) and peak concurrency is
measurable.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields, replace
from datetime import timedelta
from types import TracebackType
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from healthimaging_df.local.api import URL_MAP as API_MAP
from healthimaging_df.local.api import ApiHandlers
from healthimaging_df.local.backend import Backend
from healthimaging_df.local.documents import SeriesShape
from healthimaging_df.local.events import EventFaults, EventOptions, EventSink
from healthimaging_df.local.faults import Faults, Stats, StatsRecorder
from healthimaging_df.local.generate import NON_PRIMARY, generate_image_sets
from healthimaging_df.local.iam import normalize_actions
from healthimaging_df.local.qido import OLDER_RECORD_CAP, QidoApp, QidoSettings
from healthimaging_df.local.qido import URL_MAP as QIDO_MAP
from healthimaging_df.local.sigv4 import (
    ACCESS_KEY_ID,
    DEFAULT_MAX_SKEW,
    SECRET_ACCESS_KEY,
    KeyRing,
    Verifier,
    sign_request,
)
from healthimaging_df.local.values import REGION
from healthimaging_df.local.wire import (
    BODY_CONSUMED_KEY,
    DECLARED_LENGTH_KEY,
    MAX_BODY_BYTES,
    Gate,
    WireApp,
)

__all__ = [
    "ACCESS_KEY_ID",
    "DICOMWEB_ENDPOINT_ENV",
    "DUMMY_ACCESS_KEY",
    "DUMMY_SECRET_KEY",
    "SECRET_ACCESS_KEY",
    "LocalService",
    "seeded_datastore_id",
]

logger = logging.getLogger(__name__)

DUMMY_ACCESS_KEY = ACCESS_KEY_ID
"""The older name of :data:`ACCESS_KEY_ID`."""
DUMMY_SECRET_KEY = SECRET_ACCESS_KEY
"""The older name of :data:`SECRET_ACCESS_KEY`."""
DICOMWEB_ENDPOINT_ENV = "AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING"
"""Where the library looks for the DICOMweb address (``AWS_ENDPOINT_URL_`` + the DICOMweb host's
service name), as botocore reads ``AWS_ENDPOINT_URL_MEDICAL_IMAGING`` for the API's."""
_FAULT_FIELDS = frozenset(f.name for f in fields(Faults))
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 4 << 20


def seeded_datastore_id(image_sets: int, seed: int, non_primary: float = NON_PRIMARY) -> str:
    """The datastore id of a generated dataset: derived from its seed and size.

    Two local datasets never share an id, so a snapshot refreshed against another one is
    noticed.

    >>> seeded_datastore_id(1000, 0) == seeded_datastore_id(1000, 0) != seeded_datastore_id(1000, 1)
    True
    """
    share = "" if non_primary == NON_PRIMARY else f":{non_primary!r}"
    return hashlib.sha256(f"seeded:{seed}:{image_sets}{share}".encode()).hexdigest()[:32]


def _port(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be an integer from 0 to 65535 (0 picks a free port)")
    return value


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
        if self.close_connection and not environ.get(BODY_CONSUMED_KEY):
            self._linger()

    def _linger(self) -> None:
        """Close gently when the request body was left unread (refused past the cap).

        Closing a socket with unread data makes the kernel send a reset, which can destroy our
        answer before the client reads it. So: end our side, then read and discard what the
        client is still sending, for at most ``_LINGER_SECONDS`` and ``_LINGER_BYTES``.
        """
        connection = self.connection
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(_LINGER_SECONDS)
            deadline = time.monotonic() + _LINGER_SECONDS
            discarded = 0
            while discarded < _LINGER_BYTES and time.monotonic() < deadline:
                chunk = connection.recv(1 << 16)
                if not chunk:
                    break
                discarded += len(chunk)

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
    """A local stand-in for AWS HealthImaging over HTTP on 127.0.0.1: API and DICOMweb.

    Parameters
    ----------
    backend
        The state to serve; a new empty :class:`Backend` when None.
    host
        Interface to bind; loopback by default.
    port, dicomweb_port
        TCP ports of the API and DICOMweb addresses; 0 picks a free one (see
        :attr:`endpoint_url` and :attr:`dicomweb_endpoint_url` after :meth:`start`).
    faults
        Initial fault settings; none by default.
    max_body_bytes
        Request body cap (default 1 MiB), applied as the body streams: larger bodies get HTTP
        413 ``ValidationException``.
    access_key_id, secret_access_key
        The known credentials every request must be signed with (SigV4, service
        ``medical-imaging``, region ``us-east-1``); :meth:`add_credentials` adds more.
    max_clock_skew
        How far a request's ``x-amz-date`` may be from the clock (seconds or a timedelta;
        15 minutes by default, the documented SigV4 rule).
    deny
        IAM actions answered 403 ``AccessDeniedException`` (``medical-imaging:SearchDICOMStudies``
        or ``SearchDICOMStudies``; see :attr:`deny`).
    qido_record_cap
        At most this many QIDO-RS records per query (10,000, as the older developer guide
        states); None serves them all.
    events_queue_url, sqs_endpoint_url, event_faults, event_options
        Send every image-set change as an EventBridge-shaped event to this SQS queue
        (:mod:`~healthimaging_df.local.events`).

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
        dicomweb_port: int = 0,
        faults: Faults | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        access_key_id: str = ACCESS_KEY_ID,
        secret_access_key: str = SECRET_ACCESS_KEY,
        max_clock_skew: float | timedelta = DEFAULT_MAX_SKEW,
        deny: Iterable[str] = (),
        qido_record_cap: int | None = OLDER_RECORD_CAP,
        events_queue_url: str | None = None,
        sqs_endpoint_url: str | None = None,
        event_faults: EventFaults | None = None,
        event_options: EventOptions | None = None,
    ) -> None:
        self.backend = backend if backend is not None else Backend()
        self.host = host
        self.port = _port(port, "port")
        self.dicomweb_port = _port(dicomweb_port, "dicomweb_port")
        if self.port and self.port == self.dicomweb_port:
            raise ValueError("port and dicomweb_port must differ")
        if (
            isinstance(max_body_bytes, bool)
            or not isinstance(max_body_bytes, int)
            or max_body_bytes < 1
        ):
            raise ValueError("max_body_bytes must be a positive int")
        self.datastore_id: str | None = None
        skew = (
            max_clock_skew
            if isinstance(max_clock_skew, timedelta)
            else timedelta(seconds=max_clock_skew)
        )
        self._keys = KeyRing()
        self._keys.add(access_key_id, secret_access_key)
        self.access_key_id, self.secret_access_key = access_key_id, secret_access_key
        self._gate = Gate(Verifier(self._keys, REGION, skew), normalize_actions(deny))
        self._recorder = StatsRecorder(faults if faults is not None else Faults())
        self._qido_defaults = QidoSettings(record_cap=qido_record_cap)
        self._qido_defaults.validate()
        self._qido = QidoApp(self.backend, replace(self._qido_defaults), self._recorder)
        api = ApiHandlers(self.backend, self._recorder)
        self._api_app = WireApp(
            API_MAP,
            api.handlers(),
            self._recorder,
            self._gate,
            max_body_bytes=max_body_bytes,
        )
        self._dicomweb_app = WireApp(
            QIDO_MAP,
            self._qido.handlers(),
            self._recorder,
            self._gate,
            max_body_bytes=max_body_bytes,
        )
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._exported: tuple[str | None] | None = None
        self._events: EventSink | None = None
        self._event_settings: dict[str, Any] | None = None
        if events_queue_url is not None:
            self._event_settings = {
                "queue_url": events_queue_url,
                "sqs_endpoint_url": sqs_endpoint_url,
                "faults": event_faults,
                "options": event_options,
            }
            self._open_events()
        elif sqs_endpoint_url is not None or event_faults is not None or event_options is not None:
            raise ValueError(
                "sqs_endpoint_url, event_faults and event_options need events_queue_url"
            )

    def _open_events(self) -> None:
        """Start delivering change events (again, after :meth:`close`), if a queue was given."""
        if self._event_settings is None or self._events is not None:
            return
        self._events = EventSink(record=self._recorder.record_events, **self._event_settings)
        self.backend.subscribe(self._events)

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
        **options: Any,
    ) -> LocalService:
        """A service with one datastore named ``seeded`` holding generated image sets.

        Its id is :func:`seeded_datastore_id` of ``(image_sets, seed)``: every local dataset
        has its own. ``options`` are :class:`LocalService` keywords (``dicomweb_port``,
        ``deny``, ``qido_record_cap``, ``events_queue_url``, ...) and :class:`Faults` fields
        (``latency_ms``, ``tps``, ``window_tps``, ``malformed_rate``, ``update_rate``, ...;
        ``seed`` is taken by the data, so use ``fault_seed`` for the faults' generators).
        ``instances_per_series`` and ``attributes_per_instance`` make GetImageSetMetadata
        documents realistic in size (:class:`~healthimaging_df.local.documents.SeriesShape`).
        ``non_primary`` is the generator's share of non-primary copies
        (:func:`generate_image_sets`). The service is not started.
        """
        service_options = {k: options.pop(k) for k in list(options) if k in _SERVICE_OPTIONS}
        fault_seed = options.pop("fault_seed", 0)
        faults = Faults(seed=fault_seed, **options)
        backend = Backend(series_shape=SeriesShape(instances_per_series, attributes_per_instance))
        datastore_id = backend.create_datastore(
            "seeded", datastore_id=seeded_datastore_id(image_sets, seed, non_primary)
        )
        backend.add_image_sets(datastore_id, generate_image_sets(image_sets, seed, non_primary))
        service = cls(backend, host=host, port=port, faults=faults, **service_options)
        service.datastore_id = datastore_id
        return service

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalService:
        """Bind both addresses and serve in daemon threads; return self. Idempotent."""
        if self._servers:
            return self
        self._open_events()
        servers: list[_Server] = []
        try:
            for port, app in ((self.port, self._api_app), (self.dicomweb_port, self._dicomweb_app)):
                servers.append(_Server(self.host, port, app))
        except BaseException:
            for server in servers:
                server.server_close()
            raise
        self.port = servers[0].server_address[1]
        self.dicomweb_port = servers[1].server_address[1]
        for server, name in zip(servers, ("api", "dicomweb"), strict=True):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"healthimaging-local-{name}:{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        self._servers = servers
        return self

    def stop(self) -> None:
        """Stop serving, close open connections, release the ports, deliver queued events."""
        servers, threads = self._servers, self._threads
        self._servers, self._threads = [], []
        for server in servers:
            server.shutdown()
            server.close_connections()
            server.server_close()
        for thread in threads:
            thread.join(timeout=5)
        self._unexport()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """:meth:`stop`, and end the event delivery thread (:meth:`start` makes a new one)."""
        self.stop()
        if self._events is not None:
            self.backend.unsubscribe(self._events)
            self._events.close()
            self._events = None

    @property
    def running(self) -> bool:
        """Whether the servers are accepting requests."""
        return bool(self._servers)

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self.running:
            return f"<LocalService stopped datastore_id={self.datastore_id!r}>"
        return (
            f"<LocalService {self.endpoint_url} dicomweb={self.dicomweb_endpoint_url} "
            f"datastore_id={self.datastore_id!r}>"
        )

    @property
    def endpoint_url(self) -> str:
        """The API address, ``http://127.0.0.1:PORT`` (the bound port once started)."""
        return f"http://{self.host}:{self.port}"

    @property
    def dicomweb_endpoint_url(self) -> str:
        """The DICOMweb (QIDO-RS) address, ``http://127.0.0.1:PORT`` (bound once started).

        The library finds it through :data:`DICOMWEB_ENDPOINT_ENV` (see :meth:`env` and
        :meth:`dicomweb_environment`); the API address answers 404 for DICOMweb paths.
        """
        return f"http://{self.host}:{self.dicomweb_port}"

    # -- who may call ------------------------------------------------------------------------

    @property
    def credentials(self) -> tuple[str, str]:
        """``(access key id, secret access key)`` that :meth:`client` signs with."""
        return self.access_key_id, self.secret_access_key

    def add_credentials(
        self, access_key_id: str, secret_access_key: str, session_token: str | None = None
    ) -> None:
        """Accept requests signed with another key (with exactly this session token, if given)."""
        self._keys.add(access_key_id, secret_access_key, session_token)

    @property
    def deny(self) -> frozenset[str]:
        """IAM actions (without the ``medical-imaging:`` prefix) answered 403 AccessDenied.

        Assignable at runtime: ``svc.deny = ["medical-imaging:SearchDICOMStudies"]``;
        ``ValueError`` for a name that is not a medical-imaging action.
        """
        return self._gate.deny

    @deny.setter
    def deny(self, actions: Iterable[str]) -> None:
        self._gate.deny = normalize_actions(actions)

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
        """Back to no faults and the QIDO-RS settings the service was made with; deny nothing."""
        self._recorder.replace_faults(Faults())
        self._qido.settings = replace(self._qido_defaults)
        self._gate.deny = frozenset()

    @property
    def qido(self) -> QidoSettings:
        """The live QIDO-RS settings, e.g. ``svc.qido.record_cap = None`` (no cap)."""
        return self._qido.settings

    @property
    def stats(self) -> Stats:
        """A snapshot of the request counters."""
        return self._recorder.snapshot()

    def reset_stats(self) -> None:
        """Zero the request counters."""
        self._recorder.reset()

    def flush_events(self, timeout: float = 30.0) -> bool:
        """Send every queued event now (a partial reorder batch too); False on timeout."""
        return True if self._events is None else self._events.flush(timeout)

    # -- clients --------------------------------------------------------------------------------

    def client(self, **config_kwargs: Any) -> Any:
        """A real boto3 ``medical-imaging`` client pointed at this service's API address.

        Signed with :attr:`credentials` (nothing read from ``~/.aws`` or the environment);
        region us-east-1; host-prefix injection off (the model's ``runtime-`` prefix would
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
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=None,
            region_name=REGION,
            botocore_session=isolated,
        )
        return session.client(
            "medical-imaging",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(**settings),
        )

    def sign(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        credentials: tuple[str, str] | None = None,
        amz_date: str | None = None,
    ) -> dict[str, str]:
        """The headers of ``url`` signed with SigV4 as botocore signs, for hand-made requests.

        ``url`` is signed exactly as given (a query is not re-encoded: a ``+`` signed for a
        space fails, as on AWS). ``headers`` (a ``Host`` among them, else the URL's) are
        signed too. ``credentials`` default to :attr:`credentials`; ``amz_date``
        (``YYYYMMDDTHHMMSSZ``) to now.
        """
        return sign_request(
            method,
            url,
            body,
            headers,
            credentials=credentials or self.credentials,
            amz_date=amz_date,
        )

    def env(self) -> dict[str, str]:
        """Environment variables pointing an unmodified boto3 client (and the library) here.

        For ``boto3.client("medical-imaging")`` in a subprocess, e.g. a CLI under test:
        the API address, the DICOMweb address (:data:`DICOMWEB_ENDPOINT_ENV`), host-prefix
        injection off, the known credentials and the region.
        """
        return {
            "AWS_ENDPOINT_URL_MEDICAL_IMAGING": self.endpoint_url,
            DICOMWEB_ENDPOINT_ENV: self.dicomweb_endpoint_url,
            "AWS_DISABLE_HOST_PREFIX_INJECTION": "true",
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def export_dicomweb_endpoint(self) -> str:
        """Set :data:`DICOMWEB_ENDPOINT_ENV` to this service's DICOMweb address until :meth:`stop`.

        For a notebook or script that starts the service and then runs queries in the same
        process (the context-manager form is :meth:`dicomweb_environment`). Returns the address.
        """
        if self._exported is None:
            self._exported = (os.environ.get(DICOMWEB_ENDPOINT_ENV),)
        os.environ[DICOMWEB_ENDPOINT_ENV] = self.dicomweb_endpoint_url
        return self.dicomweb_endpoint_url

    def _unexport(self) -> None:
        if self._exported is None:
            return
        (previous,) = self._exported
        self._exported = None
        if os.environ.get(DICOMWEB_ENDPOINT_ENV) != self.dicomweb_endpoint_url:
            return  # someone else set it since: theirs stays
        if previous is None:
            os.environ.pop(DICOMWEB_ENDPOINT_ENV, None)
        else:
            os.environ[DICOMWEB_ENDPOINT_ENV] = previous

    @contextlib.contextmanager
    def dicomweb_environment(self) -> Iterator[str]:
        """Set :data:`DICOMWEB_ENDPOINT_ENV` to this service's DICOMweb address for a block.

        For in-process code that takes a ``client`` and finds DICOMweb by itself (the
        library's QIDO-RS path): ``with svc.dicomweb_environment(): query.to_dataframe(client=
        svc.client())``. The previous value (or its absence) comes back afterwards.
        """
        previous = os.environ.get(DICOMWEB_ENDPOINT_ENV)
        os.environ[DICOMWEB_ENDPOINT_ENV] = self.dicomweb_endpoint_url
        try:
            yield self.dicomweb_endpoint_url
        finally:
            if previous is None:
                os.environ.pop(DICOMWEB_ENDPOINT_ENV, None)
            else:
                os.environ[DICOMWEB_ENDPOINT_ENV] = previous


_SERVICE_OPTIONS = frozenset(inspect.signature(LocalService.__init__).parameters) - {
    "self",
    "backend",
    "host",
    "port",
    "faults",
}
