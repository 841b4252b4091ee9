"""``sql()``: Polars SQL over a ``scan_image_sets`` frame, its errors typed."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import polars as pl

from healthimaging_df._polars.source import Source, scan_image_sets
from healthimaging_df.core.logs import engine_error_text
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.options import ScanOptions, keywords

if TYPE_CHECKING:
    from typing_extensions import Unpack

_SHOWN_ERRORS = ("SQLSyntaxError", "SQLInterfaceError", "ColumnNotFoundError")
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"\\]|\\.)*\"")


class PolarsSQLError(QueryValidationError):
    """Polars could not run a :func:`sql` query.

    A syntax, interface or column error is shown (its first line, quoted text masked as
    ``'…'``); any other names only Polars' error class, since its message can quote values.
    Polars' whole message is kept in ``engine_message``.
    """

    def __init__(self, kind: str, engine_message: str) -> None:
        text = engine_error_text("Polars SQL/Polars", kind, engine_message, _SHOWN_ERRORS, _QUOTED)
        super().__init__("query", text)
        self.kind = kind
        self.engine_message = engine_message


@keywords(ScanOptions, scan_image_sets)
def sql_frame(query: str, *, datastore_id: str, **options: Unpack[ScanOptions]) -> pl.LazyFrame:
    """:func:`sql`'s lazy frame: Polars SQL over ``image_sets`` (a :func:`scan_image_sets`)."""
    if not isinstance(query, str) or not query.strip():
        raise QueryValidationError("query", "must be a non-empty SQL text")
    scan = scan_image_sets(datastore_id, **options)
    context = pl.SQLContext(frames={"image_sets": scan})
    frame: pl.LazyFrame = _sql_call(lambda: context.execute(query, eager=False))
    frame._ahi_source = scan._ahi_source  # type: ignore[attr-defined]
    return frame


@keywords(ScanOptions, scan_image_sets)
def sql(query: str, *, datastore_id: str, **options: Unpack[ScanOptions]) -> pl.DataFrame:
    """Run Polars SQL on a live datastore: ``FROM image_sets``, its WHERE reaching the planner.

    ``ahi.sql("SELECT StudyInstanceUID, count(*) AS n FROM image_sets WHERE PatientID = 'P1'
    GROUP BY 1", datastore_id=ds, client=c)``: the WHERE becomes the scan's predicate (pushed as
    :func:`scan_image_sets` pushes it), then Polars groups, aggregates, orders. Study and patient
    rollups are GROUP BY ``StudyInstanceUID`` / ``PatientID``. A query Polars cannot run raises
    :class:`PolarsSQLError`; the service's errors are the library's typed ones.
    """
    frame = sql_frame(query, datastore_id=datastore_id, **options)
    return collect_sql(frame)


def collect_sql(frame: pl.LazyFrame) -> pl.DataFrame:
    """Collect a :func:`sql_frame`; a Polars error becomes :class:`PolarsSQLError`."""
    source = getattr(frame, "_ahi_source", None)
    result = _sql_call(frame.collect, source)
    assert isinstance(result, pl.DataFrame)
    return result


def _sql_call(call: Callable[[], Any], source: Source | None = None) -> Any:
    """*call*'s result; the scan's own typed error if it failed, else a :class:`PolarsSQLError`."""
    if source is not None:
        source.failure = None
    try:
        return call()
    except pl.exceptions.PolarsError as exc:
        if source is not None and source.failure is not None:  # Polars < 2 wrapped our error
            raise source.failure from None
        raise PolarsSQLError(type(exc).__name__, str(exc)) from None
