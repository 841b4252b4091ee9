"""Windowed scans: pre-split from statistics, read from both ends, exact on any createdAt spread.

A full scan leaves createdAt quantiles behind; the next scan starts one reader per piece at
those cut points (seen here in the requests the real client sends). Bursty and same-second
datastores, with image sets updated between pages, still come back every image set once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from healthimaging_df import Query, engine
from healthimaging_df.engine import statistics
from healthimaging_df.local import LocalService, generate_image_sets
from healthimaging_df.local.backend import Backend
from healthimaging_df.plan import DatastoreStats, compile_plan, presplit, rows_between

from .conftest import first_requests

UTC = timezone.utc
START = datetime(2023, 1, 1, tzinfo=UTC)


def _service(created: list[datetime], seed: int = 4) -> LocalService:
    records = generate_image_sets(len(created), seed=seed)
    for record, moment in zip(records, created, strict=True):
        shift = moment - record["createdAt"]
        for key in ("createdAt", "updatedAt", "lastAccessedAt"):
            record[key] = record[key] + shift
    backend = Backend()
    datastore_id = backend.create_datastore("spread")
    backend.add_image_sets(datastore_id, records)
    service = LocalService(backend)
    service.datastore_id = datastore_id
    return service


def _bursty(n: int, rng: random.Random) -> list[datetime]:
    out: list[datetime] = []
    while len(out) < n:
        size = min(n - len(out), rng.randint(5, 300))
        start = START + timedelta(days=900) * rng.random()
        out += [start + timedelta(seconds=k / 2 + rng.random() / 2) for k in range(size)]
    return out


def _same_second(n: int, rng: random.Random) -> list[datetime]:
    third = n // 3
    burst = START + timedelta(days=400)
    # a third within one second, many in the very same microsecond
    same = [
        burst + timedelta(microseconds=rng.choice((0, 1, rng.randrange(10**6))))
        for _ in range(third)
    ]
    return same + [START + timedelta(days=900) * rng.random() for _ in range(n - third)]


def _lows(requests: list[dict[str, Any]]) -> set[datetime]:
    lows = set()
    for params in requests:
        for f in params.get("searchCriteria", {}).get("filters", []):
            if "createdAt" in f["values"][0]:
                lows.add(f["values"][0]["createdAt"])
    return lows


def test_presplit_cuts_the_window_at_equal_shares_of_the_quantiles() -> None:
    quantiles = tuple(START + timedelta(days=d) for d in (0, 1, 2, 3, 400, 800))
    stats = DatastoreStats(5000, quantiles[0], quantiles[-1], "scan", created_quantiles=quantiles)
    plan = compile_plan("a" * 32)
    split = presplit(plan, stats, 5)
    (chain,) = split.chains
    assert len(chain.splits) == 4
    assert all(s.microsecond == 0 and chain.window[0] < s < chain.window[1] for s in chain.splits)
    # most image sets were created in the first three days: so are most cuts
    assert sum(s <= START + timedelta(days=3) for s in chain.splits) == 3
    assert "pre-split into 5 pieces" in split.explain()
    assert rows_between(chain, START, START + timedelta(days=3)) == pytest.approx(3000)
    assert (
        presplit(plan, DatastoreStats(100, quantiles[0], quantiles[-1]), 5).chains[0].splits == ()
    )


def test_a_full_scan_leaves_quantiles_and_the_next_scan_starts_at_them() -> None:
    with LocalService.seeded(image_sets=2600, seed=8) as service:
        ds = service.datastore_id
        assert ds is not None
        client = service.client()
        first = Query(ds).to_dataframe(client=client, progress=False)
        stats = statistics.cached(client, ds)
        assert stats is not None
        assert stats.image_sets == 2600
        assert len(stats.created_quantiles) > 10
        created = sorted(first["createdAt"])
        assert stats.created_quantiles[0] == created[0].to_pydatetime()
        assert stats.created_quantiles[-1] == created[-1].to_pydatetime()

        run = engine.prepare(client, None, False, 8, 25.0)
        plan = engine.choose(lambda s: Query(ds).compile(stats=s), run)
        (chain,) = plan.chains
        assert len(chain.splits) == engine.presplit_pieces(run.fetch, stats) - 1 >= 2

        sent = first_requests(client)
        again = Query(ds).to_dataframe(client=client, progress=False, max_concurrency=8)
        assert set(chain.splits) <= _lows(sent)  # one reader started at every cut
        assert sorted(again["imageSetId"]) == sorted(first["imageSetId"])


@pytest.fixture(params=["bursty", "same-second"])
def spread_service(request: pytest.FixtureRequest) -> Iterator[LocalService]:
    rng = random.Random(7)
    make = _bursty if request.param == "bursty" else _same_second
    with _service(make(1500, rng)) as service:
        yield service


@pytest.mark.parametrize("rescan", [False, True])
def test_bursty_and_same_second_scans_are_exact_while_image_sets_change(
    spread_service: LocalService, rescan: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEALTHIMAGING_DF_CACHE", str(tmp_path))
    ds = spread_service.datastore_id
    assert ds is not None
    client = spread_service.client()
    if rescan:
        Query(ds).to_dataframe(client=client, progress=False)  # leaves statistics
        assert statistics.cached(client, ds) is not None
    before = {r["imageSetId"]: r["version"] for r in spread_service.backend.image_sets(ds)}
    spread_service.set_faults(update_rate=0.5, latency_ms=2.0, seed=3)
    spread_service.reset_stats()
    frame = Query(ds).to_dataframe(client=client, progress=False, max_concurrency=6, max_tps=None)
    updated = spread_service.stats.updated_image_sets
    spread_service.set_faults(update_rate=0.0, latency_ms=0.0)
    assert updated, "nothing changed while the scan ran"
    assert frame["imageSetId"].is_unique
    assert set(frame["imageSetId"]) == set(before)
    after = {r["imageSetId"]: r["version"] for r in spread_service.backend.image_sets(ds)}
    for image_set_id, version in zip(frame["imageSetId"], frame["version"], strict=True):
        if image_set_id in updated:
            assert before[image_set_id] <= version <= after[image_set_id]
        else:
            assert version == before[image_set_id]
