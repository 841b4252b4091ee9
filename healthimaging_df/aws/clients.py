"""The boto3 client factory and the per-thread arming of a limiter on botocore's events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from healthimaging_df.aws.errors import THROTTLING_CODES
from healthimaging_df.aws.limiter import RateLimiter
from healthimaging_df.core import logs

SERVICE = "medical-imaging"
SEARCH = "SearchImageSets"  # the operation every search path paces (its own quota bucket)
_HANDLER_ID = "healthimaging_df.aws.pace"
_THROTTLE_HANDLER_ID = "healthimaging_df.aws.throttled"


def make_client(
    client: Any, boto3_session: Any, max_concurrency: int = 8, endpoint_url: str | None = None
) -> Any:
    """Return *client*, or a ``medical-imaging`` client from *boto3_session* (default session).

    The client made here retries in botocore's standard mode (throttling and 5xx, 10 attempts),
    has a connection pool large enough for *max_concurrency*, and names us in its user agent.
    An *endpoint_url* (a local service) also turns off the ``runtime-`` host prefix.
    """
    logs.refresh()  # loggers of botocore modules imported since then are covered too
    if client is not None:
        return client
    import boto3
    from botocore.config import Config

    from healthimaging_df._version import __version__  # importlib.metadata: not at import time

    session = boto3_session if boto3_session is not None else boto3.Session()
    settings: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": 10},
        "max_pool_connections": max(10, max_concurrency + 2),
        "user_agent_extra": f"healthimaging-df/{__version__}",
    }
    if endpoint_url:
        settings["inject_host_prefix"] = False
    return session.client("medical-imaging", endpoint_url=endpoint_url, config=Config(**settings))


_armed = threading.local()


def _before_send(**_: Any) -> None:
    limiter: RateLimiter | None = getattr(_armed, "limiter", None)
    if limiter is not None:
        limiter.acquire(getattr(_armed, "priority", 0.0))
        _armed.sent = time.monotonic()


def sent_at() -> float | None:
    """When this thread's last paced attempt went out (its slot granted), for round trips."""
    sent: float | None = getattr(_armed, "sent", None)
    return sent


def _needs_retry(response: Any = None, **_: Any) -> None:
    """After each attempt: a throttled one widens the armed limiter's margin (see ``throttled``).

    Only observes: returns None, so botocore's own retry handler still decides.
    """
    limiter: RateLimiter | None = getattr(_armed, "limiter", None)
    if limiter is None or not isinstance(response, tuple) or len(response) != 2:
        return
    http, parsed = response
    code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
    if code in THROTTLING_CODES or getattr(http, "status_code", None) == 429:
        limiter.throttled()


@contextmanager
def paced(client: Any, limiter: RateLimiter | None, priority: float = 0.0) -> Iterator[None]:
    """Within the block, every HTTP attempt this thread makes on *client* waits for *limiter*.

    At *priority* (see :meth:`RateLimiter.acquire`).

    A throttled attempt also tells *limiter* (:meth:`RateLimiter.throttled`). The handlers are
    registered once per client (idempotent through their unique ids) and do nothing on threads
    that are not inside this block.
    """
    if limiter is None:
        yield
        return
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:  # not a botocore client: pace the call itself
        limiter.acquire(priority)
        yield
        return
    events.register("before-send", _before_send, unique_id=_HANDLER_ID)
    events.register("needs-retry", _needs_retry, unique_id=_THROTTLE_HANDLER_ID)
    previous = getattr(_armed, "limiter", None), getattr(_armed, "priority", 0.0)
    _armed.limiter, _armed.priority = limiter, priority
    try:
        yield
    finally:
        _armed.limiter, _armed.priority = previous
