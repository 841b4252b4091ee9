"""``Query``: the immutable, chainable statement of a cohort, and its entry points.

Every method returns a new ``Query``; building one validates every value, so a bad query fails at the
line that made it, before any request. ``plan()`` and ``explain()`` show what will be sent;
``to_dataframe()`` and ``iter_dataframes()`` run it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pandas as pd

from healthimaging_df import predicates, schema
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.predicates import Predicate

if TYPE_CHECKING:
    from healthimaging_df.fetch import FetchOptions
    from healthimaging_df.plan import Plan
    from healthimaging_df.progress import Progress

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
    ascending: bool = False
    row_limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.datastore_id, str) or not _DATASTORE_ID.fullmatch(self.datastore_id):
            raise QueryValidationError("datastore_id", "must be 32 characters of [0-9a-z]")

    def __repr__(self) -> str:
        parts = [f"datastore_id={self.datastore_id!r}", *map(repr, self.predicates)]
        if self.sort_column:
            parts.append(f"sort_by={self.sort_column}:{'asc' if self.ascending else 'desc'}")
        if self.row_limit is not None:
            parts.append(f"limit={self.row_limit}")
        return f"Query({', '.join(parts)})"

    # -- building ---------------------------------------------------------------------------

    def _with(self, *added: Predicate) -> Query:
        return replace(self, predicates=self.predicates + added)

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

    def sort_by(self, column: str, ascending: bool = False) -> Query:
        """Order the result; the API sorts by updatedAt, createdAt and StudyDateTime itself."""
        predicates.known_column(column)
        return replace(self, sort_column=column, ascending=bool(ascending))

    def limit(self, n: int) -> Query:
        """Return at most *n* rows: the first *n* in sort order (default updatedAt, newest first)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise QueryValidationError("limit", "must be a positive integer")
        return replace(self, row_limit=n)

    # -- serializing --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (values included: treat it as PHI) that ``from_dict`` reads."""
        return {
            "datastore_id": self.datastore_id,
            "predicates": [
                {"column": p.column, "op": p.op, "values": [_to_json(v) for v in p.values]}
                | ({} if p.case else {"case": False})
                for p in self.predicates
            ],
            "sort_by": self.sort_column,
            "ascending": self.ascending,
            "limit": self.row_limit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Query:
        """Rebuild a query from ``to_dict()`` output, validating it again."""
        query = cls(data["datastore_id"])
        if data.get("redacted") or any("values_redacted" in p for p in data.get("predicates", ())):
            raise QueryValidationError(
                "query", "its values were redacted; pass the original query instead"
            )
        built = tuple(
            predicates.build(p["column"], p["op"], p.get("values", ()), case=p.get("case", True))
            for p in data.get("predicates", ())
        )
        query = replace(query, predicates=built)
        if data.get("sort_by"):
            query = query.sort_by(data["sort_by"], ascending=bool(data.get("ascending")))
        if data.get("limit") is not None:
            query = query.limit(int(data["limit"]))
        return query

    # -- planning ---------------------------------------------------------------------------

    def compile(self) -> Plan:
        """The plan: requests the API can answer plus the predicates applied on the client."""
        from healthimaging_df.plan import compile_query

        return compile_query(self)

    def plan(self) -> list[dict[str, Any]]:
        """The exact keyword arguments of each ``search_image_sets`` call (no paging keys)."""
        return self.compile().requests()

    def explain(self, show_values: bool = False) -> str:
        """Say what is sent, what runs on the client, and how many request chains run.

        Values are hidden unless *show_values* (they are usually PHI).
        """
        return self.compile().explain(show_values=show_values)

    # -- running ----------------------------------------------------------------------------

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
        plan, options, client = self._prepare(client, boto3_session, max_concurrency, max_tps)
        return self._collect(plan, options, client, progress, dtype_backend)

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

        Chunks come in arrival order, each image set once; with ``limit`` set the whole (small)
        sorted result is computed first and then yielded in chunks. Arguments are checked here,
        before the first chunk is asked for.
        """
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise QueryValidationError("chunk_rows", "must be a positive integer")
        plan, options, client = self._prepare(client, boto3_session, max_concurrency, max_tps)
        return self._chunks(plan, options, client, progress, dtype_backend, chunk_rows)

    def _prepare(
        self, client: Any, boto3_session: Any, max_concurrency: int, max_tps: float | None
    ) -> tuple[Plan, FetchOptions, Any]:
        from healthimaging_df import fetch

        plan = self.compile()
        options = fetch.FetchOptions(max_concurrency=max_concurrency, max_tps=max_tps)
        return plan, options, fetch.make_client(client, boto3_session, max_concurrency)

    def _collect(
        self,
        plan: Plan,
        options: FetchOptions,
        client: Any,
        progress: Progress,
        dtype_backend: schema.DtypeBackend,
    ) -> pd.DataFrame:
        from healthimaging_df import fetch, frame

        collector = frame.Collector(plan)
        started = datetime.now(timezone.utc)
        with fetch.stream(plan, client, options, progress) as pages:
            for page in pages:
                if collector.add(page):
                    pages.stop_chain(page.chain)
        info = fetch.provenance(self, plan, client)
        info["fetch_started_at"] = started.isoformat()  # refresh looks back from here
        return collector.finish(dtype_backend, provenance=info)

    def _chunks(
        self,
        plan: Plan,
        options: FetchOptions,
        client: Any,
        progress: Progress,
        dtype_backend: schema.DtypeBackend,
        chunk_rows: int,
    ) -> Iterator[pd.DataFrame]:
        from healthimaging_df import fetch, frame

        if plan.limit is not None:
            whole = self._collect(plan, options, client, progress, dtype_backend)
            for start in range(0, max(len(whole), 1), chunk_rows):
                yield whole.iloc[start : start + chunk_rows]
            return
        chunker = frame.Chunker(
            plan, chunk_rows, dtype_backend, fetch.provenance(self, plan, client)
        )
        with fetch.stream(plan, client, options, progress) as pages:
            for page in pages:
                yield from chunker.add(page)
        yield from chunker.flush()

    def to_parquet(self, path: str, **options: Any) -> Any:
        """Run the query and write a Parquet snapshot; see ``healthimaging_df.snapshot``."""
        from healthimaging_df import snapshot

        return snapshot.export_query(self, path, **options)


def _to_json(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _equality(column: str, value: Any, *, negate: bool) -> Predicate:
    if isinstance(value, (list, tuple, set, frozenset, pd.Series, pd.Index)):
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
