"""Polars: a lazy frame over a datastore whose filters become requests, and SQL on it.

``scan_image_sets(ds)`` is a Polars IO source (``polars.io.plugins.register_io_source``). When the
frame is collected, Polars hands the source the filter it wrote after the scan (the predicate),
the columns it needs and, for a bare ``head(n)``, a row count. The source translates the
predicate, conjunct by conjunct, into ``Query`` conditions, which the planner turns into requests
(an ID to fan out on, a date range, QIDO-RS...), runs the query, and applies the **whole**
predicate again to every batch with Polars itself: Polars does not filter what a source returns
(measured in every version 1.4 to 2.1), and a translated condition need only hold for a
superset. What cannot be translated is still applied exactly, by the source; the log (INFO) and
:func:`explain` name each conjunct that was not pushed, by its shape, never its values.

Supported: ``polars>=1.26,<3`` (the ``polars`` extra; older versions lose or misplace filters).
The serialised expression format is unstable across versions, so only its structure is read;
every column-free part (a literal, a list, a date Polars parses) is evaluated by Polars itself.
Anything unknown is not pushed, and the result stays exact.

``sql("SELECT ... FROM image_sets WHERE ...", datastore_id=...)`` runs Polars SQL over the scan:
its WHERE becomes the predicate above (GROUP BY, aggregates and ORDER BY run in Polars).
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

try:
    import polars as pl
    from polars.io.plugins import register_io_source
except ImportError:  # pragma: no cover - the extra is part of the test install
    raise ImportError(
        'healthimaging_df.polars needs polars, an optional extra: pip install "healthimaging-df[polars]"'
    ) from None

from healthimaging_df import engine, schema
from healthimaging_df.aws.quotas import SEARCH_TPS
from healthimaging_df.core.progress import Progress
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.query import Query, run_batches

__all__ = [
    "PolarsSQLError",
    "Translation",
    "collect_sql",
    "explain",
    "polars_schema",
    "scan_image_sets",
    "sql",
    "sql_frame",
    "translate",
]

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 50_000  # rows a batch holds when Polars gives no hint
_CMP = {"Eq": "eq", "NotEq": "ne", "Lt": "lt", "LtEq": "le", "Gt": "gt", "GtEq": "ge"}
_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_LOWER = {"gt": True, "ge": False}  # op -> strict
_UPPER = {"lt": True, "le": False}
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_TS_FLOOR = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the planner's own floor for createdAt
_TS_CEILING = datetime(9998, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
_META = set(".^$*+?{}[]\\|()")


# -- the schema ---------------------------------------------------------------------------------


def polars_schema() -> dict[str, pl.DataType]:
    """The frame's columns as Polars dtypes, from ``schema.py`` (no request)."""
    kinds: dict[str, pl.DataType] = {
        "string": pl.String(),
        "int": pl.Int64(),
        "bool": pl.Boolean(),
        "timestamp": pl.Datetime("us", "UTC"),
        "wallclock": pl.Datetime("us"),
    }
    return {c.name: kinds[c.kind] for c in schema.COLUMNS}


# -- translation --------------------------------------------------------------------------------


class _Untranslatable(Exception):
    """A conjunct whose shape the translator does not know: it is not pushed."""


@dataclass(frozen=True)
class _Cond:
    """One condition of a conjunct: ``column op values``; ``strict`` for ``<`` and ``>``."""

    column: str
    op: str
    values: tuple[Any, ...] = ()
    strict: bool = False
    exact_unit: bool = True  # the literal's precision is the column's (a strict bound can step)
    pair: bool = False  # one end of an is_between: its own between(), as Query.between is


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


def _tree(expr: pl.Expr) -> Any:
    return json.loads(expr.meta.serialize(format="json"))


def _expr(tree: Any) -> pl.Expr:
    return pl.Expr.deserialize(io.StringIO(json.dumps(tree)), format="json")


def _has_column(tree: Any) -> bool:
    if isinstance(tree, dict):
        return "Column" in tree or any(_has_column(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_column(v) for v in tree)
    return False


def _const(tree: Any) -> tuple[list[Any], pl.DataType]:
    """Evaluate a column-free subtree with Polars: its values (a list) and their dtype."""
    if _has_column(tree):
        raise _Untranslatable
    series = pl.select(_expr(tree)).to_series()
    if series.dtype.base_type() in (pl.List, pl.Array):
        # 1.44 warns that the default of empty_as_null changes in 2.0: either way an empty
        # list gives no value (a null is dropped), so say it where the parameter exists
        explode = series.explode
        if "empty_as_null" in inspect.signature(explode).parameters:
            series = explode(empty_as_null=False)
        else:
            series = explode()
    return series.to_list(), series.dtype


def _is_dynamic(tree: Any) -> bool:
    """Polars 1.39-1.43's top-k hint (``dynamic_pred``): it cannot be evaluated."""
    node = tree.get("Display") if isinstance(tree, dict) else None
    return isinstance(node, dict) and str(node.get("fmt_str", "")).startswith("dynamic_pred")


def _split(tree: Any, op: str) -> list[Any]:
    """Flatten nested ``BinaryExpr`` nodes of *op* (``And`` or ``Or``)."""
    node = tree.get("BinaryExpr") if isinstance(tree, dict) else None
    if isinstance(node, dict) and node.get("op") in (op, f"Logical{op}"):
        return _split(node["left"], op) + _split(node["right"], op)
    return [tree]


def _shape(tree: Any) -> str:
    """A value-free rendering of an expression tree: columns, operators, functions."""
    if not isinstance(tree, dict) or len(tree) != 1:
        return "<expr>"
    [(kind, node)] = tree.items()
    if kind == "Column":
        return f'col("{node}")'
    if kind == "Literal":
        return "<value>"
    if kind == "BinaryExpr" and isinstance(node, dict):
        return f"({_shape(node.get('left'))} {node.get('op')} {_shape(node.get('right'))})"
    if kind in ("Function", "AnonymousFunction") and isinstance(node, dict):
        function = node.get("function")
        name = "python function" if kind == "AnonymousFunction" else _function_name(function)
        args = ", ".join(_shape(i) for i in node.get("input", []))
        return f"{name}({args})"
    if kind == "Cast" and isinstance(node, dict):
        return f"cast({_shape(node.get('expr'))})"
    if kind == "Display":
        return "<display node>"
    inner = [_shape(v) for v in (node.values() if isinstance(node, dict) else [])]
    inner = [i for i in inner if i != "<expr>"]
    return f"{kind}({', '.join(inner)})"


def _function_name(function: Any) -> str:
    """``Boolean.IsIn``, ``StringExpr.Contains``...: the names in a Function node, no values."""
    if isinstance(function, str):
        return function
    if isinstance(function, dict) and len(function) == 1:
        [(group, inner)] = function.items()
        if isinstance(inner, str):
            return f"{group}.{inner}"
        if isinstance(inner, dict) and inner:
            return f"{group}.{next(iter(inner))}"
        return str(group)
    return "function"


def _column(tree: Any) -> str:
    """The schema column *tree* names, else untranslatable."""
    name = tree.get("Column") if isinstance(tree, dict) else None
    if not isinstance(name, str) or name not in schema.BY_NAME:
        raise _Untranslatable
    return name


def _fits(column: str, value: Any) -> bool:
    """Whether *value* is of the Python type the column's kind compares with exactly."""
    kind = schema.BY_NAME[column].kind
    if kind == "string":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, datetime):
        return (value.tzinfo is not None) == (kind == "timestamp")
    return isinstance(value, date)  # a date: a whole day, a superset either way


def _one(values: list[Any], column: str) -> Any:
    if len(values) != 1 or values[0] is None or not _fits(column, values[0]):
        raise _Untranslatable
    return values[0]


def _exact_unit(dtype: pl.DataType) -> bool:
    """A literal at microsecond precision or coarser: ``> t`` is ``>= t + 1 us`` exactly."""
    if isinstance(dtype, pl.Datetime):
        return dtype.time_unit in ("us", "ms")
    return dtype.is_integer()


def _conds(tree: Any) -> list[_Cond]:
    """The conditions one conjunct states, or ``_Untranslatable``."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise _Untranslatable
    [(kind, node)] = tree.items()
    if kind == "Column":  # a bare boolean column: filter(pl.col("isPrimary"))
        column = _column(tree)
        if schema.BY_NAME[column].kind != "bool":
            raise _Untranslatable
        return [_Cond(column, "eq", (True,))]
    if kind == "BinaryExpr" and isinstance(node, dict) and node.get("op") in _CMP:
        left, right, op = node["left"], node["right"], _CMP[node["op"]]
        if isinstance(left, dict) and "Column" in left:
            column, other = _column(left), right
        elif isinstance(right, dict) and "Column" in right:
            column, other, op = _column(right), left, _FLIP[op]
        else:
            raise _Untranslatable
        values, dtype = _const(other)
        value = _one(values, column)
        return [
            _Cond(column, op, (value,), strict=op in ("lt", "gt"), exact_unit=_exact_unit(dtype))
        ]
    if kind == "Function" and isinstance(node, dict):
        return _function(node)
    raise _Untranslatable


def _function(node: dict[str, Any]) -> list[_Cond]:
    function, inputs = node.get("function"), node.get("input") or []
    boolean = function.get("Boolean") if isinstance(function, dict) else None
    text = function.get("StringExpr") if isinstance(function, dict) else None
    if boolean == "Not":  # ~is_in, ~is_null, ~bool column
        [inner] = inputs
        if isinstance(inner, dict) and "Column" in inner:
            column = _column(inner)
            if schema.BY_NAME[column].kind != "bool":
                raise _Untranslatable
            return [_Cond(column, "eq", (False,))]
        [cond] = _conds(inner)
        negated = {"in": "not_in", "is_null": "not_null", "not_null": "is_null"}
        if cond.op not in negated:
            raise _Untranslatable
        return [replace(cond, op=negated[cond.op])]
    if not inputs:
        raise _Untranslatable
    column = _column(inputs[0])
    args = inputs[1:]
    if boolean in ("IsNull", "IsNotNull") and not args:
        return [_Cond(column, "is_null" if boolean == "IsNull" else "not_null")]
    if boolean == "IsIn" or (isinstance(boolean, dict) and "IsIn" in boolean):
        options = boolean.get("IsIn") if isinstance(boolean, dict) else None
        if isinstance(options, dict) and options.get("nulls_equal"):
            raise _Untranslatable
        [values] = [_const(a)[0] for a in args]
        kept = [v for v in values if v is not None]  # a null in the list matches no row
        if not kept or not all(_fits(column, v) for v in kept):
            raise _Untranslatable
        return [_Cond(column, "in", tuple(dict.fromkeys(kept)))]
    if isinstance(boolean, dict) and "IsBetween" in boolean:
        closed = str(boolean["IsBetween"].get("closed", "Both"))
        (low, low_type), (high, high_type) = (_const(a) for a in args)
        low_strict, high_strict = closed in ("Right", "None"), closed in ("Left", "None")
        return [
            _Cond(column, "ge", (_one(low, column),), low_strict, _exact_unit(low_type), True),
            _Cond(column, "le", (_one(high, column),), high_strict, _exact_unit(high_type), True),
        ]
    if text is not None and schema.BY_NAME[column].kind == "string":
        [(value, _)] = [_const(a) for a in args]
        needle = _one(value, column)
        if text == "StartsWith":
            return [_Cond(column, "starts_with", (needle,))]
        if text == "EndsWith":
            return [_Cond(column, "ends_with", (needle,))]
        if isinstance(text, dict) and "Contains" in text:
            if text["Contains"].get("literal"):
                return [_Cond(column, "contains", (needle,))]
            return [_regex(column, needle)]
    raise _Untranslatable


_LIKE = re.compile(r"\^\(\?s\)(?P<lead>\.\*)?(?P<body>.*?)(?P<tail>\.\*)?\$", re.DOTALL)


def _literal(pattern: str) -> str | None:
    """The text a regex matches literally (escapes undone), or None if it has metacharacters."""
    out, escaped = [], False
    for char in pattern:
        if escaped:
            if char.isalnum():
                return None  # \d, \w...: a class, not a character
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in _META:
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


def _regex(column: str, pattern: str) -> _Cond:
    """A regex ``str.contains`` that is a literal, or SQL LIKE's ``^(?s)...$`` of one."""
    plain = _literal(pattern)
    if plain is not None:
        return _Cond(column, "contains", (plain,))
    like = _LIKE.fullmatch(pattern)
    body = _literal(like["body"]) if like else None
    if like is None or body is None:
        raise _Untranslatable
    if like["lead"] and like["tail"]:
        return _Cond(column, "contains", (body,))
    if like["tail"]:
        return _Cond(column, "starts_with", (body,))
    if like["lead"]:
        return _Cond(column, "ends_with", (body,))
    return _Cond(column, "eq", (body,))


def _bound(cond: _Cond, upper: bool) -> Any:
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
    """The bound a one-sided comparison leaves open, or ``_Untranslatable`` where none is safe.

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
    raise _Untranslatable


def _apply(query: Query, conds: list[_Cond], now: datetime) -> Query:
    """*query* with *conds* (ranges on a column merged into one ``between``)."""
    lows: dict[str, list[Any]] = {}
    highs: dict[str, list[Any]] = {}
    ends = iter(conds)
    for c in ends:
        if c.pair:  # an is_between: its two ends are the next two conditions
            upper = next(ends)
            query = query.between(c.column, _bound(c, upper=False), _bound(upper, upper=True))
        elif c.op in _LOWER:
            lows.setdefault(c.column, []).append(_bound(c, upper=False))
        elif c.op in _UPPER:
            highs.setdefault(c.column, []).append(_bound(c, upper=True))
        elif c.op == "eq":
            query = query.where(**{c.column: c.values[0]})
        elif c.op == "ne":
            query = query.where_not(**{c.column: c.values[0]})
        elif c.op == "in":
            query = query.where(**{c.column: list(c.values)})
        elif c.op == "not_in":
            query = query.where_not(**{c.column: list(c.values)})
        elif c.op == "is_null":
            query = query.is_null(c.column)
        elif c.op == "not_null":
            query = query.not_null(c.column)
        elif c.op == "contains":
            query = query.contains(c.column, c.values[0])
        elif c.op == "starts_with":
            query = query.matches(c.column, "^" + re.escape(c.values[0]))
        elif c.op == "ends_with":
            query = query.matches(c.column, re.escape(c.values[0]) + r"\Z")
        else:  # pragma: no cover - _conds makes no other op
            raise _Untranslatable
    for column in sorted({*lows, *highs}):
        low = max(lows[column]) if column in lows else _open_end(column, False, now)
        high = min(highs[column]) if column in highs else _open_end(column, True, now)
        if low > high and column in lows and column in highs:
            # bounds that cannot both hold: each with its open end, as two between() calls
            # state them; the planner sends nothing for ranges that do not meet
            query = query.between(column, low, _open_end(column, True, now))
            query = query.between(column, _open_end(column, False, now), high)
            continue
        query = query.between(column, low, high)
    return query


def _alternatives(tree: Any) -> list[list[_Cond]]:
    """An OR's sides, each as the conditions of its translatable conjuncts (a superset of it).

    A side with nothing translatable would read everything: then the OR is not pushed.
    """
    sides = _split(tree, "Or")
    if len(sides) < 2:
        raise _Untranslatable
    out = []
    for side in sides:
        conds = []
        for part in _split(side, "And"):
            try:
                conds += _conds(part)
            except (_Untranslatable, KeyError, TypeError, ValueError):
                continue
        if not conds:
            raise _Untranslatable
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
    if predicate is None:
        query = base.limit(n_rows) if n_rows else base
        return Translation(query, None, n_rows=n_rows or None)
    tree = _tree(predicate)
    parts = _split(tree, "And")
    kept_parts = [p for p in parts if not _is_dynamic(p)]
    if len(kept_parts) != len(parts):  # rebuild without the top-k hint: Polars panics on it
        predicate = None
        for p in kept_parts:
            e = _expr(p)
            predicate = e if predicate is None else predicate & e
        if predicate is None:
            query = base.limit(n_rows) if n_rows else base
            return Translation(query, None, n_rows=n_rows or None)
    if n_rows:  # Polars >= 1.39: the first n_rows rows of the scan, THEN the filter
        return Translation(
            base.limit(n_rows),
            predicate,
            kept=[_shape(p) for p in kept_parts],
            note=f"n_rows={n_rows} came with the predicate (the first {n_rows} rows, then the "
            "filter): the predicate is not pushed",
            n_rows=n_rows,
        )
    pushed: list[str] = []
    kept: list[str] = []
    query = base
    union_done = False
    ands: list[tuple[Any, list[_Cond]]] = []
    for part in kept_parts:
        try:
            ands.append((part, _conds(part)))
            continue
        except (_Untranslatable, KeyError, TypeError, ValueError):
            pass
        if not union_done:
            try:
                sides = _alternatives(part)
                query = Query.union(*(_apply(base, side, now) for side in sides))
                union_done = True
                pushed.append(_shape(part))
                continue
            except (_Untranslatable, KeyError, TypeError, ValueError, QueryValidationError):
                pass
        kept.append(_shape(part))
    # a column's bounds go together (SQL's BETWEEN is two conjuncts; StudyDateTime needs both
    # ends); a unit the query refuses is tried conjunct by conjunct, and what fails is kept
    units: dict[Any, list[int]] = {}
    for number, (_, conds) in enumerate(ands):
        ranged = {c.column for c in conds if c.op in _LOWER or c.op in _UPPER}
        only_range = len(ranged) == 1 and all(c.op in _LOWER or c.op in _UPPER for c in conds)
        units.setdefault(("range", *ranged) if only_range else number, []).append(number)
    accepted: list[_Cond] = []
    taken: set[int] = set()
    for unit in units.values():
        tries = [unit] + ([[member] for member in unit] if len(unit) > 1 else [])
        for attempt in tries:
            conds = [c for number in attempt for c in ands[number][1]]
            try:
                _apply(query, accepted + conds, now)
            except (_Untranslatable, QueryValidationError):
                continue
            accepted += conds
            taken.update(attempt)
            if attempt is unit:
                break
    pushed += [_shape(part) for number, (part, _) in enumerate(ands) if number in taken]
    kept += [_shape(part) for number, (part, _) in enumerate(ands) if number not in taken]
    query = _apply(query, accepted, now)
    return Translation(query, predicate, pushed, kept)


# -- the source ---------------------------------------------------------------------------------

_dry = threading.local()  # set while explain() copies a frame: the copies send nothing


class _Source:
    """The IO source behind :func:`scan_image_sets`: translate, run, re-apply, project."""

    def __init__(
        self,
        datastore_id: str,
        client: Any,
        boto3_session: Any,
        progress: Progress,
        max_concurrency: int | None,
        max_tps: float | None,
    ) -> None:
        Query(datastore_id)  # validates the id before anything else
        self.datastore_id = datastore_id
        self.options = (progress, max_concurrency, max_tps)
        self.explicit_client = client is not None or boto3_session is not None
        self._run: Any = engine.prepare(client, boto3_session, progress, max_concurrency, max_tps)
        self.max_tps = max_tps
        self.reports: list[Translation] | None = None  # a dry copy records here
        self.failure: Exception | None = None  # the last error a run raised

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_run"] = None  # a client does not pickle; a copy made by explain() needs none
        state["reports"] = None
        state["failure"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        copies = getattr(_dry, "copies", None)
        if copies is not None:
            self.reports = []
            copies.append(self)

    def run(self) -> Any:
        """The run options and client (remade from the default session in a pickled copy)."""
        if self._run is None:
            if self.explicit_client:
                raise QueryValidationError(
                    "client",
                    "this scan_image_sets() frame was copied to another process without its "
                    "client or session; call scan_image_sets() there",
                )
            self._run = engine.prepare(None, None, *self.options)
        return self._run

    def __call__(
        self,
        with_columns: list[str] | None,
        predicate: pl.Expr | None,
        n_rows: int | None,
        batch_size: int | None,
    ) -> Iterator[pl.DataFrame]:
        translation = translate(self.datastore_id, predicate, n_rows)
        for line in translation.describe():
            log.info("scan_image_sets: %s", line)
        columns = list(with_columns) if with_columns is not None else None
        if self.reports is not None or n_rows == 0:  # explain() records; head(0) needs no rows
            if self.reports is not None:
                self.reports.append(translation)
            empty = pl.DataFrame(schema=polars_schema())
            yield empty.select(columns) if columns is not None else empty
            return
        rows = batch_size or DEFAULT_BATCH_ROWS
        try:
            yield from self._frames(translation, columns, rows)
        except Exception as exc:  # Polars before 2.0 wraps it in a ComputeError: sql() unwraps
            self.failure = exc
            raise

    def _frames(
        self, translation: Translation, columns: list[str] | None, rows: int
    ) -> Iterator[pl.DataFrame]:
        for batch in run_batches(translation.query, self.run(), rows):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            if translation.predicate is not None:
                frame = frame.filter(translation.predicate)
            if columns is not None:
                frame = frame.select(columns)
            yield frame


def _register(source: _Source) -> pl.LazyFrame:
    """``register_io_source`` with the options this Polars version has."""
    params = inspect.signature(register_io_source).parameters
    options: dict[str, Any] = {"schema": polars_schema()}
    if "is_pure" in params:  # one scan for repeated identical occurrences in a plan
        options["is_pure"] = True
    if "explain_name" in params:
        options["explain_name"] = "healthimaging_df"
        options["explain_detail"] = (
            f"SearchImageSets on datastore {source.datastore_id}; the predicate is translated "
            "when collected (healthimaging_df.polars.explain shows how)"
        )
    frame: pl.LazyFrame = register_io_source(source, **options)
    return frame


def scan_image_sets(
    datastore_id: str,
    *,
    client: Any = None,
    boto3_session: Any = None,
    progress: Progress = False,
    max_concurrency: int | None = None,
    max_tps: float | None = SEARCH_TPS,
) -> pl.LazyFrame:
    """A lazy frame of every image set of a datastore, at its latest version.

    Filters written on it become the query's conditions when it is collected (see the module's
    docstring); the result is exact either way. Columns and dtypes come from ``schema.py``, so
    nothing is sent until ``collect()``. Each collect runs the query once. Rows come in arrival
    order (sort in Polars for an order); a bare ``head(n)`` reads the *n* most recently updated.
    The run options are those of ``Query.to_dataframe`` (checked here, before any request;
    *progress* defaults to off, as Polars shows none either). The page parser reads every column
    of a page whatever the projection (its cost is per page, not per column): the source keeps
    the columns Polars asks for.

    >>> import polars as pl
    >>> lf = scan_image_sets("0" * 32, client=object())  # doctest: +SKIP
    >>> lf.filter(pl.col("Modality") == "CT").collect()  # doctest: +SKIP
    """
    source = _Source(datastore_id, client, boto3_session, progress, max_concurrency, max_tps)
    frame = _register(source)
    frame._ahi_source = source  # type: ignore[attr-defined]  # sql() re-raises its typed error
    return frame


def explain(lf: pl.LazyFrame, *, max_tps: float | None = None) -> str:
    """Say what each ``scan_image_sets`` scan in *lf* would send, and what it would not push.

    Nothing is sent: a copy of the frame is collected with sources that record what Polars hands
    them (predicate, columns, n_rows) and answer with no rows. Each scan's translation is given,
    then the plan of its query (paths weighed, at *max_tps*, default the scan's own), values
    hidden. Needs a Polars that can serialise the frame (any supported version).
    """
    copies: list[_Source] = []
    _dry.copies = copies
    try:
        copy = pl.LazyFrame.deserialize(io.BytesIO(lf.serialize()))
    finally:
        _dry.copies = None
    copy.collect()
    lines: list[str] = []
    number = 0
    for source in copies:
        for report in source.reports or ():
            number += 1
            rate = max_tps if max_tps is not None else source.max_tps
            lines.append(f"scan {number}: datastore {source.datastore_id}")
            lines += [f"  {line}" for line in report.describe()]
            lines += [f"  {line}" for line in report.query.compile().summary(rate).splitlines()]
    return "\n".join(lines) if lines else "no healthimaging_df scan in this frame"


# -- SQL ----------------------------------------------------------------------------------------

_SHOWN_ERRORS = ("SQLSyntaxError", "SQLInterfaceError", "ColumnNotFoundError")
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"\\]|\\.)*\"")


class PolarsSQLError(QueryValidationError):
    """Polars could not run a :func:`sql` query.

    A syntax, interface or column error is shown (its first line, quoted text masked as
    ``'…'``); any other names only Polars' error class, since its message can quote values.
    Polars' whole message is kept in ``engine_message``.
    """

    def __init__(self, kind: str, engine_message: str) -> None:
        if kind in _SHOWN_ERRORS:
            first = engine_message.strip().splitlines()[0] if engine_message.strip() else kind
            text = f"Polars SQL raised {kind}: {_QUOTED.sub(chr(39) + '…' + chr(39), first)}"
        else:
            text = (
                f"Polars raised {kind}; its message, which may quote values, is withheld from "
                "this text: see the error's engine_message"
            )
        super().__init__("query", text)
        self.kind = kind
        self.engine_message = engine_message


def sql_frame(
    query: str,
    *,
    datastore_id: str,
    client: Any = None,
    boto3_session: Any = None,
    progress: Progress = False,
    max_concurrency: int | None = None,
    max_tps: float | None = SEARCH_TPS,
) -> pl.LazyFrame:
    """:func:`sql`'s lazy frame: Polars SQL over ``image_sets`` (a :func:`scan_image_sets`)."""
    if not isinstance(query, str) or not query.strip():
        raise QueryValidationError("query", "must be a non-empty SQL text")
    scan = scan_image_sets(
        datastore_id,
        client=client,
        boto3_session=boto3_session,
        progress=progress,
        max_concurrency=max_concurrency,
        max_tps=max_tps,
    )
    context = pl.SQLContext(frames={"image_sets": scan})
    frame: pl.LazyFrame = _sql_call(lambda: context.execute(query, eager=False))
    frame._ahi_source = scan._ahi_source  # type: ignore[attr-defined]
    return frame


def sql(
    query: str,
    *,
    datastore_id: str,
    client: Any = None,
    boto3_session: Any = None,
    progress: Progress = False,
    max_concurrency: int | None = None,
    max_tps: float | None = SEARCH_TPS,
) -> pl.DataFrame:
    """Run Polars SQL on a live datastore: ``FROM image_sets``, its WHERE reaching the planner.

    ``ahi.sql("SELECT StudyInstanceUID, count(*) AS n FROM image_sets WHERE PatientID = 'P1'
    GROUP BY 1", datastore_id=ds, client=c)``: the WHERE becomes the scan's predicate (pushed as
    :func:`scan_image_sets` pushes it), then Polars groups, aggregates, orders. Study and patient
    rollups are GROUP BY ``StudyInstanceUID`` / ``PatientID``. A query Polars cannot run raises
    :class:`PolarsSQLError`; the service's errors are the library's typed ones.
    """
    frame = sql_frame(
        query,
        datastore_id=datastore_id,
        client=client,
        boto3_session=boto3_session,
        progress=progress,
        max_concurrency=max_concurrency,
        max_tps=max_tps,
    )
    return collect_sql(frame)


def collect_sql(frame: pl.LazyFrame) -> pl.DataFrame:
    """Collect a :func:`sql_frame`; a Polars error becomes :class:`PolarsSQLError`."""
    source = getattr(frame, "_ahi_source", None)
    result = _sql_call(frame.collect, source)
    assert isinstance(result, pl.DataFrame)
    return result


def _sql_call(call: Callable[[], Any], source: _Source | None = None) -> Any:
    """*call*'s result; the scan's own typed error if it failed, else a :class:`PolarsSQLError`."""
    if source is not None:
        source.failure = None
    try:
        return call()
    except pl.exceptions.PolarsError as exc:
        if source is not None and source.failure is not None:  # Polars < 2 wrapped our error
            raise source.failure from None
        raise PolarsSQLError(type(exc).__name__, str(exc)) from None
