"""Predicates on schema columns: validated when built, evaluated exactly on Arrow tables.

A predicate's repr names its column, operator and value count, never its values (PHI).

Two derived values can be filtered on too, always on the client (the API cannot compute them):
``ageAtStudy`` (whole years from PatientBirthDate to StudyDate, as ``df.ahi.age_at_study()``
computes it: NA, so never matched, when partial dates leave it open) and ``StudyYear`` (the year of
StudyDate, partial dates included). They are not schema columns, so the planner never pushes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pyarrow as pa

from healthimaging_df import schema
from healthimaging_df.core import checks, dates
from healthimaging_df.errors import QueryValidationError

Op = Literal["eq", "in", "ne", "not_in", "between", "contains", "regex", "is_null", "not_null"]

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# DICOM code strings (VR CS, PS3.5 6.2): uppercase letters, digits, space and underscore, at most
# 16 characters, with no leading or trailing space. A value outside that can never be stored.
CODE_STRINGS = ("Modality", "BodyPartExamined", "PatientSex")
# Derived values: name -> (the columns they are computed from, description).
DERIVED: dict[str, tuple[tuple[str, ...], str]] = {
    "ageAtStudy": (("PatientBirthDate", "StudyDate"), "age in whole years at StudyDate"),
    "StudyYear": (("StudyDate",), "the year of StudyDate"),
}
_DERIVED_COLUMNS = {
    name: schema.Column(name, (), "int", text, phi=True) for name, (_, text) in DERIVED.items()
}
_DERIVED_OPS = ("eq", "in", "ne", "not_in", "between", "is_null", "not_null")
_CODE_STRING = re.compile(r"[A-Z0-9_]([A-Z0-9_ ]{0,14}[A-Z0-9_])?")
_SYMBOL = {
    "eq": "==",
    "in": "in",
    "ne": "!=",
    "not_in": "not in",
    "between": "between",
    "contains": "contains",
    "regex": "matches",
    "is_null": "is null",
    "not_null": "is not null",
}


@dataclass(frozen=True)
class Predicate:
    """One condition on one column; ``values`` are already typed for the column."""

    column: str
    op: Op
    values: tuple[Any, ...] = ()
    case: bool = True
    _pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        if self.op in ("is_null", "not_null"):
            return f"{self.column} {_SYMBOL[self.op]}"
        count = len(self.values)
        what = "1 value" if count == 1 else f"{count} values"
        flag = "" if self.case else " (ignoring case)"
        return f"{self.column} {_SYMBOL[self.op]} <{what}>{flag}"

    def describe(self, show_values: bool = False) -> str:
        """Readable form; values only when asked (they may be PHI)."""
        derived = ""
        if self.column in DERIVED:
            derived = f" (derived from {', '.join(DERIVED[self.column][0])}, on the client)"
        if not show_values or self.op in ("is_null", "not_null"):
            return repr(self) + derived
        shown = ", ".join(_show(v) for v in self.values)
        return f"{self.column} {_SYMBOL[self.op]} ({shown}){derived}"

    def mask(self, table: pa.Table) -> pa.Array:
        """Boolean mask of the rows of *table* that satisfy the predicate (nulls are False).

        ``!=`` and ``not in`` keep rows whose value is null: a missing modality is "not CT".
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        col = column_of(self.column)
        values = (
            _derived_values(table, self.column)
            if self.column in DERIVED
            else table.column(self.column)
        )
        if self.op == "is_null":
            return pc.is_null(values)
        if self.op == "not_null":
            return pc.is_valid(values)
        if self.op in ("eq", "in", "ne", "not_in"):
            value_set = pa.array(list(self.values), type=col.arrow_type)
            hit = pc.is_in(values, value_set=value_set)
            if self.op in ("ne", "not_in"):
                return pc.or_kleene(pc.invert(hit), pc.is_null(values)).combine_chunks()
            return pc.fill_null(hit, False)
        if self.op == "between":
            low, high = (pa.scalar(v, type=col.arrow_type) for v in self.values)
            inside = pc.and_kleene(pc.greater_equal(values, low), pc.less_equal(values, high))
            return pc.fill_null(inside, False)
        if self.op == "contains":
            found = pc.match_substring(values, self.values[0], ignore_case=not self.case)
            return pc.fill_null(found, False)
        assert self._pattern is not None
        search = self._pattern.search
        return pa.array(
            [v is not None and search(v) is not None for v in values.to_pylist()], pa.bool_()
        )


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


def known_column(name: str) -> schema.Column:
    """The schema's column called *name*; a ``QueryValidationError`` listing valid names if none."""
    if name not in schema.BY_NAME:
        derived = f" (filters only, not sorting: {', '.join(DERIVED)})" if name in DERIVED else ""
        raise QueryValidationError(
            name,
            f"unknown column; valid columns: {', '.join(schema.COLUMN_NAMES)}; derived values "
            f"for filters: {', '.join(DERIVED)}{derived}",
        )
    return schema.BY_NAME[name]


def column_of(name: str) -> schema.Column:
    """The column a predicate may name: a schema column or a derived value (``ageAtStudy``)."""
    return _DERIVED_COLUMNS.get(name) or known_column(name)


def _derived_values(table: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    """The derived value *name* per row of *table*, as ``core.derived`` defines it."""
    import pyarrow as pa

    from healthimaging_df.core import derived

    sources = DERIVED[name][0]
    missing = [c for c in sources if c not in table.column_names]
    if missing:
        raise QueryValidationError(name, f"needs the column(s) {', '.join(missing)}")
    frame = table.select(list(sources)).to_pandas()
    series = derived.age_at_study(frame) if name == "ageAtStudy" else derived.study_year(frame)
    return pa.array(series.astype("float64").to_numpy(), from_pandas=True).cast(pa.int64())


def build(column: str, op: Op, values: Iterable[Any] = (), *, case: bool = True) -> Predicate:
    """Validate and type *values* for *column*; raise ``QueryValidationError`` on any fault."""
    col = column_of(column)
    items = tuple(values)
    if column in DERIVED and op not in _DERIVED_OPS:
        raise QueryValidationError(column, f"'{op}' needs a text column; {column} is a number")
    if op in ("is_null", "not_null"):
        return Predicate(column, op)
    if op in ("in", "not_in") and not items:
        raise QueryValidationError(column, "the list of values is empty")
    if op in ("eq", "ne") and len(items) != 1:
        raise QueryValidationError(column, f"'{op}' takes exactly one value")
    if op in ("contains", "regex"):
        if col.kind != "string":
            raise QueryValidationError(column, f"'{op}' needs a text column")
        if len(items) != 1 or not isinstance(items[0], str):
            raise QueryValidationError(column, f"'{op}' takes one string")
        if op == "regex":
            try:
                pattern = re.compile(items[0], 0 if case else re.IGNORECASE)
            except re.error:
                raise QueryValidationError(column, "not a valid regular expression") from None
            return Predicate(column, op, items, case, pattern)
        return Predicate(column, op, items, case)
    if op == "between":
        return _between(col, items)
    if col.kind in ("timestamp", "wallclock"):
        whole = _whole_period(col, op, items)
        if whole is not None:
            return whole
    typed = tuple(_typed(col, v, i) for i, v in enumerate(items))
    for i, v in enumerate(typed):
        position = i if len(typed) > 1 else None
        _check_text(col, v, position)
        if op in ("eq", "in"):
            _check_searchable(col, v, position)
    return Predicate(column, op, tuple(dict.fromkeys(typed)))


def _whole_period(col: schema.Column, op: Op, items: tuple[Any, ...]) -> Predicate | None:
    """``where(StudyDateTime=date)`` means that whole day (a year alone, that year)."""
    wall = col.kind == "wallclock"
    periods = []
    for i, value in enumerate(items):
        try:
            periods.append(dates.whole_period(value, wallclock=wall) if value is not None else None)
        except dates.BoundError as exc:
            raise QueryValidationError(col.name, str(exc), i if len(items) > 1 else None) from None
    if not any(periods):
        return None
    if op == "eq" and periods[0] is not None:
        return Predicate(col.name, "between", periods[0])
    raise QueryValidationError(
        col.name,
        "a date names a whole day: give one date to where(), or use between() for a range"
        + ("" if op in ("eq", "in") else "; where_not() takes only exact moments"),
    )


def _between(col: schema.Column, items: tuple[Any, ...]) -> Predicate:
    if len(items) != 2:
        raise QueryValidationError(col.name, "between takes a lower and an upper bound")
    if col.kind == "bool":
        raise QueryValidationError(col.name, "between needs an ordered column, not a flag")
    if col.kind in ("timestamp", "wallclock"):
        wall = col.kind == "wallclock"
        bounds = []
        for i, (value, upper) in enumerate(zip(items, (False, True), strict=False)):
            try:
                bounds.append(dates.parse_bound(value, upper=upper, wallclock=wall))
            except dates.BoundError as exc:
                raise QueryValidationError(col.name, str(exc), position=i) from None
        low, high = bounds
    else:
        low, high = (_typed(col, v, i) for i, v in enumerate(items))
    if low > high:
        raise QueryValidationError(col.name, "the lower bound is after the upper bound")
    return Predicate(col.name, "between", (low, high))


def _typed(col: schema.Column, value: Any, position: int) -> Any:
    if value is None:
        raise QueryValidationError(
            col.name, "None is not a value; use is_null() for missing values", position
        )
    if col.kind == "string":
        if not isinstance(value, str):
            raise QueryValidationError(
                col.name, f"expects text, not {type(value).__name__}", position
            )
        return value
    if col.kind == "int":
        try:
            return checks.integer(col.name, value)
        except QueryValidationError:
            raise QueryValidationError(
                col.name, f"expects an integer, not {type(value).__name__}", position
            ) from None
    if col.kind == "bool":
        if not isinstance(value, bool):
            raise QueryValidationError(
                col.name, f"expects True or False, not {type(value).__name__}", position
            )
        return value
    try:
        return dates.parse_instant(value, wallclock=col.kind == "wallclock")
    except dates.BoundError as exc:
        raise QueryValidationError(col.name, str(exc), position) from None


def _check_text(col: schema.Column, value: Any, position: int | None) -> None:
    """Text no row can hold: empty, or (code strings) outside the DICOM CS character set."""
    if col.kind != "string":
        return
    if value == "":
        raise QueryValidationError(
            col.name, "the value is empty (an unset variable?); use is_null() for missing", position
        )
    if col.name in CODE_STRINGS and not _CODE_STRING.fullmatch(value):
        raise QueryValidationError(
            col.name,
            "is a DICOM code string: uppercase letters, digits, space and underscore, at most 16 "
            "characters, no surrounding spaces, one code per value (pass a list for several); "
            "this value can never match. To ignore case, use matches(column, pattern, "
            "case=False) in Python (case=False) or --ignore-case in the CLI",
            position,
        )


def _check_searchable(col: schema.Column, value: Any, position: int | None) -> None:
    """Values the API would reject are rejected here, before any request."""
    if col.max_length is not None and len(value) > col.max_length:
        raise QueryValidationError(
            col.name, f"longer than the API's limit of {col.max_length} characters", position
        )
    if col.uid and not _UID.fullmatch(value):
        raise QueryValidationError(
            col.name, "must be a DICOM UID: digits separated by single dots", position
        )
