from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from healthimaging_df.local import Faults, LocalService, Stats
from healthimaging_df.local.faults import TokenBucket
from healthimaging_df.local.sigv4 import sign_request


def raw(
    svc: LocalService, method: str, path: str, body: bytes | None = None, *, sign: bool = True
) -> tuple[int, dict[str, str], bytes]:
    """One request by hand (urllib), SigV4-signed with the service's known credentials."""
    url = svc.endpoint_url + path
    headers = svc.sign(method, url, body or b"") if sign else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def test_unknown_route_names_method_and_path(ahi_local: LocalService) -> None:
    status, headers, body = raw(ahi_local, "DELETE", "/datastore/abc/nothing")
    assert status == 404
    assert headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert (
        json.loads(body)["message"]
        == "No medical-imaging operation for DELETE /datastore/abc/nothing"
    )
    assert ahi_local.stats.by_operation == {"Unknown": 1}


def test_raw_search_bodies(ahi_local: LocalService) -> None:
    path = f"/datastore/{ahi_local.datastore_id}/searchImageSets?maxResults=3"
    for body in (None, b"", b"{}"):
        status, _, payload = raw(ahi_local, "POST", path, body)
        assert status == 200
        assert len(json.loads(payload)["imageSetsMetadataSummaries"]) == 3
    status, headers, payload = raw(ahi_local, "POST", path, b"{not json")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    status, headers, _ = raw(ahi_local, "POST", "/datastore/NOT-AN-ID/searchImageSets")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    for bad in ("abc", "%C2%B2", "0", "51", "-1"):
        status, headers, _ = raw(ahi_local, "POST", path.replace("=3", "=" + bad))
        assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")


def test_operations_through_boto3(ahi_client: Any, ahi_local: LocalService) -> None:
    ds = ahi_local.datastore_id
    listed = ahi_client.list_datastores()["datastoreSummaries"]
    assert [d["datastoreId"] for d in listed] == [ds]
    assert (
        ahi_client.get_datastore(datastoreId=ds)["datastoreProperties"]["datastoreStatus"]
        == "ACTIVE"
    )
    record = ahi_local.backend.image_sets(ds)[0]
    image_set = ahi_client.get_image_set(datastoreId=ds, imageSetId=record["imageSetId"])
    assert image_set["versionId"] == str(record["version"])
    assert image_set["imageSetArn"].endswith(f"datastore/{ds}/imageset/{record['imageSetId']}")
    versions = ahi_client.list_image_set_versions(datastoreId=ds, imageSetId=record["imageSetId"])
    assert len(versions["imageSetPropertiesList"]) == record["version"]
    blob = ahi_client.get_image_set_metadata(
        datastoreId=ds, imageSetId=record["imageSetId"], versionId="1"
    )
    document = json.loads(gzip.decompress(blob["imageSetMetadataBlob"].read()))
    assert document["DatastoreID"] == ds
    with pytest.raises(ClientError) as caught:
        ahi_client.get_image_set(datastoreId=ds, imageSetId="0" * 32)
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert ahi_local.stats.by_operation["GetImageSet"] == 2


def test_latency_overlaps_and_peak_concurrency(ahi_local: LocalService) -> None:
    ahi_local.set_faults(latency_ms=300)
    client = ahi_local.client()
    client.list_datastores()  # warm up the client before timing
    ahi_local.reset_stats()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda _: client.list_datastores(), range(6)))
    elapsed = time.perf_counter() - started
    assert elapsed >= 0.3  # the latency is served (an upper bound would fail on a busy machine)
    stats = ahi_local.stats
    assert stats.requests == 6
    assert stats.peak_concurrency >= 2


def test_error_rate_injects_500s(ahi_local: LocalService) -> None:
    ahi_local.set_faults(error_rate=1.0)
    client = ahi_local.client(retries={"mode": "standard", "total_max_attempts": 1})
    with pytest.raises(ClientError) as caught:
        client.list_datastores()
    assert caught.value.response["Error"]["Code"] == "InternalServerException"
    assert ahi_local.stats.errors_injected == 1
    ahi_local.faults.error_rate = 0.0  # faults are mutable at runtime
    assert client.list_datastores()["datastoreSummaries"]


def test_throttle_counts_and_429_shape(ahi_local: LocalService) -> None:
    ahi_local.set_faults(tps=0.5, burst=1)
    assert raw(ahi_local, "GET", "/datastore")[0] == 200
    status, headers, body = raw(ahi_local, "GET", "/datastore")
    assert status == 429
    assert headers["x-amzn-ErrorType"] == "ThrottlingException"
    assert "message" in json.loads(body)
    assert ahi_local.stats.throttled == 1


def test_token_bucket_refills_at_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, capacity=3.0, clock=lambda: now[0])
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5
    assert [bucket.try_take() for _ in range(2)] == [True, False]


def test_faults_validation_and_set_faults() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=2)
    svc = LocalService()
    assert svc.set_faults(tps=10) == Faults(tps=10)
    with pytest.raises(TypeError, match="unknown"):
        svc.set_faults(speed=1)
    assert svc.stats == Stats()


def test_start_stop_context_and_port_release() -> None:
    svc = LocalService()
    assert not svc.running
    assert svc.datastore_id is None
    with svc:
        url = svc.endpoint_url
        assert url.startswith("http://127.0.0.1:")
        client = svc.client()
        assert client.list_datastores()["datastoreSummaries"] == []
    assert not svc.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/datastore", timeout=2)


def test_env_points_unmodified_boto3_in_subprocess(ahi_local: LocalService) -> None:
    code = (
        "import boto3; c = boto3.client('medical-imaging'); "
        f"print(len(c.search_image_sets(datastoreId='{ahi_local.datastore_id}', maxResults=4)['imageSetsMetadataSummaries']))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ahi_local.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"


def test_factory_fixture(ahi_service_factory: Callable[..., LocalService]) -> None:
    svc = ahi_service_factory(image_sets=30, seed=1, latency_ms=5)
    assert svc.running
    assert svc.faults.latency_ms == 5
    assert len(svc.backend.image_sets(svc.datastore_id)) == 30


def test_cli_serve_runs_until_sigint(tmp_path: Any) -> None:
    import signal

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "healthimaging_df",
            "local",
            "serve",
            "--image-sets",
            "25",
            "--latency-ms",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        endpoint = lines[0].split()[-1]
        datastore_id = lines[1].split()[1]
        url = f"{endpoint}/datastore/{datastore_id}"
        request = urllib.request.Request(url, headers=sign_request("GET", url))
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["datastoreProperties"]["datastoreId"] == datastore_id
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_coexists_with_moto_mock_aws(ahi_local: LocalService) -> None:
    """moto has no medical-imaging; under mock_aws our loopback endpoint is passed through."""
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        s3 = boto3.client(
            "s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        s3.create_bucket(Bucket="cohort-exports")
        page = ahi_local.client().search_image_sets(
            datastoreId=ahi_local.datastore_id, maxResults=2
        )
        assert len(page["imageSetsMetadataSummaries"]) == 2
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["cohort-exports"]


def test_client_ignores_user_aws_environment(
    ahi_local: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "profile-that-does-not-exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://192.0.2.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALLOOKINGKEY")
    client = ahi_local.client()
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.retries["total_max_attempts"] == 11  # max_attempts=10 retries
    page = client.search_image_sets(datastoreId=ahi_local.datastore_id, maxResults=1)
    assert len(page["imageSetsMetadataSummaries"]) == 1
