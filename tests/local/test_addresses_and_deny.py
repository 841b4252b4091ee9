"""DICOMweb on its own address, the deny list, port rules and per-dataset datastore ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from healthimaging_df.errors import QueryValidationError
from healthimaging_df.local import LocalService
from healthimaging_df.local.server import DICOMWEB_ENDPOINT_ENV, seeded_datastore_id
from healthimaging_df.local.sigv4 import sign_request


def signed_get(url: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=sign_request("GET", url))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


# -- two addresses -----------------------------------------------------------------------------


def test_dicomweb_paths_are_404_on_the_api_address(ahi_local: LocalService) -> None:
    path = f"/datastore/{ahi_local.datastore_id}/studies?limit=1"
    assert ahi_local.dicomweb_endpoint_url != ahi_local.endpoint_url
    status, headers, _ = signed_get(ahi_local.endpoint_url + path)
    assert (status, headers["x-amzn-ErrorType"]) == (404, "UnknownOperationException")
    status, headers, body = signed_get(ahi_local.dicomweb_endpoint_url + path)
    assert status == 200
    assert headers["Content-Type"] == "application/dicom+json"
    assert len(json.loads(body)) == 1


def test_api_paths_are_404_on_the_dicomweb_address(ahi_local: LocalService) -> None:
    status, headers, _ = signed_get(f"{ahi_local.dicomweb_endpoint_url}/datastore")
    assert (status, headers["x-amzn-ErrorType"]) == (404, "UnknownOperationException")
    client = ahi_local.client()
    assert client.list_datastores()["datastoreSummaries"]


def test_env_and_dicomweb_environment(ahi_local: LocalService) -> None:
    env = ahi_local.env()
    assert env[DICOMWEB_ENDPOINT_ENV] == ahi_local.dicomweb_endpoint_url
    assert env["AWS_ENDPOINT_URL_MEDICAL_IMAGING"] == ahi_local.endpoint_url
    assert DICOMWEB_ENDPOINT_ENV == "AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING"
    assert os.environ[DICOMWEB_ENDPOINT_ENV] == ahi_local.dicomweb_endpoint_url  # the fixture's
    other = LocalService()
    with other.dicomweb_environment() as url:
        assert os.environ[DICOMWEB_ENDPOINT_ENV] == url == other.dicomweb_endpoint_url
    assert os.environ[DICOMWEB_ENDPOINT_ENV] == ahi_local.dicomweb_endpoint_url


def test_the_library_finds_the_dicomweb_address_through_the_environment(
    ahi_local: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from healthimaging_df.dicomweb import make_qido_client

    qido = make_qido_client(ahi_local.client(), max_tps=None)
    assert qido.endpoint_url == ahi_local.dicomweb_endpoint_url
    assert qido.get(str(ahi_local.datastore_id), "studies", {}, limit=2)[0]
    monkeypatch.delenv(DICOMWEB_ENDPOINT_ENV)
    # a custom endpoint says nothing of where DICOMweb is (as for a VPC or proxy endpoint)
    with pytest.raises(QueryValidationError, match="dicomweb_endpoint_url"):
        make_qido_client(ahi_local.client())


@pytest.mark.parametrize("port", [-1, 65536, 99999, True, "80"])
def test_invalid_ports_are_refused(port: Any) -> None:
    with pytest.raises(ValueError, match="0 to 65535"):
        LocalService(port=port)
    with pytest.raises(ValueError, match="0 to 65535"):
        LocalService(dicomweb_port=port)


@pytest.mark.parametrize(
    "flag", [("--port", "99999"), ("--dicomweb-port", "70000"), ("--port", "x")]
)
def test_local_serve_with_an_invalid_port_is_a_usage_error(flag: tuple[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "healthimaging_df", "local", "serve", "--image-sets", "1", *flag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert "0 to 65535" in done.stderr
    assert "endpoint_url" not in done.stdout


def test_local_serve_prints_both_addresses_and_denies(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "healthimaging_df", "local", "serve", "--image-sets", "40",
         "--seed", "3", "--deny", "medical-imaging:SearchDICOMStudies", "--deny",
         "GetImageSet", "--no-qido-cap"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        endpoint = lines[0].split()[-1]
        datastore_id = lines[1].split()[1]
        dicomweb = lines[2].split()[-1]
        assert lines[0].startswith("endpoint_url: http://127.0.0.1:")
        assert lines[2].startswith("dicomweb_endpoint_url: http://127.0.0.1:")
        assert lines[3].startswith("credentials: AKIALOCALHEALTHIMAGING / ")
        assert datastore_id == seeded_datastore_id(40, 3)
        exports = []
        while not (line := proc.stdout.readline()).startswith("Ctrl-C"):
            exports.append(line.strip())
        assert f"export {DICOMWEB_ENDPOINT_ENV}={dicomweb}" in exports
        assert f"export AWS_ENDPOINT_URL_MEDICAL_IMAGING={endpoint}" in exports
        status, headers, _ = signed_get(f"{dicomweb}/datastore/{datastore_id}/studies")
        assert (status, headers["x-amzn-ErrorType"]) == (403, "AccessDeniedException")
        status, _, body = signed_get(f"{dicomweb}/datastore/{datastore_id}/series")
        assert status == 200
        assert json.loads(body)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    bad = subprocess.run(
        [sys.executable, "-m", "healthimaging_df", "local", "serve", "--deny", "s3:GetObject"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "not a medical-imaging IAM action" in bad.stderr


# -- deny --------------------------------------------------------------------------------------


def test_denied_api_actions_get_access_denied(ahi_local: LocalService) -> None:
    client = ahi_local.client(retries={"mode": "standard", "total_max_attempts": 1})
    ds = ahi_local.datastore_id
    ahi_local.deny = ["medical-imaging:SearchImageSets", "GetImageSet"]
    assert ahi_local.deny == {"SearchImageSets", "GetImageSet"}
    with pytest.raises(ClientError) as caught:
        client.search_image_sets(datastoreId=ds, maxResults=1)
    error = caught.value.response
    assert error["Error"]["Code"] == "AccessDeniedException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
    message = error["Error"]["Message"]
    assert "medical-imaging:SearchImageSets" in message
    assert f"datastore/{ds}" in message
    record = ahi_local.backend.image_sets(ds)[0]
    with pytest.raises(ClientError) as caught:
        client.get_image_set(datastoreId=ds, imageSetId=record["imageSetId"])
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    assert f"imageset/{record['imageSetId']}" in caught.value.response["Error"]["Message"]
    assert client.list_image_set_versions(datastoreId=ds, imageSetId=record["imageSetId"])
    assert ahi_local.stats.denied == {"SearchImageSets": 1, "GetImageSet": 1}
    ahi_local.reset_faults()  # clears the deny list too
    assert client.search_image_sets(datastoreId=ds, maxResults=1)


@pytest.mark.parametrize(
    ("action", "denied", "allowed"),
    [
        ("SearchDICOMStudies", ["studies"], ["series", "instances", "studies/{S}/series"]),
        (
            "SearchDICOMSeries",
            ["series", "studies/{S}/series"],
            ["studies", "studies/{S}/instances"],
        ),
        (
            "SearchDICOMInstances",
            ["instances", "studies/{S}/instances", "studies/{S}/series/{Se}/instances"],
            ["studies", "series"],
        ),
    ],
)
def test_denied_dicomweb_actions(
    ahi_local: LocalService, action: str, denied: list[str], allowed: list[str]
) -> None:
    record = next(
        r for r in ahi_local.backend.image_sets(str(ahi_local.datastore_id)) if r["isPrimary"]
    )
    tags = record["DICOMTags"]
    base = f"{ahi_local.dicomweb_endpoint_url}/datastore/{ahi_local.datastore_id}/"

    def url(resource: str) -> str:
        return (
            base
            + resource.format(S=tags["DICOMStudyInstanceUID"], Se=tags["DICOMSeriesInstanceUID"])
            + "?limit=1"
        )

    ahi_local.deny = [f"medical-imaging:{action}"]
    for resource in denied:
        status, headers, body = signed_get(url(resource))
        assert (status, headers["x-amzn-ErrorType"]) == (403, "AccessDeniedException"), resource
        assert f"medical-imaging:{action}" in json.loads(body)["message"]
    for resource in allowed:
        assert signed_get(url(resource))[0] == 200, resource


def test_unknown_actions_are_refused() -> None:
    for bad in (["SearchEverything"], ["s3:GetObject"], "SearchImageSets", [3]):
        with pytest.raises(ValueError, match="action"):
            LocalService(deny=bad)  # type: ignore[arg-type]
    service = LocalService(deny=["StoreDICOM"])  # documented, though not served here
    with pytest.raises(ValueError, match="not a medical-imaging IAM action"):
        service.deny = ["medical-imaging:Nope"]
    assert service.deny == {"StoreDICOM"}


def test_the_factory_takes_service_options(ahi_service_factory: Any) -> None:
    service = ahi_service_factory(image_sets=20, seed=4, deny=["ListDatastores"], latency_ms=1)
    assert service.deny == {"ListDatastores"}
    assert service.faults.latency_ms == 1
    assert os.environ[DICOMWEB_ENDPOINT_ENV] == service.dicomweb_endpoint_url
    with pytest.raises(ClientError) as caught:
        service.client(retries={"total_max_attempts": 1}).list_datastores()
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"


# -- datastore ids -----------------------------------------------------------------------------


def test_each_local_dataset_has_its_own_datastore_id() -> None:
    ids = {
        LocalService.seeded(image_sets=n, seed=seed).datastore_id
        for n in (10, 11)
        for seed in (0, 1)
    }
    assert len(ids) == 4
    again = LocalService.seeded(image_sets=10, seed=0)
    assert again.datastore_id == seeded_datastore_id(10, 0)
    assert LocalService.seeded(image_sets=10, seed=0, non_primary=0.5).datastore_id not in ids


def test_the_cli_local_service_reaches_dicomweb_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """``healthimaging-df ... --local``: its QIDO-RS requests find the DICOMweb address."""
    import argparse

    from healthimaging_df.cli.commands.connect import Target
    from healthimaging_df.dicomweb import make_qido_client

    monkeypatch.delenv(DICOMWEB_ENDPOINT_ENV, raising=False)
    args = argparse.Namespace(local=True, endpoint_url=None, profile=None, datastore_id=None)
    target = Target(args)
    with target.connect() as connection:
        qido = make_qido_client(connection.client, max_tps=None)
        assert qido.endpoint_url == os.environ[DICOMWEB_ENDPOINT_ENV]
        assert qido.get(target.datastore_id, "studies", {}, limit=1)[0]
    assert DICOMWEB_ENDPOINT_ENV not in os.environ
