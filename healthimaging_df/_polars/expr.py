"""Reading Polars' serialised expression trees: structure only, values evaluated by Polars.

The serialised format is unstable across Polars versions, so only its structure is read (columns,
operators, function names); every column-free part is evaluated by Polars itself.
"""

from __future__ import annotations

import inspect
import io
import json
from typing import Any

import polars as pl


class Untranslatable(Exception):
    """A conjunct whose shape the translator does not know: it is not pushed."""


def tree_of(expr: pl.Expr) -> Any:
    return json.loads(expr.meta.serialize(format="json"))


def expr_of(tree: Any) -> pl.Expr:
    return pl.Expr.deserialize(io.StringIO(json.dumps(tree)), format="json")


def _has_column(tree: Any) -> bool:
    if isinstance(tree, dict):
        return "Column" in tree or any(_has_column(v) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_column(v) for v in tree)
    return False


def const(tree: Any) -> tuple[list[Any], pl.DataType]:
    """Evaluate a column-free subtree with Polars: its values (a list) and their dtype."""
    if _has_column(tree):
        raise Untranslatable
    series = pl.select(expr_of(tree)).to_series()
    if series.dtype.base_type() in (pl.List, pl.Array):
        # 1.44 warns that the default of empty_as_null changes in 2.0: either way an empty
        # list gives no value (a null is dropped), so say it where the parameter exists
        explode = series.explode
        if "empty_as_null" in inspect.signature(explode).parameters:
            series = explode(empty_as_null=False)
        else:
            series = explode()
    return series.to_list(), series.dtype


def is_dynamic(tree: Any) -> bool:
    """Polars 1.39-1.43's top-k hint (``dynamic_pred``): it cannot be evaluated."""
    node = tree.get("Display") if isinstance(tree, dict) else None
    return isinstance(node, dict) and str(node.get("fmt_str", "")).startswith("dynamic_pred")


def split(tree: Any, op: str) -> list[Any]:
    """Flatten nested ``BinaryExpr`` nodes of *op* (``And`` or ``Or``)."""
    node = tree.get("BinaryExpr") if isinstance(tree, dict) else None
    if isinstance(node, dict) and node.get("op") in (op, f"Logical{op}"):
        return split(node["left"], op) + split(node["right"], op)
    return [tree]


def shape(tree: Any) -> str:
    """A value-free rendering of an expression tree: columns, operators, functions."""
    if not isinstance(tree, dict) or len(tree) != 1:
        return "<expr>"
    [(kind, node)] = tree.items()
    if kind == "Column":
        return f'col("{node}")'
    if kind == "Literal":
        return "<value>"
    if kind == "BinaryExpr" and isinstance(node, dict):
        return f"({shape(node.get('left'))} {node.get('op')} {shape(node.get('right'))})"
    if kind in ("Function", "AnonymousFunction") and isinstance(node, dict):
        function = node.get("function")
        name = "python function" if kind == "AnonymousFunction" else _function_name(function)
        args = ", ".join(shape(i) for i in node.get("input", []))
        return f"{name}({args})"
    if kind == "Cast" and isinstance(node, dict):
        return f"cast({shape(node.get('expr'))})"
    if kind == "Display":
        return "<display node>"
    inner = [shape(v) for v in (node.values() if isinstance(node, dict) else [])]
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
