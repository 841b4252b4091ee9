"""fetch_metadata against the local service: values, keys, tiers, dry runs, pacing and failures."""

from __future__ import annotations

import gzip
import json
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query, aws
from healthimaging_df.errors import (
    HealthImagingDFError,
    MetadataFetchError,
    QueryValidationError,
    ThrottledError,
)
from healthimaging_df.local import LocalService
from healthimaging_df.metadata import ArchiveAccessWarning, MetadataPlan

ARCHIVED = "ARCHIVE_INSTANT_ACCESS"


def _document(client: Any, datastore_id: Any, image_set_id: str, version: int) -> dict[str, Any]:
    """The metadata document as a user would read it with boto3 by hand."""
    response = client.get_image_set_metadata(
        datastoreId=datastore_id, imageSetId=image_set_id, versionId=str(version)
    )
    return json.loads(gzip.decompress(response["imageSetMetadataBlob"].read()))


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _frequent(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["storageTier"] != ARCHIVED]


def test_series_level_matches_the_documents(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    subset = _frequent(metadata_frame).head(25)
    client = metadata_service.client()
    got = subset.ahi.fetch_metadata(client=client, progress=False)
    assert list(got.columns[:3]) == ["imageSetId", "version", "SeriesInstanceUID"]
    assert got["imageSetId"].tolist() == subset["imageSetId"].tolist()  # one series each, in order
    # Everything but the documents' series attributes and shared instance attributes is absent.
    for row, (image_set_id, version) in zip(
        got.astype(object).to_dict("records"),
        zip(subset["imageSetId"], subset["version"], strict=True),
        strict=True,
    ):
        document = _document(client, metadata_service.datastore_id, image_set_id, int(version))
        ((series_uid, series),) = document["Study"]["Series"].items()
        assert row["SeriesInstanceUID"] == series_uid
        assert row["version"] == version
        expected = dict(series["DICOM"])
        instances = [i["DICOM"] for i in series["Instances"].values()]
        for keyword in instances[0]:
            values = [json.dumps(i.get(keyword), sort_keys=True) for i in instances]
            if keyword not in ("SOPInstanceUID", "InstanceNumber") and len(set(values)) == 1:
                expected[keyword] = instances[0][keyword]
        expected["NumberOfSeriesRelatedInstances"] = len(instances)
        present = {k: _plain(v) for k, v in row.items() if _plain(v) is not None}
        present.pop("imageSetId")
        present.pop("version")
        assert present == expected
    assert {"Manufacturer", "SeriesDescription", "SOPClassUID"} <= set(got.columns)
    assert str(got["Rows"].dtype) == "Int64"
    assert str(got["Manufacturer"].dtype) == "string"
    # Ready to merge back onto the image-set frame.
    merged = subset.merge(got, on=["imageSetId", "version", "SeriesInstanceUID"], how="left")
    assert merged["Manufacturer"].notna().all()


def test_instance_level_has_one_row_per_instance(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    subset = _frequent(metadata_frame).head(12)
    client = metadata_service.client()
    got = subset.ahi.fetch_metadata(client=client, level="instance", progress=False)
    assert list(got.columns[:4]) == ["imageSetId", "version", "SeriesInstanceUID", "SOPInstanceUID"]
    expected = []
    for image_set_id, version in zip(subset["imageSetId"], subset["version"], strict=True):
        document = _document(client, metadata_service.datastore_id, image_set_id, int(version))
        for series in document["Study"]["Series"].values():
            for sop_uid, instance in series["Instances"].items():
                expected.append((image_set_id, sop_uid, instance["DICOM"]["InstanceNumber"]))
    assert list(
        zip(got["imageSetId"], got["SOPInstanceUID"], got["InstanceNumber"], strict=True)
    ) == (expected)
    assert got[["imageSetId", "SOPInstanceUID"]].duplicated().sum() == 0
    ct = got[got["Modality"] == "CT"]
    if len(ct):
        assert ct["ImagePositionPatient"].map(len).eq(3).all()


def test_archived_image_sets_are_refused_by_default_and_read_only_on_opt_in(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    """The docs' rule: never move an archived image set without explicit opt-in."""
    from healthimaging_df.errors import ArchiveAccessError

    archived = metadata_frame[metadata_frame["storageTier"] == ARCHIVED].head(10)
    frequent = _frequent(metadata_frame).head(5)
    subset = pd.concat([archived, frequent])
    assert len(archived) == 10
    before = _tiers(metadata_service)
    metadata_service.reset_stats()
    with pytest.raises(ArchiveAccessError) as refused:
        subset.ahi.fetch_metadata(client=metadata_service.client(), progress=False)
    assert isinstance(refused.value, QueryValidationError)
    assert refused.value.field == "allow_archive_access"
    assert refused.value.archived == 10
    assert "10 of 15 image sets are ARCHIVE_INSTANT_ACCESS" in str(refused.value)
    assert "allow_archive_access=True" in str(refused.value)
    assert not any(i in str(refused.value) for i in subset["imageSetId"])
    assert metadata_service.stats.by_operation.get("GetImageSetMetadata", 0) == 0
    assert _tiers(metadata_service) == before  # nothing touched
    plan = subset.ahi.fetch_metadata(dry_run=True)
    assert plan.archived == 10
    assert "10 archived image set(s) would move to FREQUENT_ACCESS" in str(plan)
    assert "refuse" in str(plan)
    with pytest.warns(ArchiveAccessWarning) as caught:
        subset.ahi.fetch_metadata(
            client=metadata_service.client(), progress=False, allow_archive_access=True
        )
    assert len(caught) == 1
    assert "10 of 15 image sets are ARCHIVE_INSTANT_ACCESS" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    tiers = {
        r["imageSetId"]: r["storageTier"]
        for r in metadata_service.backend.image_sets(metadata_service.datastore_id or "")
    }
    assert {tiers[i] for i in archived["imageSetId"]} == {"FREQUENT_ACCESS"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frequent.ahi.fetch_metadata(client=metadata_service.client(), progress=False)


def test_dry_run_counts_calls_and_sends_nothing(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    metadata_service.reset_stats()
    twice = pd.concat([metadata_frame, metadata_frame.head(7)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = twice.ahi.fetch_metadata(dry_run=True, max_tps=40)
    assert isinstance(plan, MetadataPlan)
    assert plan.calls == metadata_frame["imageSetId"].nunique() == len(metadata_frame)
    assert plan.archived == int((metadata_frame["storageTier"] == ARCHIVED).sum()) > 0
    assert plan.estimated_seconds == pytest.approx(plan.calls / 40)
    assert f"{plan.calls} GetImageSetMetadata call(s)" in str(plan)
    assert metadata_service.stats.requests == 0


def test_calls_are_paced_by_max_tps_and_bounded_by_max_concurrency(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    metadata_service.set_faults(latency_ms=20)
    metadata_service.reset_stats()
    subset = _frequent(metadata_frame).head(30)
    seen: list[tuple[int, int]] = []
    started = time.perf_counter()
    got = subset.ahi.fetch_metadata(
        client=metadata_service.client(),
        max_tps=20,
        max_concurrency=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    elapsed = time.perf_counter() - started
    # A bucket of 20 lets 20 go at once, then 20 per second: 10 more need at least 0.5 s.
    assert elapsed >= 0.45
    stats = metadata_service.stats
    assert stats.by_operation.get("GetImageSetMetadata") == 30
    assert stats.peak_concurrency <= 3
    assert seen[-1] == (30, 30)
    assert [d for d, _ in seen] == list(range(1, 31))
    assert len(got) == 30


def test_failures_raise_listing_every_failed_image_set(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    subset = _frequent(metadata_frame).head(8).copy()
    missing = ["0" * 31 + "1", "0" * 31 + "2"]
    subset.loc[subset.index[:2], "imageSetId"] = missing
    subset.loc[subset.index[2], "version"] = 99  # no such version
    with pytest.raises(MetadataFetchError) as raised:
        subset.ahi.fetch_metadata(client=metadata_service.client(), progress=False)
    failures = raised.value.failures
    assert failures == {
        missing[0]: "ResourceNotFoundException",
        missing[1]: "ResourceNotFoundException",
        subset["imageSetId"].iloc[2]: "ResourceNotFoundException",
    }
    message = str(raised.value)
    assert "3 image set(s)" in message
    for phi in subset[["PatientID", "PatientName", "StudyInstanceUID"]].stack().astype(str):
        assert phi not in message


def test_failures_reported_in_a_column(
    metadata_service: LocalService,
    metadata_frame: pd.DataFrame,
    caplog: pytest.LogCaptureFixture,
) -> None:
    subset = _frequent(metadata_frame).head(6).copy()
    subset.loc[subset.index[1], "imageSetId"] = "f" * 32
    with caplog.at_level(logging.DEBUG, logger="healthimaging_df"):
        got = subset.ahi.fetch_metadata(
            client=metadata_service.client(), on_error="report", progress=False
        )
    assert "metadataError" in got.columns
    failed = got[got["metadataError"].notna()]
    assert failed["imageSetId"].tolist() == ["f" * 32]
    assert failed["metadataError"].tolist() == ["ResourceNotFoundException"]
    assert failed["SeriesInstanceUID"].isna().all()
    assert got["imageSetId"].tolist() == subset["imageSetId"].tolist()
    assert got.loc[got["metadataError"].isna(), "Manufacturer"].notna().all()
    logged = caplog.text
    assert "ResourceNotFoundException" in logged
    for phi in subset[["PatientID", "PatientName", "StudyInstanceUID"]].stack().astype(str):
        assert phi not in logged


def test_throttling_after_retries_stops_the_whole_fetch(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    metadata_service.set_faults(tps=1, burst=1)
    metadata_service.reset_stats()
    client = metadata_service.client(retries={"mode": "standard", "max_attempts": 1})
    frame = _frequent(metadata_frame)
    with pytest.raises(ThrottledError, match="GetImageSetMetadata"):
        frame.ahi.fetch_metadata(client=client, max_tps=None, max_concurrency=2, progress=False)
    assert metadata_service.stats.requests < len(frame) / 2


def test_datastore_id_comes_from_provenance_or_the_argument(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    bare = _frequent(metadata_frame).head(3).copy()
    bare.attrs = {}
    with pytest.raises(QueryValidationError, match=r"^datastore_id: ") as raised:
        bare.ahi.fetch_metadata(client=metadata_service.client(), progress=False)
    assert raised.value.field == "datastore_id"
    assert isinstance(raised.value, HealthImagingDFError)
    got = bare.ahi.fetch_metadata(
        client=metadata_service.client(),
        datastore_id=metadata_service.datastore_id,
        progress=False,
    )
    assert len(got) == 3


SECRET = "PAT-SECRET-77"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("level", "study"),
        ("level", SECRET),
        ("on_error", SECRET),
        ("max_concurrency", 0),
        ("max_concurrency", 2.5),
        ("max_concurrency", True),
        ("max_tps", 0),
        ("max_tps", -1.0),
        ("max_tps", float("nan")),
        ("max_tps", SECRET),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_options_fail_before_any_call(
    metadata_service: LocalService,
    metadata_frame: pd.DataFrame,
    option: str,
    value: Any,
    dry_run: bool,
) -> None:
    metadata_service.reset_stats()
    with pytest.raises(QueryValidationError) as raised:
        metadata_frame.ahi.fetch_metadata(
            client=metadata_service.client(), progress=False, dry_run=dry_run, **{option: value}
        )
    assert raised.value.field == option
    assert str(raised.value).startswith(f"{option}: ")
    assert SECRET not in str(raised.value)
    assert isinstance(raised.value, (HealthImagingDFError, ValueError))
    assert metadata_service.stats.requests == 0


def test_a_frame_without_image_set_ids_is_a_validation_error(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    metadata_service.reset_stats()
    with pytest.raises(
        QueryValidationError, match=r"needs column\(s\) the frame lacks: imageSetId"
    ):
        fetch_metadata(metadata_frame.drop(columns="imageSetId"), client=metadata_service.client())
    assert metadata_service.stats.requests == 0


def test_result_carries_the_frame_provenance(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    subset = _frequent(metadata_frame).head(2)
    got = subset.ahi.fetch_metadata(client=metadata_service.client(), progress=False)
    assert got.attrs == subset.attrs
    assert got.attrs["healthimaging_df"]["datastore_id"]


def _multi_series_document() -> dict[str, Any]:
    """Two series; instances that disagree, lack attributes, or add their own."""
    return {
        "Study": {
            "Series": {
                "1.2.1": {
                    "DICOM": {"Modality": "CT", "Rows": 1},
                    "Instances": {
                        "1.2.1.1": {"DICOM": {"Rows": 512, "SliceThickness": 1.0, "A": [1, 2]}},
                        "1.2.1.2": {"DICOM": {"Rows": 256, "SliceThickness": 1.0, "B": "x"}},
                        "1.2.1.3": {"DICOM": {"SliceThickness": 1.0, "A": [1, 2]}},
                    },
                },
                "1.2.2": {"DICOM": {"Modality": "SR", "Extra": "ü"}, "Instances": {}},
                "1.2.3": {"Instances": {"1.2.3.1": {"DICOM": {"InstanceNumber": 1, "C": None}}}},
            }
        }
    }


@pytest.mark.parametrize("level", ["series", "instance"])
def test_column_wise_flattening_equals_the_row_wise_one(
    metadata_service: LocalService, level: Any
) -> None:
    from healthimaging_df.engine.document_rows import document_block, flatten_document
    from healthimaging_df.local.backend import metadata_document

    records = metadata_service.backend.image_sets(metadata_service.datastore_id or "")[:30]
    documents = [metadata_document("d" * 32, r) for r in records] + [_multi_series_document()]
    for document in documents:
        rows = list(flatten_document(document, level))
        block = document_block(document, level)
        assert block.rows == len(rows)
        assert list(block.columns) == list(dict.fromkeys(k for row in rows for k in row))
        as_rows = [
            {k: v[i] for k, v in block.columns.items() if v[i] is not None}
            for i in range(block.rows)
        ]
        assert as_rows == [{k: v for k, v in row.items() if v is not None} for row in rows]


def test_retries_are_paced_by_the_limiter_too(
    metadata_service: LocalService,
    metadata_frame: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from botocore.retries import standard

    # Retries a millisecond apart: unpaced, they would hammer the throttling service.
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.001)
    metadata_service.set_faults(tps=10, burst=1)
    metadata_service.reset_stats()
    client = metadata_service.client(retries={"mode": "standard", "max_attempts": 30})
    subset = _frequent(metadata_frame).head(12)
    started = time.perf_counter()
    got = subset.ahi.fetch_metadata(client=client, max_tps=20, max_concurrency=4, progress=False)
    elapsed = time.perf_counter() - started
    assert len(got) == 12
    requests = metadata_service.stats.by_operation.get("GetImageSetMetadata", 0)
    assert requests > 12  # some were throttled and retried
    assert requests <= 20 * elapsed + 2  # every attempt, retries included, took a token

    # The pacing handlers leave the user's client with the call: nothing of ours is paced after.
    handlers = client.meta.events._emitter._unique_id_handlers
    assert not [name for name in handlers if name.startswith("healthimaging_df")]


def test_pacing_at_the_quota_never_trips_a_strict_sliding_window(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    """A hair under a strict window's limit: every call takes a slot of the one limiter.

    That no call is then throttled depends on the machine's jitter (a late grant under CPU load
    can land in the service's next window): ``python -m bench pacing_bench`` measures it.
    """
    metadata_service.set_faults(window_tps=25)  # at most 25 requests in any one-second window
    metadata_service.reset_stats()
    subset = _frequent(metadata_frame).head(45)
    client = metadata_service.client()
    got = subset.ahi.fetch_metadata(client=client, max_tps=24, max_concurrency=8, progress=False)
    assert got["imageSetId"].tolist() == subset["imageSetId"].tolist()
    calls = metadata_service.stats.by_operation.get("GetImageSetMetadata")
    limiter = aws.limiter_for(client, "GetImageSetMetadata", 24)
    assert limiter is not None
    assert calls == 45 + metadata_service.stats.throttled  # 45, and retries of any throttled
    assert limiter.acquired == calls  # every attempt, retries included, took a slot


def test_retries_into_a_strict_sliding_window_take_a_token_each(
    metadata_service: LocalService,
    metadata_frame: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A max_tps above the window's limit gets throttled; botocore's retries wait their turn too."""
    from botocore.retries import standard

    from healthimaging_df import aws

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0.0)
    tokens = []
    acquire = aws.RateLimiter.acquire

    def counted(self: aws.RateLimiter) -> None:
        acquire(self)
        tokens.append(self.rate)

    monkeypatch.setattr(aws.RateLimiter, "acquire", counted)
    metadata_service.set_faults(window_tps=6)
    metadata_service.reset_stats()
    client = metadata_service.client(retries={"mode": "standard", "max_attempts": 40})
    subset = _frequent(metadata_frame).head(20)
    got = subset.ahi.fetch_metadata(client=client, max_tps=12, max_concurrency=4, progress=False)
    assert got["imageSetId"].tolist() == subset["imageSetId"].tolist()
    stats = metadata_service.stats
    assert stats.throttled_by_limit.get("window", 0) > 0  # throttled, then retried...
    assert stats.by_operation["GetImageSetMetadata"] == 20 + stats.throttled
    assert len(tokens) == stats.requests  # ...and every attempt took a token first


# -- the archive guard asks the service ------------------------------------------------------------


def _tiers(service: LocalService) -> dict[str, tuple[str, Any]]:
    return {
        r["imageSetId"]: (r["storageTier"], r["lastAccessedAt"])
        for r in service.backend.image_sets(service.datastore_id or "")
    }


def _aged(frame: pd.DataFrame, **provenance: Any) -> pd.DataFrame:
    """*frame* with its provenance changed (fetch times, a refresh)."""
    out = frame.copy()
    out.attrs = {"healthimaging_df": {**frame.attrs["healthimaging_df"], **provenance}}
    return out


def test_archived_image_sets_a_frame_does_not_show_are_refused_before_any_access(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    archived = metadata_frame[metadata_frame["storageTier"] == ARCHIVED].head(5)
    frequent = _frequent(metadata_frame).head(3)
    before = _tiers(metadata_service)
    metadata_service.reset_stats()
    for frame in (
        pd.concat([archived, frequent]).drop(columns="storageTier"),  # no tier at all
        pd.concat([archived, frequent]).assign(storageTier=pd.NA),  # no tier values
    ):
        with pytest.raises(QueryValidationError) as raised:
            fetch_metadata(frame, client=metadata_service.client(), progress=False)
        assert raised.value.field == "allow_archive_access"
        assert str(raised.value).startswith("allow_archive_access: 5 of 8 image sets are archived")
        assert "Nothing was accessed" in str(raised.value)
    stats = metadata_service.stats.by_operation
    assert stats.get("GetImageSet") == 16  # each tier looked up, twice
    assert stats.get("GetImageSetMetadata", 0) == 0
    assert _tiers(metadata_service) == before  # storageTier and lastAccessedAt unchanged


def test_a_stale_or_refreshed_frequent_tier_is_looked_up_first(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    archived = metadata_frame[metadata_frame["storageTier"] == ARCHIVED].head(2)
    now = pd.Timestamp.now(tz="UTC")
    old = (now - pd.Timedelta(minutes=16)).isoformat()
    disguised = archived.assign(storageTier="FREQUENT_ACCESS")  # as a day-old snapshot says
    before = _tiers(metadata_service)
    metadata_service.reset_stats()
    for stale in (
        _aged(disguised, fetch_started_at=old, fetched_at=old),
        _aged(disguised, refreshed_since=old),  # refreshed: unchanged rows keep old tiers
    ):
        with pytest.raises(QueryValidationError, match="2 of 2 image sets are archived"):
            fetch_metadata(stale, client=metadata_service.client(), progress=False)
    assert metadata_service.stats.by_operation.get("GetImageSet") == 4
    assert metadata_service.stats.by_operation.get("GetImageSetMetadata", 0) == 0
    assert _tiers(metadata_service) == before

    # A current frame's FREQUENT_ACCESS is trusted: no look-up; an old one's is checked.
    frequent = _frequent(metadata_frame).head(4)
    metadata_service.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fetch_metadata(frequent, client=metadata_service.client(), progress=False)
        assert metadata_service.stats.by_operation.get("GetImageSet", 0) == 0
        fetch_metadata(
            _aged(frequent, fetch_started_at=old), client=metadata_service.client(), progress=False
        )
    assert metadata_service.stats.by_operation.get("GetImageSet") == 4
    assert metadata_service.stats.by_operation.get("GetImageSetMetadata") == 8


def test_the_guard_says_how_old_the_tiers_are_and_trusts_a_fresh_reconcile(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    archived = metadata_frame[metadata_frame["storageTier"] == ARCHIVED].head(2)
    disguised = archived.assign(storageTier="FREQUENT_ACCESS")
    now = pd.Timestamp.now(tz="UTC")
    three_hours = (now - pd.Timedelta(hours=3, minutes=5)).isoformat()
    synced = _aged(disguised, refreshed_since=three_hours, tiers_observed_at=three_hours)
    with pytest.raises(QueryValidationError, match=r"tiers are read 3 h [45] min ago"):
        fetch_metadata(synced, client=metadata_service.client(), progress=False)
    unknown = _aged(disguised, refreshed_since=three_hours)  # refreshed by an older version
    with pytest.raises(QueryValidationError, match="tiers are of unknown age"):
        fetch_metadata(unknown, client=metadata_service.client(), progress=False)
    # a snapshot refreshed long ago but reconciled a minute ago: its tiers are current
    frequent = _frequent(metadata_frame).head(2)
    recent = (now - pd.Timedelta(minutes=1)).isoformat()
    reconciled = _aged(frequent, refreshed_since=three_hours, tiers_observed_at=recent)
    metadata_service.reset_stats()
    fetch_metadata(reconciled, client=metadata_service.client(), progress=False)
    assert metadata_service.stats.by_operation.get("GetImageSet", 0) == 0


def test_allow_archive_access_skips_the_look_ups_and_false_refuses_any(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    archived = metadata_frame[metadata_frame["storageTier"] == ARCHIVED].head(3)
    metadata_service.reset_stats()
    for refusing in ({"allow_archive_access": False}, {}):  # the default refuses too
        with pytest.raises(QueryValidationError, match="3 of 3 image sets are ARCHIVE_INSTANT"):
            fetch_metadata(archived, client=metadata_service.client(), progress=False, **refusing)
    assert metadata_service.stats.requests == 0
    bare = archived.drop(columns="storageTier")
    with pytest.warns(ArchiveAccessWarning, match="3 of 3 have no current storageTier"):
        got = fetch_metadata(
            bare, client=metadata_service.client(), allow_archive_access=True, progress=False
        )
    assert len(got) == 3
    assert metadata_service.stats.by_operation.get("GetImageSet", 0) == 0
    assert {_tiers(metadata_service)[i][0] for i in archived["imageSetId"]} == {"FREQUENT_ACCESS"}


def test_dry_run_counts_the_look_ups_and_bad_guard_values_fail_first(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    bare = metadata_frame.head(10).drop(columns="storageTier")
    metadata_service.reset_stats()
    plan = fetch_metadata(bare, dry_run=True, max_tps=50)
    assert (plan.calls, plan.archived, plan.stale, plan.lookups) == (10, 0, 10, 10)
    assert "10 image set(s) without a current storageTier would first be looked up" in str(plan)
    assert plan.estimated_seconds == pytest.approx(10 / 50 + 10 / 25)
    unchecked = fetch_metadata(bare, dry_run=True, allow_archive_access=True)
    assert unchecked.lookups == 0
    assert "read unchecked" in str(unchecked)
    for value in ("yes", 1, 0, None):
        with pytest.raises(QueryValidationError, match=r"^allow_archive_access: must be"):
            fetch_metadata(bare, client=metadata_service.client(), allow_archive_access=value)
    assert metadata_service.stats.requests == 0


def test_look_ups_are_paced_under_get_image_set_quota(
    metadata_service: LocalService, metadata_frame: pd.DataFrame
) -> None:
    from healthimaging_df.metadata import fetch_metadata

    bare = _frequent(metadata_frame).head(13).drop(columns="storageTier")
    metadata_service.reset_stats()
    started = time.perf_counter()
    fetch_metadata(bare, client=metadata_service.client(), max_tps=None, progress=False)
    elapsed = time.perf_counter() - started
    assert metadata_service.stats.by_operation.get("GetImageSet") == 13
    assert elapsed >= 12 / 25  # evenly paced at 24/s (25 with headroom), though max_tps=None


# -- large documents, flattened exactly ----------------------------------------------------------


def _brute_rows(document: dict[str, Any], level: str) -> list[dict[str, Any]]:
    """The flattening by definition, one (series, instance, keyword) at a time."""
    rows: list[dict[str, Any]] = []
    for series_uid, series in document["Study"]["Series"].items():
        series_dicom = series.get("DICOM") or {}
        dicoms = [i.get("DICOM") or {} for i in series.get("Instances", {}).values()]
        if level == "instance":
            for sop_uid, dicom in zip(series.get("Instances", {}), dicoms, strict=True):
                row = {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
                for source in (series_dicom, dicom):
                    for keyword in source:
                        if keyword not in row:
                            row[keyword] = source[keyword]
                rows.append(row)
            continue
        row = {"SeriesInstanceUID": series_uid, **series_dicom}
        for keyword in dicoms[0] if dicoms else {}:
            if keyword in ("SOPInstanceUID", "InstanceNumber") or keyword in row:
                continue
            if all(keyword in d and d[keyword] == dicoms[0][keyword] for d in dicoms):
                row[keyword] = dicoms[0][keyword]
        row["NumberOfSeriesRelatedInstances"] = len(dicoms)
        rows.append(row)
    return rows


def _frame_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: _plain(v) for k, v in row.items() if _plain(v) is not None and k != "version"}
        for row in frame.astype(object).to_dict("records")
    ]


@pytest.fixture(scope="module")
def large_series_service() -> Iterator[LocalService]:
    """Image sets of 300-instance series, 44 attributes each (as a CT series)."""
    with LocalService.seeded(
        image_sets=6, seed=21, instances_per_series=300, attributes_per_instance=44
    ) as service:
        yield service


@pytest.mark.parametrize("level", ["series", "instance"])
def test_large_series_are_flattened_exactly(large_series_service: LocalService, level: Any) -> None:
    """fetch_metadata over real calls equals a brute-force flatten of the documents by hand."""
    service = large_series_service
    client = service.client()
    frame = Query(service.datastore_id or "").to_dataframe(
        client=client, progress=False, max_tps=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchiveAccessWarning)
        got = frame.ahi.fetch_metadata(
            client=client, level=level, progress=False, allow_archive_access=True
        )
    expected = []
    for image_set_id, version in zip(frame["imageSetId"], frame["version"], strict=True):
        document = _document(client, service.datastore_id, image_set_id, int(version))
        assert len(next(iter(document["Study"]["Series"].values()))["Instances"]) == 300
        expected += [{"imageSetId": image_set_id, **row} for row in _brute_rows(document, level)]
    assert len(got) == (len(frame) if level == "series" else 300 * len(frame))
    assert _frame_rows(got) == expected
    if level == "series":  # the instances' shared attributes made it, their own did not
        assert {"Rows", "SliceThickness", "Manufacturer"} <= set(got.columns)
        assert "SliceLocation" not in got.columns


@pytest.mark.parametrize("level", ["series", "instance"])
def test_irregular_large_documents_flatten_as_brute_force(
    large_series_service: LocalService, level: Any
) -> None:
    """Instances that lack attributes, disagree, or add their own, in 500-instance series."""
    import random

    from healthimaging_df.aws.documents import collector_paused
    from healthimaging_df.engine.document_rows import blob_block
    from healthimaging_df.local.documents import SeriesShape, metadata_json

    rng = random.Random(8)
    records = large_series_service.backend.image_sets(large_series_service.datastore_id or "")
    for record, lacking in zip(records[:4], [40, 0, 1, 0], strict=True):
        document = json.loads(metadata_json("d" * 32, record, SeriesShape(500, 44)))
        (series,) = document["Study"]["Series"].values()
        dicoms = [i["DICOM"] for i in series["Instances"].values()]
        keywords = list(dicoms[0])
        for dicom in rng.sample(dicoms, lacking):
            dicom.pop(rng.choice(keywords[3:]))  # some instances lack an attribute
        for dicom in rng.sample(dicoms, 3):
            dicom[rng.choice(keywords[-20:])] = [rng.random()]  # one disagrees on a shared one
        if lacking:
            rng.choice(dicoms)["OnlyHere"] = "x"  # or has its own
        series["DICOM"]["Rows"] = 1  # a series attribute wins over an instance one
        document["Study"]["Series"]["9.9"] = {"DICOM": {"Modality": "SR"}, "Instances": {}}
        with collector_paused:
            block = blob_block(json.dumps(document).encode(), level)
        rows = [
            {k: v[i] for k, v in block.columns.items() if v[i] is not None}
            for i in range(block.rows)
        ]
        brute = _brute_rows(document, level)
        assert rows == [{k: v for k, v in row.items() if v is not None} for row in brute]
        assert list(block.columns) == list(dict.fromkeys(k for row in brute for k in row))


def test_the_collector_pause_nests_and_restores_the_collector() -> None:
    import gc

    from healthimaging_df.aws.documents import collector_paused

    assert gc.isenabled()
    with collector_paused:
        with collector_paused:
            assert not gc.isenabled()
        assert not gc.isenabled()  # another parse still runs
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused:
            pass
        assert not gc.isenabled()  # the process had it off: it stays off
    finally:
        gc.enable()
