"""A StudyDateTime or updatedAt range starts as sub-ranges of its own key, all read at once.

With the quantiles a full scan in this process measured, a range alone is cut into sub-ranges
of about equal size that share their boundaries (BETWEEN is inclusive): each sends one BETWEEN
(no second filter to verify) and is split lazily by createdAt windows as it runs. A boundary
inside a burst of image sets with the same study date-time (one study's image sets share it)
loses none of them: the burst is read by both neighbours and kept once.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from healthimaging_df import Query
from healthimaging_df.engine import run as run_module
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.plan import DatastoreStats, Facts, compile_spec, subranges
from healthimaging_df.plan.subranges import SUBRANGE_MIN_PAGES, sub_cuts

from .conftest import (
    brute_force,
    first_requests,
    flat_row,
    read_while_updating,
    serve,
    update_metadata,
)
from .test_exactness import run_mode

UTC = timezone.utc
DS = "0123456789abcdef0123456789abcdef"
STUDY_BURST = ("20200615", "101500")  # a third of the image sets: this study date-time's second


def _quantiles(values: list[datetime], count: int = 64) -> tuple[datetime, ...]:
    ordered = sorted(values)
    last = len(ordered) - 1
    return tuple(ordered[round(last * k / count)] for k in range(count + 1))


def _facts(column: str, values: list[datetime], readers: int = 8) -> Facts:
    stats = DatastoreStats(
        len(values), source="scan", key_quantiles=((column, _quantiles(values), len(values)),)
    )
    return Facts(stats=stats, max_concurrency=readers, for_run=True)


def _study_values(n: int) -> list[datetime]:
    start = datetime(2000, 1, 1)
    return [start + timedelta(days=9000) * (k / n) for k in range(n)]


def test_a_study_range_starts_as_sub_ranges_sharing_their_boundaries() -> None:
    values = _study_values(20_000)
    low, high = values[4_000], values[12_000]  # 8,000 image sets: 160 pages
    query = Query(DS).between("StudyDateTime", low, high)
    plan = compile_spec(query.spec(), _facts("StudyDateTime", values, readers=6))
    assert len(plan.chains) == 3  # one per two readers (160 pages would allow 10)
    bounds = []
    for chain in plan.chains:
        assert chain.lazy  # each still split by createdAt as it runs...
        assert chain.unbounded
        assert chain.long  # ...read from both ends at once
        (only,) = chain.filters
        a, b = (v["DICOMStudyDateAndTime"] for v in only["values"])
        bounds.append(
            (a["DICOMStudyDate"] + a["DICOMStudyTime"], b["DICOMStudyDate"] + b["DICOMStudyTime"])
        )
    assert bounds[0][0] == f"{low:%Y%m%d%H%M%S}"
    assert bounds[-1][1] == f"{high:%Y%m%d%H%M%S}"
    assert all(bounds[k][1] == bounds[k + 1][0] for k in range(len(bounds) - 1))  # shared
    shown = plan.explain()
    assert "starts as 3 sub-ranges" in shown
    assert "the range as 3 sub-ranges of its own key" in shown
    assert "starts with two readers" in shown


def test_a_short_range_or_unknown_quantiles_or_an_id_stay_one_chain() -> None:
    values = _study_values(20_000)
    short = Query(DS).between("StudyDateTime", values[100], values[100 + 50 * SUBRANGE_MIN_PAGES])
    (one,) = compile_spec(short.spec(), _facts("StudyDateTime", values)).chains
    assert one.long  # too short to cut, long enough to start from both ends
    tiny = Query(DS).between("StudyDateTime", values[100], values[200])  # 2 pages
    assert not compile_spec(tiny.spec(), _facts("StudyDateTime", values)).chains[0].long
    wide = Query(DS).between("StudyDateTime", values[0], values[-1])
    unknown = Facts(stats=DatastoreStats(20_000, source="scan"), for_run=True)
    assert len(compile_spec(wide.spec(), unknown).chains) == 1
    assert len(compile_spec(wide.spec(), _facts("updatedAt", values)).chains) == 1
    patient = wide.where(PatientID="P1")
    assert len(compile_spec(patient.spec(), _facts("StudyDateTime", values)).chains) == 1


def test_sub_cuts_are_whole_seconds_strictly_inside_and_at_most_one_per_readers() -> None:
    values = _study_values(20_000)
    cuts = sub_cuts((_quantiles(values), 20_000), values[0], values[-1], readers=64)
    assert len(cuts) == 20_000 // 50 // SUBRANGE_MIN_PAGES - 1
    assert all(c.microsecond == 0 and values[0] < c < values[-1] for c in cuts)
    # a tenth of the image sets in one second (a study, a midnight import): no cut inside it
    burst = datetime(2010, 5, 5, 0, 0, 0)
    heavy = sorted(values[:18_000] + [burst + timedelta(microseconds=k % 3) for k in range(2_000)])
    cuts = sub_cuts((_quantiles(heavy), 20_000), heavy[0], heavy[-1], readers=64)
    assert burst not in cuts
    assert burst + timedelta(seconds=1) in cuts  # the cut that fell in it went after it
    aware = values[0].replace(tzinfo=UTC)
    assert sub_cuts((_quantiles(values), 20_000), aware, aware + timedelta(days=9000), 8) == ()


# -- the run ------------------------------------------------------------------------------------


def _service(n: int, seed: int) -> LocalService:
    """A third of the image sets share one study date-time second (some at its very start)."""
    rng = random.Random(seed)
    records = generate_image_sets(n, seed=seed)
    for k, record in enumerate(records):
        tags = record["DICOMTags"]
        if k % 3 == 0:
            tags["DICOMStudyDate"], clock = STUDY_BURST
            tags["DICOMStudyTime"] = rng.choice((clock, clock, f"{clock}.000001", f"{clock}.5"))
        else:
            day = datetime(2018, 1, 1) + timedelta(days=rng.randrange(5 * 365))
            tags["DICOMStudyDate"] = f"{day:%Y%m%d}"
            tags["DICOMStudyTime"] = f"{rng.randrange(24):02d}{rng.randrange(60):02d}00"
    return serve(records, "subranges")


@pytest.fixture
def burst_service(fresh_endpoint: None) -> Iterator[LocalService]:
    with _service(3000, seed=31) as service:
        yield service


def _read_all_while_updating(service: LocalService, tmp_path: Path) -> list[dict[str, Any]]:
    """A range over every dated image set, read after a full scan while image sets change.

    Checks the result is exact; returns the first requests of the range's chains.
    """
    ds = service.datastore_id
    assert ds is not None
    client = service.client()
    Query(ds).to_dataframe(client=client, progress=False, max_tps=None)  # leaves the quantiles
    written = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert '"image_sets"' in written  # the statistics were cached...
    assert "2020-06-15" not in written  # ...without a study date-time (PHI)
    dated = sorted(
        r["StudyDateTime"]
        for r in map(flat_row, service.backend.image_sets(ds))
        if r["StudyDateTime"]
    )
    query = Query(ds).between("StudyDateTime", dated[0], dated[-1])
    expected = brute_force(service.backend.image_sets(ds), query)
    sent = first_requests(client)
    frame = read_while_updating(service, query, client, seed=7)
    assert sorted(frame["imageSetId"]) == sorted(expected)
    own = [p for p in sent if len(p["searchCriteria"]["filters"]) == 1]
    return [
        p for p in own if "DICOMStudyDateAndTime" in p["searchCriteria"]["filters"][0]["values"][0]
    ]


def _bounds(requests: list[dict[str, Any]]) -> set[str]:
    return {
        v["DICOMStudyDateAndTime"]["DICOMStudyDate"] + v["DICOMStudyDateAndTime"]["DICOMStudyTime"]
        for p in requests
        for v in p["searchCriteria"]["filters"][0]["values"]
    }


def test_a_sub_range_boundary_inside_a_same_second_burst_loses_nothing_while_sets_change(
    burst_service: LocalService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boundary at the burst's second: its image sets at .0 are in both neighbours, those
    at .000001 and .5 in the upper one; every one is read, once."""
    burst = datetime.strptime("".join(STUDY_BURST), "%Y%m%d%H%M%S")
    monkeypatch.setattr(subranges, "sub_cuts", lambda *_: (burst,))
    own = _read_all_while_updating(burst_service, tmp_path)
    assert len(own) >= 4  # two sub-ranges, each from both ends
    assert "".join(STUDY_BURST) in _bounds(own)


def test_sub_range_boundaries_keep_clear_of_a_burst_so_it_is_read_once(
    burst_service: LocalService, tmp_path: Path
) -> None:
    own = _read_all_while_updating(burst_service, tmp_path)
    assert len(own) >= 4
    assert "".join(STUDY_BURST) not in _bounds(own)  # the cut next to it went after it


@pytest.mark.parametrize("mode", ["iter_dataframes", "to_parquet"])
def test_sub_ranges_read_in_chunks_or_exported_keep_each_image_set_once(
    burst_service: LocalService, tmp_path: Path, mode: str
) -> None:
    """The boundary's image sets come in two sub-ranges: a chunked run and an export keep one."""
    ds = burst_service.datastore_id
    assert ds is not None
    Query(ds).to_dataframe(client=burst_service.client(), progress=False, max_tps=None)
    query = Query(ds).between("StudyDateTime", datetime(2017, 1, 1), datetime(2024, 1, 1))
    assert len(query.plan(client=burst_service.client())) >= 3  # sub-ranges
    got = run_mode(mode, query, burst_service, tmp_path / "out.parquet")
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(brute_force(burst_service.backend.image_sets(ds), query))


def test_an_updated_range_is_cut_only_when_it_ended_before_the_run() -> None:
    """An update during the run moves an image set's updatedAt to now: out of a range that ended
    before, never into a sub-range already read past it."""
    now = datetime.now(UTC)
    values = [now - timedelta(days=900) + timedelta(days=900) * (k / 20_000) for k in range(20_000)]
    facts = _facts("updatedAt", values)
    ended = Query(DS).between("updatedAt", values[0], now - timedelta(hours=2))
    assert len(compile_spec(ended.spec(), facts).chains) > 1
    running = Query(DS).between("updatedAt", values[0], now + timedelta(days=1))
    (one,) = compile_spec(running.spec(), facts).chains
    assert one.long  # still read from both ends at once: the same chain, no cut


# -- the catch-up read --------------------------------------------------------------------------

LOWER = datetime(2010, 6, 1, 12, 0, 0)  # inside the lower sub-range, clear of its boundary
CUT = datetime(2015, 1, 1)


@pytest.fixture
def lopsided_service(fresh_endpoint: None) -> Iterator[LocalService]:
    """1,500 image sets: 20 dated in 2010 (the lower sub-range, one page), the rest 2018-2022."""
    rng = random.Random(41)
    records = generate_image_sets(1500, seed=41)
    for k, record in enumerate(records):
        day = datetime(2010, 1, 1) if k < 20 else datetime(2018, 1, 1)
        day += timedelta(days=rng.randrange(300 if k < 20 else 4 * 365))
        record["DICOMTags"]["DICOMStudyDate"] = f"{day:%Y%m%d}"
        record["DICOMTags"]["DICOMStudyTime"] = f"{rng.randrange(24):02d}0000"
    with serve(records, "catchup") as service:
        yield service


def _searches(client: Any) -> list[dict[str, Any]]:
    """Every SearchImageSets request *client* sends from now on, next pages included."""
    sent: list[dict[str, Any]] = []
    client.meta.events.register(
        "provide-client-params.medical-imaging.SearchImageSets",
        lambda params, **_: sent.append(params),
    )
    return sent


def _on_updated_at(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in requests
        for f in p.get("searchCriteria", {}).get("filters", [])
        if "updatedAt" in f["values"][0]
    ]


def _move_during_read(service: LocalService, moved: dict[str, Any]) -> threading.Event:
    """Move *moved* into the lower sub-range while its upper one is read, through boto3.

    The service computes the upper sub-range's later pages only after both of the lower one's
    pages (one reader from each end, one page each) were computed and *moved*'s StudyDate was
    edited to 2010: the lower sub-range was read past it, the upper one had read two pages of
    its ~30 (one from each end; *moved* is in the middle of its createdAt order).
    """
    backend, search = service.backend, service.backend.search
    editor = service.client()
    seen = {"lower": 0, "upper": 0}
    lower_read, done = threading.Condition(), threading.Event()

    def sub_range(criteria: dict[str, Any] | None) -> str | None:
        for f in (criteria or {}).get("filters", []):
            value = f["values"][0].get("DICOMStudyDateAndTime")
            if value is not None:
                return "upper" if value["DICOMStudyDate"] == f"{CUT:%Y%m%d}" else "lower"
        return None

    def searched(ds: str, criteria: dict[str, Any] | None, *args: Any) -> dict[str, Any]:
        part = sub_range(criteria)
        if part == "upper":
            with lower_read:
                seen["upper"] += 1
                number = seen["upper"]
            if number > 3:  # none of the upper sub-range's later pages before the edit
                assert done.wait(timeout=30)
            if number == 3:
                with lower_read:
                    assert lower_read.wait_for(lambda: seen["lower"] >= 2, timeout=30)
                date = {"StudyDate": f"{LOWER:%Y%m%d}", "StudyTime": f"{LOWER:%H%M%S}"}
                update_metadata(editor, ds, moved, Study=date)
                done.set()
        answer = search(ds, criteria, *args)
        if part == "lower":
            with lower_read:
                seen["lower"] += 1
                lower_read.notify_all()
        return answer

    backend.search = searched  # type: ignore[method-assign]
    return done


@pytest.mark.parametrize("mode", ["to_dataframe", "iter_dataframes", "to_parquet"])
@pytest.mark.parametrize("caught_up", [True, False], ids=["catch-up", "without"])
def test_an_image_set_moved_into_a_sub_range_already_read_is_read_again(
    lopsided_service: LocalService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    caught_up: bool,
) -> None:
    """Its StudyDate edited from the upper sub-range, not yet read past it, into the lower one,
    read past it: the catch-up's updatedAt search reads it again, at its latest version, once.
    Without the catch-up (``without``: the gap the test forces) it is lost."""
    service = lopsided_service
    ds = service.datastore_id
    assert ds is not None
    Query(ds).to_dataframe(client=service.client(), progress=False, max_tps=None)  # quantiles
    monkeypatch.setattr(subranges, "sub_cuts", lambda *_: (CUT,))
    if not caught_up:
        monkeypatch.setattr(run_module, "catch_up", lambda *_: iter(()))
    query = Query(ds).between("StudyDateTime", datetime(2009, 1, 1), datetime(2023, 1, 1))
    assert len(query.plan(client=service.client())) == 2
    assert "updatedAt search from the run's start" in query.explain(client=service.client())
    upper = sorted(
        (r for r in service.backend.image_sets(ds) if r["DICOMTags"]["DICOMStudyDate"] >= "2018"),
        key=lambda r: r["createdAt"],
    )
    moved = upper[len(upper) // 2]
    edited = _move_during_read(service, moved)
    versions: dict[str, int] = {}
    if mode == "to_dataframe":  # run_mode's options, the frame kept for its versions
        frame = query.to_dataframe(
            client=service.client(), progress=False, max_concurrency=4, max_tps=None
        )
        got = list(frame["imageSetId"])
        versions = dict(zip(frame["imageSetId"], frame["version"], strict=True))
    else:
        got = run_mode(mode, query, service, tmp_path / "out.parquet")
    assert edited.is_set()
    now = {r["imageSetId"]: r for r in service.backend.image_sets(ds)}
    assert now[moved["imageSetId"]]["version"] == moved["version"] + 1
    assert len(got) == len(set(got))
    expected = brute_force(list(now.values()), query)
    assert moved["imageSetId"] in expected
    if caught_up:
        assert sorted(got) == sorted(expected)
        assert versions.get(moved["imageSetId"], moved["version"] + 1) == moved["version"] + 1
    else:
        assert sorted(got) == sorted(set(expected) - {moved["imageSetId"]})  # silently lost


def test_the_catch_up_costs_one_request_when_nothing_changed_and_none_without_sub_ranges(
    lopsided_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = lopsided_service
    ds = service.datastore_id
    assert ds is not None
    query = Query(ds).between("StudyDateTime", datetime(2009, 1, 1), datetime(2023, 1, 1))
    client = service.client()
    sent = _searches(client)
    one = query.to_dataframe(client=client, progress=False, max_tps=None)  # no quantiles yet
    assert len(query.plan(client=client)) == 1  # ...one chain: no catch-up
    assert "updatedAt search from the run's start" not in query.explain(client=client)
    assert sent
    assert not _on_updated_at(sent)
    Query(ds).to_dataframe(client=client, progress=False, max_tps=None)  # leaves the quantiles
    monkeypatch.setattr(subranges, "sub_cuts", lambda *_: (CUT,))
    assert len(query.plan(client=client)) == 2
    assert "updatedAt search from the run's start" in query.explain(client=client)
    sent.clear()
    two = query.to_dataframe(client=client, progress=False, max_tps=None, max_concurrency=4)
    (catch_up,) = _on_updated_at(sent)  # one request: nothing was updated since the start
    assert "nextToken" not in catch_up
    assert sorted(two["imageSetId"]) == sorted(one["imageSetId"])


def test_the_catch_up_window_is_moved_by_the_clock_skew_the_service_answers_show(
    lopsided_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up compares our clock with the service's updatedAt stamps: it measures the skew
    from the answers' Date header (the local service shares our clock: about none) and moves its
    window by it (a service two hours ahead, as its Date headers would say)."""
    from healthimaging_df.aws import clients

    service = lopsided_service
    ds = service.datastore_id
    assert ds is not None
    query = Query(ds).between("StudyDateTime", datetime(2009, 1, 1), datetime(2023, 1, 1))
    client = service.client()
    Query(ds).to_dataframe(client=client, progress=False, max_tps=None)  # leaves the quantiles
    measured = clients.clock_skew()
    assert measured is not None
    assert abs(measured) < timedelta(seconds=5)
    monkeypatch.setattr(subranges, "sub_cuts", lambda *_: (CUT,))
    ahead = timedelta(hours=2)
    monkeypatch.setattr(clients, "_observe_clock", lambda _: clients._clock.update(skew=ahead))
    sent = _searches(client)
    started = datetime.now(timezone.utc)
    query.to_dataframe(client=client, progress=False, max_tps=None, max_concurrency=4)
    (catch_up,) = _on_updated_at(sent)
    low, high = (v["updatedAt"] for v in catch_up["searchCriteria"]["filters"][0]["values"])
    assert started + ahead - timedelta(minutes=6) <= low <= started + ahead
    assert high >= datetime.now(timezone.utc) + ahead
