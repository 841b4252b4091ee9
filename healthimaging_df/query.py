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
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from healthimaging_df import schema
from healthimaging_df.core.progress import Progress
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.plan import (
    STRATEGIES,
    DatastoreStats,
    Plan,
    Strategy,
    any_of,
    compile_plan,
    predicates,
    union,
)
from healthimaging_df.plan.predicates import Predicate

if TYPE_CHECKING:
    import pandas as pd

    from healthimaging_df import snapshot

_DATASTORE_ID = re.compile(r"[0-9a-z]{32}")


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

    def __post_init__(self) -> None:
        if not isinstance(self.datastore_id, str) or not _DATASTORE_ID.fullmatch(self.datastore_id):
            raise QueryValidationError("datastore_id", "must be 32 characters of [0-9a-z]")
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
        return self._with(predicates.build(column, "contains", (text,), case=case))

    def matches(self, column: str, pattern: str, *, case: bool = True) -> Query:
        """Keep rows whose text column matches the Python regular expression *pattern* (search)."""
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
        return replace(self, sort_column=column, ascending=bool(ascending))

    def limit(self, n: int) -> Query:
        """Return at most *n* rows: the first *n* in sort order (default updatedAt, newest first)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise QueryValidationError("limit", "must be a positive integer")
        return replace(self, row_limit=n)

    def using(self, strategy: Strategy) -> Query:
        """Force an access path: ``"fanout"`` (a chain per IN value) or ``"scan"``; or ``"auto"``.

        ``"auto"`` (the default) lets the planner pick the path with fewer estimated requests.
        """
        if strategy not in STRATEGIES:
            raise QueryValidationError("strategy", f"must be one of {', '.join(STRATEGIES)}")
        if self.parts:
            return replace(self, parts=tuple(q.using(strategy) for q in self.parts))
        return replace(self, strategy=strategy)

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
            query = query.sort_by(data["sort_by"], ascending=bool(data.get("ascending")))
        if data.get("limit") is not None:
            query = query.limit(int(data["limit"]))
        if data.get("strategy"):
            query = query.using(data["strategy"])
        return query

    def to_json(self) -> str:
        """``to_dict()`` as canonical JSON: what provenance and checkpoints record."""
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- planning ---------------------------------------------------------------------------

    def compile(
        self,
        now: datetime | None = None,
        stats: DatastoreStats | None = None,
        strategy: Strategy | None = None,
    ) -> Plan:
        """The plan: requests the API can answer plus the predicates applied on the client.

        *now* bounds an unbounded scan (default: the current time); *stats* (the datastore's
        size) lets the planner weigh fan-out against a scan; *strategy* overrides the query's.
        The plan is deterministic for given arguments.
        """
        if self.parts:
            strategies = [strategy or q.strategy for q in self.parts]
            return union(
                self.datastore_id,
                [q.predicates for q in self.parts],
                self.sort_column,
                self.ascending,
                self.row_limit,
                now,
                strategies,
                stats,
            )
        return compile_plan(
            self.datastore_id,
            self.predicates,
            self.sort_column,
            self.ascending,
            self.row_limit,
            now,
            strategy or self.strategy,
            stats,
        )

    def plan(self) -> list[dict[str, Any]]:
        """The exact keyword arguments of each ``search_image_sets`` call (no paging keys)."""
        return self.compile().requests()

    def explain(self, show_values: bool = False) -> str:
        """Say what is sent, what runs on the client, and how many request chains run.

        Values are hidden unless *show_values* (they are usually PHI).
        """
        return self.compile().explain(show_values=show_values)

    # -- running (the engine does the work) ---------------------------------------------------

    def to_dataframe(
        self,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int = 8,
        max_tps: float | None = 25.0,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
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
        """
        from healthimaging_df import engine

        run = engine.prepare(
            client, boto3_session, progress, max_concurrency, max_tps, dtype_backend
        )
        plan = engine.choose(lambda stats: self.compile(stats=stats), run)
        return engine.collect(plan, self.to_json(), run)

    def iter_dataframes(
        self,
        chunk_rows: int = 50_000,
        client: Any = None,
        boto3_session: Any = None,
        progress: Progress = None,
        max_concurrency: int = 8,
        max_tps: float | None = 25.0,
        dtype_backend: schema.DtypeBackend = "numpy_nullable",
    ) -> Iterator[pd.DataFrame]:
        """Yield typed frames of about *chunk_rows* rows as pages arrive, for results beyond memory.

        Chunks come in arrival order, each image set once (see ``docs/queries.md``); with
        ``limit`` set the whole (small) sorted result is computed first and then yielded in
        chunks. Arguments are checked here, before the first chunk is asked for.
        """
        from healthimaging_df import engine

        engine.check_positive_int("chunk_rows", chunk_rows)
        run = engine.prepare(
            client, boto3_session, progress, max_concurrency, max_tps, dtype_backend
        )
        plan = engine.choose(lambda stats: self.compile(stats=stats), run)
        return engine.chunks(plan, self.to_json(), run, chunk_rows)

    def to_parquet(self, path: str, **options: Any) -> snapshot.SnapshotInfo:
        """Run the query and write one Parquet file (``….parquet``); see ``snapshot.export_query``.

        A directory path still writes a Delta table, with a ``DeprecationWarning``: that is
        :meth:`to_delta` now.
        """
        from healthimaging_df import snapshot

        snapshot._deprecated_directory(path)
        return snapshot.export_query(self, path, **options)

    def to_delta(self, path: str, **options: Any) -> snapshot.SnapshotInfo:
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
