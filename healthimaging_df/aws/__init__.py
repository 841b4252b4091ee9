"""The one place that talks to botocore: clients, pacing under the quota, error translation.

Search (the engine) and enrichment (``fetch_metadata``) share it. Every HTTP attempt, botocore's
own retries included, takes a token from the caller's :class:`RateLimiter`: the limiter is armed
per thread through botocore's ``before-send`` event, so a retry cannot overrun the quota that the
first attempt respected, and a user's own client is paced only inside our calls.
"""

from __future__ import annotations

from healthimaging_df.aws import session
from healthimaging_df.aws.clients import (
    SEARCH,
    SERVICE,
    clock_skew,
    hooked,
    paced,
    pacing,
    sent_at,
)
from healthimaging_df.aws.errors import (
    FATAL_CODES,
    THROTTLING_CODES,
    Failure,
    aws_errors,
    describe,
    error_code,
    failure,
    http_failure,
    is_aws_error,
    search_error,
    service_error,
)
from healthimaging_df.aws.limiter import (
    CONCURRENCY_MARGIN,
    HEADROOM,
    MARGIN,
    MAX_CONCURRENCY,
    MAX_MARGIN,
    RECOVER_WINDOWS,
    RateLimiter,
    forget_limiters,
    limiter_for,
)
from healthimaging_df.aws.quotas import (
    GET_IMAGE_SET_TPS,
    METADATA_TPS,
    QIDO_TPS,
    QUOTAS,
    SEARCH_TPS,
    Quota,
    default_tps,
)
from healthimaging_df.aws.retry import (
    CONFLICT,
    MALFORMED,
    SERVICE_BACKOFF,
    Backoff,
    RetryCancelled,
    retrying,
)
from healthimaging_df.aws.session import make_client

__all__ = [
    "CONCURRENCY_MARGIN",
    "CONFLICT",
    "FATAL_CODES",
    "GET_IMAGE_SET_TPS",
    "HEADROOM",
    "MALFORMED",
    "MARGIN",
    "MAX_CONCURRENCY",
    "MAX_MARGIN",
    "METADATA_TPS",
    "QIDO_TPS",
    "QUOTAS",
    "RECOVER_WINDOWS",
    "SEARCH",
    "SEARCH_TPS",
    "SERVICE",
    "SERVICE_BACKOFF",
    "THROTTLING_CODES",
    "Backoff",
    "Failure",
    "Quota",
    "RateLimiter",
    "RetryCancelled",
    "aws_errors",
    "clock_skew",
    "default_tps",
    "describe",
    "error_code",
    "failure",
    "forget_limiters",
    "hooked",
    "http_failure",
    "is_aws_error",
    "limiter_for",
    "make_client",
    "paced",
    "pacing",
    "retrying",
    "search_error",
    "sent_at",
    "service_error",
    "session",
]
