"""Retry with backoff: the one loop the package retries with, and its named policies.

botocore retries throttling and 5xx on the clients it makes (standard mode). What it cannot see
is retried here: a 2xx page that broke the service model, a DICOMweb request (no SDK), a Delta
commit that lost a race. Each passes its policy from the table below, so the constants live in
one place, and every retry waits a *full-jitter* exponential delay (AWS Architecture Blog,
"Exponential Backoff And Jitter"; botocore's standard mode does the same): the n-th retry waits a
random time up to ``min(cap, base * 2**(n - 1))``, so clients that failed together do not retry
together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

__all__ = [
    "CONFLICT",
    "MALFORMED",
    "SERVICE_BACKOFF",
    "Backoff",
    "RetryCancelled",
    "retrying",
]


@dataclass(frozen=True)
class Backoff:
    """How often and how long to retry: *attempts* calls in all, full-jitter delays in between."""

    attempts: int
    base: float
    cap: float

    def delay(self, retry: int) -> float:
        """Seconds before retry number *retry* (1 for the first): random, up to the cap."""
        return random.uniform(0.0, min(self.cap, self.base * 2 ** (retry - 1)))


SERVICE_BACKOFF = Backoff(attempts=10, base=1.0, cap=20.0)
"""A service error (throttling, 5xx, a dropped connection): botocore's standard-mode constants."""

MALFORMED = Backoff(attempts=4, base=0.1, cap=1.0)
"""A 2xx page that broke the service model (truncated, bad types): asked for again, soon."""

CONFLICT = Backoff(attempts=5, base=0.05, cap=2.0)
"""A Delta commit another writer won: read the table again and redo the change."""


class RetryCancelled(Exception):
    """The wait between two attempts was cancelled (*wait* returned True); the caller says why."""


def retrying(
    action: Callable[[int], T],
    *,
    retry_if: Callable[[BaseException], bool],
    backoff: Backoff,
    wait: Callable[[float], bool | None] = time.sleep,
) -> T:
    """``action(attempt)`` until it returns, retrying failures that *retry_if* accepts.

    *attempt* counts from 1. The last failure, or one *retry_if* refuses, propagates unchanged
    (*retry_if* sees every failure, the last one too, so it may also record it: widen a
    limiter's margin, log its code). *wait* sleeps the
    delay; a *wait* that returns True (``threading.Event.wait`` of a cancel flag) stops with
    :class:`RetryCancelled`.
    """
    attempt = 1
    while True:
        try:
            return action(attempt)
        except Exception as exc:
            if not retry_if(exc) or attempt >= backoff.attempts:
                raise
        if wait(backoff.delay(attempt)) is True:
            raise RetryCancelled
        attempt += 1
