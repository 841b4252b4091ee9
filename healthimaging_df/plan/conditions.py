"""What a conjunction of predicates admits, per column: the sets and ranges the planner pushes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from healthimaging_df import schema
from healthimaging_df.plan.predicates import Predicate

RANGE_RANK = schema.RANGE_RANK


def allowed_values(preds: Sequence[Predicate]) -> dict[str, tuple[Any, ...]]:
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


def ranges(preds: Sequence[Predicate]) -> dict[str, tuple[Any, Any]]:
    """Per pushable range column, the intersection of its between predicates."""
    found: dict[str, tuple[Any, Any]] = {}
    for p in preds:
        if p.op == "between" and p.column in RANGE_RANK:
            low, high = p.values
            if p.column in found:
                low = max(low, found[p.column][0])
                high = min(high, found[p.column][1])
            found[p.column] = (low, high)
    return found


def keeps_primary_only(predicates: Sequence[Predicate]) -> bool:
    """Whether *predicates* keep primary image sets only (QIDO-RS sees all of those)."""
    return any(
        p.column == "isPrimary" and p.op in ("eq", "in") and set(p.values) == {True}
        for p in predicates
    )
