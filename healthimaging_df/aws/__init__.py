"""The one place that talks to botocore: clients, pacing under the quota, error translation.

Search (the engine) and enrichment (``fetch_metadata``) share it. Every HTTP attempt, botocore's
own retries included, takes a token from the caller's :class:`RateLimiter`: the limiter is armed
per thread through botocore's ``before-send`` event, so a retry cannot overrun the quota that the
first attempt respected, and a user's own client is paced only inside our calls.
"""

from __future__ import annotations

from healthimaging_df.aws.clients import SEARCH, SERVICE, make_client, paced, sent_at
from healthimaging_df.aws.errors import THROTTLING_CODES, error_code, search_error
from healthimaging_df.aws.limiter import (
    HEADROOM,
    MARGIN,
    MAX_MARGIN,
    RECOVER_WINDOWS,
    RateLimiter,
    forget_limiters,
    limiter_for,
)

__all__ = [
    "HEADROOM",
    "MARGIN",
    "MAX_MARGIN",
    "RECOVER_WINDOWS",
    "SEARCH",
    "SERVICE",
    "THROTTLING_CODES",
    "RateLimiter",
    "error_code",
    "forget_limiters",
    "limiter_for",
    "make_client",
    "paced",
    "search_error",
    "sent_at",
]
