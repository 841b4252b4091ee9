"""Small pandas helpers every public face shares: provenance carried over, required columns."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import pandas as pd

from healthimaging_df.errors import QueryValidationError


def with_attrs(result: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """Give *result* a deep copy of *source*'s ``attrs`` (provenance) and return it."""
    result.attrs = copy.deepcopy(source.attrs)
    return result


def require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ``QueryValidationError`` naming the columns *what* needs and *frame* lacks.

    The names are *columns*' own (ours), never the frame's other column names or its values.
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise QueryValidationError(
            "frame", f"{what} needs column(s) the frame lacks: {', '.join(missing)}"
        )
