"""Incremental refresh: after the datastore changes, a refreshed snapshot equals a fresh export."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.errors import SnapshotError
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.refresh import refresh_frame, refresh_snapshot
from healthimaging_df.snapshot import read_snapshot, snapshot_history
from healthimaging_df.store.redact import RedactionPolicy, apply_redaction

FAST = {"progress": False, "max_tps": None}
KEY = b"refresh-test-key-0123456789-abcdefghij"


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = {}
    return out


def _mutate(service: LocalService) -> dict[str, set[str]]:
    """New image sets, new versions, isPrimary flips both ways, a tag change out of the cohort."""
    ds = service.datastore_id
    backend = service.backend
    records = backend.image_sets(ds)
    primary = [
        r for r in records if r["isPrimary"] and r["DICOMTags"].get("DICOMSeriesModality") != "SR"
    ]
    secondary = [
        r
        for r in records
        if not r["isPrimary"] and r["DICOMTags"].get("DICOMSeriesModality") != "SR"
    ]
    flipped_out = primary[0]["imageSetId"]
    moved_out = primary[1]["imageSetId"]
    retagged = primary[2]["imageSetId"]
    flipped_in = secondary[0]["imageSetId"]
    backend.update_image_set(ds, flipped_out, is_primary=False)
    backend.update_image_set(ds, moved_out, tags={"DICOMSeriesModality": "SR"})
    backend.update_image_set(ds, retagged, tags={"DICOMStudyDescription": "Révision ✓"})
    backend.update_image_set(ds, retagged, tags={"DICOMPatientName": None})
    backend.update_image_set(ds, flipped_in, is_primary=True)
    now = datetime.now(timezone.utc)
    new = generate_image_sets(25, seed=4242)
    for record in new:
        record.update(createdAt=now, updatedAt=now, lastAccessedAt=now, version=1)
    backend.add_image_sets(ds, new)
    new_in = {
        r["imageSetId"]
        for r in new
        if r["isPrimary"] and r["DICOMTags"].get("DICOMSeriesModality") != "SR"
    }
    return {
        "added": new_in | {flipped_in},
        "removed": {flipped_out, moved_out},
        "updated": {retagged},
    }


@pytest.mark.parametrize("partition_cols", [None, ["Modality"]])
def test_refreshed_snapshot_equals_a_fresh_export(
    ahi_service_factory: Callable[..., LocalService],
    tmp_path: Path,
    partition_cols: list[str] | None,
) -> None:
    service = ahi_service_factory(image_sets=600, seed=5)
    client = service.client()
    query = Query(service.datastore_id).where(isPrimary=True).where_not(Modality="SR")
    path = tmp_path / ("snap" if partition_cols else "snap.parquet")
    export = query.to_delta if partition_cols else query.to_parquet
    export(str(path), client=client, partition_cols=partition_cols, **FAST)

    quiet = refresh_snapshot(path, client=client, **FAST)
    assert not quiet.changed

    expected = _mutate(service)
    service.reset_stats()
    report = refresh_snapshot(path, client=client, **FAST)
    assert service.stats.requests == 1  # one page of recent changes, not a scan
    assert set(report.added) == expected["added"]
    assert set(report.removed) == expected["removed"]
    assert set(report.updated) == expected["updated"]
    assert report.fetched == 4 + 25  # distinct image sets changed

    got = read_snapshot(path)
    fresh = query.to_dataframe(client=client, **FAST)
    pd.testing.assert_frame_equal(_plain(got), _plain(fresh))
    prov = got.attrs["healthimaging_df"]
    assert prov["row_count"] == len(fresh) == report.rows
    assert prov["watermark"] == fresh["updatedAt"].max().isoformat()
    if partition_cols:  # a Delta table: one MERGE commit on top of the export and a no-op
        history = snapshot_history(path)
        assert history["version"].tolist() == [1, 0]  # the quiet refresh committed nothing
        latest = history.iloc[0]
        assert latest["operation"] == "MERGE"
        assert (latest["rows_added"], latest["rows_updated"], latest["rows_removed"]) == (
            len(report.added),
            len(report.updated),
            len(report.removed),
        )
        assert latest["provenance"]["row_count"] == report.rows
        before = read_snapshot(path, version=0)
        assert len(before) == report.rows - len(report.added) + len(report.removed)


def test_refresh_frame_in_memory(ahi_service_factory: Callable[..., LocalService]) -> None:
    service = ahi_service_factory(image_sets=400, seed=8)
    client = service.client()
    query = Query(service.datastore_id).where(isPrimary=True).where_not(Modality="SR")
    before = query.to_dataframe(client=client, dtype_backend="pyarrow", **FAST)
    expected = _mutate(service)
    after, report = refresh_frame(before, client=client, **FAST)
    fresh = query.to_dataframe(client=client, dtype_backend="pyarrow", **FAST)
    pd.testing.assert_frame_equal(_plain(after), _plain(fresh))
    assert set(report.added) == expected["added"]
    assert "3 removed" not in str(report)
    assert "2 removed" in str(report)
    assert len(before) == len(fresh) - len(expected["added"]) + len(expected["removed"])


def test_redacted_snapshot_refresh_needs_query_and_key(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=300, seed=9)
    client = service.client()
    policy = RedactionPolicy(key=KEY)
    query = Query(service.datastore_id).where(isPrimary=True).where_not(Modality="SR")
    path = tmp_path / "red.parquet"
    query.to_parquet(str(path), client=client, redact=policy, **FAST)
    _mutate(service)

    with pytest.raises(SnapshotError, match="original query"):
        refresh_snapshot(path, client=client, **FAST)
    with pytest.raises(SnapshotError, match="different key"):
        refresh_snapshot(
            path,
            client=client,
            query=query,
            redact=RedactionPolicy(key=b"another-key-of-32-bytes-or-more-0123"),
            **FAST,
        )
    report = refresh_snapshot(path, client=client, query=query, redact=policy, **FAST)
    assert report.changed

    got = read_snapshot(path)
    fresh = apply_redaction(query.to_dataframe(client=client, **FAST), policy)
    pd.testing.assert_frame_equal(_plain(got), _plain(fresh))
    assert '"redacted": true' in got.attrs["healthimaging_df"]["query"]


def test_refresh_refuses_frames_without_provenance(ahi_client: Any) -> None:
    frame = pd.DataFrame({"imageSetId": pd.array(["a"], dtype="string")})
    with pytest.raises(SnapshotError):
        refresh_frame(frame, client=ahi_client, **FAST)


def test_latest_versions_orders_by_version_then_updated_at_nulls_lowest() -> None:
    import pyarrow as pa

    from healthimaging_df.engine.frame import latest_rows as _latest_versions
    from healthimaging_df.engine.frame import rank_of as _rank

    def at(hour: int) -> datetime:
        return datetime(2025, 1, 1, hour, tzinfo=timezone.utc)

    rows = [
        ("a", 1, at(5), "a-v1"),
        ("a", 2, at(1), "a-v2"),  # higher version wins over a later update
        ("a", None, at(9), "a-null"),  # a null version is lowest
        ("b", 3, at(1), "b-early"),
        ("b", 3, at(2), "b-late"),  # same version: latest updatedAt wins
        ("b", 3, None, "b-null-time"),  # a null updatedAt is lowest
        ("c", None, None, "c-only"),  # nothing better: kept
        ("d", None, at(1), "d-null-early"),
        ("d", None, at(3), "d-null-late"),  # both versions null: latest updatedAt
    ]
    for order in (rows, rows[::-1]):
        table = pa.table(
            {
                "imageSetId": [r[0] for r in order],
                "version": pa.array([r[1] for r in order], pa.int64()),
                "updatedAt": pa.array([r[2] for r in order], pa.timestamp("us", "UTC")),
                "tag": [r[3] for r in order],
            }
        )
        kept = _latest_versions(table)
        assert sorted(kept.column("tag").to_pylist()) == [
            "a-v2",
            "b-late",
            "c-only",
            "d-null-late",
        ]
    # the refresh upsert compares a fetched state with the held one in the same order
    assert _rank(2, at(1)) > _rank(1, at(5)) > _rank(None, at(9))
    assert _rank(3, at(2)) > _rank(3, at(1)) > _rank(3, None)
    assert _rank(3, at(2)) >= _rank(3, at(2))
