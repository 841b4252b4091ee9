"""Fixtures for the Polars source: predicates captured through a real ``register_io_source``.

Every predicate a test translates is the one the installed Polars version hands a source (its
own JSON), never a hand-written fixture: the version matrix (``make polars-matrix``) runs these
tests against each supported Polars.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import polars as pl
import pytest
from polars.io.plugins import register_io_source

from healthimaging_df.local import LocalService
from healthimaging_df.local.server import DICOMWEB_ENDPOINT_ENV
from healthimaging_df.polars import polars_schema


class Received:
    """What Polars handed a source: ``(with_columns, predicate, n_rows)`` per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str] | None, pl.Expr | None, int | None]] = []

    @property
    def predicate(self) -> pl.Expr | None:
        return self.calls[0][1]

    @property
    def n_rows(self) -> int | None:
        return self.calls[0][2]


def capture(build: Callable[[pl.LazyFrame], pl.LazyFrame], engine: str = "auto") -> Received:
    """Collect *build* over an empty source of the schema; return what the source received."""
    received = Received()

    def source(
        with_columns: list[str] | None, predicate: Any, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        received.calls.append((with_columns, predicate, n_rows))
        empty = pl.DataFrame(schema=polars_schema())
        yield empty.select(with_columns) if with_columns is not None else empty

    lf = register_io_source(source, schema=polars_schema())
    build(lf).collect(**({} if engine == "auto" else {"engine": engine}))
    return received


class FreshStatistics:
    """A new statistics cache folder per run: two runs of one query each probe alike."""

    def __init__(self) -> None:
        self._saved = os.environ.get("HEALTHIMAGING_DF_CACHE")
        self._dirs: list[tempfile.TemporaryDirectory[str]] = []

    def __enter__(self) -> FreshStatistics:
        folder = tempfile.TemporaryDirectory(prefix="ahi-stats-")
        self._dirs.append(folder)
        os.environ["HEALTHIMAGING_DF_CACHE"] = folder.name
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            os.environ.pop("HEALTHIMAGING_DF_CACHE", None)
        else:
            os.environ["HEALTHIMAGING_DF_CACHE"] = self._saved
        for folder in self._dirs:
            folder.cleanup()


@pytest.fixture(scope="session")
def polars_service() -> Iterator[LocalService]:
    """A local service of 1,200 image sets (seed 11) for the Polars tests."""
    with LocalService.seeded(image_sets=1200, seed=11) as service:
        yield service


@pytest.fixture
def service(polars_service: LocalService, monkeypatch: pytest.MonkeyPatch) -> LocalService:
    """The service, its DICOMweb address named in the environment for this test only."""
    monkeypatch.setenv(DICOMWEB_ENDPOINT_ENV, polars_service.dicomweb_endpoint_url)
    polars_service.reset_faults()
    polars_service.reset_stats()
    return polars_service
