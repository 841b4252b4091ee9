"""The planner weighs fan-out against a scan by estimated requests; the engine supplies the size."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from healthimaging_df import Query, engine
from healthimaging_df.engine import statistics
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.local import LocalService
from healthimaging_df.plan import DatastoreStats

from .conftest import brute_force, flat_row

DS = "0123456789abcdef0123456789abcdef"
IDS = [f"P{n:04d}" for n in range(1000)]


def test_a_long_in_list_on_a_small_datastore_is_a_scan() -> None:
    plan = Query(DS).where(PatientID=IDS).compile(stats=DatastoreStats(2_000))
    assert plan.access == "scan"
    assert plan.windowed
    assert not plan.pushed
    assert [c.chosen for c in plan.candidates] == [False, True]


def test_a_long_in_list_on_a_large_datastore_fans_out() -> None:
    plan = Query(DS).where(PatientID=IDS).compile(stats=DatastoreStats(1_000_000))
    assert plan.access == "fanout"
    assert len(plan.chains) == 1000


def test_without_statistics_a_long_list_asks_for_them_and_a_short_one_does_not() -> None:
    assert Query(DS).where(PatientID=IDS).compile().wants_statistics
    short = Query(DS).where(PatientID=IDS[:5]).compile()
    assert not short.wants_statistics
    assert short.access == "fanout"


def test_a_created_at_range_shrinks_the_scan_estimate() -> None:
    from datetime import datetime, timezone

    stats = DatastoreStats(
        100_000,
        datetime(2020, 1, 1, tzinfo=timezone.utc),
        datetime(2024, 1, 1, tzinfo=timezone.utc),
    )
    query = Query(DS).where(PatientID=IDS).between("createdAt", "2023-01-01", "2023-01-31")
    plan = query.compile(stats=stats)
    scan = plan.candidates[1]
    assert scan.requests is not None
    assert scan.requests < 100
    assert plan.access == "scan"


def test_strategy_forces_a_path_and_explain_shows_the_estimates() -> None:
    query = Query(DS).where(PatientID=IDS)
    forced = query.using("fanout").compile(stats=DatastoreStats(2_000))
    assert forced.access == "fanout"
    text = query.compile(stats=DatastoreStats(2_000)).explain()
    assert "access paths weighed" in text
    assert "fan-out (1000 chains): about 1,000 requests" in text
    assert "scan, IN list applied on the client: about 42 requests" in text
    assert "P0001" not in text
    with pytest.raises(QueryValidationError, match="strategy"):
        query.using("fastest")  # type: ignore[arg-type]
    assert Query.from_dict(query.using("scan").to_dict()).strategy == "scan"


@pytest.fixture
def stats_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEALTHIMAGING_DF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_unknown_datastore_is_probed_then_scanned_and_the_result_is_exact(
    ahi_service_factory: Any, stats_cache: Path
) -> None:
    with ahi_service_factory(image_sets=2_000, seed=8) as service:
        records = service.backend.image_sets(service.datastore_id)
        patients = sorted({flat_row(r)["PatientID"] for r in records if flat_row(r)["PatientID"]})
        query = Query(service.datastore_id).where(PatientID=patients[:300])
        frame = query.to_dataframe(client=service.client(), progress=False, max_tps=None)
        assert sorted(frame["imageSetId"]) == sorted(brute_force(records, query))
        requests = service.stats.requests
        assert requests < 80  # probe (10) + a scan of 40 pages, not 300 fan-out chains
        assert list(stats_cache.rglob("*.json"))  # the probe's estimate is kept


def test_a_full_scan_leaves_an_exact_count_the_next_plan_uses(
    service: LocalService, records: list, stats_cache: Path
) -> None:
    Query(service.datastore_id).to_dataframe(client=service.client(), progress=False, max_tps=None)
    service.reset_stats()
    patients = sorted({flat_row(r)["PatientID"] for r in records if flat_row(r)["PatientID"]})
    query = Query(service.datastore_id).where(PatientID=patients[:200])
    frame = query.to_dataframe(client=service.client(), progress=False, max_tps=None)
    assert sorted(frame["imageSetId"]) == sorted(brute_force(records, query))
    # no probe: the scan's count was cached; 1,500 image sets are a 30-page scan, not 200 chains
    assert service.stats.requests < 100  # a scan (30 pages, more as windows split), not 200 chains


def test_a_full_scan_counts_non_primary_image_sets_and_a_filtered_one_keeps_the_count(
    service: LocalService, records: list, stats_cache: Path
) -> None:
    client = service.client()
    ds = service.datastore_id
    flagged = sum(1 for r in records if r.get("isPrimary") is False)
    assert 0 < flagged < len(records)
    Query(ds).to_dataframe(client=client, progress=False, max_tps=None)
    after_scan = statistics.cached(client, ds)
    assert after_scan is not None
    assert (after_scan.image_sets, after_scan.non_primary) == (len(records), flagged)
    # a filtered full scan cannot count them (it keeps no flags of the rows it drops): the
    # count stands, where a scan used to overwrite it with None
    Query(ds).where_not(Modality="CT").to_dataframe(client=client, progress=False, max_tps=None)
    after_filtered = statistics.cached(client, ds)
    assert after_filtered is not None
    assert after_filtered.non_primary == flagged


def test_a_probe_sends_its_window_requests_at_once(ahi_service_factory: Any) -> None:
    from healthimaging_df.engine import statistics

    with ahi_service_factory(image_sets=2_000, seed=8) as service:
        service.set_faults(latency_ms=100)
        service.reset_stats()
        stats = statistics.probe(service.client(), str(service.datastore_id), None)
        assert service.stats.requests == 10
        assert service.stats.peak_concurrency >= 4  # ten in a row would be one at a time
        assert 1_000 <= stats.image_sets <= 4_000


def test_a_probe_of_fifty_image_sets_or_fewer_counts_them_with_two_requests(
    ahi_service_factory: Any,
) -> None:
    from healthimaging_df.engine import statistics

    with ahi_service_factory(image_sets=37, seed=8) as service:
        stats = statistics.probe(service.client(), str(service.datastore_id), None)
        assert service.stats.requests == 2
        assert stats.image_sets == 37


@pytest.mark.parametrize("shape", ["in-list", "whole-datastore"])
@pytest.mark.parametrize("mode", ["to_dataframe", "iter_dataframes", "to_parquet"])
def test_a_probed_scan_starts_from_the_probes_pages_and_stays_exact_while_updates_land(
    ahi_service_factory: Any, stats_cache: Path, tmp_path: Path, mode: str, shape: str
) -> None:
    import threading

    from healthimaging_df.snapshot import read_snapshot

    from .test_exactness import current, update_while_paging

    with ahi_service_factory(image_sets=2_000, seed=8) as service:
        records = service.backend.image_sets(service.datastore_id)
        patients = sorted({flat_row(r)["PatientID"] for r in records if flat_row(r)["PatientID"]})
        query = Query(service.datastore_id)
        if shape == "in-list":  # long enough for a scan to win: the probe decides
            query = query.where(PatientID=patients[:300])
        seen: list[int] = []
        options: dict[str, Any] = {
            "client": service.client(),
            "max_tps": None,
            "progress": lambda pages, _rows: seen.append(pages),
        }
        service.set_faults(latency_ms=2.0)
        service.reset_stats()
        stop = threading.Event()
        touched: list[str] = []
        worker = threading.Thread(
            target=lambda: touched.extend(update_while_paging(service, stop, 4))
        )
        worker.start()
        try:
            if mode == "to_dataframe":
                got = list(query.to_dataframe(**options)["imageSetId"])
            elif mode == "iter_dataframes":
                chunks = query.iter_dataframes(chunk_rows=97, **options)
                got = [i for chunk in chunks for i in chunk["imageSetId"]]
            else:
                query.to_parquet(str(tmp_path / "x.parquet"), checkpoint_interval=0, **options)
                got = list(read_snapshot(tmp_path / "x.parquet")["imageSetId"])
        finally:
            stop.set()
            worker.join()
        assert touched  # the datastore changed while the probe and the scan read it
        assert len(got) == len(set(got))
        assert sorted(got) == sorted(brute_force(current(service), query))
        # the probe's two ends are the only requests beyond the pages the scan consumed: its
        # eight window pages were the scan's first pages, not asked for again
        assert service.stats.requests == max(seen) + 2


# -- honest costs (issue 26): explain() and plan() use what the run uses ------------------------


def test_explain_with_a_client_prices_the_scan_the_run_sends(
    ahi_service_factory: Any, stats_cache: Path
) -> None:
    """Was: "expected calls: at least 1" for a scan of hundreds of requests."""
    with ahi_service_factory(image_sets=2_000, seed=8) as service:
        client = service.client()
        query = Query(service.datastore_id)
        query.to_dataframe(client=client, progress=False, max_tps=None)  # leaves exact statistics
        text = query.explain(client=client, max_tps=None)
        assert "datastore size: 2,000 image sets" in text
        found = re.search(r"expected requests: about ([\d,]+)", text)
        assert found is not None, text
        said = int(found[1].replace(",", ""))
        service.reset_stats()
        query.to_dataframe(client=client, progress=False, max_tps=None)
        sent = service.stats.requests
        assert 0.8 * sent <= said <= 1.25 * sent, (said, sent)
        assert "at least 1 " not in text


def test_explain_with_a_client_says_the_scan_the_run_chooses_for_a_long_list(
    service: LocalService, records: list, stats_cache: Path
) -> None:
    """Was: "fan-out" explained for 500 IDs that the run then scanned."""
    client = service.client()
    Query(service.datastore_id).to_dataframe(client=client, progress=False, max_tps=None)
    patients = sorted({flat_row(r)["PatientID"] for r in records if flat_row(r)["PatientID"]})
    query = Query(service.datastore_id).where(PatientID=patients[:500])
    assert query.compile().access == "fanout"  # without statistics, as before
    planned = query.explain(client=client)
    assert "scan, IN list applied on the client: about" in planned
    assert "(chosen)" in planned.split("scan, IN list applied on the client")[1].splitlines()[0]
    run = engine.prepare(client, progress=False, max_tps=None)
    assert engine.choose(query.spec(), run).access == "scan"


def test_plan_with_a_client_lists_the_requests_the_run_starts_with(
    service: LocalService, stats_cache: Path
) -> None:
    """Was: one request listed for a scan the run starts in several pieces."""
    client = service.client()
    query = Query(service.datastore_id)
    query.to_dataframe(client=client, progress=False, max_tps=None)
    listed = query.plan(client=client)
    assert len(query.plan()) == 1  # without statistics: the one window
    assert len(listed) > 1
    run = engine.prepare(client, progress=False, max_tps=None)
    assert engine.choose(query.spec(), run).requests() == listed
    windows = [r["searchCriteria"]["filters"][-1]["values"] for r in listed]
    assert all(w[0]["createdAt"] <= w[1]["createdAt"] for w in windows)


def test_explain_prices_at_the_runs_max_tps(service: LocalService, stats_cache: Path) -> None:
    """Was: "at 25 TPS" whatever max_tps was."""
    query = Query(service.datastore_id).where(PatientID=IDS)
    slow = query.compile(stats=DatastoreStats(2_000)).explain(max_tps=5)
    assert "at 5 TPS" in slow
    assert "at 25 TPS" not in slow
    with_client = query.explain(client=service.client(), max_tps=5)
    assert "at 5 TPS" in with_client
    assert "at 25 TPS" not in with_client
    assert "unpaced" in query.explain(max_tps=None)


def test_explain_says_when_the_size_is_unknown_and_shows_the_probe(
    service: LocalService, stats_cache: Path
) -> None:
    client = service.client()
    text = Query(service.datastore_id).where(PatientID=IDS).explain(client=client)
    assert "measured first, at run time (about 10 requests)" in text
    assert "a probe of about 10 requests" in text
    assert "size unknown" in text
    whole = Query(service.datastore_id).explain(client=client)
    assert "the datastore's two ends (2 requests)" in whole


def test_cli_explain_prices_at_the_given_max_tps(capsys: pytest.CaptureFixture[str]) -> None:
    from healthimaging_df.cli.app import main

    code = main(
        ["search", "--datastore-id", DS, "--where", "PatientID=P1", "--explain", "--max-tps", "5"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "at 5 TPS" in out
    assert "at 25 TPS" not in out
