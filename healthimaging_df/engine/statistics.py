"""What the planner may know: a datastore's size, a chain's size, whether DICOMweb answers.

The size from a cache of past scans or a cheap probe, a chain's from its first page, DICOMweb's
answer as remembered per endpoint and region.

:func:`known` reads what costs no request (the cache, the capability); :func:`gather` measures,
all at once, what a plan's ``needs`` ask for. The engine compiles once from the two.

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
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import aws, dicomweb
from healthimaging_df.core import dates
from healthimaging_df.engine.fetch import Prefetched, call_page, request_key
from healthimaging_df.plan import (
    PAGE_ROWS,
    Chain,
    ChainSize,
    DatastoreStats,
    Facts,
    Needs,
    QidoAccess,
    chain_key,
    rows_between,
)

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


def _key(endpoint: str, name: str) -> str:
    """A cache file's name for *name* at *endpoint* (hashed: neither is written in the clear)."""
    return hashlib.sha256(f"{endpoint}|{name}".encode()).hexdigest()[:24]


def _keep(path: Path, data: dict[str, Any], what: str) -> None:
    """Write *data* to *path* as JSON, atomically; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
            json.dump(data, handle)
        os.replace(handle.name, path)
    except OSError as exc:
        log.debug("%s not cached: %s", what, type(exc).__name__)


def _path(client: Any, datastore_id: str) -> Path:
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "") or ""
    return cache_dir() / "stats" / f"{_key(endpoint, datastore_id)}.json"


# range columns' quantiles, by the stats file they go with: in this process only (PHI)
_KEY_QUANTILES: dict[Path, tuple[tuple[str, tuple[datetime, ...], int], ...]] = {}


def cached(client: Any, datastore_id: str) -> DatastoreStats | None:
    """Statistics a previous run left, if fresh enough."""
    try:
        path = _path(client, datastore_id)
        data = json.loads(path.read_text())
        measured = dates.read_iso(data["measured_at"])
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
            key_quantiles=_KEY_QUANTILES.get(path, ()),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(client: Any, datastore_id: str, stats: DatastoreStats) -> None:
    """Keep *stats* for later plans; a cache that cannot be written is skipped quietly.

    Range columns' quantiles stay in this process (study date-times are PHI).
    """
    path = _path(client, datastore_id)
    if stats.key_quantiles:
        _KEY_QUANTILES[path] = stats.key_quantiles
    data = {
        "image_sets": stats.image_sets,
        "created_min": stats.created_min.isoformat() if stats.created_min else None,
        "created_max": stats.created_max.isoformat() if stats.created_max else None,
        "source": stats.source,
        "non_primary": stats.non_primary,
        "created_quantiles": [q.isoformat() for q in stats.created_quantiles],
        "measured_at": datetime.now(timezone.utc).isoformat(),
    }
    _keep(path, data, "statistics")


RANGE_QUANTILES = 64  # quantiles of StudyDateTime and updatedAt a full scan keeps in memory
QUANTILE_COLUMNS = ("StudyDateTime", "updatedAt")


def key_quantiles(
    table: pa.Table, count: int = RANGE_QUANTILES
) -> tuple[tuple[str, tuple[datetime, ...], int], ...]:
    """Each range column's values at *count* + 1 evenly spaced ranks among the rows having one.

    From the whole datastore (a full scan's result): where a later range on that column is cut
    into sub-ranges of about equal size.
    """
    found = []
    for column in QUANTILE_COLUMNS:
        if column not in table.column_names:
            continue
        values = pc.drop_null(table.column(column))
        if len(values) < 2 or not pa.types.is_timestamp(values.type):
            continue
        ordered = pc.sort_indices(values)
        last = len(values) - 1
        ranks = sorted({round(last * k / count) for k in range(count + 1)})
        picked = pc.take(values, pa.array([ordered[r].as_py() for r in ranks]))
        found.append((column, tuple(picked.to_pylist()), len(values)))
    return tuple(found)


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
    """How many image sets *chain* reads: (count, exact); see :func:`size_chain`."""
    size, _, _ = size_chain(client, datastore_id, chain, limiter)
    return size.image_sets, size.exact


def size_chain(
    client: Any,
    datastore_id: str,
    chain: Chain,
    limiter: aws.RateLimiter | None,
    page_size: int = PAGE_ROWS,
    stats: DatastoreStats | None = None,
) -> tuple[ChainSize, str, tuple[pa.Table, str | None]]:
    """How many image sets *chain* reads, from its first page: (count, exact).

    A chain pages by ``createdAt`` ascending: a first page without a nextToken is the whole
    answer (one request, exact). Else one more request (the same criteria, newest first, one
    row) finds the chain's last ``createdAt``, and the count is extrapolated from the span the
    first page covers to it. An estimate decides costs and chain shapes only, never what a
    query returns. The first page is returned with its request's key: it is the first page
    the fetcher asks for when the chain runs (``fetch.stream(prefetched=...)``), so sizing a
    chain that then runs costs its second request at most.
    """
    kwargs = {**chain.request(datastore_id), "maxResults": page_size}
    first = call_page(client, limiter, kwargs)
    key = request_key(kwargs)
    table, token = first
    if token is None:
        return ChainSize(table.num_rows, True), key, first
    if table.num_rows < 2:
        return ChainSize(PAGE_ROWS + 1, False), key, first
    if stats is not None and stats.created_max is not None:
        return _by_statistics(table, stats), key, first
    newest = chain.request(datastore_id)
    criteria = dict(newest.get("searchCriteria", {}))
    criteria["sort"] = {"sortField": "createdAt", "sortOrder": "DESC"}
    last_page, _ = call_page(
        client, limiter, {**newest, "searchCriteria": criteria, "maxResults": 1}
    )
    created = table.column("createdAt")
    oldest, last = created[0].as_py(), created[-1].as_py()
    end = last_page.column("createdAt")[0].as_py() if last_page.num_rows else last
    covered = max((last - oldest).total_seconds(), 1e-3)
    span = max((end - oldest).total_seconds(), covered)
    count = max(table.num_rows + 1, round(table.num_rows * span / covered))
    return ChainSize(count, False), key, first


def _by_statistics(table: pa.Table, stats: DatastoreStats) -> ChainSize:
    """A chain's size from its first page and the datastore's createdAt profile, no request more.

    The page's rows are the chain's oldest by createdAt; the share of the datastore created in
    the span they cover is the chain's density there, applied to what was created after.
    """
    created = table.column("createdAt")
    oldest, last = created[0].as_py(), created[-1].as_py()
    after = _created(stats, oldest, stats.created_max)
    within = max(_created(stats, oldest, last), float(table.num_rows))
    count = max(table.num_rows + 1, round(table.num_rows * after / within))
    return ChainSize(count, False)


def _created(stats: DatastoreStats, low: Any, high: Any) -> float:
    """Image sets of the datastore created in ``[low, high]``: by quantiles, else evenly."""
    points = stats.created_quantiles
    if len(points) >= 2:
        probe = Chain(0, (), None, profile=points, profile_rows=stats.image_sets)
        found = rows_between(probe, low, high)
        if found is not None:
            return found
    return stats.image_sets * stats.share(low, high)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _moment(text: Any) -> datetime | None:
    return dates.read_iso(text) if isinstance(text, str) else None


# -- the facts of a run: known without a request, then measured at once ----------------------------


def known(
    client: Any,
    datastore_id: str,
    *,
    max_tps: float | None,
    max_concurrency: int,
    page_size: int = PAGE_ROWS,
    dicomweb_endpoint_url: str | None = None,
) -> Facts:
    """What the planner may know without sending a request: cached statistics, QIDO-RS access."""
    return Facts(
        stats=cached(client, datastore_id),
        qido=qido_access(client, dicomweb_endpoint_url),
        max_tps=max_tps,
        max_concurrency=max_concurrency,
        page_size=page_size,
        for_run=True,
    )


@dataclass(frozen=True)
class Gathered:
    """Facts after measuring, and the pages measuring read.

    Each page is keyed by its request (``fetch.request_key``): the first page of a chain that
    was sized, or of a piece of the scan a probe cut. The fetcher uses a page only for the very
    same first request, so pages of chains that do not run are simply never read.
    """

    facts: Facts
    pages: Prefetched = field(default_factory=dict, repr=False)  # summaries are PHI


def gather(
    client: Any,
    datastore_id: str,
    needs: Needs,
    facts: Facts,
    limiter: aws.RateLimiter | None,
) -> Gathered:
    """Measure everything *needs* asks for at once; keep what is worth keeping in the cache."""
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="ahi-facts") as pool:
        probe: Future[Probe] | None = None
        ends: Future[tuple[datetime, ...]] | None = None
        if needs.size:
            probe = pool.submit(
                probe_pieces, client, datastore_id, limiter, needs.probe_scan, facts.page_size
            )
        elif needs.cuts is not None:
            ends = pool.submit(probe_cuts, client, datastore_id, limiter, needs.cuts)
        sized = {
            chain_key(chain): pool.submit(
                size_chain, client, datastore_id, chain, limiter, facts.page_size, facts.stats
            )
            for chain in needs.chains
        }
        pages: Prefetched = {}
        sizes: dict[str, ChainSize] = {}
        for key, job in sized.items():
            size, request, page = job.result()
            sizes[key] = size
            pages[request] = page
        out = facts.with_sizes(sizes)
        if probe is not None:
            found = probe.result()
            remember(client, datastore_id, found.stats)
            out = replace(out, stats=found.stats)
            if needs.probe_scan is not None and found.pages:
                window = needs.probe_scan.window
                out = replace(out, probe_window=window, probe_cuts=found.cuts)
                pages.update(found.pages)
        if ends is not None and needs.cuts is not None:
            out = replace(out, probe_window=needs.cuts.window, probe_cuts=ends.result())
    return Gathered(_with_non_primary(client, datastore_id, out, needs), pages)


def _with_non_primary(client: Any, datastore_id: str, facts: Facts, needs: Needs) -> Facts:
    """Facts whose statistics carry a whole-datastore sweep's count (cached for later plans)."""
    chain = needs.non_primary
    measured = facts.size(chain) if chain is not None else None
    if measured is None or facts.stats is None:
        return facts
    stats = replace(facts.stats, non_primary=measured.image_sets)
    remember(client, datastore_id, stats)
    return replace(facts, stats=stats)


# -- whether DICOMweb answers this caller: remembered per endpoint and region ------------------------

CAPABILITY_TTL = {"available": timedelta(days=1), "unavailable": timedelta(hours=1)}
_CAPABILITIES: dict[str, QidoAccess] = {}
_CAPABILITY_LOCK = threading.Lock()


def qido_access(client: Any, dicomweb_endpoint_url: str | None = None) -> QidoAccess:
    """Whether the planner may weigh QIDO-RS for *client*: installed, addressable, not refused."""
    if not dicomweb.installed():
        return QidoAccess("not_installed", "the dicomweb extra is not installed")
    region = getattr(getattr(client, "meta", None), "region_name", None)
    endpoint = dicomweb.resolve_endpoint(client, region, dicomweb_endpoint_url)
    if endpoint.url is None:
        return QidoAccess("no_endpoint", endpoint.why)
    return remembered_access(endpoint.url, region or "") or QidoAccess("untested")


def _capability_path(key: str) -> Path:
    return cache_dir() / "capabilities" / f"{key}.json"


def remembered_access(endpoint: str, region: str) -> QidoAccess | None:
    """What was last learned about QIDO-RS at *endpoint* in *region*, while it is fresh."""
    key = _key(endpoint, region)
    now = datetime.now(timezone.utc)
    with _CAPABILITY_LOCK:
        found = _CAPABILITIES.get(key)
    if found is None:
        try:
            data = json.loads(_capability_path(key).read_text())
            found = QidoAccess(
                data["state"], data.get("reason"), "cached", dates.read_iso(data["until"])
            )
        except (OSError, ValueError, KeyError, TypeError, dates.TimestampError):
            return None
    if found.until is not None and found.until <= now:
        return None
    return found


def remember_access(
    endpoint: str, region: str, state: str, reason: str | None, source: str
) -> None:
    """Keep a finding about QIDO-RS (``available`` or ``unavailable``) for its time to live."""
    until = datetime.now(timezone.utc) + CAPABILITY_TTL[state]
    access = QidoAccess(state, reason, source, until)  # type: ignore[arg-type]
    key = _key(endpoint, region)
    with _CAPABILITY_LOCK:
        _CAPABILITIES[key] = access
    path = _capability_path(key)
    data = {"state": state, "reason": reason, "until": until.isoformat(), "source": source}
    _keep(path, data, "capability")


def forget_capabilities() -> None:
    """Forget every finding about QIDO-RS, in this process and in the cache."""
    with _CAPABILITY_LOCK:
        _CAPABILITIES.clear()
    folder = cache_dir() / "capabilities"
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            path.unlink()
        except OSError:
            continue
