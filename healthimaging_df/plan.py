"""The planner: a ``Query`` becomes request chains the API can answer plus client-side predicates.

Rules (see ``docs/queries.md``):

- At most two filters go out: one EQUAL (the most selective ID the query pins, else ``isPrimary``)
  and one BETWEEN (``StudyDateTime``, then ``createdAt``, then ``updatedAt``).
- An IN list on the chosen ID fans out into one request chain per value.
- Timestamps go out as whole seconds (botocore drops fractions), so bounds are widened to whole
  seconds; every predicate, pushed or not, is then applied exactly on the client.
- A scan with no ID to pin is split into ``createdAt`` windows at run time (createdAt never changes,
  so windows are stable while the datastore is written to).
- Every chain pages in an order no update can change: ``createdAt`` ascending. The service's default
  (``updatedAt`` descending) would move an image set updated mid-query ahead of the cursor, where
  it is never returned. Only a query with a ``limit`` pushes its own sort down, to stop early.

The planner never sees a ``Query``: it takes the query's parts, so it sits below the builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from healthimaging_df import dates, schema
from healthimaging_df.predicates import Predicate

ID_RANK = schema.ID_RANK  # from each column's push-down role and rank in the schema
RANGE_RANK = schema.RANGE_RANK
DEFAULT_SORT = "updatedAt"
STABLE_SORT = {"sortField": "createdAt", "sortOrder": "ASC"}  # no update moves a row in it
WINDOW_FLOOR = datetime(1970, 1, 1, tzinfo=timezone.utc)

Filter = dict[str, Any]


@dataclass(frozen=True)
class Chain:
    """One request chain: a request followed by its nextToken pages.

    A windowed chain is a ``createdAt`` window ``[low, high]`` (whole seconds, inclusive) that the
    executor splits further while it still has more pages.
    """

    index: int
    filters: tuple[Filter, ...]
    sort: dict[str, str] | None
    window: tuple[datetime, datetime] | None = None

    def __repr__(self) -> str:
        keys = [next(iter(f["values"][0]), "?") for f in self.filters]
        where = (
            f", window={self.window[0]:%Y-%m-%d}..{self.window[1]:%Y-%m-%d}" if self.window else ""
        )
        return f"Chain({self.index}, filters on {keys or 'nothing'}{where})"  # no values: PHI

    def criteria(self, window: tuple[datetime, datetime] | None = None) -> dict[str, Any]:
        """``searchCriteria`` for this chain, or for a sub-window of it."""
        filters = list(self.filters)
        sort = self.sort
        bounds = window or self.window
        if bounds is not None:
            filters.append(
                {
                    "operator": "BETWEEN",
                    "values": [{"createdAt": bounds[0]}, {"createdAt": bounds[1]}],
                }
            )
            sort = {"sortField": "createdAt", "sortOrder": "ASC"}
        criteria: dict[str, Any] = {}
        if filters:
            criteria["filters"] = filters
        if sort:
            criteria["sort"] = sort
        return criteria

    def request(
        self, datastore_id: str, window: tuple[datetime, datetime] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of ``search_image_sets`` for the first page (no paging keys)."""
        kwargs: dict[str, Any] = {"datastoreId": datastore_id}
        criteria = self.criteria(window)
        if criteria:
            kwargs["searchCriteria"] = criteria
        return kwargs


@dataclass(frozen=True)
class Plan:
    """What a query sends, and what it applies on the client."""

    datastore_id: str
    chains: tuple[Chain, ...]
    predicates: tuple[Predicate, ...]
    pushed: tuple[Predicate, ...]
    sort_column: str
    ascending: bool
    sort_pushed: bool
    limit: int | None
    note: str | None = None

    def __repr__(self) -> str:
        return (
            f"Plan(datastore_id={self.datastore_id!r}, chains={len(self.chains)}, "
            f"predicates={list(self.predicates)!r}, limit={self.limit})"  # no values: PHI
        )

    @property
    def windowed(self) -> bool:
        """Whether the scan is split into createdAt windows at run time."""
        return any(c.window is not None for c in self.chains)

    @property
    def stops_early(self) -> bool:
        """Chains arrive in result order, so each can stop once it holds ``limit`` matches."""
        return self.limit is not None and self.sort_pushed and not self.windowed

    def requests(self) -> list[dict[str, Any]]:
        """The first request of every chain, exactly as passed to ``search_image_sets``."""
        return [c.request(self.datastore_id) for c in self.chains]

    def explain(self, show_values: bool = False) -> str:
        """A readable account of the plan; values hidden unless *show_values*."""
        lines = [f"Plan for datastore {self.datastore_id}"]
        if self.note:
            lines.append(f"  {self.note}")
        count = len(self.chains)
        lines.append(f"  SearchImageSets request chains: {count}")
        if self.pushed:
            lines.append("  pushed down to the API:")
            lines += [f"    {p.describe(show_values)}" for p in self.pushed]
        if count > 1:
            lines.append(f"    (IN list fanned out: one chain per value, {count} chains)")
        if self.chains and self.chains[0].sort:
            sort = self.chains[0].sort
            lines.append(f"    sort: {sort['sortField']} {sort['sortOrder']}")
        window = self.chains[0].window if self.chains else None
        if window is not None:
            low, high = window
            lines.append(
                f"  exhaustive scan: createdAt {low:%Y-%m-%dT%H:%M:%SZ} .. {high:%Y-%m-%dT%H:%M:%SZ}"
                " split at run time into windows (sorted createdAt ASC) while a window has more"
                " pages; windows run concurrently under max_tps"
            )
        client_side = [p for p in self.predicates if p not in self.pushed]
        lines.append("  applied on the client, exactly:")
        lines += [f"    {p.describe(show_values)}" for p in client_side] or ["    (nothing else)"]
        if self.pushed:
            lines.append("    + pushed predicates re-checked (timestamps to the microsecond)")
        order = "ascending" if self.ascending else "descending"
        if self.sort_pushed:
            where = "sorted by the API" if count == 1 else "each chain sorted by the API, merged"
        else:
            where = "pages read by createdAt ascending, sorted on the client"
        lines.append(
            f"  result: one row per imageSetId (highest version), ordered by {self.sort_column} "
            f"{order} ({where}; ties by imageSetId)"
        )
        if self.limit is not None:
            how = (
                "each chain stops once it holds enough matches"
                if self.stops_early
                else "every page is read first"
            )
            lines.append(f"  limit: first {self.limit} rows; {how}")
        if count:
            lines.append(
                f"  expected calls: at least {count} (50 image sets per page"
                + ("; more as windows split)" if self.windowed else ")")
            )
        return "\n".join(lines)


def compile_plan(
    datastore_id: str,
    predicates: tuple[Predicate, ...] = (),
    sort_column: str | None = None,
    ascending: bool = True,
    limit: int | None = None,
    now: datetime | None = None,
) -> Plan:
    """Plan a query from its parts; pure and deterministic for a given *now* (bounds full scans).

    Without a *sort_column* the result is ordered by ``updatedAt``, newest first (the API's own
    default order) and *ascending* is ignored.
    """
    preds = predicates
    allowed = _allowed_values(preds)
    ranges = _ranges(preds)
    sorted_by = sort_column
    sort_column = sorted_by or DEFAULT_SORT
    ascending = ascending if sorted_by else False
    sort_field = schema.BY_NAME[sort_column].sort_field
    stops_early = limit is not None and sort_field is not None
    plan_args: dict[str, Any] = {
        "datastore_id": datastore_id,
        "predicates": preds,
        "sort_column": sort_column,
        "ascending": ascending,
        "sort_pushed": stops_early,
        "limit": limit,
    }
    empty = [c for c, v in allowed.items() if not v] + [
        c for c, (lo, hi) in ranges.items() if lo > hi
    ]
    if empty:
        return Plan(
            chains=(),
            pushed=(),
            note=f"no request sent: the conditions on {', '.join(empty)} cannot all hold",
            **plan_args,
        )

    pushed: list[Predicate] = []
    equal_column = next((c for c in ID_RANK if c in allowed), None)
    equal_values: list[Any] = list(allowed[equal_column]) if equal_column else []
    flag = next((c for c in schema.FLAG_COLUMNS if len(allowed.get(c, ())) == 1), None)
    if equal_column is None and flag is not None:
        equal_column, equal_values = flag, list(allowed[flag])
    if equal_column:
        pushed += [p for p in preds if p.column == equal_column and p.op in ("eq", "in")]

    range_column = next((c for c in RANGE_RANK if c in ranges), None)
    range_filter: Filter | None = None
    if range_column:
        pushed += [p for p in preds if p.column == range_column and p.op == "between"]
        range_filter = _between_filter(range_column, *ranges[range_column])

    sort = STABLE_SORT
    if stops_early and sort_field is not None:
        sort = {"sortField": sort_field, "sortOrder": "ASC" if ascending else "DESC"}

    windowed = (equal_column is None or equal_column in schema.FLAG_COLUMNS) and range_column in (
        None,
        "createdAt",
    )
    if stops_early:
        windowed = False  # a sorted chain that stops early beats reading every window
    key = schema.BY_NAME[equal_column].search_key if equal_column else None
    base: list[Filter | None] = [
        {"operator": "EQUAL", "values": [{key: v}]} for v in equal_values
    ] or [None]
    chains = []
    for index, equal in enumerate(base):
        filters = tuple(f for f in (equal, None if windowed else range_filter) if f is not None)
        window = None
        if windowed:
            low, high = ranges.get("createdAt", (WINDOW_FLOOR, _tomorrow(now)))
            window = (dates.floor_second(low), dates.ceil_second(high))
        chains.append(Chain(index, filters, None if windowed else sort, window))
    return Plan(chains=tuple(chains), pushed=tuple(pushed), **plan_args)


def _allowed_values(preds: tuple[Predicate, ...]) -> dict[str, tuple[Any, ...]]:
    """Per column, the values every eq/in predicate on it admits (intersection, first order)."""
    allowed: dict[str, tuple[Any, ...]] = {}
    for p in preds:
        if p.op in ("eq", "in"):
            if p.column in allowed:
                keep = set(p.values)
                allowed[p.column] = tuple(v for v in allowed[p.column] if v in keep)
            else:
                allowed[p.column] = p.values
    return allowed


def _ranges(preds: tuple[Predicate, ...]) -> dict[str, tuple[Any, Any]]:
    """Per pushable range column, the intersection of its between predicates."""
    ranges: dict[str, tuple[Any, Any]] = {}
    for p in preds:
        if p.op == "between" and p.column in RANGE_RANK:
            low, high = p.values
            if p.column in ranges:
                low = max(low, ranges[p.column][0])
                high = min(high, ranges[p.column][1])
            ranges[p.column] = (low, high)
    return ranges


def _between_filter(column: str, low: datetime, high: datetime) -> Filter:
    key = schema.BY_NAME[column].search_key
    assert key is not None
    values: list[dict[str, Any]]
    if column == "StudyDateTime":
        values = [{key: dates.study_date_and_time(low)}, {key: dates.study_date_and_time(high)}]
    else:
        values = [{key: dates.floor_second(low)}, {key: dates.ceil_second(high)}]
    return {"operator": "BETWEEN", "values": values}


def _tomorrow(now: datetime | None) -> datetime:
    today = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return today.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
