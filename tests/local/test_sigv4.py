"""SigV4 on every route, canonicalised as AWS does (aws-facts.md section 6), over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from healthimaging_df.local import LocalService
from healthimaging_df.local.sigv4 import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    AuthFailure,
    KeyRing,
    Verifier,
    canonical_query,
    sign_request,
)

ID = "0" * 32
API_ROUTES = [
    ("GET", "/datastore"),
    ("GET", "/datastore/{ds}"),
    ("POST", "/datastore/{ds}/searchImageSets"),
    ("POST", "/datastore/{ds}/imageSet/{id}/getImageSet"),
    ("POST", "/datastore/{ds}/imageSet/{id}/getImageSetMetadata"),
    ("POST", "/datastore/{ds}/imageSet/{id}/listImageSetVersions"),
    ("POST", "/datastore/{ds}/imageSet/{id}/updateImageSetMetadata?latestVersion=1"),
    ("POST", "/datastore/{ds}/imageSet/{id}/deleteImageSet"),
    ("POST", "/datastore/{ds}/imageSet/{id}/copyImageSet"),
    ("DELETE", "/datastore/{ds}/nothing"),  # not a route: still 403 before 404
]
DICOMWEB_ROUTES = [
    ("GET", "/datastore/{ds}/studies"),
    ("GET", "/datastore/{ds}/series"),
    ("GET", "/datastore/{ds}/instances"),
    ("GET", "/datastore/{ds}/studies/1.2/series"),
    ("GET", "/datastore/{ds}/studies/1.2/instances"),
    ("GET", "/datastore/{ds}/studies/1.2/series/1.2.3/instances"),
]


def send(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def error_code(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    return answer[0], answer[1].get("x-amzn-ErrorType", "")


def fill(path: str, service: LocalService) -> str:
    return path.format(ds=service.datastore_id, id=ID)


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_every_api_route_refuses_an_unsigned_request(
    ahi_local: LocalService, method: str, path: str
) -> None:
    url = ahi_local.endpoint_url + fill(path, ahi_local)
    answer = send(url, method, b"{}" if method == "POST" else None)
    assert error_code(answer) == (403, "MissingAuthenticationTokenException")
    assert json.loads(answer[2]) == {"message": "Missing Authentication Token"}


@pytest.mark.parametrize(("method", "path"), DICOMWEB_ROUTES)
def test_every_dicomweb_route_refuses_an_unsigned_request(
    ahi_local: LocalService, method: str, path: str
) -> None:
    url = ahi_local.dicomweb_endpoint_url + fill(path, ahi_local)
    assert error_code(send(url, method)) == (403, "MissingAuthenticationTokenException")
    signed = sign_request(method, url)
    assert send(url, method, headers=signed)[0] == 200


def test_wrong_secret_unknown_key_region_and_service(ahi_local: LocalService) -> None:
    url = f"{ahi_local.endpoint_url}/datastore/{ahi_local.datastore_id}"
    assert send(url, headers=sign_request("GET", url))[0] == 200
    wrong = sign_request("GET", url, credentials=(ACCESS_KEY_ID, "not-the-secret"))
    status, headers, body = send(url, headers=wrong)
    assert (status, headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")
    assert json.loads(body)["message"].startswith("The request signature we calculated")
    unknown = sign_request("GET", url, credentials=("AKIAUNKNOWN", SECRET_ACCESS_KEY))
    assert error_code(send(url, headers=unknown)) == (403, "UnrecognizedClientException")
    elsewhere = sign_request("GET", url, region="eu-west-1")
    status, headers, body = send(url, headers=elsewhere)
    assert (status, headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")
    assert "region" in json.loads(body)["message"]
    request = AWSRequest("GET", url)
    SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY), "execute-api", "us-east-1").add_auth(
        request
    )
    assert error_code(send(url, headers=dict(request.headers))) == (
        403,
        "InvalidSignatureException",
    )
    assert ahi_local.stats.auth_failures == {
        "InvalidSignatureException": 3,
        "UnrecognizedClientException": 1,
    }


def test_boto3_with_other_credentials_gets_a_typed_403(ahi_local: LocalService) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "medical-imaging",
        endpoint_url=ahi_local.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="AKIASOMEONEELSE",
        aws_secret_access_key="whatever",
        config=Config(inject_host_prefix=False, retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError) as caught:
        client.search_image_sets(datastoreId=ahi_local.datastore_id, maxResults=1)
    error = caught.value.response
    assert error["Error"]["Code"] == "UnrecognizedClientException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_a_plus_signed_for_a_space_fails_as_on_aws(ahi_local: LocalService) -> None:
    """AWS decodes the query and re-encodes it (RFC 3986): `+` and raw `*` were signed wrongly."""
    base = f"{ahi_local.dicomweb_endpoint_url}/datastore/{ahi_local.datastore_id}/studies"
    good = f"{base}?StudyDescription=CT%20HEAD%2A&limit=1"
    assert send(good, headers=sign_request("GET", good))[0] == 200
    for bad in (
        f"{base}?StudyDescription=CT+HEAD%2A&limit=1",  # urlencode / requests style
        f"{base}?StudyDescription=CT%20HEAD*&limit=1",  # a raw *
        f"{base}?StudyDescription=CT%20HEAD%2a&limit=1",  # lower-case hex
    ):
        assert error_code(send(bad, headers=sign_request("GET", bad))) == (
            403,
            "InvalidSignatureException",
        ), bad


def test_the_body_is_signed(ahi_local: LocalService) -> None:
    url = f"{ahi_local.endpoint_url}/datastore/{ahi_local.datastore_id}/searchImageSets"
    signed = sign_request("POST", url, b"{}")
    assert send(url, "POST", b"{}", signed)[0] == 200
    assert error_code(send(url, "POST", b"{ }", signed)) == (403, "InvalidSignatureException")
    lying = sign_request("POST", url, b"{}", {"X-Amz-Content-SHA256": "0" * 64})
    assert error_code(send(url, "POST", b"{}", lying)) == (403, "InvalidSignatureException")
    unsigned = sign_request("POST", url, b"{}", {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert send(url, "POST", b"{}", unsigned)[0] == 200  # as curl or other SDKs may send


def test_the_clock_skew_window(ahi_service_factory: Any) -> None:
    service = ahi_service_factory(image_sets=5, max_clock_skew=120)
    url = f"{service.endpoint_url}/datastore"
    now = datetime.now(timezone.utc)

    def at(delta: timedelta) -> tuple[int, str, str]:
        stamp = (now + delta).strftime("%Y%m%dT%H%M%SZ")
        status, headers, body = send(url, headers=sign_request("GET", url, amz_date=stamp))
        message = json.loads(body).get("message", "") if status != 200 else ""
        return status, headers.get("x-amzn-ErrorType", ""), message

    assert at(timedelta(seconds=-60))[0] == 200
    status, code, message = at(timedelta(minutes=-3))
    assert (status, code) == (403, "InvalidSignatureException")
    assert message.startswith("Signature expired:")
    assert message.endswith("- 2 min.)")
    status, code, message = at(timedelta(minutes=3))
    assert (status, code) == (403, "InvalidSignatureException")
    assert message.startswith("Signature not yet current:")


def test_default_skew_is_15_minutes(ahi_local: LocalService) -> None:
    url = f"{ahi_local.endpoint_url}/datastore"
    now = datetime.now(timezone.utc)
    fresh = (now - timedelta(minutes=14)).strftime("%Y%m%dT%H%M%SZ")
    stale = (now - timedelta(minutes=16)).strftime("%Y%m%dT%H%M%SZ")
    assert send(url, headers=sign_request("GET", url, amz_date=fresh))[0] == 200
    assert send(url, headers=sign_request("GET", url, amz_date=stale))[0] == 403


def test_session_tokens_and_added_credentials(ahi_local: LocalService) -> None:
    url = f"{ahi_local.endpoint_url}/datastore"
    ahi_local.add_credentials("AKIAROTATED", "rotated-secret", "token-1")
    creds = Credentials("AKIAROTATED", "rotated-secret", token="token-1")
    request = AWSRequest("GET", url)
    SigV4Auth(creds, "medical-imaging", "us-east-1").add_auth(request)
    assert send(url, headers=dict(request.headers))[0] == 200
    for token in (None, "token-2"):
        request = AWSRequest("GET", url)
        SigV4Auth(
            Credentials("AKIAROTATED", "rotated-secret", token=token),
            "medical-imaging",
            "us-east-1",
        ).add_auth(request)
        assert error_code(send(url, headers=dict(request.headers))) == (
            403,
            "UnrecognizedClientException",
        )


def test_malformed_authorization_is_incomplete(ahi_local: LocalService) -> None:
    url = f"{ahi_local.endpoint_url}/datastore"
    signed = sign_request("GET", url)
    for broken in (
        "AWS4-HMAC-SHA256 Credential=AKIALOCALHEALTHIMAGING/20260101/us-east-1/medical-imaging/aws4_request",
        "AWS4-HMAC-SHA1 Credential=x, SignedHeaders=host, Signature=00",
        signed["Authorization"].replace("SignedHeaders=host;x-amz-date", "SignedHeaders=host"),
    ):
        headers = dict(signed, Authorization=broken)
        status, answer, _ = send(url, headers=headers)
        assert status == 403
        assert answer["x-amzn-ErrorType"] in (
            "IncompleteSignatureException",
            "InvalidSignatureException",
        )


# -- the verifier alone: botocore's canonical forms -------------------------------------------


def verifier() -> Verifier:
    keys = KeyRing()
    keys.add(ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    return Verifier(keys, "us-east-1")


def wire(request: AWSRequest) -> tuple[str, dict[str, str]]:
    from urllib.parse import urlsplit

    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    headers = dict(prepared.headers)
    headers["Host"] = parts.netloc
    return parts.path + (f"?{parts.query}" if parts.query else ""), headers


def test_paths_are_double_encoded_as_botocore_does_for_non_s3() -> None:
    creds = Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    url = "http://h:1/datastore/a%2Fb/imageSet/c%7Ed/getImageSet"
    request = AWSRequest("POST", url, data=b"")
    SigV4Auth(creds, "medical-imaging", "us-east-1").add_auth(request)
    raw, headers = wire(request)
    assert verifier().verify("POST", raw, headers, b"") == ACCESS_KEY_ID
    s3_style = AWSRequest("POST", url, data=b"")  # S3 signs the path as sent, once
    S3SigV4Auth(creds, "medical-imaging", "us-east-1").add_auth(s3_style)
    raw, headers = wire(s3_style)
    with pytest.raises(AuthFailure) as caught:
        verifier().verify("POST", raw, headers, b"")
    assert caught.value.code == "InvalidSignatureException"


def test_canonical_query_matches_the_sigv4_test_suite() -> None:
    # get-vanilla-query-order-value and get-vanilla-query-order-encoded of the AWS suite
    assert canonical_query("Param1=value2&Param1=value1") == "Param1=value1&Param1=value2"
    assert canonical_query("Param-3=Value3&Param=Value2&%E1%88%B4=Value1") == (
        "%E1%88%B4=Value1&Param=Value2&Param-3=Value3"
    )
    assert canonical_query("a=&b") == "a=&b="
    assert canonical_query("q=%7e~%2F/") == "q=~~%2F%2F"
