"""What the planner may know about a datastore's size: a cache of past scans, or a cheap probe.

A full scan reads every image set, so it leaves an exact count behind (in the user's cache
directory, ``$HEALTHIMAGING_DF_CACHE`` or ``~/.cache/healthimaging_df``, keyed by endpoint and
datastore; neither is PHI). Without one, :func:`probe` estimates the size with about ten requests
in two rounds of concurrent requests: the oldest and newest ``createdAt`` (the oldest as a whole
page: a datastore of 50 or fewer is counted by it), then one page in each of eight equal
``createdAt`` windows (a window that ends within its page is counted exactly, one that does not
is extrapolated from the span its 50 rows cover); when a scan follows, those pages are its first
ones (:func:`probe_pieces`). A first scan of the whole datastore needs no count: it sends the two
ends alone and starts at the probe's cuts (:func:`probe_cuts`). A probe's estimate has no
``createdAt`` quantiles: eight pages say too little about bursty data to steer a scan by.
:func:`probe_chain` sizes one request chain with one or two requests (what a QIDO-RS plan's
sweep of the non-primary image sets, or a StudyDateTime-filtered scan, reads).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from healthimaging_df import aws
from healthimaging_df.core import dates
from healthimaging_df.engine.fetch import Prefetched, call_page, request_key
from healthimaging_df.plan import PAGE_ROWS, Chain, DatastoreStats

log = logging.getLogger(__name__)

PROBE_WINDOWS = 8
# An empty page may carry a nextToken (legal): an end of the datastore is looked for past at most
# this many such pages before the probe gives up on counting it.
EMPTY_PAGES_FOLLOWED = 5
MAX_AGE = timedelta(days=7)  # older counts are measured again
_SECOND = timedelta(seconds=1)


def cache_dir() -> Path:
    """Where statistics are kept."""
    configured = os.environ.get("HEALTHIMAGING_DF_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "healthimaging_df"


def _path(client: Any, datastore_id: str) -> Path:
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "") or ""
    key = hashlib.sha256(f"{endpoint}|{datastore_id}".encode()).hexdigest()[:24]
    return cache_dir() / "stats" / f"{key}.json"


def cached(client: Any, datastore_id: str) -> DatastoreStats | None:
    """Statistics a previous run left, if fresh enough."""
    try:
        data = json.loads(_path(client, datastore_id).read_text())
        measured = datetime.fromisoformat(data["measured_at"])
        if datetime.now(timezone.utc) - measured > MAX_AGE:
            return None
        return DatastoreStats(
            int(data["image_sets"]),
            _moment(data.get("created_min")),
            _moment(data.get("created_max")),
            source=str(data.get("source", "cache")),
            non_primary=_count(data.get("non_primary")),
            created_quantiles=tuple(
                m for m in map(_moment, data.get("created_quantiles") or ()) if m is not None
            ),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(client: Any, datastore_id: str, stats: DatastoreStats) -> None:
    """Keep *stats* for later plans; a cache that cannot be written is skipped quietly."""
    path = _path(client, datastore_id)
    data = {
        "image_sets": stats.image_sets,
        "created_min": stats.created_min.isoformat() if stats.created_min else None,
        "created_max": stats.created_max.isoformat() if stats.created_max else None,
        "source": stats.source,
        "non_primary": stats.non_primary,
        "created_quantiles": [q.isoformat() for q in stats.created_quantiles],
        "measured_at": datetime.now(timezone.utc).isoformat(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
            json.dump(data, handle)
        os.replace(handle.name, path)
    except OSError as exc:
        log.debug("statistics not cached: %s", type(exc).__name__)


@dataclass(frozen=True)
class Probe:
    """A probe's estimate, and the pages it read: the first pages of a scan cut at *cuts*."""

    stats: DatastoreStats
    cuts: tuple[datetime, ...] = ()
    pages: Prefetched = field(default_factory=dict, repr=False)  # summaries are PHI


def probe(client: Any, datastore_id: str, limiter: aws.RateLimiter | None) -> DatastoreStats:
    """Estimate the datastore's size with about ten requests (see :func:`probe_pieces`)."""
    return probe_pieces(client, datastore_id, limiter).stats


def probe_pieces(
    client: Any,
    datastore_id: str,
    limiter: aws.RateLimiter | None,
    scan: Chain | None = None,
    page_size: int = PAGE_ROWS,
) -> Probe:
    """Estimate the datastore's size with about ten requests, in two rounds sent at once.

    The two ends first, then one page in each of eight windows cut at even whole seconds between
    them. Given *scan* (an unfiltered chain whose createdAt window covers the datastore) the
    windows are that chain's pieces cut at ``Probe.cuts`` and each page is the very first page
    the fetcher would ask for (same request, *page_size* rows): a scan pre-split at those cuts
    starts from them (``fetch.stream(prefetched=...)``), so the probe costs it two requests.
    """
    with ThreadPoolExecutor(max_workers=PROBE_WINDOWS, thread_name_prefix="ahi-probe") as pool:
        found = _ends(pool, client, datastore_id, limiter, scan)
        if isinstance(found, Probe):
            return found
        first, last, window, cuts = found
        low, high = first, last + _SECOND
        edges = [window[0], *cuts, window[1]]
        chain = scan if scan is not None else Chain(0, (), None, window=window)
        requests = [
            {**chain.request(datastore_id, piece), "maxResults": page_size}
            for piece in itertools.pairwise(edges)
        ]
        # past an empty page with a nextToken: the page kept for the scan is then its first rows
        pages = list(pool.map(lambda kwargs: _first_rows(client, limiter, kwargs), requests))
    # what each piece really spans: the datastore's rows lie between its oldest and newest
    spans = [(max(a, low), min(b, high)) for a, b in itertools.pairwise(edges)]
    counts = [
        _count_rows(table, token, *span) for (table, token), span in zip(pages, spans, strict=True)
    ]
    return Probe(
        # no createdAt quantiles: eight pages say too little of bursty data, and a fetcher
        # steered by them read a bursty first scan at 33% of the quota instead of 74%
        DatastoreStats(round(sum(counts)), first, last, source="probe"),
        tuple(cuts),
        {request_key(kwargs): page for kwargs, page in zip(requests, pages, strict=True)},
    )


def probe_cuts(
    client: Any, datastore_id: str, limiter: aws.RateLimiter | None, scan: Chain
) -> tuple[datetime, ...]:
    """Where a first scan of the whole datastore starts in pieces: the probe's cuts, two requests.

    No window pages: a scan that reads every image set decides nothing on a count, and waiting
    for eight pages before it starts held every reader back a round trip (at 100 ms, a third of
    a point of the quota); the fetcher's first requests are those pages. No cuts for an empty
    datastore or one of fifty image sets or fewer.
    """
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ahi-probe") as pool:
        found = _ends(pool, client, datastore_id, limiter, scan)
    if isinstance(found, Probe):
        return ()
    _first, _last, _window, cuts = found
    return tuple(cuts)


def _ends(
    pool: ThreadPoolExecutor,
    client: Any,
    datastore_id: str,
    limiter: aws.RateLimiter | None,
    scan: Chain | None,
) -> Probe | tuple[datetime, datetime, tuple[datetime, datetime], list[datetime]]:
    """The oldest and newest image set (two requests at once) and eight windows' cuts.

    ``(oldest createdAt, newest createdAt, the window cut, cuts)``; a finished :class:`Probe` when
    the first page already counts the datastore (empty, or fifty image sets or fewer).
    """

    def end(order: str) -> tuple[pa.Table, str | None]:
        kwargs: dict[str, Any] = {
            "datastoreId": datastore_id,
            "maxResults": PAGE_ROWS if order == "ASC" else 1,
            "searchCriteria": {"sort": {"sortField": "createdAt", "sortOrder": order}},
        }
        return _first_rows(client, limiter, kwargs)

    (oldest, token), (newest, newest_token) = pool.map(end, ("ASC", "DESC"))
    if oldest.num_rows == 0 or newest.num_rows == 0:
        if token is None and newest_token is None:
            return Probe(DatastoreStats(0, source="probe"))
        # only empty pages, each with a nextToken: more than a page, size unknown
        return Probe(DatastoreStats(PAGE_ROWS + 1, source="probe"))
    first = oldest.column("createdAt")[0].as_py()
    last = newest.column("createdAt")[0].as_py()
    if token is None:  # fifty image sets or fewer: the first page counted them all
        return Probe(DatastoreStats(oldest.num_rows, first, last, source="probe"))
    low, high = first, last + _SECOND
    window = (scan.window if scan is not None else None) or (
        dates.floor_second(low),
        dates.ceil_second(high),
    )
    step = (high - low) / PROBE_WINDOWS
    seconds = {dates.floor_second(low + step * k) for k in range(1, PROBE_WINDOWS)}
    return first, last, window, sorted(c for c in seconds if window[0] < c < window[1])


def _first_rows(
    client: Any, limiter: aws.RateLimiter | None, kwargs: dict[str, Any]
) -> tuple[pa.Table, str | None]:
    """The first page of *kwargs* that holds a row (past a few empty pages with a nextToken)."""
    table, token = call_page(client, limiter, kwargs)
    for _ in range(EMPTY_PAGES_FOLLOWED):
        if table.num_rows or token is None:
            break
        table, token = call_page(client, limiter, {**kwargs, "nextToken": token})
    return table, token


def _count_rows(table: pa.Table, token: str | None, a: datetime, b: datetime) -> float:
    """Image sets created in ``[a, b]``: exact when one page holds them, else extrapolated.

    An empty page with a nextToken (legal) says nothing of its window: a page's worth is assumed.
    """
    if token is None:
        return float(table.num_rows)
    if table.num_rows == 0:
        return float(PAGE_ROWS)
    last = table.column("createdAt")[-1].as_py()
    covered = max((last - a).total_seconds(), 1e-3)
    return float(table.num_rows * max(1.0, (b - a).total_seconds() / covered))


def probe_chain(
    client: Any,
    datastore_id: str,
    chain: Chain,
    limiter: aws.RateLimiter | None,
) -> tuple[int, bool]:
    """How many image sets *chain* reads, from its first page: (count, exact).

    A chain pages by ``createdAt`` ascending: a first page without a nextToken is the whole
    answer (one request, exact). Else one more request (the same criteria, newest first, one
    row) finds the chain's last ``createdAt``, and the count is extrapolated from the span the
    first page covers to it. An estimate decides costs and chain shapes only, never what a
    query returns.
    """
    kwargs = {**chain.request(datastore_id), "maxResults": PAGE_ROWS}
    table, token = call_page(client, limiter, kwargs)
    if token is None:
        return table.num_rows, True
    if table.num_rows < 2:
        return PAGE_ROWS + 1, False
    newest = chain.request(datastore_id)
    criteria = dict(newest.get("searchCriteria", {}))
    criteria["sort"] = {"sortField": "createdAt", "sortOrder": "DESC"}
    last_page, _ = call_page(
        client, limiter, {**newest, "searchCriteria": criteria, "maxResults": 1}
    )
    created = table.column("createdAt")
    first, last = created[0].as_py(), created[-1].as_py()
    end = last_page.column("createdAt")[0].as_py() if last_page.num_rows else last
    covered = max((last - first).total_seconds(), 1e-3)
    span = max((end - first).total_seconds(), covered)
    return max(table.num_rows + 1, round(table.num_rows * span / covered)), False


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _moment(text: Any) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None
