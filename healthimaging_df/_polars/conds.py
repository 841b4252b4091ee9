"""One conjunct of a Polars predicate as the conditions it states (``column op values``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

import polars as pl

from healthimaging_df import schema
from healthimaging_df._polars.expr import Untranslatable, const

_CMP = {"Eq": "eq", "NotEq": "ne", "Lt": "lt", "LtEq": "le", "Gt": "gt", "GtEq": "ge"}
_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
# a regex matching one text only: characters that are not metacharacters, and escaped
# punctuation (an escaped letter or digit is a class or an assertion: \d, \w, \b)
_LITERAL_REGEX = re.compile(r"(?:[^.^$*+?{}\[\]\\|()]|\\[^\w]|\\_)*")


@dataclass(frozen=True)
class Cond:
    """One condition of a conjunct: ``column op values``; ``strict`` for ``<`` and ``>``."""

    column: str
    op: str
    values: tuple[Any, ...] = ()
    strict: bool = False
    exact_unit: bool = True  # the literal's precision is the column's (a strict bound can step)
    pair: bool = False  # one end of an is_between: its own between(), as Query.between is


def _column(tree: Any) -> str:
    """The schema column *tree* names, else untranslatable."""
    name = tree.get("Column") if isinstance(tree, dict) else None
    if not isinstance(name, str) or name not in schema.BY_NAME:
        raise Untranslatable
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
        raise Untranslatable
    return values[0]


def _exact_unit(dtype: pl.DataType) -> bool:
    """A literal at microsecond precision or coarser: ``> t`` is ``>= t + 1 us`` exactly."""
    if isinstance(dtype, pl.Datetime):
        return dtype.time_unit in ("us", "ms")
    return dtype.is_integer()


def conditions(tree: Any) -> list[Cond]:
    """The conditions one conjunct states, or ``Untranslatable``."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise Untranslatable
    [(kind, node)] = tree.items()
    if kind == "Column":  # a bare boolean column: filter(pl.col("isPrimary"))
        column = _column(tree)
        if schema.BY_NAME[column].kind != "bool":
            raise Untranslatable
        return [Cond(column, "eq", (True,))]
    if kind == "BinaryExpr" and isinstance(node, dict) and node.get("op") in _CMP:
        left, right, op = node["left"], node["right"], _CMP[node["op"]]
        if isinstance(left, dict) and "Column" in left:
            column, other = _column(left), right
        elif isinstance(right, dict) and "Column" in right:
            column, other, op = _column(right), left, _FLIP[op]
        else:
            raise Untranslatable
        values, dtype = const(other)
        value = _one(values, column)
        return [
            Cond(column, op, (value,), strict=op in ("lt", "gt"), exact_unit=_exact_unit(dtype))
        ]
    if kind == "Function" and isinstance(node, dict):
        return _function(node)
    raise Untranslatable


_Handler = Callable[[str, list[Any], Any], list[Cond]]


def _function(node: dict[str, Any]) -> list[Cond]:
    """A Function node's conditions, by the handler its name selects (none: not pushed)."""
    inputs = node.get("input") or []
    key, options = _function_key(node.get("function"))
    if key == ("Boolean", "Not", False):  # ~is_in, ~is_null, ~bool column
        return _negated(inputs)
    if not inputs:
        raise Untranslatable
    column = _column(inputs[0])
    handler = _FUNCTIONS.get(key) if key is not None else None
    if handler is None:
        raise Untranslatable
    return handler(column, inputs[1:], options)


def _function_key(function: Any) -> tuple[tuple[str, str, bool] | None, Any]:
    """``(group, name, with options)`` of a ``Boolean`` or ``StringExpr`` function, and its options.

    A function serialises as a bare name (``"IsNull"``) or a one-key mapping of its name to its
    options (``{"IsIn": {...}}``); the two forms are told apart, as each function has one.
    """
    if not isinstance(function, dict):
        return None, None
    for group in ("Boolean", "StringExpr"):
        inner = function.get(group)
        if isinstance(inner, str):
            return (group, inner, False), None
        if isinstance(inner, dict) and inner:
            name = next(iter(inner))
            return (group, name, True), inner[name]
    return None, None


def _negated(inputs: list[Any]) -> list[Cond]:
    [inner] = inputs
    if isinstance(inner, dict) and "Column" in inner:
        column = _column(inner)
        if schema.BY_NAME[column].kind != "bool":
            raise Untranslatable
        return [Cond(column, "eq", (False,))]
    [cond] = conditions(inner)
    negated = {"in": "not_in", "is_null": "not_null", "not_null": "is_null"}
    if cond.op not in negated:
        raise Untranslatable
    return [replace(cond, op=negated[cond.op])]


def _null(op: str) -> _Handler:
    def handler(column: str, args: list[Any], options: Any) -> list[Cond]:
        if args:
            raise Untranslatable
        return [Cond(column, op)]

    return handler


def _is_in(column: str, args: list[Any], options: Any) -> list[Cond]:
    if isinstance(options, dict) and options.get("nulls_equal"):
        raise Untranslatable
    [values] = [const(a)[0] for a in args]
    kept = [v for v in values if v is not None]  # a null in the list matches no row
    if not kept or not all(_fits(column, v) for v in kept):
        raise Untranslatable
    return [Cond(column, "in", tuple(dict.fromkeys(kept)))]


def _is_between(column: str, args: list[Any], options: Any) -> list[Cond]:
    closed = str(options.get("closed", "Both"))
    (low, low_type), (high, high_type) = (const(a) for a in args)
    low_strict, high_strict = closed in ("Right", "None"), closed in ("Left", "None")
    return [
        Cond(column, "ge", (_one(low, column),), low_strict, _exact_unit(low_type), True),
        Cond(column, "le", (_one(high, column),), high_strict, _exact_unit(high_type), True),
    ]


def _text(op: str | None) -> _Handler:
    """A string test on a text column (``op`` None: ``str.contains``, literal or a regex)."""

    def handler(column: str, args: list[Any], options: Any) -> list[Cond]:
        if schema.BY_NAME[column].kind != "string":
            raise Untranslatable
        [(value, _)] = [const(a) for a in args]
        needle = _one(value, column)
        if op is not None:
            return [Cond(column, op, (needle,))]
        if options.get("literal"):
            return [Cond(column, "contains", (needle,))]
        return [_regex(column, needle)]

    return handler


_FUNCTIONS: dict[tuple[str, str, bool], _Handler] = {
    ("Boolean", "IsNull", False): _null("is_null"),
    ("Boolean", "IsNotNull", False): _null("not_null"),
    ("Boolean", "IsIn", False): _is_in,
    ("Boolean", "IsIn", True): _is_in,
    ("Boolean", "IsBetween", True): _is_between,
    ("StringExpr", "StartsWith", False): _text("starts_with"),
    ("StringExpr", "EndsWith", False): _text("ends_with"),
    ("StringExpr", "Contains", True): _text(None),
}


_LIKE = re.compile(r"\^\(\?s\)(?P<lead>\.\*)?(?P<body>.*?)(?P<tail>\.\*)?\$", re.DOTALL)


def _literal(pattern: str) -> str | None:
    """The text a regex matches literally (escapes undone), or None if it has metacharacters."""
    if _LITERAL_REGEX.fullmatch(pattern) is None:
        return None
    return re.sub(r"\\(.)", r"\1", pattern, flags=re.DOTALL)


def _regex(column: str, pattern: str) -> Cond:
    """A regex ``str.contains`` that is a literal, or SQL LIKE's ``^(?s)...$`` of one."""
    plain = _literal(pattern)
    if plain is not None:
        return Cond(column, "contains", (plain,))
    like = _LIKE.fullmatch(pattern)
    body = _literal(like["body"]) if like else None
    if like is None or body is None:
        raise Untranslatable
    if like["lead"] and like["tail"]:
        return Cond(column, "contains", (body,))
    if like["tail"]:
        return Cond(column, "starts_with", (body,))
    if like["lead"]:
        return Cond(column, "ends_with", (body,))
    return Cond(column, "eq", (body,))
