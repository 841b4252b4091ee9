"""``Query``: the immutable, chainable statement of a cohort, and its entry points.

Every method returns a new ``Query``; building one validates every value, so a bad query fails at the
line that made it, before any request. ``plan()`` and ``explain()`` show what will be sent;
``to_dataframe()``, ``iter_dataframes()`` and ``to_parquet()`` hand the plan to the engine.
``q1 | q2`` (``Query.union``) is one query whose rows match either.

The builder sits above what runs it (as polars' LazyFrame above its engine): it imports the planner,
the engine and the snapshot writer; none of them imports it back. The engine and the writer (and
with them pandas and pyarrow) load when a query first runs, so building and explaining one is cheap.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, get_args

from healthimaging_df import schema
from healthimaging_df.aws.quotas import SEARCH_TPS
from healthimaging_df.core import checks
from healthimaging_df.core.progress import Progress
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.plan import (
    CONSISTENT_OPTION,
    STRATEGIES,
    DatastoreStats,
    Facts,
    Plan,
    Spec,
    Strategy,
    any_of,
    compile_spec,
    predicates,
)
from healthimaging_df.plan.predicates import Op, Predicate

OPS: tuple[str, ...] = get_args(Op)  # every predicate operator (the JSON form's "op")

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa
    from typing_extensions import Unpack

    from healthimaging_df import snapshot
    from healthimaging_df.options import ExportOptions


@dataclass(frozen=True)
class Query:
    """An image-set search over one datastore.

    >>> q = Query("0" * 32).where(PatientID="P1", Modality=["CT", "MR"]).limit(10)
    >>> q
    Query(datastore_id='00000000000000000000000000000000', PatientID == <1 value>, Modality in <2 values>, limit=10)
    >>> q.plan()[0]["searchCriteria"]["filters"][0]["operator"]
    'EQUAL'
    """

    datastore_id: str
    predicates: tuple[Predicate, ...] = ()
    sort_column: str | None = None
    ascending: bool = True
    row_limit: int | None = None
    strategy: Strategy = "auto"
    parts: tuple[Query, ...] = ()  # a union's queries (none a union, none with sort or limit)
    # the caller asserts a study's image sets agree on study- and patient-level attributes
    assume_consistent_studies: bool = False

    def __post_init__(self) -> None:
        checks.resource_id("datastore_id", self.datastore_id)
        if self.parts:  # what the client applies: any part's predicates (refresh reads this)
            groups = tuple(q.predicates for q in self.parts)
            object.__setattr__(self, "predicates", (any_of(groups),))

    def __repr__(self) -> str:
        if self.parts:
            inner = " | ".join(f"[{', '.join(map(repr, q.predicates))}]" for q in self.parts)
            parts = [f"datastore_id={self.datastore_id!r}", f"union of {inner}"]
        else:
            parts = [f"datastore_id={self.datastore_id!r}", *map(repr, self.predicates)]
        if self.sort_column:
            parts.append(f"sort_by={self.sort_column}:{'asc' if self.ascending else 'desc'}")
        if self.row_limit is not None:
            parts.append(f"limit={self.row_limit}")
        if self.strategy != "auto":
            parts.append(f"strategy={self.strategy}")
        if self.assume_consistent_studies:
            parts.append(f"{CONSISTENT_OPTION}=True")
        return f"Query({', '.join(parts)})"

    # -- building ---------------------------------------------------------------------------

    def _with(self, *added: Predicate) -> Query:
        if self.parts:  # (q1 | q2).where(x) is q1.where(x) | q2.where(x)
            return replace(self, parts=tuple(q._with(*added) for q in self.parts))
        return replace(self, predicates=self.predicates + added)

    def union(self, *others: Query) -> Query:
        """Rows matching this query or any of *others* (``q1 | q2``), each image set once.

        ``Query.union(q1, q2, q3)`` reads the same. The queries must search one datastore and
        carry no ``limit`` (limit the union instead); their sorts must agree, and the union is
        ordered by the one given (``sort_by`` on the union sets it). See ``docs/queries.md``.
        """
        queries = (self, *others)
        for position, q in enumerate(queries):
            if not isinstance(q, Query):
                raise QueryValidationError("union", "takes Query objects", position)
            if q.datastore_id != self.datastore_id:
                raise QueryValidationError(
                    "datastore_id", "a union's queries must search one datastore", position
                )
            if q.row_limit is not None:
                raise QueryValidationError(
                    "limit",
                    "a query in a union cannot have a limit (first n of it, or of the union?); "
                    "limit the union instead",
                    position,
                )
        sorts = {(q.sort_column, q.ascending) for q in queries if q.sort_column}
        if len(sorts) > 1:
            raise QueryValidationError(
                "sort_by", "the queries of a union sort differently; sort the union instead"
            )
        column, ascending = sorts.pop() if sorts else (None, True)
        flat = tuple(p for q in queries for p in (q.parts or (q,)))
        members = tuple(replace(p, sort_column=None, ascending=True) for p in flat)
        if len(members) == 1:
            return replace(self, sort_column=column, ascending=ascending)
        return Query(self.datastore_id, sort_column=column, ascending=ascending, parts=members)

    def __or__(self, other: object) -> Query:
        """``q1 | q2``: see :meth:`union`."""
        if not isinstance(other, Query):
            return NotImplemented
        return self.union(other)

    def where(self, **equalities: Any) -> Query:
        """Keep rows whose column equals a value; a list, tuple or set means any of them (IN)."""
        return self._with(*(_equality(c, v, negate=False) for c, v in equalities.items()))

    def where_not(self, **inequalities: Any) -> Query:
        """Drop rows whose column equals a value (or any of a list); rows with nulls are kept."""
        return self._with(*(_equality(c, v, negate=True) for c, v in inequalities.items()))

    def between(self, column: str, lower: Any, upper: Any) -> Query:
        """Keep rows with ``lower <= column <= upper``; a date-only upper bound covers that day."""
        return self._with(predicates.build(column, "between", (lower, upper)))

    def contains(self, column: str, text: str, *, case: bool = True) -> Query:
        """Keep rows whose text column contains *text*."""
        case = checks.flag("case", case)
        return self._with(predicates.build(column, "contains", (text,), case=case))

    def matches(self, column: str, pattern: str, *, case: bool = True) -> Query:
        """Keep rows whose text column matches the Python regular expression *pattern* (search)."""
        case = checks.flag("case", case)
        return self._with(predicates.build(column, "regex", (pattern,), case=case))

    def is_null(self, *columns: str) -> Query:
        """Keep rows where every named column is missing."""
        return self._with(*(predicates.build(c, "is_null") for c in columns))

    def not_null(self, *columns: str) -> Query:
        """Keep rows where every named column is present."""
        return self._with(*(predicates.build(c, "not_null") for c in columns))

    def sort_by(self, column: str, ascending: bool = True) -> Query:
        """Order the result by *column*, ascending (oldest first) unless ``ascending=False``.

        Without ``sort_by`` the result is ordered as the API orders it: updatedAt, newest first.
        """
        predicates.known_column(column)
        return replace(self, sort_column=column, ascending=checks.flag("ascending", ascending))

    def limit(self, n: int) -> Query:
        """Return at most *n* rows: the first *n* in sort order (default updatedAt, newest first)."""
        return replace(self, row_limit=checks.positive_int("limit", n))

    def using(
        self, strategy: Strategy = "auto", *, assume_consistent_studies: bool | None = None
    ) -> Query:
        """Choose an access path, and what QIDO-RS may be trusted with.

        ``"auto"`` (the default) lets the planner pick the path with fewer estimated requests;
        ``"fanout"`` (a chain per IN value) and ``"scan"`` force one; ``"search"`` never uses
        QIDO-RS; ``"qido"`` uses it whenever a condition can go to it, and raises a typed
        error when DICOMweb is denied, absent or broken (``auto`` runs SearchImageSets alone).

        ``assume_consistent_studies=True`` asserts that a study's primary image sets agree on
        study- and patient-level attributes (PatientName, StudyDescription, PatientBirthDate,
        StudyDate). AWS does not guarantee it: an UpdateImageSetMetadata without
        ``includeStudyImageSets`` changes one image set. Only then are such conditions matched
        by QIDO-RS (one value per study); ``explain()`` says when it is in force. Without it,
        QIDO-RS matches series-level conditions (Modality, SeriesNumber) only, which are sound.
        """
        if strategy not in STRATEGIES:
            raise QueryValidationError("strategy", f"must be one of {', '.join(STRATEGIES)}")
        if assume_consistent_studies is not None and not isinstance(
            assume_consistent_studies, bool
        ):
            raise QueryValidationError(CONSISTENT_OPTION, "must be True or False")
        consistent = (
            self.assume_consistent_studies
            if assume_consistent_studies is None
            else assume_consistent_studies
        )
        if self.parts:
            parts = tuple(
                q.using(strategy, assume_consistent_studies=consistent) for q in self.parts
            )
            return replace(self, parts=parts, assume_consistent_studies=consistent)
        return replace(self, strategy=strategy, assume_consistent_studies=consistent)

    # -- serializing --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (values included: treat it as PHI) that ``from_dict`` reads.

        A union lists every query's predicates in one ``predicates`` list, each marked with its
        query's position (``part``), and the number of queries in ``parts``: a redacted copy,
        which rewrites ``predicates``, then holds no value of any of them.
        """
        members = self.parts or (self,)
        data: dict[str, Any] = {
            "datastore_id": self.datastore_id,
            "predicates": [
                {"column": p.column, "op": p.op, "values": [_to_json(v) for v in p.values]}
                | ({} if p.case else {"case": False})
                | ({"part": i} if self.parts else {})
                for i, q in enumerate(members)
                for p in q.predicates
            ],
            "sort_by": self.sort_column,
            "ascending": self.ascending,
            "limit": self.row_limit,
        }
        if self.parts:
            data["parts"] = len(self.parts)
            if any(q.strategy != "auto" for q in self.parts):
                data["part_strategies"] = [q.strategy for q in self.parts]
        elif self.strategy != "auto":
            data["strategy"] = self.strategy
        if self.assume_consistent_studies:
            data[CONSISTENT_OPTION] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Query:
        """Rebuild a query from ``to_dict()`` output, validating it again."""
        query = cls(data["datastore_id"])
        if data.get("redacted") or any("values_redacted" in p for p in data.get("predicates", ())):
            raise QueryValidationError(
                "query", "its values were redacted; pass the original query instead"
            )
        items = data.get("predicates", ())
        for position, p in enumerate(items):  # an unknown op would fail only when run
            if p.get("op") not in OPS:
                raise QueryValidationError("op", f"must be one of {', '.join(OPS)}", position)
        built = [
            predicates.build(p["column"], p["op"], p.get("values", ()), case=p.get("case", True))
            for p in items
        ]
        if data.get("parts"):
            count = int(data["parts"])
            strategies = data.get("part_strategies") or ["auto"] * count
            members = [
                query.using(strategies[i])._with(
                    *(b for b, p in zip(built, items, strict=True) if p.get("part") == i)
                )
                for i in range(count)
            ]
            query = members[0].union(*members[1:])
        else:
            query = replace(query, predicates=tuple(built))
        if data.get("sort_by"):
            query = query.sort_by(data["sort_by"], ascending=data.get("ascending", True))
        if data.get("limit") is not None:
            query = query.limit(int(data["limit"]))
        if data.get("strategy"):
            query = query.using(data["strategy"])
        if data.get(CONSISTENT_OPTION):
            query = query.using(query.strategy, assume_consistent_studies=True)
        return query

    def to_json(self) -> str:
        """``to_dict()`` as canonical JSON: what provenance and checkpoints record."""
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- planning ---------------------------------------------------------------------------

    def spec(self, now: datetime | None = None, strategy: Strategy | None = None) -> Spec:
        """The query's parts as the planner takes them (*strategy* overrides the query's)."""
        members = self.parts or (self,)
        return Spec(
            self.datastore_id,
            tuple(q.predicates for q in members),
            tuple(strategy or q.strategy for q in members),
            self.sort_column,
            self.ascending,
            self.row_limit,
            now,
            union=bool(self.parts),
            assume_consistent_studies=self.assume_consistent_studies,
        )

    def compile(
        self,
        now: datetime | None = None,
        stats: DatastoreStats | None = None,
        strategy: Strategy | None = None,
        facts: Facts | None = None,
    ) -> Plan:
        """The plan: requests the API can answer plus the predicates applied on the client.

        *now* bounds an unbounded scan (default: the current time); *stats* (the datastore's
        size) lets the planner weigh fan-out against a scan; *strategy* overrides the query's;
        *facts* (what a run knows, see ``engine.choose``) replace *stats*. The plan is
        deterministic for given arguments.
        """
        known = facts if facts is not None else Facts(stats=stats)
        return compile_spec(self.spec(now, strategy), known)

    def plan(
        self,
        client: Any = None,
        boto3_session: Any = None,
        max_tps: float | None = SEARCH_TPS,
        max_concurrency: int | None = None,
        dicomweb_endpoint_url: str | None = None,
    ) -> list[dict[str, Any]]:
        """The exact keyword arguments of each first ``search_image_sets`` call (no paging keys).

        With *client* (or *boto3_session*), as the run would start them: from the statistics a
        previous run cached for that endpoint, a scan lists one request per pre-split piece.
        No request is sent.
        """
        return self._planned(
            client, boto3_session, max_tps, max_concurrency, dicomweb_endpoint_url
        ).requests()

    def explain(
        self,
        show_values: bool = False,
        *,
        client: Any = None,
        boto3_session: Any = None,
        max_tps: float | None = SEARCH_TPS,
        max_concurrency: int | None = None,
        dicomweb_endpoint_url: str | None = None,
    ) -> str:
        """Say what is sent, what runs on the client, and roughly what it costs.

        Values are hidden unless *show_values* (they are usually PHI). With *client* (or
        *boto3_session*) the plan is the one the run would choose from what it knows before
        a request: the statistics cached for that endpoint (a previous scan's exact count, or a
        probe's estimate), whether QIDO-RS answered there lately; what it does not know yet
        (the datastore's size, a sweep's) is listed with the requests that measure it. Costs
        are priced at *max_tps*, the run's pace. No request is sent.
        """
        planned = self._planned(
            client, boto3_session, max_tps, max_concurrency, dicomweb_endpoint_url
        )
        return planned.explain(show_values=show_values, max_tps=max_tps)

    def _planned(
        self,
        client: Any,
        boto3_session: Any,
        max_tps: float | None,
        max_concurrency: int | None,
        dicomweb_endpoint_url: str | None,
    ) -> Plan:
        if client is None and boto3_session is None:
            readers = max_concurrency or Facts.max_concurrency  # a run measures; explain assumes
            return self.compile(facts=Facts(max_tps=max_tps, max_concurrency=readers))
        from healthimaging_df import engine

        run = engine.prepare(
            client,
            boto3_session,
            False,
            max_concurrency,
            max_tps,
            dicomweb_endpoint_url=dicomweb_endpoint_url,
        )
        spec = self.spec()
        return compile_spec(spec, engine.facts_for(spec, run))

    # -- running (the engine does the work) ---------------------------------------------------

    def to_dataframe(
        self,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int | None = None,
        max_tps: float | None = SEARCH_TPS,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
        dicomweb_endpoint_url: str | None = None,
    ) -> pd.DataFrame:
        """Run the query and return every matching image set as a typed DataFrame.

        Parameters
        ----------
        client
            A boto3 ``medical-imaging`` client; made from *boto3_session* (or the default session)
            with standard-mode retries when None.
        boto3_session
            The boto3 session to make the client from; the default session if None.
        progress
            True for a tqdm bar, False for none, a callable ``(pages, image_sets)``, or None to
            show a bar only in a terminal or notebook outside CI.
        max_concurrency
            Request chains run at once.
        max_tps
            Requests per second across all threads (the service's default quota is 25); None for
            no client-side limit.
        dtype_backend
            ``"numpy_nullable"`` or ``"pyarrow"``, as in pandas.
        dicomweb_endpoint_url
            Where DICOMweb (QIDO-RS) lives, for a custom ``endpoint_url`` (a VPC endpoint's own
            DNS name, a proxy); else ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING``, else AWS's
            ``dicom-medical-imaging.{region}`` host for AWS's own endpoint. Unknown: QIDO-RS is
            not weighed (``explain()`` says so).
        """
        from healthimaging_df import engine

        run = engine.prepare(
            client,
            boto3_session,
            progress,
            max_concurrency,
            max_tps,
            dtype_backend,
            dicomweb_endpoint_url=dicomweb_endpoint_url,
        )
        plan = engine.choose(self.spec(), run)
        return engine.collect(plan, self.to_json(), run)

    def iter_dataframes(
        self,
        chunk_rows: int = 50_000,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int | None = None,
        max_tps: float | None = SEARCH_TPS,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
        dicomweb_endpoint_url: str | None = None,
    ) -> Iterator[pd.DataFrame]:
        """Yield typed frames of about *chunk_rows* rows as pages arrive, for results beyond memory.

        Chunks come in arrival order, each image set once (see ``docs/queries.md``); with
        ``limit`` set the whole (small) sorted result is computed first and then yielded in
        chunks. Arguments are checked here, before the first chunk is asked for.
        """
        from healthimaging_df import engine

        engine.check_positive_int("chunk_rows", chunk_rows)
        run = engine.prepare(
            client,
            boto3_session,
            progress,
            max_concurrency,
            max_tps,
            dtype_backend,
            dicomweb_endpoint_url=dicomweb_endpoint_url,
        )
        plan = engine.choose(self.spec(), run)
        return engine.chunks(plan, self.to_json(), run, chunk_rows)

    def to_arrow(
        self,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int | None = None,
        max_tps: float | None = SEARCH_TPS,
    ) -> pa.Table:
        """Run the query and return the result as an Arrow table of the declared schema.

        The same rows, order, exactness and errors as :meth:`to_dataframe`, without pandas on
        the way: pages are Arrow tables, and the result is gathered from them column by column.
        Provenance is in the schema's metadata under ``b"healthimaging_df"`` (JSON; the query's
        values are PHI, as in ``df.attrs``). Arguments as :meth:`to_dataframe`.
        """
        from healthimaging_df import engine

        run = engine.prepare(client, boto3_session, progress, max_concurrency, max_tps)
        plan = engine.choose(lambda stats: self.compile(stats=stats), run)
        table, info = engine.collect_table(plan, self.to_json(), run)
        return _with_provenance(table, info)

    def iter_batches(
        self,
        chunk_rows: int = 50_000,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int | None = None,
        max_tps: float | None = SEARCH_TPS,
    ) -> Iterator[pa.RecordBatch]:
        """Yield Arrow record batches of about *chunk_rows* rows as pages arrive (bounded memory).

        What :meth:`iter_dataframes` yields, as Arrow: arrival order, each image set once, an
        empty result as one empty batch of the declared schema. Arguments are checked here,
        before the first batch is asked for.
        """
        from healthimaging_df import engine

        engine.check_positive_int("chunk_rows", chunk_rows)
        run = engine.prepare(client, boto3_session, progress, max_concurrency, max_tps)
        return run_batches(self, run, chunk_rows)

    def to_polars(
        self,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int | None = None,
        max_tps: float | None = SEARCH_TPS,
    ) -> pl.DataFrame:
        """:meth:`to_arrow` as a Polars DataFrame (needs the ``polars`` extra).

        For a lazy frame whose filters reach the planner, see
        ``healthimaging_df.polars.scan_image_sets``.
        """
        try:
            import polars as pl
        except ImportError:
            raise ImportError(
                'to_polars() needs polars, an optional extra: pip install "healthimaging-df[polars]"'
            ) from None
        table = self.to_arrow(client, boto3_session, progress, max_concurrency, max_tps)
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame

    def reader(
        self,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int | None = None,
        max_tps: float | None = SEARCH_TPS,
        chunk_rows: int = 50_000,
    ) -> QueryReader:
        """The query as an Arrow stream: ``pa.table(r)``, ``pl.DataFrame(r)``, DuckDB's ``FROM r``.

        Each consumption runs the query once (the Arrow PyCapsule interface: a consumer asks
        ``__arrow_c_schema__``, answered from the declared schema without a request, then
        ``__arrow_c_stream__``, which runs the query). Run options are checked and the client
        made here, before any request.
        """
        from healthimaging_df import engine

        engine.check_positive_int("chunk_rows", chunk_rows)
        run = engine.prepare(client, boto3_session, progress, max_concurrency, max_tps)
        return QueryReader(self, run, chunk_rows)

    # -- display ------------------------------------------------------------------------------

    def _repr_html_(self) -> str:
        """The query in a notebook: its conditions (no values) and the plan it compiles to."""
        from healthimaging_df.core import display

        rows = [("datastore", self.datastore_id)]
        members = self.parts or (self,)
        for number, q in enumerate(members, 1):
            label = f"query {number} of the union" if self.parts else "conditions"
            rows.append((label, "; ".join(map(repr, q.predicates)) or "(none: every image set)"))
        if self.sort_column:
            rows.append(("sort", f"{self.sort_column} {'asc' if self.ascending else 'desc'}"))
        if self.row_limit is not None:
            rows.append(("limit", str(self.row_limit)))
        if self.strategy != "auto":
            rows.append(("strategy", self.strategy))
        return display.section("Query", rows) + self.compile().to_html(SEARCH_TPS)

    def to_parquet(self, path: str, **options: Unpack[ExportOptions]) -> snapshot.SnapshotInfo:
        """Run the query and write a snapshot; see ``healthimaging_df.snapshot.export_query``.

        *options* are :class:`~healthimaging_df.options.ExportOptions`: the run's (``client``,
        ``max_tps``...) and the store's (``partition_cols``, ``redact``, ``resume``...). A
        directory path still writes a Delta table, with a ``DeprecationWarning``: that is
        :meth:`to_delta` now.
        """
        from healthimaging_df import snapshot

        snapshot._deprecated_directory(path)
        return snapshot.export_query(self, path, **options)

    def to_delta(self, path: str, **options: Unpack[ExportOptions]) -> snapshot.SnapshotInfo:
        """Run the query into a Delta table at *path* (a folder or ``s3://bucket/prefix``).

        Reader 1 / writer 2, one commit per write, time travel; see ``snapshot.export_query``.
        """
        from healthimaging_df import snapshot

        snapshot.check_table_path(path, "to_delta")
        return snapshot.export_query(self, path, **options)

    def to_iceberg(
        self, iceberg_table: str, *, catalog: str, warehouse: str | None = None, **options: Any
    ) -> snapshot.SnapshotInfo:
        """Run the query into the Iceberg table ``NAMESPACE.TABLE`` of *catalog*.

        *catalog* is ``sqlite:///…`` (SQL), ``glue`` (AWS Glue) or ``http(s)://…`` (REST);
        new tables' files go under *warehouse*. See ``snapshot.export_query``.
        """
        from healthimaging_df import snapshot

        return snapshot.export_query(
            self, iceberg_table=iceberg_table, catalog=catalog, warehouse=warehouse, **options
        )


class QueryReader:
    """A query as an Arrow stream (the PyCapsule interface); see :meth:`Query.reader`.

    ``__arrow_c_schema__`` answers from the declared schema (consumers such as DuckDB ask it
    several times while binding: no request is sent). Every ``__arrow_c_stream__`` runs the
    query anew: the first batch is computed before the stream is handed over, so a failure to
    start (a bad datastore, denied access, throttling) raises its typed error to the caller; a
    failure after that reaches the consumer as its own error type, naming ours and its message.
    """

    def __init__(self, query: Query, run: Any, chunk_rows: int) -> None:
        self.query = query
        self._run = run
        self._chunk_rows = chunk_rows
        self.runs = 0  # how many times a consumer opened the stream (each one runs the query)

    def __repr__(self) -> str:
        return f"QueryReader({self.query!r}, runs={self.runs})"

    @property
    def schema(self) -> pa.Schema:
        """The declared Arrow schema of every batch."""
        return schema.arrow_schema()

    def __arrow_c_schema__(self) -> object:
        """The declared schema as an ArrowSchema capsule; no request is sent."""
        return schema.arrow_schema().__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        """Run the query and return an ArrowArrayStream capsule of its record batches."""
        import pyarrow as pa

        self.runs += 1
        batches = run_batches(self.query, self._run, self._chunk_rows)
        first = next(batches)  # raises a typed error if the run cannot start

        def rest() -> Iterator[pa.RecordBatch]:
            yield first
            yield from batches

        stream = pa.RecordBatchReader.from_batches(schema.arrow_schema(), rest())
        return stream.__arrow_c_stream__(requested_schema)

    def to_pyarrow(self) -> pa.RecordBatchReader:
        """Run the query once as a ``pyarrow.RecordBatchReader``."""
        import pyarrow as pa

        return pa.RecordBatchReader.from_stream(self)


def run_batches(query: Query, run: Any, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Plan *query* now (statistics probed here, as ``iter_dataframes`` does); its batches.

    What ``iter_batches``, a reader and the Polars source run (*run*: ``engine.prepare``'s).

    Each call plans and runs on a copy of *run* with nothing prefetched, so a reader opened
    twice runs twice from scratch.
    """
    from healthimaging_df import engine

    fresh = replace(run, prefetched={})
    plan = engine.choose(lambda stats: query.compile(stats=stats), fresh)
    return _as_batches(engine.table_chunks(plan, query.to_json(), fresh, chunk_rows))


def _as_batches(tables: Iterator[pa.Table]) -> Iterator[pa.RecordBatch]:
    for table in tables:
        yield from table.to_batches() or [_empty_batch()]


def _empty_batch() -> pa.RecordBatch:
    import pyarrow as pa

    return pa.RecordBatch.from_pylist([], schema=schema.arrow_schema())


def _with_provenance(table: pa.Table, info: dict[str, Any]) -> pa.Table:
    """*table* with the run's provenance in its schema metadata (JSON under the library's key)."""
    from healthimaging_df.engine.provenance import KEY

    return table.replace_schema_metadata({KEY.encode(): json.dumps(info).encode()})


def _to_json(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _is_pandas_list(value: Any) -> bool:
    """A pandas Series or Index; pandas cannot have made one if it is not imported."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(value, (pd.Series, pd.Index))


def _equality(column: str, value: Any, *, negate: bool) -> Predicate:
    if isinstance(value, (list, tuple, set, frozenset)) or _is_pandas_list(value):
        values = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
        op: predicates.Op = "not_in" if negate else "in"
        if len(values) == 1:
            op = "ne" if negate else "eq"
        return predicates.build(column, op, values)
    return predicates.build(column, "ne" if negate else "eq", (value,))


def search(
    datastore_id: str,
    *,
    client: Any = None,
    boto3_session: Any = None,
    limit: int | None = None,
    **equalities: Any,
) -> pd.DataFrame:
    """One-line search: ``search(ds, client=c, PatientID="P1")`` is ``Query(ds).where(...)``."""
    query = Query(datastore_id).where(**equalities)
    if limit is not None:
        query = query.limit(limit)
    return query.to_dataframe(client=client, boto3_session=boto3_session)
