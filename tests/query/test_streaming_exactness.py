"""The bounded-memory frame stage keeps the old exact answers.

``latest_in_order`` (to_dataframe, the export's final pass) and ``Chunker`` (iter_dataframes) work
on rank columns, compacted buffers and a numpy rank index; here they are checked against the
plain algorithms they replace, on pages with superseded copies, identical copies, copies that
left the cohort, and ids spread across compactions, folds and index merges.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthimaging_df import Query
from healthimaging_df.engine import frame, memory
from healthimaging_df.engine.fetch import Page
from healthimaging_df.engine.flatten import summaries_to_table
from healthimaging_df.local import generate_image_sets

BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _pages(seed: int, image_sets: int = 400, page_rows: int = 7) -> list[pa.Table]:
    """Pages in which many image sets are read two or three times, at random versions.

    Copies of one rank are identical, as the service's are: which of them is kept is not part of
    the contract (the old hash join picked any), only that one is.
    """
    rng = random.Random(seed)
    items = generate_image_sets(image_sets, seed=seed)
    reads: list[dict[str, Any]] = []
    for item in items:
        for _ in range(rng.choice([1, 1, 2, 3])):
            copy = {**item, "DICOMTags": dict(item["DICOMTags"])}
            version, second = rng.choice([1, 2, 3]), rng.choice([0, 1, 2])
            copy["version"] = version
            copy["updatedAt"] = BASE + timedelta(seconds=second)
            # one state of an image set reads the same every time: content follows the rank
            # (so a newer copy may have left the cohort, or joined it)
            flip = (version + second + int(item["imageSetId"][0], 36)) % 2
            copy["DICOMTags"]["DICOMSeriesModality"] = ["CT", "MR"][flip]
            reads.append(copy)
    rng.shuffle(reads)
    return [summaries_to_table(reads[i : i + page_rows]) for i in range(0, len(reads), page_rows)]


def _old_result(pages: list[pa.Table], plan: Any) -> pa.Table:
    """What the frame stage computed before it was bounded: everything in memory at once."""
    seen = pa.concat_tables(pages)
    matched = frame.apply_predicates(seen, plan.predicates)
    return frame.order(frame.drop_superseded(matched, seen), plan)


def _old_chunks(pages: list[pa.Table], plan: Any, chunk_rows: int) -> list[list[str]]:
    """The dict-based Chunker this replaces: ids of each chunk, in order."""
    best: dict[str, frame.Rank] = {}
    yielded: set[str] = set()
    pending: list[pa.Table] = []
    out: list[list[str]] = []

    def emit() -> None:
        if not pending:
            return
        table = pa.concat_tables(pending)
        pending.clear()
        chunk = []
        for image_set, rank in frame.ranks(table):
            if image_set not in yielded and rank == best.get(image_set):
                yielded.add(image_set)
                chunk.append(image_set)
        if chunk:
            out.append(chunk)

    for page in pages:
        for image_set, rank in frame.ranks(page):
            best[image_set] = max(rank, best.get(image_set, (-2, -2)))
        pending.append(frame.apply_predicates(page, plan.predicates))
        if sum(t.num_rows for t in pending) >= chunk_rows:
            emit()
    emit()
    return out


@pytest.fixture
def tiny_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact, fold and merge the index often, so that every boundary is crossed."""
    monkeypatch.setattr(memory, "_COMPACT_ROWS", 20)
    monkeypatch.setattr(frame, "_FOLD_ROWS", 45)


QUERIES = {
    "everything": Query("0" * 32),
    "CT only": Query("0" * 32).where(Modality="CT"),
    "CT, sorted by createdAt, limit": Query("0" * 32)
    .where(Modality="CT")
    .sort_by("createdAt")
    .limit(37),
    "by PatientID descending": Query("0" * 32).sort_by("PatientID", ascending=False),
}


@pytest.mark.parametrize("name", sorted(QUERIES))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_collector_equals_the_in_memory_algorithm(name: str, seed: int, tiny_buffers: None) -> None:
    plan = QUERIES[name].compile(now=BASE)
    pages = _pages(seed)
    collector = frame.Collector(plan)
    for page in pages:
        collector.add(Page(0, page))
    expected = _old_result(pages, plan)
    distinct = len(set(pa.concat_tables(pages).column("imageSetId").to_pylist()))
    assert collector.distinct_seen() == distinct
    got = collector.table()
    assert got.num_rows > 0
    assert got.equals(expected)


@pytest.mark.parametrize("name", ["everything", "CT only"])
@pytest.mark.parametrize("chunk_rows", [1, 30, 1000])
@pytest.mark.parametrize("seed", [4, 5])
def test_chunker_equals_the_dict_based_one(
    name: str, chunk_rows: int, seed: int, tiny_buffers: None
) -> None:
    plan = QUERIES[name].compile(now=BASE)
    pages = _pages(seed)
    chunker = frame.Chunker(plan, chunk_rows, "numpy_nullable", {})
    chunks = [c for page in pages for c in chunker.add(Page(0, page))] + list(chunker.flush())
    got = [list(c["imageSetId"]) for c in chunks if len(c)]
    assert got == _old_chunks(pages, plan, chunk_rows)
    ids = [i for c in got for i in c]
    assert len(ids) == len(set(ids))  # each image set once


def test_rank_index_merges_levels_without_losing_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    index = frame.RankIndex()
    rng = random.Random(7)
    truth: dict[bytes, tuple[int, int]] = {}
    for _ in range(30):  # enough new ids per fold to merge the small level into the large one
        ids = [f"{rng.randrange(20_000):032d}".encode() for _ in range(700)]
        versions = [rng.randrange(4) for _ in ids]
        stamps = [rng.randrange(3) for _ in ids]
        import numpy as np

        index.fold(np.array(ids, "S32"), np.array(versions), np.array(stamps))
        for i, v, t in zip(ids, versions, stamps, strict=True):
            truth[i] = max(truth.get(i, (-1, -1)), (v, t))
    assert len(index) == len(truth)
    import numpy as np

    keys = sorted(truth)
    rows = index.claim(
        np.array(keys, "S32"),
        np.array([truth[k][0] for k in keys]),
        np.array([truth[k][1] for k in keys]),
    )
    assert len(rows) == len(keys)  # every id found at its best rank


@given(
    st.lists(st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", ""])), max_size=9))
)
@settings(max_examples=200, deadline=None)
def test_distinct_count_by_sorting_equals_a_set(chunks: list[list[str | None]]) -> None:
    values = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], pa.string())
    assert frame.distinct_count(values) == len({v for c in chunks for v in c if v is not None})


def test_read_once_with_rows_that_left_keeps_every_match_in_order() -> None:
    """The no-duplicates shortcut (every image set read once, some not matching) keeps all matches."""
    items = generate_image_sets(60, seed=5)
    table = summaries_to_table(items)
    matched, unmatched = table.slice(0, 40), table.slice(40).select(frame.RANK_COLUMNS)
    plan = Query("0" * 32).sort_by("createdAt").compile()
    kept = frame.latest_in_order([matched], [unmatched], plan)
    assert sorted(kept.column("imageSetId").to_pylist()) == sorted(
        matched.column("imageSetId").to_pylist()
    )
    stamps = kept.column("createdAt").to_pylist()
    assert stamps == sorted(stamps)


def test_result_memory_pool_switches_to_the_system_allocator_and_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    before = pa.default_memory_pool().backend_name
    with frame.result_memory_pool():
        inside = pa.default_memory_pool().backend_name
        with frame.result_memory_pool():  # nested (or a second thread's) call
            pass
        still = pa.default_memory_pool().backend_name
    assert pa.default_memory_pool().backend_name == before
    assert (inside, still) == (("system", "system") if before == "mimalloc" else (before, before))


def test_result_memory_pool_leaves_a_chosen_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    before = pa.default_memory_pool().backend_name
    with frame.result_memory_pool():
        assert pa.default_memory_pool().backend_name == before
