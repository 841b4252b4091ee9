"""The export's spilled final pass equals the in-memory one it replaces.

Tasks' rows go through spill files (``TaskRows``) into checkpoint parts, and ``SortedRows`` orders
the survivors by buckets; with spills, parts and buckets forced small, its row groups joined must
be ``frame.latest_in_order`` of the same reads, row for row, and no spill file may outlive it.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from healthimaging_df import Query
from healthimaging_df.engine import checkpoint, frame, spill
from healthimaging_df.engine.fetch import Coverage
from healthimaging_df.engine.flatten import summaries_to_table
from healthimaging_df.local import generate_image_sets
from healthimaging_df.store.storage import Target, local_store

BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _reads(seed: int, image_sets: int = 300) -> list[dict[str, Any]]:
    """Image sets read one to three times at random ranks; content follows the rank."""
    rng = random.Random(seed)
    reads: list[dict[str, Any]] = []
    for item in generate_image_sets(image_sets, seed=seed):
        for _ in range(rng.choice([1, 1, 2, 3])):
            copy = {**item, "DICOMTags": dict(item["DICOMTags"])}
            version, second = rng.choice([1, 2, 3]), rng.choice([0, 1, 2])
            copy["version"] = version
            copy["updatedAt"] = BASE + timedelta(seconds=second)
            flip = (version + second + int(item["imageSetId"][0], 36)) % 2
            copy["DICOMTags"]["DICOMSeriesModality"] = ["CT", "MR"][flip]
            reads.append(copy)
    rng.shuffle(reads)
    return reads


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    "build",
    [
        lambda q: q.where(Modality="CT"),
        lambda q: q.where(Modality="MR").sort_by("updatedAt", ascending=False),
        lambda q: q,
    ],
    ids=["ct", "mr-by-updated-desc", "all"],
)
def test_spilled_final_pass_equals_the_in_memory_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, build: Any
) -> None:
    monkeypatch.setattr(spill, "SPILL_ROWS", 11)
    monkeypatch.setattr(checkpoint, "PART_ROWS", 23)
    plan = build(Query("0" * 32)).compile()
    reads = _reads(seed)
    rng = random.Random(seed)
    store = local_store(str(tmp_path / "out"))
    saved = checkpoint.Checkpoint(Target(store, "x.parquet", True), "f")
    matched_all: list[pa.Table] = []
    unmatched_all: list[pa.Table] = []
    with spill.SpillDir(str(tmp_path / "out"), spill.spill_prefix("x")) as folder:
        start = 0
        while start < len(reads):  # tasks of random sizes, in pages of 7
            size = rng.randint(1, 60)
            task = spill.TaskRows(folder)
            misses = []
            for at in range(start, min(start + size, len(reads)), 7):
                page = summaries_to_table(reads[at : min(at + 7, start + size)])
                hit, miss = frame.split_page(page, plan.predicates)
                task.append(hit)
                misses.append(miss)
                matched_all.append(hit)
                unmatched_all.append(miss)
            start += size
            seen = pa.concat_tables(misses)
            saved.add(task.tables(), seen, Coverage(), interval=float(rng.choice([0, 1e9])))
        saved.flush(Coverage())
        assert len(saved.parts) > 3
        result = spill.SortedRows(saved.rows_of, saved.seen(), saved.schema(), plan, folder)
        groups = list(result.groups(17))
        assert [p.name for p in folder.path.iterdir()] == [
            ".lock"
        ]  # every spill file went once read
    assert not list((tmp_path / "out").glob(".ahi-spill-*"))
    want = frame.latest_in_order(matched_all, unmatched_all, plan)
    assert want.num_rows > 17 * 2
    assert [g.num_rows for g in groups[:-1]] == [17] * (len(groups) - 1)
    got = pa.concat_tables(groups)
    assert got.equals(want)
    assert result.num_rows == want.num_rows
    assert result.watermark == max(want.column("updatedAt").to_pylist())


def test_an_empty_result_is_one_empty_group(tmp_path: Path) -> None:
    plan = Query("0" * 32).compile()
    saved = checkpoint.Checkpoint(Target(local_store(str(tmp_path)), "x.parquet", True), "f")
    with spill.SpillDir(str(tmp_path)) as folder:
        result = spill.SortedRows(saved.rows_of, saved.seen(), saved.schema(), plan, folder)
        groups = list(result.groups(5))
    assert [g.num_rows for g in groups] == [0]
    assert result.watermark is None


def test_spill_folder_is_private_and_removed_on_failure(tmp_path: Path) -> None:
    folder = spill.SpillDir(str(tmp_path), ".ahi-spill-t-")

    def fail() -> None:
        with folder:
            task = spill.TaskRows(folder)
            task.append(summaries_to_table(generate_image_sets(spill.SPILL_ROWS + 1, seed=1)))
            assert list(folder.path.iterdir())
            raise RuntimeError("boom")

    assert folder.path.stat().st_mode & 0o777 == 0o700
    with pytest.raises(RuntimeError):
        fail()
    assert not folder.path.exists()
    stale = tmp_path / ".ahi-spill-t-left"  # what a killed run leaves: a lock nobody holds
    stale.mkdir()
    (stale / ".lock").touch()
    with spill.SpillDir(str(tmp_path), ".ahi-spill-t-") as folder:
        assert not stale.exists()


def test_a_live_runs_spill_folder_survives_a_second_run(tmp_path: Path) -> None:
    """Two exports to one destination: the second must not delete the first's spilled rows."""
    with spill.SpillDir(str(tmp_path), ".ahi-spill-t-") as first:
        with spill.SpillDir(str(tmp_path), ".ahi-spill-t-") as second:
            assert first.path.exists()
            assert second.path != first.path
        assert first.path.exists()
        just_made = tmp_path / ".ahi-spill-t-new"  # no lock yet, and young: maybe a live run
        just_made.mkdir()
        with spill.SpillDir(str(tmp_path), ".ahi-spill-t-"):
            assert just_made.exists()
