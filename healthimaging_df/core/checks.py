"""Argument checks every public function shares: one rule, one message, one typed error.

Each check returns the value it accepted (so a caller can write ``n = checks.positive_int("n", n)``)
and raises :class:`~healthimaging_df.errors.QueryValidationError` naming the argument and the rule,
never the value. Python's ``bool`` is an ``int``: every integer check refuses it, and every flag
accepts only ``True`` or ``False`` (the string ``"no"`` is truthy, so ``bool(value)`` would read it
as yes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, TypeVar

from healthimaging_df.errors import QueryValidationError

T = TypeVar("T")
_RESOURCE_ID = re.compile(r"[0-9a-z]{32}")  # a datastore's or an image set's ID (service model)

__all__ = [
    "flag",
    "integer",
    "non_negative_int",
    "number",
    "one_of",
    "optional_flag",
    "optional_positive_int",
    "optional_positive_number",
    "positive_int",
    "resource_id",
    "resource_ids",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, rule: str = ""
) -> int:
    """*value* if it is an ``int`` (not a bool) within ``[minimum, maximum]``; else a typed error.

    *rule* replaces the default wording ("must be an integer from 1 to 50").
    """
    if (
        _is_int(value)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    ):
        return int(value)
    if not rule:
        if minimum is not None and maximum is not None:
            rule = f"must be an integer from {minimum} to {maximum}"
        elif minimum == 1:
            rule = "must be a positive integer"
        elif minimum == 0:
            rule = "must be a non-negative integer"
        elif minimum is not None:
            rule = f"must be an integer of at least {minimum}"
        else:
            rule = "must be an integer"
    raise QueryValidationError(name, rule)


def positive_int(name: str, value: Any) -> int:
    """*value* if it is a positive ``int`` (not a bool); else ``name: must be a positive integer``."""
    return integer(name, value, minimum=1)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None, or a positive ``int`` (not a bool); else ``name: must be a positive integer or None``."""
    if value is None:
        return None
    return integer(name, value, minimum=1, rule="must be a positive integer or None")


def non_negative_int(name: str, value: Any) -> int:
    """*value* if it is an ``int`` (not a bool) of 0 or more."""
    return integer(name, value, minimum=0)


def number(name: str, value: Any, *, minimum: float = 0.0, rule: str = "") -> float:
    """*value* if it is a finite real number (not a bool) of at least *minimum*."""
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= minimum
    ):
        return float(value)
    raise QueryValidationError(name, rule or f"must be a number of at least {minimum:g}")


def optional_positive_number(name: str, value: Any) -> float | None:
    """None, or a finite number above 0 (a rate such as ``max_tps``; None means unlimited)."""
    if value is None:
        return None
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise QueryValidationError(name, "must be a positive number or None")


def flag(name: str, value: Any) -> bool:
    """*value* if it is ``True`` or ``False``; anything else (``"no"``, 0, None) is refused."""
    if isinstance(value, bool):
        return value
    raise QueryValidationError(name, "must be True or False")


def optional_flag(name: str, value: Any) -> bool | None:
    """None, ``True`` or ``False``; anything else is refused."""
    if value is None or isinstance(value, bool):
        return value
    raise QueryValidationError(name, "must be None, True or False")


def resource_id(name: str, value: Any, position: int | None = None) -> str:
    """*value* if it is a HealthImaging ID (a datastore's, an image set's): 32 of ``[0-9a-z]``."""
    if isinstance(value, str) and _RESOURCE_ID.fullmatch(value):
        return value
    raise QueryValidationError(name, "must be 32 characters of [0-9a-z]", position)


def resource_ids(name: str, values: Iterable[Any]) -> None:
    """Check every one of *values* with :func:`resource_id`.

    The error names the first bad one's position (counted from 1 in the message), never its value.
    """
    for position, value in enumerate(values):
        resource_id(name, value, position)


def one_of(name: str, value: Any, choices: Iterable[T]) -> T:
    """*value* if it is one of *choices* (compared with ``==``, hashable or not)."""
    options = list(choices)
    for choice in options:
        if type(value) is type(choice) and value == choice:
            return choice
    words = [repr(c) for c in options]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    raise QueryValidationError(name, f"must be {listed}")
