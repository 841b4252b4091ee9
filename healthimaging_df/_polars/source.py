"""The Polars IO source behind ``scan_image_sets``, and ``explain``."""

from __future__ import annotations

import inspect
import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import polars as pl
from polars.io.plugins import register_io_source

from healthimaging_df import engine, schema
from healthimaging_df._polars.translate import Translation, translate
from healthimaging_df.aws.quotas import SEARCH_TPS
from healthimaging_df.core.progress import Progress
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.query import Query, run_batches

log = logging.getLogger("healthimaging_df.polars")  # the public module's name, as before the split

DEFAULT_BATCH_ROWS = 50_000  # rows a batch holds when Polars gives no hint


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


_dry = threading.local()  # set while explain() copies a frame: the copies send nothing


class Source:
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


def _register(source: Source) -> pl.LazyFrame:
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
    source = Source(datastore_id, client, boto3_session, progress, max_concurrency, max_tps)
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
    copies: list[Source] = []
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
