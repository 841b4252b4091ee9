"""``doctor``: a read-only check of a setup, its JSON and exit codes, and what it remembers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import healthimaging_df as ahi
from healthimaging_df.dicomweb import ENV_VAR
from healthimaging_df.local import LocalService

ROOT = Path(__file__).resolve().parents[2]


def dicomweb_url(service: LocalService) -> str:
    return str(getattr(service, "dicomweb_endpoint_url", service.endpoint_url))


def _archived(service: LocalService) -> int:
    records = service.backend.image_sets(service.datastore_id)
    return sum(r["storageTier"] == "ARCHIVE_INSTANT_ACCESS" for r in records)


def test_doctor_on_a_working_setup(
    ahi_service_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ahi_service_factory(image_sets=200, seed=4)
    monkeypatch.setenv(ENV_VAR, dicomweb_url(service))
    archived = _archived(service)
    report = ahi.doctor(service.datastore_id, client=service.client(), conformance_checks=True)
    statuses = {c.name: c.status for c in report.checks}
    for name in (
        "credentials",
        "region",
        "endpoint",
        "botocore",
        "datastore",
        "SearchImageSets",
        "GetImageSet",
        "GetImageSetMetadata",
        "DICOMweb endpoint",
        "SearchDICOMStudies",
        "SearchDICOMSeries",
        "SearchDICOMInstances",
        "latency",
        "throttling",
    ):
        assert statuses[name] == "ok", (name, report.table())
    assert any(name.startswith("conformance: ") for name in statuses)
    assert report.exit_code == 0
    assert "searching works" in report.table()
    data = json.loads(report.to_json())
    assert set(data) == {"checks"}
    assert all(set(c) == {"name", "status", "detail"} for c in data["checks"])
    assert all(c["status"] in ("ok", "warn", "fail") for c in data["checks"])
    assert _archived(service) == archived  # nothing un-archived
    ops = service.stats.by_operation
    assert not {"UpdateImageSetMetadata", "CopyImageSet", "DeleteImageSet"} & set(ops)


def test_doctor_feeds_the_capability_cache(ahi_service_factory: Any) -> None:
    from healthimaging_df import Query

    service = ahi_service_factory(image_sets=200, seed=4)
    absent = f"{service.endpoint_url}/no-dicomweb-here"
    report = ahi.doctor(service.datastore_id, client=service.client(), dicomweb_endpoint_url=absent)
    statuses = {c.name: c for c in report.checks}
    assert statuses["SearchDICOMStudies"].status == "warn"
    assert "HTTP 404" in statuses["SearchDICOMStudies"].detail
    assert report.exit_code == 0  # searching still works, on SearchImageSets alone
    text = (
        Query(service.datastore_id)
        .where(Modality="CT")
        .explain(client=service.client(), dicomweb_endpoint_url=absent)
    )
    assert "QIDO-RS not weighed: unavailable here" in text
    assert "doctor" in text


def test_doctor_without_credentials_fails_with_exit_1(
    ahi_service_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import boto3
    import botocore.session

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    service = ahi_service_factory(image_sets=20, seed=4)
    session = boto3.Session(botocore_session=botocore.session.Session(), region_name="us-east-1")
    client = session.client("medical-imaging", endpoint_url=service.endpoint_url)
    report = ahi.doctor(service.datastore_id, client=client)
    assert report.exit_code == 1
    assert {c.name: c.status for c in report.checks}["credentials"] == "fail"
    assert "searching does NOT work" in report.table()


def test_doctor_refuses_a_bad_datastore_id_before_any_request() -> None:
    from healthimaging_df.errors import QueryValidationError

    with pytest.raises(QueryValidationError, match="datastore_id"):
        ahi.doctor("not-an-id")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "healthimaging_df", *args],
        env=merged,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_doctor_command_json_and_exit_codes(ahi_service_factory: Any) -> None:
    service = ahi_service_factory(image_sets=100, seed=4)
    env = {**service.env(), ENV_VAR: dicomweb_url(service)}
    done = _cli("doctor", "--datastore-id", str(service.datastore_id), "--json", env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [c["name"] for c in data["checks"]][:2] == ["credentials", "region"]
    table = _cli("doctor", "--datastore-id", str(service.datastore_id), env=env)
    assert table.returncode == 0
    assert "searching works" in table.stdout
    missing = _cli("doctor", env=env)
    assert missing.returncode == 2
    assert "--datastore-id" in missing.stderr
