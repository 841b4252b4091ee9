"""How rows lie in a table's files: ``createdAt`` order, derived partitions, and what a merge rewrites.

Every table format keeps a snapshot's rows in :data:`FILE_ORDER` within each partition, in files of
a target size. Changes in HealthImaging concentrate on recently imported image sets, so in this
order they sit in the last files of each partition, and a merge that rewrites only the files
holding touched rows (:func:`cover`) writes little. The spans :func:`cover` returns are the
``createdAt`` ranges (per partition) that a merge replaces: every row in them is read, changed
and written again, sorted, in files of the target size; nothing outside them is touched.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from healthimaging_df.core.derived import study_year
from healthimaging_df.errors import SnapshotError

# A snapshot's rows by createdAt (ties by imageSetId), whatever the query's order
FILE_ORDER = ("createdAt", True)
ORDER_COLUMN = FILE_ORDER[0]
# Columns a snapshot can be partitioned by that the frame need not hold (computed when written)
DERIVED_COLUMNS: dict[str, str] = {
    "StudyYear": "year of StudyDate, partial dates included (core/derived.py: study_year)"
}
# data files are closed at this size (about 1,500 rows): small enough that a merge rewrites a
# small part of a large table, large enough for scans
DEFAULT_TARGET_FILE_SIZE = 128 * 1024
_MICROSECOND = timedelta(microseconds=1)


def file_order(table: pa.Table) -> pa.Table:
    """Rows in :data:`FILE_ORDER` (then imageSetId): a merge then rewrites few files."""
    keys = [(c, "ascending") for c in (ORDER_COLUMN, "imageSetId") if c in table.column_names]
    return table.sort_by(keys) if keys else table


def derive_columns(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """*table* with the derived columns *names* appended.

    ``StudyYear`` is :func:`healthimaging_df.core.derived.study_year`: the year of StudyDate,
    partial dates included, the same value ``where(StudyYear=...)`` filters on.
    """
    for name in names:
        if name in table.column_names:
            continue
        if name == "StudyYear" and "StudyDate" in table.column_names:
            dates = pd.DataFrame({"StudyDate": table.column("StudyDate").to_pandas()})
            years = study_year(dates)
            table = table.append_column(
                "StudyYear", pa.array(years.astype(object).where(years.notna(), None), pa.int64())
            )
        else:
            raise SnapshotError(f"partition column {name!r} is not in the frame")
    return table


# -- what a merge rewrites -------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpan:
    """A data file's place: its partition values and its ``createdAt`` range [low, high).

    *high* is exclusive; a format whose statistics are truncated (Delta keeps milliseconds)
    widens it to cover every value the file can hold.
    """

    path: str
    partition: tuple[Any, ...]
    low: datetime
    high: datetime


@dataclass(frozen=True)
class Span:
    """Rows of one partition with ``low <= createdAt < high``: what a merge replaces."""

    partition: tuple[Any, ...]
    low: datetime
    high: datetime


def cover(
    files: Sequence[FileSpan],
    touched: Iterable[str],
    points: Iterable[tuple[tuple[Any, ...], datetime]],
) -> list[Span]:
    """The spans a merge replaces: the touched files' ranges plus the new rows' places.

    *touched* are the paths of files holding a row that changes or goes; *points* the
    (partition, createdAt) of every row written anew. Spans of one partition are joined when no
    untouched file lies between them, so a change spread over every file is one span and the
    predicate stays short.
    """
    touched = set(touched)
    by_part: dict[tuple[Any, ...], list[tuple[datetime, datetime]]] = {}
    others: dict[tuple[Any, ...], list[tuple[datetime, datetime]]] = {}
    for item in files:
        group = by_part if item.path in touched else others
        group.setdefault(item.partition, []).append((item.low, item.high))
    for partition, moment in points:
        if not any(low <= moment < high for low, high in by_part.get(partition, ())):
            by_part.setdefault(partition, []).append((moment, moment + _MICROSECOND))
    spans: list[Span] = []
    for partition, ranges in by_part.items():
        blocked = sorted(others.get(partition, ()))
        lows = [low for low, _ in blocked]
        ranges.sort()
        current_low, current_high = ranges[0]
        for low, high in ranges[1:]:
            if low <= current_high or not _between(blocked, lows, current_high, low):
                current_high = max(current_high, high)
                continue
            spans.append(Span(partition, current_low, current_high))
            current_low, current_high = low, high
        spans.append(Span(partition, current_low, current_high))
    return spans


def _between(
    blocked: list[tuple[datetime, datetime]], lows: list[datetime], start: datetime, end: datetime
) -> bool:
    """Whether an untouched file's range meets the gap [start, end)."""
    # files starting before the gap's end; any of them ending after its start meets it
    stop = bisect.bisect_left(lows, end)
    return any(high > start for _, high in blocked[:stop])


def span_filter(
    spans: Sequence[Span], partition_by: Sequence[str], order: str | None = ORDER_COLUMN
) -> pc.Expression:
    """The spans as a ``pyarrow.compute`` expression (the rows a merge reads and replaces).

    Without an *order* column (a table of other rows) a span is its whole partition.
    """
    terms = []
    for span in spans:
        term = pc.scalar(True)
        if order is not None:
            term = (pc.field(order) >= pa.scalar(span.low, _UTC)) & (
                pc.field(order) < pa.scalar(span.high, _UTC)
            )
        for name, value in zip(partition_by, span.partition, strict=True):
            term &= pc.field(name).is_null() if value is None else pc.field(name) == value
        terms.append(term)
    if not terms:
        return pc.scalar(False)
    return _balanced_or(terms)


def _balanced_or(terms: list[pc.Expression]) -> pc.Expression:
    if len(terms) == 1:
        return terms[0]
    middle = len(terms) // 2
    return _balanced_or(terms[:middle]) | _balanced_or(terms[middle:])


_UTC = pa.timestamp("us", tz="UTC")
