"""OR of queries: ``q1 | q2`` over one datastore is one plan, exact against brute force."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthimaging_df import Query
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.plan import AnyOf, DatastoreStats
from healthimaging_df.refresh import refresh_frame, refresh_snapshot
from healthimaging_df.snapshot import read_snapshot
from healthimaging_df.store.redact import redact_query_json

from .conftest import brute_force, flat_row

DS = "0" * 32
OTHER = "1" * 32
FAST: dict[str, Any] = {"progress": False, "max_tps": None}
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def expected_ids(records: list[dict[str, Any]], union: Query) -> list[str]:
    """The union of each part's brute-force ids, in the union's order, cut to its limit."""
    ids = set().union(*(brute_force(records, part) for part in union.parts))
    kept = [r for r in records if r["imageSetId"] in ids]
    order = SimpleNamespace(
        predicates=(),
        sort_column=union.sort_column,
        ascending=union.ascending,
        row_limit=union.row_limit,
    )
    return brute_force(kept, order)


# -- building, planning, serializing (no server) ------------------------------------------------


def test_or_and_union_build_the_same_query_and_flatten_nested_unions() -> None:
    a = Query(DS).where(PatientID="P1")
    b = Query(DS).where(Modality="CT")
    c = Query(DS).is_null("StudyTime")
    assert (a | b) == Query.union(a, b) == a.union(b)
    assert ((a | b) | c).parts == Query.union(a, b, c).parts == (a, b, c)
    assert isinstance((a | b).predicates[0], AnyOf)
    # building on a union adds to every query of it
    narrowed = (a | b).where(isPrimary=True)
    assert narrowed == a.where(isPrimary=True) | b.where(isPrimary=True)
    assert "union of [PatientID == <1 value>] | [Modality == <1 value>]" in repr(a | b)


def test_a_union_refuses_other_datastores_limits_on_parts_and_conflicting_sorts() -> None:
    a = Query(DS).where(PatientID="P1")
    with pytest.raises(QueryValidationError, match="one datastore"):
        _ = a | Query(OTHER)
    with pytest.raises(QueryValidationError, match="limit the union"):
        _ = a | Query(DS).limit(3)
    with pytest.raises(QueryValidationError, match="limit the union"):
        _ = (a | Query(DS)).limit(3) | a
    with pytest.raises(QueryValidationError, match="sort differently"):
        _ = a.sort_by("createdAt") | Query(DS).sort_by("createdAt", ascending=False)
    with pytest.raises(QueryValidationError, match="Query objects"):
        a.union("not a query")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _ = a | "not a query"  # type: ignore[operator]
    # one sort given: the union takes it; a limit on the union is fine
    union = a.sort_by("StudyDateTime", ascending=False) | Query(DS).where(Modality="MR")
    assert (union.sort_column, union.ascending) == ("StudyDateTime", False)
    assert union.limit(5).compile(now=NOW).limit == 5


def test_the_plan_is_both_plans_chains_renumbered_and_applies_any_of_them() -> None:
    a = Query(DS).where(PatientID=["P1", "P2"]).between("StudyDateTime", "2020", "2021")
    b = Query(DS).where(StudyInstanceUID="1.2.3")
    plan = (a | b).compile(now=NOW)
    first, second = a.compile(now=NOW), b.compile(now=NOW)
    assert [c.index for c in plan.chains] == [0, 1, 2]
    assert [c.filters for c in plan.chains] == [c.filters for c in first.chains + second.chains]
    assert plan.requests() == first.requests() + second.requests()
    assert plan.predicate_groups == (a.predicates, b.predicates)
    assert first.predicate_groups == (first.predicates,)  # an ordinary plan: one group
    text = (a | b).explain()
    assert "union (OR) of 2 queries: SearchImageSets request chains: 3" in text
    assert "query 1 (chains 0..1):" in text
    assert "query 2 (chain 2):" in text
    assert "PatientID in <2 values>" in text
    assert "matches any of the 2 queries" in text
    shown = text + repr(a | b) + repr(plan) + repr(plan.predicates)
    assert "P1" not in shown
    assert "1.2.3" not in shown
    assert "'P1'" in (a | b).explain(show_values=True)


def test_the_union_json_round_trips_and_redacts_every_part() -> None:
    a = Query(DS).where(PatientID="P1").using("scan")
    b = Query(DS).between("createdAt", "2021", "2022").contains("StudyDescription", "x", case=False)
    union = (a | b | Query(DS)).sort_by("createdAt").limit(7)
    data = json.loads(union.to_json())
    assert data["parts"] == 3
    assert Query.from_dict(data) == union
    assert Query.from_dict(json.loads(union.to_json())).to_json() == union.to_json()
    redacted = redact_query_json(union.to_json())
    assert redacted is not None
    assert "P1" not in redacted
    assert "2021" not in redacted
    assert '"x"' not in redacted
    with pytest.raises(QueryValidationError, match="redacted"):
        Query.from_dict(json.loads(redacted))


# -- against the local service ------------------------------------------------------------------


def test_a_union_equals_the_union_of_brute_force_results(
    service: LocalService, records: list[dict[str, Any]]
) -> None:
    rows = [flat_row(r) for r in records]
    patients = sorted({r["PatientID"] for r in rows if r["PatientID"]})
    ds = service.datastore_id
    a = Query(ds).where(PatientID=patients[:3])
    b = Query(ds).where(Modality="MR").between("StudyDateTime", "2015", "2020")
    c = Query(ds).where(PatientID=patients[2])  # overlaps a: rows come once
    union = (a | b | c).sort_by("StudyDateTime")
    frame = union.to_dataframe(client=service.client(), **FAST)
    got = list(frame["imageSetId"])
    assert got == expected_ids(records, union)
    assert len(got) == len(set(got))
    assert len(got) > len(brute_force(records, a))  # b added rows
    # provenance survives: the recorded query is the union
    recorded = json.loads(frame.attrs["healthimaging_df"]["query"])
    assert Query.from_dict(recorded) == union
    frequent = frame[frame["storageTier"] == "FREQUENT_ACCESS"].head(2)
    enriched = frequent.ahi.fetch_metadata(client=service.client(), progress=False)
    assert set(enriched["imageSetId"]) == set(frequent["imageSetId"])
    limited = union.limit(9)
    head = limited.to_dataframe(client=service.client(), **FAST)
    assert list(head["imageSetId"]) == expected_ids(records, limited)


def test_iter_dataframes_and_to_parquet_of_a_union(
    service: LocalService, records: list[dict[str, Any]], tmp_path: Path
) -> None:
    ds = service.datastore_id
    rows = [flat_row(r) for r in records]
    patients = sorted({r["PatientID"] for r in rows if r["PatientID"]})
    studies = sorted({r["StudyInstanceUID"] for r in rows if r["StudyInstanceUID"]})
    union = Query(ds).where(PatientID=patients[5:12], isPrimary=True) | Query(ds).where(
        StudyInstanceUID=studies[:6], Modality=["CT", "MR"]
    )
    want = set(expected_ids(records, union))
    assert len(want) > 20
    chunks = list(union.iter_dataframes(chunk_rows=10, client=service.client(), **FAST))
    assert len(chunks) > 1
    got = [i for chunk in chunks for i in chunk["imageSetId"]]
    assert len(got) == len(set(got))
    assert set(got) == want
    assert all(isinstance(ch.attrs["healthimaging_df"]["query"], str) for ch in chunks)
    path = tmp_path / "union.parquet"
    union.to_parquet(str(path), client=service.client(), **FAST)
    snap = read_snapshot(str(path))
    assert set(snap["imageSetId"]) == want
    assert Query.from_dict(json.loads(snap.attrs["healthimaging_df"]["query"])) == union


def test_a_union_snapshot_and_frame_refresh_to_a_fresh_run(
    ahi_service_factory: Callable[..., LocalService], tmp_path: Path
) -> None:
    service = ahi_service_factory(image_sets=300, seed=11)
    ds, backend, client = service.datastore_id, service.backend, service.client()
    union = Query(ds).where(Modality="CT") | Query(ds).where(isPrimary=False)
    path = tmp_path / "cohort.parquet"
    union.to_parquet(str(path), client=client, **FAST)
    before = union.to_dataframe(client=client, **FAST)
    rows = [flat_row(r) for r in backend.image_sets(ds)]
    ct_primary = [r["imageSetId"] for r in rows if r["Modality"] == "CT" and r["isPrimary"]]
    mr_primary = [r["imageSetId"] for r in rows if r["Modality"] == "MR" and r["isPrimary"]]
    backend.update_image_set(ds, ct_primary[0], tags={"DICOMSeriesModality": "SR"})  # leaves
    backend.update_image_set(ds, mr_primary[0], is_primary=False)  # joins through query 2
    now = datetime.now(timezone.utc)
    new = generate_image_sets(20, seed=99)
    for record in new:
        record.update(createdAt=now, updatedAt=now, lastAccessedAt=now, version=1)
    backend.add_image_sets(ds, new)

    fresh = set(union.to_dataframe(client=client, **FAST)["imageSetId"])
    assert fresh == set(expected_ids(backend.image_sets(ds), union))
    report = refresh_snapshot(str(path), client=client, **FAST)
    assert set(read_snapshot(str(path))["imageSetId"]) == fresh
    assert ct_primary[0] in report.removed
    assert mr_primary[0] in report.added
    after, _ = refresh_frame(before, client=client, **FAST)
    assert set(after["imageSetId"]) == fresh


@st.composite
def parts(draw: st.DrawFn, rows: list[dict[str, Any]], datastore_id: str) -> Query:
    def pick(column: str) -> Any:
        return draw(st.sampled_from([r[column] for r in rows if r[column] is not None]))

    query = Query(datastore_id)
    for step in draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)):
        if step == 0:
            query = query.where(
                PatientID=[pick("PatientID") for _ in range(draw(st.integers(1, 3)))]
            )
        elif step == 1:
            query = query.where(Modality=draw(st.sampled_from(["CT", "MR", "CR", "US", "SR"])))
        elif step == 2:
            query = query.where(isPrimary=draw(st.booleans()))
        elif step == 3:
            a, b = sorted([pick("StudyDateTime"), pick("StudyDateTime")])
            query = query.between("StudyDateTime", a, b)
        elif step == 4:
            a, b = sorted([pick("createdAt"), pick("createdAt")])
            query = query.between("createdAt", a, b)
        else:
            query = query.where_not(BodyPartExamined=pick("BodyPartExamined"))
    return query


@pytest.mark.slow
def test_any_union_of_two_queries_equals_brute_force(cohort_service: LocalService) -> None:
    records = cohort_service.backend.image_sets(cohort_service.datastore_id)
    rows = [flat_row(r) for r in records]
    client = cohort_service.client()
    ds = cohort_service.datastore_id

    @settings(
        max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(
        first=parts(rows, ds),
        second=parts(rows, ds),
        sort=st.sampled_from([None, "createdAt", "StudyDateTime"]),
        ascending=st.booleans(),
        limit=st.sampled_from([None, None, 1, 40]),
    )
    def check(
        first: Query, second: Query, sort: str | None, ascending: bool, limit: int | None
    ) -> None:
        union = first | second
        if sort:
            union = union.sort_by(sort, ascending=ascending)
        if limit:
            union = union.limit(limit)
        frame = union.to_dataframe(client=client, max_concurrency=4, **FAST)
        assert list(frame["imageSetId"]) == expected_ids(records, union)

    check()


def test_queries_that_weigh_access_paths_differently_are_all_fanned_out() -> None:
    stats = DatastoreStats(100)
    many = Query(DS).where(PatientID=[f"P{i}" for i in range(20)])
    few = Query(DS).where(PatientID=["A", "B"])
    assert many.compile(now=NOW, stats=stats).access == "scan"
    assert few.compile(now=NOW, stats=stats).access == "fanout"
    plan = (many | few).compile(now=NOW, stats=stats)
    assert plan.access == "fanout"
    assert len(plan.chains) == 22
    # a resumed export forces the recorded path on every query: the same chains again
    forced = (many | few).compile(now=NOW, stats=stats, strategy=plan.access)
    assert forced.chains == plan.chains
    # agreeing queries keep their choice
    assert (many | many.where(Modality="CT")).compile(now=NOW, stats=stats).access == "scan"
