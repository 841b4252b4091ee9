"""One AWS session: every client from the caller's boto3 session, credentials read when used."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.credentials import RefreshableCredentials

import healthimaging_df  # noqa: F401  (registers df.ahi)
from healthimaging_df import Query, aws
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.local import LocalService


def _env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_series_attributes_without_a_client_follow_the_environment(
    ahi_local: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26: without ``client=`` the QIDO-RS requests went to AWS (and were retried 80 s)."""
    frame = (
        Query(ahi_local.datastore_id)
        .where(Modality="MG")
        .to_dataframe(client=ahi_local.client(), progress=False, max_tps=None)
    )
    _env(monkeypatch, ahi_local.env())
    ahi_local.reset_stats()
    enriched = frame.ahi.fetch_series_attributes(["SeriesDescription"], max_tps=None)
    assert list(enriched["imageSetId"]) == list(frame["imageSetId"])
    assert ahi_local.stats.by_operation["SearchDICOMSeries"] == frame["StudyInstanceUID"].nunique()


def test_the_factory_follows_a_configured_endpoint(
    ahi_local: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, ahi_local.env())
    client = aws.make_client(None, None)
    assert client.meta.endpoint_url == ahi_local.endpoint_url
    assert client.meta.config.retries["mode"] == "standard"
    monkeypatch.delenv("AWS_DISABLE_HOST_PREFIX_INJECTION")
    with pytest.raises(QueryValidationError, match="AWS_DISABLE_HOST_PREFIX_INJECTION") as info:
        aws.make_client(None, None)
    assert info.value.field == "endpoint_url"
    given = aws.make_client(None, None, endpoint_url=ahi_local.endpoint_url)
    assert given.meta.config.inject_host_prefix is False


def _session(key: str, account: str | None = None) -> Any:
    return boto3.Session(
        aws_access_key_id=key,
        aws_secret_access_key="secret",
        region_name="us-east-1",
        aws_account_id=account,
    )


def test_two_accounts_are_two_quotas_and_one_account_is_one() -> None:
    op, rate = "SearchImageSets", 25.0
    a = aws.make_client(None, _session("AKIAFIRST"), endpoint_url="http://127.0.0.1:9")
    a_again = aws.make_client(None, _session("AKIAFIRST"), endpoint_url="http://127.0.0.1:9")
    b = aws.make_client(None, _session("AKIASECOND"), endpoint_url="http://127.0.0.1:9")
    assert aws.limiter_for(a, op, rate) is aws.limiter_for(a_again, op, rate)
    assert aws.limiter_for(a, op, rate) is not aws.limiter_for(b, op, rate)
    # Two keys that name one account share its quota.
    one = aws.make_client(None, _session("AKIAONE", "111122223333"), endpoint_url="http://h:1")
    two = aws.make_client(None, _session("AKIATWO", "111122223333"), endpoint_url="http://h:1")
    assert aws.limiter_for(one, op, rate) is aws.limiter_for(two, op, rate)
    assert aws.session.identity(one) == "account-111122223333"
    assert "AKIA" not in aws.session.identity(a)  # a digest, never the key


def _refreshing_session() -> tuple[Any, list[int]]:
    """A session whose temporary credentials expire at once and come back with a new key."""
    calls: list[int] = []

    def refresh() -> dict[str, str]:
        calls.append(1)
        return {
            "access_key": f"ASIAKEY{len(calls)}",
            "secret_key": "secret",
            "token": f"token{len(calls)}",
            "expiry_time": (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat(),
        }

    credentials = RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")
    core = botocore.session.get_session()
    core._credentials = credentials
    core.set_config_variable("region", "us-east-1")
    return boto3.Session(botocore_session=core), calls


def test_credentials_are_read_per_use_not_frozen_when_a_store_opens() -> None:
    session, _ = _refreshing_session()
    first = aws.session.delta_storage_options(session, endpoint_url="http://127.0.0.1:9")
    second = aws.session.delta_storage_options(session, endpoint_url="http://127.0.0.1:9")
    assert first["AWS_ACCESS_KEY_ID"] != second["AWS_ACCESS_KEY_ID"]  # refreshed as boto3 does
    fs1 = aws.session.s3_filesystem(session, endpoint_url="http://127.0.0.1:9")
    fs2 = aws.session.s3_filesystem(session, endpoint_url="http://127.0.0.1:9")
    assert fs1 is not fs2  # a new file system for the new keys


def test_static_credentials_reuse_one_file_system() -> None:
    session = _session("AKIASTATIC")
    fs1 = aws.session.s3_filesystem(session, endpoint_url="http://127.0.0.1:9")
    assert aws.session.s3_filesystem(session, endpoint_url="http://127.0.0.1:9") is fs1


def test_the_dynamodb_lock_reaches_the_sessions_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, {"AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:8000"})
    options = aws.session.delta_storage_options(
        _session("AKIALOCK"), endpoint_url="http://127.0.0.1:9", dynamodb_lock_table="delta_log"
    )
    assert options["AWS_S3_LOCKING_PROVIDER"] == "dynamodb"
    assert options["DELTA_DYNAMO_TABLE_NAME"] == "delta_log"
    assert options["AWS_ENDPOINT_URL_DYNAMODB"] == "http://127.0.0.1:8000"
    assert "conditional_put" not in options
    plain = aws.session.delta_storage_options(_session("AKIALOCK"), endpoint_url="http://h:9")
    assert plain["conditional_put"] == "etag"
