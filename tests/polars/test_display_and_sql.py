"""Notebook display (no values, ever) and SQL on a live datastore (its WHERE reaches the planner)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

import healthimaging_df as ahi
from healthimaging_df import Query, RefreshReport
from healthimaging_df.cli.app import main
from healthimaging_df.local import LocalService
from healthimaging_df.polars import PolarsSQLError
from healthimaging_df.snapshot import snapshot_history, write_snapshot

from .conftest import FreshStatistics

SECRET = "SECRET-PATIENT-4711"


def test_query_and_plan_display_no_values() -> None:
    query = (
        Query("0" * 32)
        .where(PatientID=[SECRET, "OTHER-PATIENT-9"], Modality="CT")
        .between("StudyDateTime", "1961-03-04", "1961-05-06")
        .limit(5)
    )
    for text in (
        repr(query),
        query._repr_html_(),
        query.compile().summary(),
        repr(query.compile()),
    ):
        assert SECRET not in text
        assert "1961" not in text
    html = query._repr_html_()
    assert "PatientID in &lt;2 values&gt;" in html
    assert "access path" in html
    union = Query("0" * 32).where(PatientID=SECRET) | Query("0" * 32).where(AccessionNumber="A1")
    assert SECRET not in union._repr_html_()
    assert "query 2 of the union" in union._repr_html_()


def test_plan_weighs_paths_in_requests_and_seconds_at_the_rate() -> None:
    ids = [f"P{i}" for i in range(30)]
    plan = Query("0" * 32).where(PatientID=ids).compile()
    text = plan.summary(max_tps=10)
    assert "fan-out (30 chains): about 30 requests, 3.0 s at 10 TPS (chosen)" in text
    assert "scan, IN list applied on the client: size of the datastore unknown" in text
    assert "no client-side rate limit" in plan.summary(max_tps=None)
    assert plan._repr_html_().startswith("<table")


def test_refresh_report_display() -> None:
    report = RefreshReport(
        added=("a" * 32, "b" * 32),
        updated=(),
        removed=("c" * 32,),
        fetched=7,
        since=datetime(2024, 1, 1, tzinfo=timezone.utc),
        rows=12,
        watermark=None,
    )
    assert repr(report).startswith("RefreshReport(added=2, updated=0, removed=1, fetched=7")
    html = report._repr_html_()
    assert "2 image set(s)" in html
    assert "a" * 32 not in html


def test_snapshot_history_shows_no_query_values(service: LocalService, tmp_path: Path) -> None:
    patient = "SUBJECT00303"
    frame = (
        Query(service.datastore_id)
        .where(PatientID=patient)
        .to_dataframe(client=service.client(), progress=False)
    )
    write_snapshot(frame, tmp_path / "snap")
    history = snapshot_history(tmp_path / "snap")
    assert patient in str(history["provenance"].iloc[0]["query"])  # the data is still there
    html = history._repr_html_() or ""
    for text in (repr(history), html, repr(history[["version", "provenance"]])):
        assert patient not in text
    assert "query withheld (PHI)" in html


def test_sql_rollup_reaches_the_planner(service: LocalService) -> None:
    everything = Query(service.datastore_id).to_polars(client=service.client(), progress=False)
    patient = everything["PatientID"].drop_nulls().sort()[5]
    text = (
        "SELECT StudyInstanceUID, count(*) AS image_sets, min(StudyDateTime) AS first "
        f"FROM image_sets WHERE PatientID = '{patient}' AND isPrimary GROUP BY StudyInstanceUID"
    )
    with FreshStatistics():
        service.reset_stats()
        got = ahi.sql(text, datastore_id=service.datastore_id, client=service.client())
        sent = service.stats.by_operation
    with FreshStatistics():
        service.reset_stats()
        Query(service.datastore_id).where(PatientID=patient, isPrimary=True).to_dataframe(
            client=service.client(), progress=False
        )
        assert sent == service.stats.by_operation == {"SearchImageSets": 1}
    want = (
        everything.filter((pl.col("PatientID") == patient) & pl.col("isPrimary"))
        .group_by("StudyInstanceUID")
        .agg(
            pl.len().cast(got["image_sets"].dtype).alias("image_sets"),
            pl.col("StudyDateTime").min().alias("first"),
        )
    )
    assert got.sort("StudyInstanceUID").equals(want.sort("StudyInstanceUID"))


def test_sql_errors_mask_values(service: LocalService) -> None:
    with pytest.raises(PolarsSQLError) as caught:
        ahi.sql(
            f"SELECT * FROM image_sets WHERE PatientID = '{SECRET}' AND AND",
            datastore_id=service.datastore_id,
            client=service.client(),
        )
    assert SECRET not in str(caught.value)
    with pytest.raises(PolarsSQLError, match=r"ColumnNotFoundError|SQLInterfaceError"):
        ahi.sql(
            "SELECT NoSuchColumn FROM image_sets",
            datastore_id=service.datastore_id,
            client=service.client(),
        )
    assert service.stats.requests == 0


def test_cli_sql_verb(
    service: LocalService, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in service.env().items():
        monkeypatch.setenv(key, value)
    code = main(
        [
            "sql",
            "-q",
            "--datastore-id",
            service.datastore_id,
            "SELECT Modality, count(*) AS n FROM image_sets WHERE isPrimary GROUP BY Modality "
            "ORDER BY Modality",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Modality" in out
    assert "CT" in out
    code = main(
        [
            "sql",
            "--datastore-id",
            service.datastore_id,
            "--explain",
            f"SELECT * FROM image_sets WHERE PatientID = '{SECRET}'",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "pushed into the query" in out
    assert SECRET not in out
