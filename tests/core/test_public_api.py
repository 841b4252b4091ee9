"""The package root: the names users need, nothing leaked; typed option groups that cannot drift."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any, get_type_hints

import pytest

import healthimaging_df
from healthimaging_df import options, snapshot
from healthimaging_df.query import Query


def test_dir_lists_the_public_names_only() -> None:
    names = dir(healthimaging_df)
    assert names == sorted(healthimaging_df.__all__)
    assert not [n for n in names if n.startswith("_") and n != "__version__"]
    for leaked in ("importlib", "sys", "TYPE_CHECKING", "Any", "annotations", "accessor", "aws"):
        assert leaked not in names


@pytest.mark.parametrize("name", healthimaging_df.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(healthimaging_df, name) is not None


def test_star_import_binds_the_public_names_only() -> None:
    code = (
        "from healthimaging_df import *\nprint(sorted(n for n in dir() if not n.startswith('__')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = eval(done.stdout)
    assert got == sorted(n for n in healthimaging_df.__all__ if n != "__version__")


def _without_dry_run(frame: Any, **options: Any) -> Any:  # pragma: no cover (a signature)
    raise NotImplementedError


def _keywords(function: Callable[..., Any]) -> set[str]:
    if function is _without_dry_run:
        from healthimaging_df.metadata import fetch_metadata

        return _keywords(fetch_metadata) - {"dry_run"}
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize(
    ("group", "function"),
    [
        (options.ExportOptions, snapshot.export_query),
        (options.WriteOptions, snapshot.write_snapshot),
        (options.MetadataOptions, _without_dry_run),
    ],
)
def test_option_groups_are_the_keywords_of_the_function_that_takes_them(
    group: type, function: Callable[..., Any]
) -> None:
    keys: frozenset[str] = group.__optional_keys__ | group.__required_keys__  # type: ignore[attr-defined]
    assert set(keys) == _keywords(function)


def test_run_options_are_the_run_methods_keywords() -> None:
    run = set(inspect.signature(Query.to_dataframe).parameters) - {"self", "dtype_backend"}
    assert set(get_type_hints(options.RunOptions, localns=_typing_names())) == run


def _typing_names() -> dict[str, Any]:
    from healthimaging_df.core.progress import Progress
    from healthimaging_df.store.redact import RedactionPolicy

    return {"Progress": Progress, "RedactionPolicy": RedactionPolicy}


def test_the_methods_are_typed_with_the_groups() -> None:
    from healthimaging_df.accessor import AHIAccessor

    assert "Unpack[ExportOptions]" in str(inspect.signature(Query.to_parquet))
    assert "Unpack[WriteOptions]" in str(inspect.signature(AHIAccessor.to_parquet))
    assert "Unpack[MetadataOptions]" in str(inspect.signature(AHIAccessor.fetch_metadata))
