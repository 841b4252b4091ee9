"""What the planner may know about a datastore's size: a cache of past scans, or a cheap probe.

A full scan reads every image set, so it leaves an exact count behind (in the user's cache
directory, ``$HEALTHIMAGING_DF_CACHE`` or ``~/.cache/healthimaging_df``, keyed by endpoint and
datastore; neither is PHI). Without one, :func:`probe` estimates the size with about ten requests
in two rounds of concurrent requests: the oldest and newest ``createdAt`` (the oldest as a whole
page: a datastore of 50 or fewer is counted by it), then one page in each of eight equal
``createdAt`` windows (a window that ends within its page is counted exactly, one that does not
is extrapolated from the span its 50 rows cover). :func:`probe_chain` sizes one request chain with one or two
requests (what a QIDO-RS plan's sweep of the non-primary image sets, or a StudyDateTime-filtered
scan, reads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from healthimaging_df import aws
from healthimaging_df.fetch import call_page
from healthimaging_df.plan import PAGE_ROWS, Chain, DatastoreStats

log = logging.getLogger(__name__)

PROBE_WINDOWS = 8
MAX_AGE = timedelta(days=7)  # older counts are measured again


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


def probe(client: Any, datastore_id: str, limiter: aws.RateLimiter | None) -> DatastoreStats:
    """Estimate the datastore's size with about ten requests (see the module docstring).

    The requests go out at once where they can: the two ends together, then the eight windows
    together, so a probe takes about two round trips (and ten of the quota's slots), not ten.
    """

    def ends(order: str) -> tuple[pa.Table, str | None]:
        kwargs = {
            "datastoreId": datastore_id,
            "maxResults": PAGE_ROWS if order == "ASC" else 1,
            "searchCriteria": {"sort": {"sortField": "createdAt", "sortOrder": order}},
        }
        return call_page(client, limiter, kwargs)

    with ThreadPoolExecutor(max_workers=PROBE_WINDOWS, thread_name_prefix="ahi-probe") as pool:
        (oldest, token), (newest, _) = pool.map(ends, ("ASC", "DESC"))
        if oldest.num_rows == 0 or newest.num_rows == 0:
            return DatastoreStats(0, source="probe")
        created = oldest.column("createdAt")
        first, last = created[0].as_py(), newest.column("createdAt")[0].as_py()
        if token is None:  # fifty image sets or fewer: the first page counted them all
            return DatastoreStats(oldest.num_rows, first, last, source="probe")
        low, high = first, last + timedelta(seconds=1)
        step = (high - low) / PROBE_WINDOWS
        windows = [(low + step * k, low + step * (k + 1)) for k in range(PROBE_WINDOWS)]
        counts = list(pool.map(lambda w: _window_count(client, datastore_id, limiter, *w), windows))
    return DatastoreStats(
        round(sum(counts)),
        first,
        last,
        source="probe",
        created_quantiles=_quantiles(low, step, counts),
    )


def _window_count(
    client: Any, datastore_id: str, limiter: aws.RateLimiter | None, a: datetime, b: datetime
) -> float:
    """Image sets created in ``[a, b]``: exact when one page holds them, else extrapolated."""
    criteria = {
        "filters": [{"operator": "BETWEEN", "values": [{"createdAt": a}, {"createdAt": b}]}],
        "sort": {"sortField": "createdAt", "sortOrder": "ASC"},
    }
    kwargs = {"datastoreId": datastore_id, "maxResults": PAGE_ROWS, "searchCriteria": criteria}
    table, token = call_page(client, limiter, kwargs)
    if token is None:
        return float(table.num_rows)
    last = table.column("createdAt")[-1].as_py()
    covered = max((last - a).total_seconds(), 1e-3)
    return float(table.num_rows * max(1.0, (b - a).total_seconds() / covered))


def _quantiles(low: datetime, step: timedelta, counts: list[float]) -> tuple[datetime, ...]:
    """The createdAt at PROBE_WINDOWS + 1 even ranks, the rows spread evenly within each window."""
    total = sum(counts)
    if total <= 0:
        return ()
    out = [low]
    seen, k = 0.0, 0
    for n in range(1, PROBE_WINDOWS):
        target = total * n / PROBE_WINDOWS
        while k < len(counts) - 1 and seen + counts[k] < target:
            seen += counts[k]
            k += 1
        inside = (target - seen) / counts[k] if counts[k] else 0.0
        out.append(low + step * (k + min(max(inside, 0.0), 1.0)))
    out.append(low + step * len(counts))
    return tuple(out)


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
