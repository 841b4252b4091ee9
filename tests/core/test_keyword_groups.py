"""Keyword groups written once (options.py) still read as spelled-out signatures."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from healthimaging_df import options, refresh, snapshot, sync


def _keyword_only(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _keys(group: type) -> set[str]:
    return set(group.__annotations__)


# each group and the public functions that take it
_TAKEN_BY: dict[type, tuple[Callable[..., Any], ...]] = {
    options.ReadLocation: (
        snapshot.read_snapshot,
        snapshot.scan_snapshot,
        snapshot.snapshot_provenance,
        snapshot.snapshot_history,
        snapshot.snapshot_info,
        snapshot.vacuum_snapshot,
        snapshot.optimize_snapshot,
    ),
    options.S3Location: (snapshot.downgrade_snapshot,),
    options.WriteLocation: (snapshot.write_snapshot, snapshot.export_query),
    refresh.RefreshOptions: (refresh.refresh_frame,),
    refresh.RefreshSnapshotOptions: (refresh.refresh_snapshot,),
    refresh.SyncOptions: (sync.sync_snapshot,),
}


@pytest.mark.parametrize(
    ("function", "group"), [(f, group) for group, taken in _TAKEN_BY.items() for f in taken]
)
def test_a_group_is_spelled_out_in_the_signature_help_shows(
    function: Callable[..., Any], group: type
) -> None:
    shown = _keyword_only(function)
    assert _keys(group) <= set(shown)
    assert "**" not in str(inspect.signature(function))
    for name in _keys(group) & set(_keyword_only(snapshot.locate)):
        assert shown[name].default is None  # locate's default, not a copy of it
    assert function.__doc__  # the function's own, through functools.wraps


def test_the_defaults_are_the_receivers() -> None:
    shown = _keyword_only(sync.sync_snapshot)
    assert shown["margin"].default == refresh.DEFAULT_MARGIN
    assert shown["progress"].default is True  # sync's own, not refresh's
    assert _keyword_only(refresh.refresh_frame)["max_tps"].default == 25.0


def test_an_unknown_keyword_is_refused_before_anything_is_read(tmp_path: Any) -> None:
    with pytest.raises(TypeError, match=r"snapshot_history\(\).*'regoin'"):
        snapshot.snapshot_history(tmp_path / "t", regoin="us-east-1")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="kms_key_id"):  # a writer's keyword, not a reader's
        snapshot.read_snapshot(tmp_path / "t", kms_key_id="k")  # type: ignore[call-overload]


def test_a_group_key_no_receiver_takes_fails_at_import() -> None:
    def receiver(*, region: str | None = None) -> None: ...

    with pytest.raises(TypeError, match="no receiver takes 'boto3_session'"):

        @options.keywords(options.S3Location, receiver)
        def function(**kwargs: Any) -> None: ...


def test_the_body_gets_every_key_with_its_default() -> None:
    def receiver(
        *, region: str | None = "here", boto3_session: Any = None, s3_endpoint_url: Any = 1
    ) -> None: ...

    seen: dict[str, Any] = {}

    @options.keywords(options.S3Location, receiver)
    def function(path: str, **kwargs: Any) -> None:
        seen.update(kwargs, path=path)

    function("p", s3_endpoint_url=2)
    assert seen == {"path": "p", "region": "here", "boto3_session": None, "s3_endpoint_url": 2}


def test_polars_sql_takes_the_scans_keywords() -> None:
    pytest.importorskip("polars")
    from healthimaging_df import polars as ahi_polars

    scan = _keyword_only(ahi_polars.scan_image_sets)
    for function in (ahi_polars.sql, ahi_polars.sql_frame):
        shown = _keyword_only(function)
        assert {k: v.default for k, v in scan.items()} == {
            k: v.default for k, v in shown.items() if k != "datastore_id"
        }
