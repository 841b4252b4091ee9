"""Small pandas helpers every public face shares: provenance's key and access, required columns."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import pandas as pd

from healthimaging_df.errors import QueryValidationError

PROVENANCE_KEY = "healthimaging_df"
"""Where a frame's provenance lives: ``df.attrs[PROVENANCE_KEY]``, and the snapshot metadata key."""


def provenance_of(frame: pd.DataFrame) -> dict[str, Any] | None:
    """*frame*'s provenance (``attrs[PROVENANCE_KEY]``), or None when it carries none."""
    provenance = frame.attrs.get(PROVENANCE_KEY)
    return provenance if isinstance(provenance, dict) else None


def provenance_datastore(frame: pd.DataFrame) -> str | None:
    """The datastore ID *frame*'s provenance names, or None (no provenance, or none recorded)."""
    provenance = provenance_of(frame)
    found = provenance.get("datastore_id") if provenance is not None else None
    return str(found) if found else None


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
