"""New faults, each provoked through a real boto3 client against the local service."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from healthimaging_df.local import Faults, LocalService
from healthimaging_df.local.faults import (
    DOCUMENTED_QUOTAS,
    MALFORMED_KINDS,
    SlidingWindow,
    StatsRecorder,
    TokenBucket,
)


@pytest.fixture(scope="module")
def svc() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=300, seed=5) as service:
        yield service


@pytest.fixture
def fresh(svc: LocalService) -> LocalService:
    svc.reset_faults()
    svc.reset_stats()
    return svc


def once(service: LocalService) -> Any:
    """A client that does not retry, so each call is one request."""
    return service.client(retries={"mode": "standard", "total_max_attempts": 1})


def raw_search(service: LocalService) -> tuple[dict[str, str], bytes]:
    """One signed SearchImageSets over a bare socket: headers and every byte until EOF."""
    path = f"/datastore/{service.datastore_id}/searchImageSets?maxResults=5"
    signed = service.sign("POST", f"http://local{path}", headers={"Host": "local"})
    lines = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\n{lines}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return headers, body


# -- malformed pages ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "short", "html", "empty"])
def test_unparsable_bodies_look_like_a_last_page_to_botocore(
    fresh: LocalService, kind: str
) -> None:
    fresh.set_faults(malformed_every=1, malformed_kinds=(kind,))
    try:
        page = once(fresh).search_image_sets(datastoreId=fresh.datastore_id, maxResults=5)
    except BotoCoreError:  # a urllib3 that enforces Content-Length on "short"
        assert kind == "short"
    else:
        assert "imageSetsMetadataSummaries" not in page
        assert "nextToken" not in page  # the silent end of a chain issue 9 describes
    headers, body = raw_search(fresh)
    declared = int(headers["Content-Length"])
    if kind == "short":
        assert 0 < len(body) < declared
    else:
        assert len(body) == declared
    if kind == "truncated":
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
        assert body.startswith(b'{"imageSetsMetadataSummaries": [')
    if kind == "html":
        assert headers["Content-Type"].startswith("text/html")
        assert body.startswith(b"<html>")
    if kind == "empty":
        assert body == b""
    stats = fresh.stats
    assert stats.malformed_sent == 2
    assert stats.malformed_by_kind == {kind: 2}


def test_null_summaries_drop_the_page_but_keep_the_token(fresh: LocalService) -> None:
    fresh.set_faults(malformed_every=1, malformed_kinds=("null_summaries",))
    page = once(fresh).search_image_sets(datastoreId=fresh.datastore_id, maxResults=5)
    assert "imageSetsMetadataSummaries" not in page
    assert page["nextToken"]
    _, body = raw_search(fresh)
    assert json.loads(body)["imageSetsMetadataSummaries"] is None


def test_bad_item_and_bad_timestamp(fresh: LocalService) -> None:
    fresh.set_faults(malformed_every=1, malformed_kinds=("bad_item",))
    items = once(fresh).search_image_sets(datastoreId=fresh.datastore_id, maxResults=5)[
        "imageSetsMetadataSummaries"
    ]
    bad = [item for item in items if len(item["imageSetId"]) != 32]
    assert len(bad) == 1
    assert len(items) == 5
    assert len(bad[0]["imageSetId"]) == 10
    assert isinstance(bad[0]["version"], int)  # botocore coerces the string back
    _, body = raw_search(fresh)
    versions = [item["version"] for item in json.loads(body)["imageSetsMetadataSummaries"]]
    assert sum(isinstance(v, str) for v in versions) == 1  # on the wire: a string
    fresh.set_faults(malformed_kinds=("bad_timestamp",))
    with pytest.raises(ValueError, match="timestamp"):  # botocore's own, untyped, error
        once(fresh).search_image_sets(datastoreId=fresh.datastore_id, maxResults=5)
    _, body = raw_search(fresh)
    created = [item["createdAt"] for item in json.loads(body)["imageSetsMetadataSummaries"]]
    assert created.count("not-a-timestamp") == 1


def test_malformed_every_and_rate_are_deterministic(fresh: LocalService) -> None:
    client = once(fresh)

    def run(n: int) -> list[bool]:
        fresh.reset_stats()
        broken = []
        for _ in range(n):
            try:
                page = client.search_image_sets(datastoreId=fresh.datastore_id, maxResults=2)
            except ValueError:  # bad_timestamp
                broken.append(True)
                continue
            items = page.get("imageSetsMetadataSummaries")
            broken.append(not items or any(len(i["imageSetId"]) != 32 for i in items))
        return broken

    fresh.set_faults(malformed_every=3)
    assert run(9) == [False, False, True] * 3
    fresh.set_faults(malformed_every=None, malformed_rate=0.4, seed=11)
    first = run(35)
    fresh.set_faults(seed=11)  # same seed: the same requests are spoiled
    assert run(35) == first
    stats = fresh.stats
    assert 5 <= stats.malformed_sent == sum(first) <= 25
    counts = [stats.malformed_by_kind.get(kind, 0) for kind in MALFORMED_KINDS]
    assert max(counts) - min(counts) <= 1  # kinds taken in turn


def test_faults_validate_new_settings() -> None:
    for bad in (
        {"malformed_rate": 1.5},
        {"malformed_kinds": ("gibberish",)},
        {"malformed_kinds": ()},
        {"malformed_every": 0},
        {"window_tps": 0},
        {"update_rate": -1.0},
        {"update_tags": ("not a tag",)},
        {"operation_quotas": {"SearchImageSets": (0.0, 1)}},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Faults(**bad)


# -- endless empty pages -------------------------------------------------------------------------


def test_endless_empty_pages_never_repeat_a_token(fresh: LocalService) -> None:
    fresh.set_faults(endless_empty_pages=True)
    client = fresh.client()
    pages = client.get_paginator("search_image_sets").paginate(
        datastoreId=fresh.datastore_id, PaginationConfig={"PageSize": 50}
    )
    tokens = []
    for number, page in enumerate(pages):
        assert page["imageSetsMetadataSummaries"] == []
        tokens.append(page["nextToken"])
        if number == 29:
            break
    assert len(set(tokens)) == 30
    assert fresh.stats.empty_pages_sent == 30
    with pytest.raises(ClientError) as caught:  # still validated
        client.search_image_sets(datastoreId=fresh.datastore_id, nextToken="forged.token")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    fresh.set_faults(endless_empty_pages=False)
    with pytest.raises(ClientError) as caught:  # an endless token is no cursor
        client.search_image_sets(datastoreId=fresh.datastore_id, nextToken=tokens[-1])
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_a_stuck_cursor_repeats_the_first_page_with_fresh_tokens(fresh: LocalService) -> None:
    client = fresh.client()
    first = client.search_image_sets(datastoreId=fresh.datastore_id, maxResults=7)
    fresh.set_faults(stuck_cursor=True)
    tokens = []
    token = first["nextToken"]
    for _ in range(5):
        page = client.search_image_sets(
            datastoreId=fresh.datastore_id, maxResults=7, nextToken=token
        )
        assert page["imageSetsMetadataSummaries"] == first["imageSetsMetadataSummaries"]
        token = page["nextToken"]
        tokens.append(token)
    assert len(set(tokens)) == 5
    with pytest.raises(ClientError) as caught:  # still validated
        client.search_image_sets(datastoreId=fresh.datastore_id, nextToken="forged.token")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    fresh.set_faults(stuck_cursor=False)


# -- updates between pages -----------------------------------------------------------------------


def page_all(client: Any, datastore_id: str, criteria: dict[str, Any] | None) -> list[str]:
    kwargs: dict[str, Any] = {"datastoreId": datastore_id, "PaginationConfig": {"PageSize": 25}}
    if criteria is not None:
        kwargs["searchCriteria"] = criteria
    pages = client.get_paginator("search_image_sets").paginate(**kwargs)
    return [item["imageSetId"] for page in pages for item in page["imageSetsMetadataSummaries"]]


def test_updates_between_pages_keep_tags_and_move_updated_at(
    ahi_service_factory: Callable[..., LocalService],
) -> None:
    service = ahi_service_factory(image_sets=300, seed=2, update_rate=2.0, fault_seed=4)
    before = {r["imageSetId"]: r for r in service.backend.image_sets(service.datastore_id)}
    client = service.client()
    # createdAt ASC: no update moves a row across the cursor, so every row comes exactly once.
    found = page_all(
        client, service.datastore_id, {"sort": {"sortField": "createdAt", "sortOrder": "ASC"}}
    )
    assert sorted(found) == sorted(before)
    stats = service.stats
    assert stats.updates_applied == 2 * stats.by_operation["SearchImageSets"] == 2 * 12
    assert stats.updated_image_sets
    assert not any(stats.updated_image_sets.values())
    after = {r["imageSetId"]: r for r in service.backend.image_sets(service.datastore_id)}
    for image_set_id in stats.updated_image_sets:
        old, new = before[image_set_id], after[image_set_id]
        assert new["version"] > old["version"]
        assert new["updatedAt"] > old["updatedAt"]
        assert new["DICOMTags"] == old["DICOMTags"]
    # The default order (updatedAt DESC) loses updated rows: they jump ahead of the cursor.
    service.reset_stats()
    found = page_all(client, service.datastore_id, None)
    updated = set(service.stats.updated_image_sets)
    missing = set(before) - set(found)
    assert len(found) == len(set(found))
    assert missing
    assert missing <= updated
    assert {i for i in before if i not in updated} <= set(found)


def test_updates_that_change_the_match(ahi_service_factory: Callable[..., LocalService]) -> None:
    service = ahi_service_factory(
        image_sets=300,
        seed=3,
        update_rate=1.0,
        update_tags=("DICOMSeriesModality", "DICOMPatientId", "isPrimary"),
        update_tags_rate=0.5,
    )
    before = {r["imageSetId"]: r for r in service.backend.image_sets(service.datastore_id)}
    page_all(service.client(), service.datastore_id, None)
    changed = service.stats.updated_image_sets
    assert set(changed.values()) == {True, False}
    after = {r["imageSetId"]: r for r in service.backend.image_sets(service.datastore_id)}
    for image_set_id, did_change in changed.items():
        old, new = before[image_set_id], after[image_set_id]
        same = (old["DICOMTags"], old["isPrimary"]) == (new["DICOMTags"], new["isPrimary"])
        if not did_change:
            assert same  # only version and updatedAt moved
    moved = [
        i
        for i, did in changed.items()
        if did
        and before[i]["DICOMTags"].get("DICOMPatientId")
        != after[i]["DICOMTags"].get("DICOMPatientId")
    ]
    assert moved
    patients = {r["DICOMTags"].get("DICOMPatientId") for r in before.values()}
    assert all(after[i]["DICOMTags"]["DICOMPatientId"] in patients for i in moved)


def test_update_draws_are_seeded(ahi_service_factory: Callable[..., LocalService]) -> None:
    runs = []
    for _ in range(2):
        service = ahi_service_factory(image_sets=200, seed=1, update_rate=0.5, fault_seed=9)
        page_all(service.client(), service.datastore_id, None)
        runs.append(service.stats.updated_image_sets)
    assert runs[0] == runs[1]
    assert 1 <= len(runs[0]) <= 8


# -- rate limits ---------------------------------------------------------------------------------


def test_sliding_window_is_strict_where_a_bucket_is_not() -> None:
    now = [0.0]
    window = SlidingWindow(limit=4, window=1.0, clock=lambda: now[0])
    bucket = TokenBucket(rate=4.0, capacity=4.0, clock=lambda: now[0])
    admitted = {"window": 0, "bucket": 0}
    for step in range(8):  # 8 requests in 0.7 s
        now[0] = step * 0.1
        admitted["window"] += window.try_take()
        admitted["bucket"] += bucket.try_take()
    assert admitted == {"window": 4, "bucket": 6}  # the bucket refilled while draining
    now[0] = 1.0  # the first accepted request (t=0) leaves the window
    assert window.try_take()
    assert not window.try_take()


def test_window_tps_throttles_through_boto3(fresh: LocalService) -> None:
    fresh.set_faults(window_tps=3)
    client = once(fresh)
    outcomes = []
    started = time.monotonic()
    for _ in range(4):
        try:
            client.get_datastore(datastoreId=fresh.datastore_id)
            outcomes.append("ok")
        except ClientError as error:
            outcomes.append(error.response["Error"]["Code"])
    if time.monotonic() - started < 1.0:
        assert outcomes == ["ok", "ok", "ok", "ThrottlingException"]
    stats = fresh.stats
    assert stats.throttled_by_limit == {"window": outcomes.count("ThrottlingException")}
    assert stats.throttled_by_operation == {"GetDatastore": stats.throttled}


def test_documented_quotas_one_bucket_per_operation() -> None:
    now = [0.0]
    recorder = StatsRecorder(Faults(documented_quotas=True), clock=lambda: now[0])
    for operation, (_rate, burst) in DOCUMENTED_QUOTAS.items():
        assert not any(recorder.should_throttle(operation) for _ in range(burst)), operation
        assert recorder.should_throttle(operation)
    now[0] = 0.2  # ListDatastores refills 5/s: one more
    assert [recorder.should_throttle("ListDatastores") for _ in range(2)] == [False, True]
    assert not recorder.should_throttle("Unknown")  # no quota for unrouted requests
    stats = recorder.snapshot()
    assert stats.throttled_by_limit == {"operation": len(DOCUMENTED_QUOTAS) + 1}
    assert stats.throttled_by_operation["ListDatastores"] == 2
    raised = StatsRecorder(
        Faults(documented_quotas=True, operation_quotas={"SearchImageSets": (250.0, 500)}),
        clock=lambda: now[0],
    )
    assert not any(raised.should_throttle("SearchImageSets") for _ in range(500))


def test_documented_quotas_through_boto3(fresh: LocalService) -> None:
    fresh.set_faults(documented_quotas=True)
    client = once(fresh)
    started = time.monotonic()
    passed, code = 0, None
    while passed < 100:
        try:
            client.list_datastores()
        except ClientError as error:
            code = error.response["Error"]["Code"]
            break
        passed += 1
    elapsed = time.monotonic() - started
    assert code == "ThrottlingException"
    assert 10 <= passed <= 10 + 5 * elapsed + 1  # burst 10, refill 5/s
    # Other operations have their own buckets.
    assert client.get_datastore(datastoreId=fresh.datastore_id)["datastoreProperties"]
    assert client.search_image_sets(datastoreId=fresh.datastore_id, maxResults=1)
    assert fresh.stats.throttled_by_operation == {"ListDatastores": 1}


def test_cli_serve_takes_the_new_fault_options() -> None:
    import argparse
    import threading

    from healthimaging_df.local import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["local", "serve", "--image-sets", "3", "--window-tps", "5", "--documented-quotas",
         "--malformed-rate", "0.5", "--update-rate", "0.25"]
    )  # fmt: skip
    assert (args.window_tps, args.documented_quotas, args.malformed_rate, args.update_rate) == (
        5,
        True,
        0.5,
        0.25,
    )
    stop = threading.Event()
    stop.set()
    assert cli.serve(args, stop=stop) == 0
    bad = parser.parse_args(["local", "serve", "--malformed-rate", "2"])
    assert cli.serve(bad, stop=stop) == 2
