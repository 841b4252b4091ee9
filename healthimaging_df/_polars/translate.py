"""The query a scan runs for the predicate Polars hands over, and what it leaves to the source."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import polars as pl

from healthimaging_df import schema
from healthimaging_df._polars.conds import Cond, conditions
from healthimaging_df._polars.expr import Untranslatable, expr_of, is_dynamic, shape, split, tree_of
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.query import Query

LOWER = {"gt": True, "ge": False}  # op -> strict
UPPER = {"lt": True, "le": False}
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_TS_FLOOR = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the planner's own floor for createdAt


@dataclass
class Translation:
    """What the source does with what Polars handed it.

    Attributes
    ----------
    query
        The query that runs (pushed conditions, and a limit where that is exact).
    predicate
        The predicate the source applies to every batch (Polars' own, less the top-k hint
        nodes Polars 1.39-1.43 add); None when there is none.
    pushed, kept
        Value-free shapes of the conjuncts pushed into the query, and of those that were not.
    note
        Why nothing was pushed, when that is a rule rather than a shape (``n_rows`` with a
        predicate).
    """

    query: Query
    predicate: pl.Expr | None
    pushed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    note: str | None = None
    n_rows: int | None = None

    def describe(self) -> list[str]:
        """Lines for the log and :func:`explain` (no values)."""
        total = len(self.pushed) + len(self.kept)
        lines = []
        if self.predicate is None:
            lines.append("no predicate from Polars")
        else:
            lines.append(f"predicate from Polars: {total} conjunct(s), {len(self.pushed)} pushed")
        if self.note:
            lines.append(self.note)
        lines += [f"pushed into the query: {shape}" for shape in self.pushed]
        lines += [
            f"NOT pushed (applied by the source after the fetch): {shape}" for shape in self.kept
        ]
        if self.predicate is not None:
            lines.append("the whole predicate is applied again by the source to every batch")
        if self.n_rows is not None:
            lines.append(f"n_rows={self.n_rows}: a limit on the query (the {self.n_rows} newest)")
        return lines


def _bound(cond: Cond, upper: bool) -> Any:
    """*cond*'s value as an inclusive bound: strict integers and microseconds step by one."""
    value = cond.values[0]
    kind = schema.BY_NAME[cond.column].kind
    if isinstance(value, date) and not isinstance(value, datetime):
        moment = datetime.combine(value, time.max if upper else time.min)
        return moment.replace(tzinfo=timezone.utc) if kind == "timestamp" else moment
    if cond.strict and cond.exact_unit:
        step = -1 if upper else 1
        if isinstance(value, datetime):
            return value + timedelta(microseconds=step)
        if isinstance(value, int):
            return value + step
    return value


def _open_end(column: str, upper: bool, now: datetime) -> Any:
    """The bound a one-sided comparison leaves open, or ``Untranslatable`` where none is safe.

    Integers: the int64 range. ``createdAt``, ``updatedAt``, ``lastAccessedAt``: from 1970 (the
    planner's own floor) to two days ahead (what the planner bounds a scan with; nothing is
    created or updated in the future). ``StudyDateTime`` and text: none (the API takes a range
    of study dates with both ends, and DICOM dates have no floor to assume).
    """
    kind = schema.BY_NAME[column].kind
    if kind == "int":
        return _INT_MAX if upper else _INT_MIN
    if kind == "timestamp":
        if not upper:
            return _TS_FLOOR
        ahead = now.astimezone(timezone.utc) + timedelta(days=2)
        return ahead.replace(hour=0, minute=0, second=0, microsecond=0)
    raise Untranslatable


_OPS: dict[str, Callable[[Query, Cond], Query]] = {
    "eq": lambda q, c: q.where(**{c.column: c.values[0]}),
    "ne": lambda q, c: q.where_not(**{c.column: c.values[0]}),
    "in": lambda q, c: q.where(**{c.column: list(c.values)}),
    "not_in": lambda q, c: q.where_not(**{c.column: list(c.values)}),
    "is_null": lambda q, c: q.is_null(c.column),
    "not_null": lambda q, c: q.not_null(c.column),
    "contains": lambda q, c: q.contains(c.column, c.values[0]),
    "starts_with": lambda q, c: q.matches(c.column, "^" + re.escape(c.values[0])),
    "ends_with": lambda q, c: q.matches(c.column, re.escape(c.values[0]) + r"\Z"),
}
"""The Query call of each non-range condition."""


def _apply(query: Query, conds: list[Cond], now: datetime) -> Query:
    """*query* with *conds* (ranges on a column merged into one ``between``)."""
    lows: dict[str, list[Any]] = {}
    highs: dict[str, list[Any]] = {}
    ends = iter(conds)
    for c in ends:
        if c.pair:  # an is_between: its two ends are the next two conditions
            upper = next(ends)
            query = query.between(c.column, _bound(c, upper=False), _bound(upper, upper=True))
        elif c.op in LOWER:
            lows.setdefault(c.column, []).append(_bound(c, upper=False))
        elif c.op in UPPER:
            highs.setdefault(c.column, []).append(_bound(c, upper=True))
        elif c.op in _OPS:
            query = _OPS[c.op](query, c)
        else:  # pragma: no cover - conditions() makes no other op
            raise Untranslatable
    for column in sorted({*lows, *highs}):
        query = _range(query, column, lows.get(column), highs.get(column), now)
    return query


def _range(
    query: Query, column: str, lows: list[Any] | None, highs: list[Any] | None, now: datetime
) -> Query:
    """*query* with one column's bounds: the tightest of each side, else its open end."""
    low = max(lows) if lows else _open_end(column, False, now)
    high = min(highs) if highs else _open_end(column, True, now)
    if low > high and lows and highs:
        # bounds that cannot both hold: each with its open end, as two between() calls
        # state them; the planner sends nothing for ranges that do not meet
        query = query.between(column, low, _open_end(column, True, now))
        return query.between(column, _open_end(column, False, now), high)
    return query.between(column, low, high)


def _alternatives(tree: Any) -> list[list[Cond]]:
    """An OR's sides, each as the conditions of its translatable conjuncts (a superset of it).

    A side with nothing translatable would read everything: then the OR is not pushed.
    """
    sides = split(tree, "Or")
    if len(sides) < 2:
        raise Untranslatable
    out = []
    for side in sides:
        conds = []
        for part in split(side, "And"):
            try:
                conds += conditions(part)
            except (Untranslatable, KeyError, TypeError, ValueError):
                continue
        if not conds:
            raise Untranslatable
        out.append(conds)
    return out


def translate(
    datastore_id: str,
    predicate: pl.Expr | None,
    n_rows: int | None = None,
    now: datetime | None = None,
) -> Translation:
    """The query a scan runs for what Polars handed over, and the predicate it re-applies.

    Never raises for a predicate it does not understand: each conjunct that cannot be
    translated (or whose values the query refuses) is left out of the query and named in
    ``kept``. *now* fixes the open end of a one-sided timestamp comparison (default: now).
    """
    now = now or datetime.now(timezone.utc)
    base = Query(datastore_id)
    parts, predicate = _without_hints(predicate)
    if predicate is None:
        query = base.limit(n_rows) if n_rows else base
        return Translation(query, None, n_rows=n_rows or None)
    if n_rows:  # Polars >= 1.39: the first n_rows rows of the scan, THEN the filter
        return Translation(
            base.limit(n_rows),
            predicate,
            kept=[shape(p) for p in parts],
            note=f"n_rows={n_rows} came with the predicate (the first {n_rows} rows, then the "
            "filter): the predicate is not pushed",
            n_rows=n_rows,
        )
    query, ands, pushed, kept = _read(parts, base, now)
    accepted, taken = _accept(query, ands, now)
    pushed += [shape(part) for number, (part, _) in enumerate(ands) if number in taken]
    kept += [shape(part) for number, (part, _) in enumerate(ands) if number not in taken]
    return Translation(_apply(query, accepted, now), predicate, pushed, kept)


_UNREAD = (Untranslatable, KeyError, TypeError, ValueError)  # a conjunct the reader cannot read


def _without_hints(predicate: pl.Expr | None) -> tuple[list[Any], pl.Expr | None]:
    """The predicate's conjuncts and the predicate, without Polars' top-k hint (it panics on it)."""
    if predicate is None:
        return [], None
    parts = split(tree_of(predicate), "And")
    kept_parts = [p for p in parts if not is_dynamic(p)]
    if len(kept_parts) != len(parts):  # rebuild without the hint
        predicate = None
        for p in kept_parts:
            e = expr_of(p)
            predicate = e if predicate is None else predicate & e
    return kept_parts, predicate


def _read(
    parts: list[Any], base: Query, now: datetime
) -> tuple[Query, list[tuple[Any, list[Cond]]], list[str], list[str]]:
    """Sort the conjuncts: conditions to weigh, the first OR pushed as a union, the rest kept.

    Returns the query (a union, else *base*), the conjuncts read as conditions, and the
    shapes pushed and kept so far.
    """
    pushed: list[str] = []
    kept: list[str] = []
    query = base
    union_done = False
    ands: list[tuple[Any, list[Cond]]] = []
    for part in parts:
        try:
            ands.append((part, conditions(part)))
            continue
        except _UNREAD:
            pass
        if not union_done:
            try:
                sides = _alternatives(part)
                query = Query.union(*(_apply(base, side, now) for side in sides))
                union_done = True
                pushed.append(shape(part))
                continue
            except (*_UNREAD, QueryValidationError):
                pass
        kept.append(shape(part))
    return query, ands, pushed, kept


def _units(ands: list[tuple[Any, list[Cond]]]) -> list[list[int]]:
    """Conjuncts that go together: a column's bounds, else each alone.

    SQL's BETWEEN is two conjuncts, and StudyDateTime needs both ends.
    """
    units: dict[Any, list[int]] = {}
    for number, (_, conds) in enumerate(ands):
        ranged = {c.column for c in conds if c.op in LOWER or c.op in UPPER}
        only_range = len(ranged) == 1 and all(c.op in LOWER or c.op in UPPER for c in conds)
        units.setdefault(("range", *ranged) if only_range else number, []).append(number)
    return list(units.values())


def _accept(
    query: Query, ands: list[tuple[Any, list[Cond]]], now: datetime
) -> tuple[list[Cond], set[int]]:
    """The conditions the query takes, and the conjuncts they came from.

    A unit the query refuses is tried conjunct by conjunct, and what fails is kept.
    """
    accepted: list[Cond] = []
    taken: set[int] = set()
    for unit in _units(ands):
        tries = [unit] + ([[member] for member in unit] if len(unit) > 1 else [])
        for attempt in tries:
            conds = [c for number in attempt for c in ands[number][1]]
            try:
                _apply(query, accepted + conds, now)
            except (Untranslatable, QueryValidationError):
                continue
            accepted += conds
            taken.update(attempt)
            if attempt is unit:
                break
    return accepted, taken
