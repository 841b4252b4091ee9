"""engine.events alone: parsing both documented shapes, coalescing, and the fetch cost model."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from healthimaging_df.engine import events

DS = "d" * 32
NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


def body(kind: str, image_set_id: str, version: str | None = "2", **detail: Any) -> str:
    """The developer guide's sample shape (imagesetId, isPrimary, imageSetVersion)."""
    out: dict[str, Any] = {
        "version": "0",
        "id": "7cf0fb1c-8720-4d48-baa3-6eb97b35a10e",
        "detail-type": kind,
        "source": "aws.medical-imaging",
        "account": "111122223333",
        "time": "2026-01-01T11:00:00Z",
        "region": "us-west-2",
        "resources": [],
        "detail": {
            "imagingVersion": "1.0",
            "isPrimary": True,
            "datastoreId": DS,
            "imagesetId": image_set_id,
            "imageSetState": "ACTIVE",
            "imageSetWorkflowStatus": "CREATED",
            **detail,
        },
    }
    if version is not None:
        out["detail"]["imageSetVersion"] = version
    return json.dumps(out)


def test_both_spellings_and_optional_fields() -> None:
    guide = events.parse(body("Image Set Created", "a" * 32), DS)
    assert isinstance(guide, events.Event)
    assert (guide.image_set_id, guide.action, guide.version, guide.id_key) == (
        "a" * 32,
        "upsert",
        2,
        "imagesetId",
    )
    # the EventBridge reference / CDK shape: imageSetId, no isPrimary, no imageSetVersion
    reference = json.loads(body("Image Set Updated", "b" * 32, version=None))
    reference["detail"]["imageSetId"] = reference["detail"].pop("imagesetId")
    del reference["detail"]["isPrimary"]
    parsed = events.parse(json.dumps(reference), DS)
    assert isinstance(parsed, events.Event)
    assert (parsed.image_set_id, parsed.version, parsed.id_key) == ("b" * 32, None, "imageSetId")
    assert parsed.time == datetime(2026, 1, 1, 11, tzinfo=timezone.utc)


def test_poison_reasons_name_no_value() -> None:
    secret = "PATIENT-42"
    cases = {
        "{": "the body is not JSON",
        "[]": "the body is not a JSON object",
        body("Image Set Created", "a" * 32).replace(DS, "e" * 32): "another datastore",
        body("Image Set Created", secret): "not an image set ID",
        body("Image Set Created", "a" * 32, version=secret): "not a whole number",
        body("Import Job Completed", "a" * 32): "not an image-set event",
    }
    for text, reason in cases.items():
        found = events.parse(text, DS)
        assert isinstance(found, str)
        assert reason in found
        assert secret not in found


def test_coalesce_collapses_duplicates_and_marks_a_delete_with_other_events() -> None:
    def message(n: int, text: str) -> events.Message:
        return events.Message(f"m{n}", f"r{n}", text)

    a, b, c = "a" * 32, "b" * 32, "c" * 32
    batch = events.coalesce(
        [
            message(1, body("Image Set Updated", a, "3")),
            message(2, body("Image Set Updated", a, "2")),
            message(3, body("Image Set Updated", a, "3")),
            message(4, body("Image Set Deleted", b, "1")),
            message(5, body("Image Set Created", b, "1")),  # reordered after its deletion
            message(6, body("Image Set Updating", c, "1")),
            message(7, body("Image Set Copying With Read Only Access", c, "1")),
            message(8, "junk"),
        ],
        DS,
    )
    moment = datetime(2026, 1, 1, 11, tzinfo=timezone.utc)
    assert batch.upserts == {a: (moment, 3), b: (moment, 1)}
    assert batch.deletes == batch.conflicts == {b}  # the read decides
    assert batch.touched == {c}
    assert [m.message_id for m in batch.idle] == ["m6"]
    assert [(m.message_id, r) for m, r in batch.poison] == [("m8", "the body is not JSON")]
    assert {k: len(v) for k, v in batch.messages.items()} == {a: 3, b: 2, c: 1}


def test_cost_model_prefers_a_window_for_recent_changes_and_chains_for_stragglers() -> None:
    margin = timedelta(minutes=5)
    recent = {f"{n:032d}": NOW - timedelta(seconds=n) for n in range(120)}
    choice = events.choose_fetch(recent, {}, NOW, margin)
    assert (choice.series, choice.by_window, choice.requests) == ((), 120, 3)  # 3 pages of 50
    # one old event of an image set the snapshot holds: its series, not a window from last week
    old = "f" * 32
    wanted = {**recent, old: NOW - timedelta(days=7)}
    choice = events.choose_fetch(wanted, {old: "1.2.3"}, NOW, margin)
    assert choice.series == ("1.2.3",)
    assert choice.by_series == 1
    assert choice.by_window == 120
    assert choice.since == min(recent.values()) - margin
    # unknown series (not in the snapshot, or redacted): the window must reach back
    choice = events.choose_fetch(wanted, {}, NOW, margin)
    assert choice.series == ()
    assert choice.since == NOW - timedelta(days=7) - margin
    # a few held image sets: a chain each beats nothing only when cheaper than a window page
    few = {f"{n:032d}": NOW for n in range(3)}
    choice = events.choose_fetch(few, {i: f"s{i}" for i in few}, NOW, margin)
    assert choice.requests == 1
    assert choice.series == ()
    assert events.choose_fetch({}, {}, NOW, margin).requests == 0


def test_reconcile_every_durations() -> None:
    import argparse

    import pytest

    from healthimaging_df.cli.commands.sync import duration

    assert duration("90") == duration("90s") == timedelta(seconds=90)
    assert duration("15m") == timedelta(minutes=15)
    assert duration("24h") == timedelta(days=1) == duration("1d")
    for bad in ("0", "-1h", "1w", "h", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive duration"):
            duration(bad)
