"""The per-thread arming of a limiter on botocore's events: pacing a client inside our calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from healthimaging_df.aws.errors import THROTTLING_CODES
from healthimaging_df.aws.limiter import RateLimiter

SERVICE = "medical-imaging"
SEARCH = "SearchImageSets"  # the operation every search path paces (its own quota bucket)
_HANDLER_ID = "healthimaging_df.aws.pace"
_THROTTLE_HANDLER_ID = "healthimaging_df.aws.throttled"


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
