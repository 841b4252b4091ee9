"""One page of SearchImageSets: paced, checked, parsed into Arrow, a malformed page asked again.

Also what identifies a first request (:func:`request_key`, the key of pages a probe already read)
and what tells the service's refusal of a range chain's createdAt window as second filter.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any

import pyarrow as pa

from healthimaging_df import aws
from healthimaging_df.engine import flatten, pagecheck, pages
from healthimaging_df.errors import MalformedResponseError, SearchError
from healthimaging_df.plan import Chain

# the fetcher's logger, as before the split into modules
log = logging.getLogger("healthimaging_df.engine.fetch")

# first pages already read, by request_key: what a probe hands the scan it decided on
Prefetched = dict[str, tuple[pa.Table, str | None]]
OPERATION = aws.SEARCH


def request_key(kwargs: dict[str, Any]) -> str:
    """A first request's exact identity: its keyword arguments as canonical JSON."""
    return json.dumps(kwargs, sort_keys=True, default=lambda v: v.isoformat())


def _range_pair(chain: Chain) -> bool:
    """Whether *chain*'s split readers send a range with createdAt BETWEEN (not documented)."""
    return chain.lazy and any(f["operator"] == "BETWEEN" for f in chain.filters)


def _pair_refusal(exc: SearchError, chain: Chain, kwargs: dict[str, Any]) -> bool:
    """Whether *exc* is the service refusing a range chain's createdAt window as second filter."""
    if exc.code != "ValidationException" or not _range_pair(chain):
        return False
    filters = kwargs.get("searchCriteria", {}).get("filters", [])
    return len(filters) == 2 and all(f["operator"] == "BETWEEN" for f in filters)


_no_lean: weakref.WeakSet[Any] = weakref.WeakSet()


def _lean(client: Any) -> bool:
    """Whether *client*'s pages can take the lean path (a botocore client with events).

    Otherwise botocore parses them and ``pagecheck`` checks them.
    """
    return hasattr(getattr(client, "meta", None), "events") and client not in _no_lean


def call_page(
    client: Any,
    limiter: aws.RateLimiter | None,
    kwargs: dict[str, Any],
    chain: int | None = None,
    cancel: threading.Event | None = None,
) -> tuple[pa.Table, str | None]:
    """One page, checked against the service model; a malformed page is asked for again.

    Every attempt waits for *limiter* (:meth:`aws.RateLimiter.acquire`).

    The body is parsed straight into Arrow columns (``pages``) where botocore allows it; a client
    that does not is parsed by botocore and checked by ``pagecheck``. Every attempt, botocore's own retries of throttling and 5xx included, waits for the rate
    limiter, so a retry never overruns the quota.
    """
    from botocore.parsers import ResponseParserError

    cancel = cancel or threading.Event()

    def attempt(_: int) -> tuple[pa.Table, str | None]:
        try:
            with aws.paced(client, limiter):
                if _lean(client):
                    try:
                        page = pages.fetch_page(client, kwargs, request_index=chain)
                        return page.table, page.next_token
                    except SearchError as exc:
                        if exc.code != "LeanPathUnavailable":
                            raise
                        _no_lean.add(client)  # an old botocore: parse as botocore does
                response = client.search_image_sets(**kwargs)
            items, token = pagecheck.check_page(response, chain)
            return flatten.summaries_to_table(items), token
        except aws.aws_errors() as exc:
            raise aws.service_error(OPERATION, chain, exc) from None
        except (ResponseParserError, ValueError, TypeError):
            # a body botocore could not read (a bad timestamp) or that broke the model
            raise pagecheck.malformed(chain, "botocore could not parse the response") from None

    def malformed(exc: BaseException) -> bool:
        if not isinstance(exc, MalformedResponseError):
            return False
        log.debug("chain %s: malformed page: %s", chain, exc.rule)
        return True

    try:
        return aws.retrying(
            attempt,
            retry_if=malformed,
            backoff=aws.MALFORMED,
            wait=cancel.wait,
        )
    except aws.RetryCancelled:
        raise SearchError(OPERATION, chain, "Cancelled") from None
