"""Pacing a client inside our calls: botocore event handlers that live only as long as the call.

A handler registered on a client stays there for the client's life, and the client may be the
user's. So every handler of ours is registered by :func:`hooked` for the block that needs it,
counted per client (concurrent and nested blocks share one registration) and unregistered when
the last block leaves, also by an exception: after our call the user's client has no handler
of ours. A run registers once for its whole life (``PageStream``, ``fetch_metadata``); each
request's :func:`paced` block then only counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from healthimaging_df.aws.errors import THROTTLING_CODES
from healthimaging_df.aws.limiter import RateLimiter

SERVICE = "medical-imaging"
SEARCH = "SearchImageSets"  # the operation every search path paces (its own quota bucket)
_HANDLER_ID = "healthimaging_df.aws.pace"
_THROTTLE_HANDLER_ID = "healthimaging_df.aws.throttled"


_armed = threading.local()
# the service's clock minus ours, from the last answer's Date header (see clock_skew)
_clock: dict[str, timedelta | None] = {"skew": None}
_hooks_lock = threading.Lock()
_hook_users: dict[tuple[int, str], int] = {}  # (id(client), handler id) -> blocks inside


@contextmanager
def hooked(client: Any, event: str, handler: Any, unique_id: str) -> Iterator[None]:
    """Within the block, *handler* is registered on *client*'s *event*; gone after the last block.

    Counted per client and *unique_id*: a block entered while another holds the registration
    only counts; the last to leave unregisters, exception or not. Nothing happens for an object
    that is not a botocore client.
    """
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:
        yield
        return
    key = (id(client), unique_id)
    with _hooks_lock:
        users = _hook_users.get(key, 0)
        if users == 0:
            events.register(event, handler, unique_id=unique_id)
        _hook_users[key] = users + 1
    try:
        yield
    finally:
        with _hooks_lock:
            _hook_users[key] -= 1
            if _hook_users[key] == 0:
                del _hook_users[key]
                events.unregister(event, handler, unique_id=unique_id)


@contextmanager
def pacing(client: Any) -> Iterator[None]:
    """Keep the pacing handlers on *client* for a run; :func:`paced` blocks inside only count."""
    with ExitStack() as stack:
        stack.enter_context(hooked(client, "before-send", _before_send, _HANDLER_ID))
        stack.enter_context(hooked(client, "needs-retry", _needs_retry, _THROTTLE_HANDLER_ID))
        yield


def _before_send(**_: Any) -> None:
    limiter: RateLimiter | None = getattr(_armed, "limiter", None)
    if limiter is not None:
        limiter.acquire()
        _armed.sent = time.monotonic()


def sent_at() -> float | None:
    """When this thread's last paced attempt went out (its slot granted), for round trips."""
    sent: float | None = getattr(_armed, "sent", None)
    return sent


def _needs_retry(response: Any = None, **_: Any) -> None:
    """After each attempt: note the service's clock; a throttle widens the limiter's margin.

    A throttled attempt tells the armed limiter (see ``throttled``). Only observes: returns None, so botocore's own retry handler still decides.
    """
    if not isinstance(response, tuple) or len(response) != 2:
        return
    http, parsed = response
    _observe_clock(getattr(http, "headers", None))
    limiter: RateLimiter | None = getattr(_armed, "limiter", None)
    if limiter is None:
        return
    code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
    if code in THROTTLING_CODES or getattr(http, "status_code", None) == 429:
        limiter.throttled()


def _observe_clock(headers: Any) -> None:
    try:
        service = parsedate_to_datetime(headers.get("Date"))
    except (AttributeError, TypeError, ValueError):
        return
    if service.tzinfo is not None:
        _clock["skew"] = service - datetime.now(timezone.utc)


def clock_skew() -> timedelta | None:
    """How far the service's clock stands from ours (+ ahead), as its last answer's ``Date`` said.

    Whole seconds, and late by the answer's way back; None before a run has had an answer. What
    compares our clock with the service's timestamps (a sub-ranged run's catch-up) shifts by it
    instead of assuming the two agree.
    """
    return _clock["skew"]


@contextmanager
def paced(client: Any, limiter: RateLimiter | None) -> Iterator[None]:
    """Within the block, every HTTP attempt this thread makes on *client* waits for *limiter*.

    A throttled attempt also tells *limiter* (:meth:`RateLimiter.throttled`). The handlers are
    on the client while a block is (see :func:`hooked`: wrap a run in :func:`pacing` to register
    them once) and do nothing on threads that are not inside this block.
    """
    if limiter is None:
        yield
        return
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:  # not a botocore client: pace the call itself
        limiter.acquire()
        yield
        return
    previous = getattr(_armed, "limiter", None)
    with pacing(client):
        _armed.limiter = limiter
        try:
            yield
        finally:
            _armed.limiter = previous
