"""The executor: pages from a boto3 client, concurrently, under one client-side rate limit.

Request chains (one per fanned-out value, or createdAt windows read from both ends and split while
workers are free) run on a pool of threads sharing one client. The shared rate limiter
(``aws.RateLimiter``) paces every call below ``max_tps`` so we do not cause the throttling we would
then retry, first come, first served. botocore's standard retry mode
retries throttling and 5xx; anything it gives up on becomes a typed error and the whole fetch
stops: a fault we cannot recover from raises, it never returns half a result.

The modules, bottom up: ``readers`` (the segment / reader model of createdAt windows and the pure
choice of the next reader), ``records`` (options, pages, coverage, counters), ``call`` (one page,
checked; a first request's key), ``windows`` (a stream's windows: readers, hand-overs, splits) and
``stream`` (:class:`PageStream`: threads, queues, the page loop).
"""

from __future__ import annotations

from healthimaging_df.engine.fetch.call import OPERATION, Prefetched, call_page, request_key
from healthimaging_df.engine.fetch.readers import (
    ADD_READER_ROWS,
    AT_RATE,
    CHECKPOINT_PAGES,
    EARLY_STOP_ROWS,
    LOCAL_REACH,
    LOCAL_REACH_SECONDS,
    PAGE_ROWS,
    SPLIT_ROWS,
    STATS_QUANTILES,
    Window,
    even_cuts,
    next_reader,
    readers_short,
)
from healthimaging_df.engine.fetch.readers import _Reader as _Reader
from healthimaging_df.engine.fetch.readers import _Segment as _Segment
from healthimaging_df.engine.fetch.records import Coverage, FetchOptions, Page
from healthimaging_df.engine.fetch.stream import EMPTY_PAGE_LIMIT, PageStream, stream

__all__ = [
    "ADD_READER_ROWS",
    "AT_RATE",
    "CHECKPOINT_PAGES",
    "EARLY_STOP_ROWS",
    "EMPTY_PAGE_LIMIT",
    "LOCAL_REACH",
    "LOCAL_REACH_SECONDS",
    "OPERATION",
    "PAGE_ROWS",
    "SPLIT_ROWS",
    "STATS_QUANTILES",
    "Coverage",
    "FetchOptions",
    "Page",
    "PageStream",
    "Prefetched",
    "Window",
    "call_page",
    "even_cuts",
    "next_reader",
    "readers_short",
    "request_key",
    "stream",
]
