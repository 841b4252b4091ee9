"""The engine: the one place where fetching, framing and storage meet.

Every way of running a query goes through the same pipeline: checked pages from ``fetch``, exact
filtering and the latest version of each image set from ``frame``, provenance from ``provenance``.
``collect`` returns one frame, ``chunks`` a bounded stream of frames, ``export`` a checkpointed write
through a caller-given writer, ``changes`` a refresh's delta; in each of them a plan whose range
was cut into sub-ranges ends with ``catch_up``'s pages. The engine takes a ``Plan`` and the
query's JSON, never a ``Query``: the builder sits above it and calls it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import types
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df import aws, schema
from healthimaging_df.aws.quotas import SEARCH_TPS
from healthimaging_df.core import checks, dates
from healthimaging_df.core.progress import Progress
from healthimaging_df.engine import flatten, provenance, statistics
from healthimaging_df.engine.checkpoint import Checkpoint
from healthimaging_df.engine.fetch import Coverage, FetchOptions, Page, PageStream, stream
from healthimaging_df.engine.frame import (
    Buffer,
    Chunker,
    Collector,
    TableChunker,
    frame_of,
    result_memory_pool,
    split_page,
)
from healthimaging_df.engine.prepared import Run
from healthimaging_df.engine.spill import SPILL_PREFIX, SortedRows, SpillDir, TaskRows
from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.plan import (
    DatastoreStats,
    Facts,
    Plan,
    Spec,
    compile_plan,
    compile_spec,
    predicates,
)
from healthimaging_df.plan import presplit_pieces as _pieces
from healthimaging_df.plan.predicates import Predicate

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C", covariant=True)
Writer = Callable[[pa.Table | SortedRows, dict[str, Any]], T]


def check_dtype_backend(dtype_backend: Any) -> schema.DtypeBackend:
    """*dtype_backend* if it is one pandas and we both support, else a typed error."""
    if dtype_backend not in schema.DTYPE_BACKENDS:
        raise QueryValidationError(
            "dtype_backend", f"must be one of {', '.join(schema.DTYPE_BACKENDS)}"
        )
    backend: schema.DtypeBackend = dtype_backend
    return backend


def check_positive_int(name: str, value: Any) -> int:
    """*value* if it is a positive integer (not a bool), else a typed error naming *name*."""
    return checks.positive_int(name, value)


def prepare(
    client: Any = None,
    boto3_session: Any = None,
    progress: Progress = None,
    max_concurrency: int | None = None,
    max_tps: float | None = SEARCH_TPS,
    dtype_backend: schema.DtypeBackend = "numpy_nullable",
    dicomweb_endpoint_url: str | None = None,
) -> Run:
    """Check every run option and make the client; no request is sent."""
    from healthimaging_df.dicomweb import resolve_endpoint

    backend = check_dtype_backend(dtype_backend)
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise QueryValidationError("progress", "must be True, False, None or a callable")
    if dicomweb_endpoint_url is not None:
        if not isinstance(dicomweb_endpoint_url, str):
            raise QueryValidationError("dicomweb_endpoint_url", "must be an http(s) URL or None")
        resolve_endpoint(dicomweb_endpoint_url=dicomweb_endpoint_url)  # checks the URL's form
    options = FetchOptions(max_concurrency=max_concurrency, max_tps=max_tps)
    made = aws.make_client(client, boto3_session, max_concurrency or aws.MAX_CONCURRENCY)
    return Run(made, options, progress, backend, dicomweb_endpoint_url=dicomweb_endpoint_url)


# Measuring happens in at most two rounds: what settles the plan the query would otherwise run
# (the datastore's size, a filtered scan's first page), then what only matters when QIDO-RS can
# still be cheaper than that plan (the sweep of the non-primary image sets).
MEASURING_ROUNDS = 2


def choose(query: Spec | Callable[[DatastoreStats | None], Plan], run: Run) -> Plan:
    """The plan that runs: facts gathered in one step, compiled once, QIDO-RS answered.

    *query* is the query's parts (``Query.spec()``), or a function compiling it (called once,
    with no statistics, for its parts). The walk reads down:

    1. :func:`statistics.known`: cached statistics and whether QIDO-RS may answer (no request);
    2. the planner says what a plan from those facts would like measured (``Plan.needs``);
    3. :func:`statistics.gather` measures all of it at once: the datastore's size (a probe of
       about ten requests whose window pages are the scan's first pages: a scan that wins starts
       from them), the two ends of a first whole scan (where it starts in pieces), chains sized
       by their first page (a StudyDateTime-filtered scan; then, only if QIDO-RS can still win,
       the non-primary sweep); every page read is a first page the fetcher then does not ask
       for again;
    4. the planner compiles from the facts (pre-split scans included);
    5. a QIDO-RS step, if the plan has one, runs its searches and its answer becomes the
       SearchImageSets plan (``engine.qido``); if QIDO-RS is denied, absent or broken, the plan
       it replaces runs instead, said once in a warning.
    """
    spec = query if isinstance(query, Spec) else _spec_of(query)
    known = facts_for(spec, run)
    plan = compile_spec(spec, known)
    facts = known
    for _ in range(MEASURING_ROUNDS):
        if plan.needs.empty:
            break
        limiter = aws.limiter_for(run.client, aws.SEARCH, run.fetch.max_tps)
        gathered = statistics.gather(run.client, spec.datastore_id, plan.needs, facts, limiter)
        run.prefetched.update(gathered.pages)  # each is used only by its very request
        facts = gathered.facts
        plan = compile_spec(spec, facts)
    if plan.qido is not None:
        from healthimaging_df.engine import qido  # the optional dicomweb extra, when QIDO runs

        plan = qido.run_step(plan, run)
    return plan


def facts_for(spec: Spec, run: Run) -> Facts:
    """What a run of *spec* would know before sending a request (``explain(client=...)``)."""
    return statistics.known(
        run.client,
        spec.datastore_id,
        max_tps=run.fetch.max_tps,
        max_concurrency=planned_concurrency(run),
        page_size=run.fetch.page_size,
        dicomweb_endpoint_url=run.dicomweb_endpoint_url,
    )


def planned_concurrency(run: Run) -> int:
    """The readers a run plans for: explicit, else what the endpoint's limiter measures."""
    limiter = aws.limiter_for(run.client, aws.SEARCH, run.fetch.max_tps)
    return run.fetch.concurrency(limiter)


def _spec_of(compile: Callable[[DatastoreStats | None], Plan]) -> Spec:
    plan = compile(None)
    if plan.spec is None:
        raise TypeError("choose() needs a Spec, or a function returning a compiled Plan")
    return plan.spec


def presplit_pieces(options: FetchOptions, stats: DatastoreStats) -> int:
    """Pieces a scan starts with: half the workers (see ``plan.presplit_pieces``)."""
    return _pieces(stats, options.concurrency(None), options.page_size)


def collect(plan: Plan, query_json: str, run: Run) -> pd.DataFrame:
    """Every matching image set once, at its latest version read, as one typed frame.

    The table is handed over, not kept: each Arrow column is freed as it becomes pandas.
    """
    with result_memory_pool():
        holder, info = _collect(plan, query_json, run)
        return frame_of(holder, run.dtype_backend, info)


def collect_table(plan: Plan, query_json: str, run: Run) -> tuple[pa.Table, dict[str, Any]]:
    """:func:`collect` as an Arrow table plus its provenance."""
    with result_memory_pool():
        holder, info = _collect(plan, query_json, run)
    return holder.pop(), info


def _collect(plan: Plan, query_json: str, run: Run) -> tuple[list[pa.Table], dict[str, Any]]:
    started = datetime.now(timezone.utc)
    collector = Collector(plan)
    with stream(plan, run.client, run.fetch, run.progress, prefetched=run.prefetched) as pages:
        for page in pages:
            if collector.add(page):
                pages.stop_chain(page.chain)
    for page in catch_up(plan, run, started):
        collector.add(page)
    seen = collector.distinct_seen() if plan.full_scan else 0  # before table() empties it
    result = collector.table()
    if plan.full_scan:
        quantiles = pages.created_quantiles()
        counted = DatastoreStats(
            seen,
            quantiles[0] if quantiles else None,
            quantiles[-1] if quantiles else None,
            source="scan",
            non_primary=_non_primary(plan, result, run),
            created_quantiles=quantiles,
            key_quantiles=statistics.key_quantiles(result) if not plan.predicates else (),
        )
        statistics.remember(run.client, plan.datastore_id, counted)
    return [result], provenance.build(plan, query_json, run.client, started)


def _non_primary(plan: Plan, result: pa.Table, run: Run) -> int | None:
    """The ``isPrimary=false`` image sets a full scan saw, else the count a previous run left.

    Counted when the result is every image set (no filter, no limit); a filtered scan keeps
    only the ranks of the rows it drops, so the cached count (a QIDO-RS sweep's) stands.
    """
    if not plan.predicates and plan.limit is None:
        flags = result.column("isPrimary")
        return int(pc.sum(pc.equal(flags, False)).as_py() or 0)
    previous = statistics.cached(run.client, plan.datastore_id)
    return previous.non_primary if previous is not None else None


def chunks(plan: Plan, query_json: str, run: Run, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Typed frames of about *chunk_rows* rows as pages arrive; each image set once.

    Arguments are checked here, before the first chunk is asked for. With a ``limit`` the whole
    (small, sorted) result is computed first and then yielded in chunks.
    """
    check_positive_int("chunk_rows", chunk_rows)
    return _chunks(plan, query_json, run, chunk_rows)


def _chunks(plan: Plan, query_json: str, run: Run, chunk_rows: int) -> Iterator[pd.DataFrame]:
    if plan.limit is not None:
        whole = collect(plan, query_json, run)
        for start in range(0, max(len(whole), 1), chunk_rows):
            yield whole.iloc[start : start + chunk_rows]
        return
    with result_memory_pool():
        yield from _streamed(plan, query_json, run, Chunker, chunk_rows)


def table_chunks(plan: Plan, query_json: str, run: Run, chunk_rows: int) -> Iterator[pa.Table]:
    """:func:`chunks` as Arrow tables of the declared schema (no pandas), each image set once.

    The same pipeline and memory bound as :func:`chunks`: at most one chunk's matching rows
    plus the rank index. With a ``limit`` the whole (small, sorted) result is computed first.
    An empty result yields one empty table. Arguments are checked here, before the first table.
    """
    check_positive_int("chunk_rows", chunk_rows)
    return _table_chunks(plan, query_json, run, chunk_rows)


def _table_chunks(plan: Plan, query_json: str, run: Run, chunk_rows: int) -> Iterator[pa.Table]:
    if plan.limit is not None:
        whole, _ = collect_table(plan, query_json, run)
        whole = whole.combine_chunks()
        for start in range(0, max(whole.num_rows, 1), chunk_rows):
            yield whole.slice(start, chunk_rows)
        return
    yield from _streamed(plan, query_json, run, TableChunker, chunk_rows)


class _Chunking(Protocol[C]):
    """What :func:`_streamed` needs of a chunker: ``Chunker`` (frames), ``TableChunker`` (tables)."""

    late_versions: int

    def add(self, page: Page) -> Iterator[C]: ...

    def flush(self) -> Iterator[C]: ...


def _streamed(
    plan: Plan,
    query_json: str,
    run: Run,
    make: Callable[[Plan, int, schema.DtypeBackend, dict[str, Any]], _Chunking[C]],
    chunk_rows: int,
) -> Iterator[C]:
    """The plan's pages in chunks as they arrive (a chunker *make* builds); each image set once."""
    started = datetime.now(timezone.utc)
    info = provenance.build(plan, query_json, run.client, started)
    chunker = make(plan, chunk_rows, run.dtype_backend, info)
    with stream(plan, run.client, run.fetch, run.progress, prefetched=run.prefetched) as pages:
        for page in pages:
            yield from chunker.add(page)
    for page in catch_up(plan, run, started):
        yield from chunker.add(page)
    yield from chunker.flush()
    if chunker.late_versions:
        log.info(
            "%d image set(s) were read again at a newer version after being yielded",
            chunker.late_versions,
        )


def export(
    plan: Plan,
    query_json: str,
    run: Run,
    write: Writer[T],
    checkpoint: Checkpoint | None = None,
    coverage: Coverage | None = None,
    checkpoint_interval: float = 5.0,
    spill_parent: str | None = None,
    spill_prefix: str = SPILL_PREFIX,
    order: tuple[str, bool] | None = None,
) -> T:
    """Run *plan* and hand the whole result to *write*, checkpointing finished tasks as it goes.

    With a *checkpoint*, tasks that *coverage* (what it had saved) covers are skipped and every
    finished task is saved to it; the result equals an uninterrupted run, superseded
    copies dropped across tasks exactly as :func:`collect` drops them. Then *write* gets a
    :class:`~healthimaging_df.engine.spill.SortedRows`, not a table: matching rows wait on disk (in a
    private folder named *spill_prefix* under *spill_parent*, or the system's temporary folder)
    until it reads them in order, so memory does not grow with the result: in the plan's order,
    or in *order* ``(column, ascending)`` when given (ties by imageSetId either way).
    """
    if plan.limit is not None or checkpoint is None:  # small and sorted, or not resumable
        table, info = collect_table(plan, query_json, run)
        return write(table, info)
    coverage = coverage if coverage is not None else Coverage()
    with result_memory_pool(), SpillDir(spill_parent, spill_prefix) as folder:
        matched: dict[int, TaskRows] = {}
        unmatched: dict[int, Buffer] = {}  # ranks of rows read that did not match
        with (
            stream(
                plan,
                run.client,
                run.fetch,
                run.progress,
                resume=coverage,
                prefetched=run.prefetched,
            ) as pages,
            _wind_down_on_signals(pages) as signals,
        ):
            for page in pages:
                if not page.done:
                    hit, miss = split_page(page.table, plan.predicates)
                    matched.setdefault(page.task, TaskRows(folder)).append(hit)
                    unmatched.setdefault(page.task, Buffer()).append(miss)
                    continue
                task = matched.pop(page.task, None)
                ranks = _concat(unmatched.pop(page.task, Buffer()).take(), _EMPTY_RANKS)
                coverage.add(page)
                checkpoint.add(task.tables() if task else (), ranks, coverage, checkpoint_interval)
        if signals:  # the pages in flight finished and were handed over: keep them, then stop
            checkpoint.flush(coverage)
            name = signal.Signals(signals[0]).name
            raise KeyboardInterrupt(
                f"{name}: stopped after the pages in flight; the checkpoint holds "
                f"{checkpoint.tasks} finished task(s), {checkpoint.rows} matching row(s): run "
                "the same export again to resume"
            )
        if any(t.rows for t in matched.values()) or any(b.rows for b in unmatched.values()):
            raise SnapshotError("the fetch ended with unfinished tasks; rerun to resume")
        del matched, unmatched
        _export_catch_up(plan, run, checkpoint, coverage, folder, checkpoint_interval)
        checkpoint.flush(coverage)
        result = SortedRows(
            checkpoint.rows_of, checkpoint.seen(), checkpoint.schema(), plan, folder, order
        )
        info = provenance.build(plan, query_json, run.client, checkpoint.started_at)
        return write(result, info)


def _export_catch_up(
    plan: Plan,
    run: Run,
    checkpoint: Checkpoint,
    coverage: Coverage,
    folder: SpillDir,
    interval: float,
) -> None:
    """An export's :func:`catch_up`, from the first attempt's start, as one more finished task.

    Not in *coverage*: a resumed export reads it again (copies it read twice are kept once).
    """
    if not plan.catch_up:
        return
    rows = TaskRows(folder)
    missed = Buffer()
    for page in catch_up(plan, run, checkpoint.started_at):
        hit, miss = split_page(page.table, plan.predicates)
        rows.append(hit)
        missed.append(miss)
    checkpoint.add(rows.tables(), _concat(missed.take(), _EMPTY_RANKS), coverage, interval)


@contextlib.contextmanager
def _wind_down_on_signals(pages: PageStream) -> Iterator[list[int]]:
    """While an export streams: SIGINT or SIGTERM winds the stream down instead of killing it.

    The pages in flight finish, every reader hands over what it read, and the export writes its
    checkpoint before it raises ``KeyboardInterrupt`` (so a resume redoes little; dying mid-page
    kept only what the last periodic save had). The signals that came are yielded; a second one
    interrupts at once. Outside the main thread (where Python delivers signals) nothing changes.
    """
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def handle(signum: int, frame: types.FrameType | None) -> None:
        if came:  # asked twice: stop now
            raise KeyboardInterrupt
        came.append(signum)
        log.warning(
            "%s: finishing the pages in flight, then writing the checkpoint",
            signal.Signals(signum).name,
        )
        pages.wind_down()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def changes(datastore_id: str, since: datetime, until: datetime, run: Run) -> pa.Table:
    """The latest version of every image set updated in ``[since, until]``, unfiltered.

    A refresh's delta: the same checked, createdAt-ordered pipeline as any query.
    """
    return latest_matching(
        datastore_id, predicates.build("updatedAt", "between", (since, until)), run
    )


def latest_matching(datastore_id: str, predicate: Predicate, run: Run) -> pa.Table:
    """The latest version of every image set matching *predicate*, one chain plan, no sort."""
    plan = compile_plan(datastore_id, (predicate,))
    collector = Collector(plan)
    with stream(plan, run.client, run.fetch, run.progress, prefetched=run.prefetched) as pages:
        for page in pages:
            collector.add(page)
    return collector.table()


def catch_up(plan: Plan, run: Run, started: datetime) -> Iterator[Page]:
    """After a sub-ranged plan's chains: every image set updated since *started*, latest read.

    An edit of a study's date or time during the read can move an image set from a sub-range not
    yet read past it into one already read past it (``plan.subranges``); it was updated after
    the run started, so one ``updatedAt`` search from *started* to now reads it again. Both are
    our clock's; the service stamps updatedAt by its own, so the window is moved by the skew its
    answers' ``Date`` showed during the run (``aws.clock_skew``: verified, not assumed) and
    widened by ``dates.CLOCK_MARGIN`` for what that measure cannot see (its whole seconds, the
    answer's way back). Its pages go through the run's own collector: the latest version kept,
    every condition applied exactly, each image set once. One request when nothing changed;
    none for a plan without sub-ranges. Pages come without the ``done`` markers (they belong to
    no task of the run).
    """
    if not plan.catch_up:
        return
    skew = aws.clock_skew() or timedelta(0)
    now = datetime.now(timezone.utc)
    since = min(started, now) + skew - dates.CLOCK_MARGIN
    window = predicates.build("updatedAt", "between", (since, now + skew + dates.CLOCK_MARGIN))
    again = compile_plan(plan.datastore_id, (window,))
    with stream(again, run.client, run.fetch, False) as pages:
        yield from (page for page in pages if not page.done)


_EMPTY_RANKS = flatten.EMPTY_TABLE.select(["imageSetId", "version", "updatedAt"])


def _concat(tables: list[pa.Table], empty: pa.Table = flatten.EMPTY_TABLE) -> pa.Table:
    return pa.concat_tables(tables) if tables else empty
