"""The QIDO-RS client: signing, credentials, endpoints, retries, typed errors, frames, enrichment."""

from __future__ import annotations

import datetime as dt
import logging
import os
import warnings
from typing import Any

import pandas as pd
import pytest
import requests

from healthimaging_df import Query, dicomweb
from healthimaging_df.dicomweb import QidoClient, make_qido_client
from healthimaging_df.errors import (
    DICOMwebError,
    DICOMwebThrottledError,
    QueryValidationError,
    ThrottledError,
)
from healthimaging_df.local import LocalService
from healthimaging_df.local.backend import metadata_document
from healthimaging_df.metadata import ArchiveAccessWarning


def _ds(service: LocalService) -> str:
    assert service.datastore_id is not None
    return service.datastore_id


def test_unsigned_or_wrongly_scoped_requests_are_refused(ahi_local: LocalService) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"{ahi_local.dicomweb_endpoint_url}/datastore/{_ds(ahi_local)}/studies?limit=1"

    def code(response: requests.Response) -> tuple[int, str]:
        return response.status_code, response.headers.get("x-amzn-ErrorType", "")

    assert code(requests.get(url, timeout=5)) == (403, "MissingAuthenticationTokenException")
    known = Credentials(*ahi_local.credentials)
    signed = AWSRequest("GET", url, headers={"Accept": "application/dicom+json"})
    SigV4Auth(known, "execute-api", "us-east-1").add_auth(signed)
    answer = requests.get(url, headers=dict(signed.headers), timeout=5)
    assert code(answer) == (403, "InvalidSignatureException")
    signed = AWSRequest("GET", url, headers={"Accept": "application/dicom+json"})
    SigV4Auth(Credentials("AK", "SK"), "medical-imaging", "us-east-1").add_auth(signed)
    answer = requests.get(url, headers=dict(signed.headers), timeout=5)
    assert code(answer) == (403, "UnrecognizedClientException")
    signed = AWSRequest("GET", url, headers={"Accept": "application/dicom+json"})
    SigV4Auth(known, "medical-imaging", "us-east-1").add_auth(signed)
    assert requests.get(url, headers=dict(signed.headers), timeout=5).status_code == 200


def test_client_signs_every_request_with_fresh_credentials(ahi_local: LocalService) -> None:
    from botocore.credentials import Credentials

    seen: list[dict[str, str]] = []
    calls = 0

    def credentials() -> Credentials:
        nonlocal calls
        calls += 1
        # Rotated session credentials: the service knows each set once it is issued.
        ahi_local.add_credentials(f"AKIA{calls:04d}", "secret", f"token-{calls}")
        return Credentials(f"AKIA{calls:04d}", "secret", token=f"token-{calls}")

    qido = QidoClient(ahi_local.dicomweb_endpoint_url, "us-east-1", credentials, max_tps=None)
    session = qido._web(_ds(ahi_local))._session
    session.hooks["response"].append(lambda r, *a, **k: seen.append(dict(r.request.headers)))
    result = qido.search(_ds(ahi_local), "studies", {}, page_size=200)
    assert result.requests == len(seen) == calls >= 3
    for number, headers in enumerate(seen, start=1):
        auth = headers["Authorization"]
        assert auth.startswith(f"AWS4-HMAC-SHA256 Credential=AKIA{number:04d}/")
        assert "/us-east-1/medical-imaging/aws4_request" in auth
        assert "host" in auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        assert headers["X-Amz-Security-Token"] == f"token-{number}"
        assert headers["Accept"] == "application/dicom+json, application/json"


def test_query_is_signed_as_sigv4_canonicalizes_it() -> None:
    url = "https://h/datastore/x/studies?StudyDescription=CT+HEAD%2A&PatientName=O%27Brien%5E%2A"
    assert dicomweb.canonical_url(url) == (
        "https://h/datastore/x/studies?StudyDescription=CT%20HEAD%2A&PatientName=O%27Brien%5E%2A"
    )


def test_endpoint_resolution(ahi_local: LocalService, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    session = boto3.Session(
        aws_access_key_id="a", aws_secret_access_key="b", region_name="eu-west-1"
    )
    aws = session.client("medical-imaging")
    # The plugin's ahi_local names the local DICOMweb address in the environment.
    assert os.environ[dicomweb.ENV_VAR] == ahi_local.dicomweb_endpoint_url
    assert dicomweb.dicomweb_endpoint(ahi_local.client()) == ahi_local.dicomweb_endpoint_url
    assert dicomweb.dicomweb_endpoint(aws) == ahi_local.dicomweb_endpoint_url  # environment first
    monkeypatch.delenv(dicomweb.ENV_VAR)
    assert (
        dicomweb.dicomweb_endpoint(aws) == "https://dicom-medical-imaging.eu-west-1.amazonaws.com"
    )
    # a custom endpoint says nothing about where DICOMweb is: the environment does
    with pytest.raises(QueryValidationError, match="dicomweb_endpoint_url"):
        dicomweb.dicomweb_endpoint(ahi_local.client())
    assert dicomweb.resolve_endpoint(ahi_local.client()).source == "unknown"
    vpce = session.client(
        "medical-imaging",
        endpoint_url="https://vpce-1a2b.medical-imaging.eu-west-1.vpce.amazonaws.com",
    )
    assert dicomweb.resolve_endpoint(vpce).url is None  # an endpoint-specific VPC name: unknown
    fips = session.client(
        "medical-imaging", endpoint_url="https://medical-imaging-fips.us-east-1.amazonaws.com"
    )
    assert (
        dicomweb.dicomweb_endpoint(fips) == "https://dicom-medical-imaging.us-east-1.amazonaws.com"
    )
    monkeypatch.setenv(dicomweb.ENV_VAR, "http://127.0.0.1:9/")
    assert dicomweb.dicomweb_endpoint(ahi_local.client()) == "http://127.0.0.1:9"
    assert dicomweb.dicomweb_endpoint(aws) == "http://127.0.0.1:9"
    override = "https://proxy.example/dicomweb/"
    assert dicomweb.dicomweb_endpoint(aws, dicomweb_endpoint_url=override) == override.rstrip("/")
    monkeypatch.delenv(dicomweb.ENV_VAR)
    qido = make_qido_client(boto3_session=session)
    assert qido.endpoint_url.startswith("https://dicom-medical-imaging.eu-west-1.")
    assert qido.region == "eu-west-1"


def test_throttling_is_retried_under_the_limiter(ahi_local: LocalService) -> None:
    from botocore.credentials import Credentials

    from healthimaging_df.local.server import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY

    creds = Credentials(DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY)
    ahi_local.set_faults(tps=20, burst=1)
    qido = QidoClient(
        ahi_local.dicomweb_endpoint_url, "us-east-1", lambda: creds, max_tps=None, retry_base=0.05
    )
    result = qido.search(_ds(ahi_local), "studies", {}, page_size=100)
    assert len(result.records) > 500
    assert ahi_local.stats.throttled > 0
    assert result.requests > 6
    impatient = QidoClient(
        ahi_local.dicomweb_endpoint_url, "us-east-1", lambda: creds, max_tps=None, max_attempts=1
    )
    ahi_local.set_faults(tps=0.01, burst=1)
    impatient.get(_ds(ahi_local), "studies", {}, limit=1)  # takes the only token
    with pytest.raises(DICOMwebThrottledError) as caught:
        impatient.get(_ds(ahi_local), "studies", {}, limit=1)
    assert isinstance(caught.value, ThrottledError)
    assert caught.value.status == 429


def test_a_throttle_widens_the_qido_limiters_margin(ahi_local: LocalService) -> None:
    from botocore.credentials import Credentials

    from healthimaging_df import aws
    from healthimaging_df.local.server import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY

    creds = Credentials(DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY)
    ahi_local.set_faults(tps=20, burst=1)  # below the client's max_tps: 429s
    qido = QidoClient(
        ahi_local.dicomweb_endpoint_url, "us-east-1", lambda: creds, max_tps=100, retry_base=0.01
    )
    result = qido.search(_ds(ahi_local), "studies", {}, page_size=100)
    assert len(result.records) > 500
    limiter = qido._limiter
    assert limiter is not None
    assert ahi_local.stats.throttled > 0
    assert limiter.throttles == ahi_local.stats.throttled
    assert limiter.margin > aws.MARGIN


def test_errors_and_logs_carry_no_query_values(
    ahi_local: LocalService, qido: QidoClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret_name = "Zzyzx^Secret*"
    caplog.set_level(logging.DEBUG)
    frame = dicomweb.search_studies(_ds(ahi_local), PatientName=secret_name, qido=qido)
    assert frame.empty
    assert list(frame.columns)[:2] == ["StudyInstanceUID", "StudyDate"]
    with pytest.raises(DICOMwebError) as caught:
        qido.get(_ds(ahi_local), "studies", {"PatientName": secret_name, "bogus": "1"})
    assert caught.value.status == 400
    texts = [str(caught.value), repr(caught.value)]
    texts += [record.getMessage() for record in caplog.records]
    assert not any("Zzyzx" in text for text in texts)
    assert any("dicomweb_client" in r.getMessage() for r in caplog.records)


def test_bad_input_fails_before_any_request(ahi_local: LocalService, qido: QidoClient) -> None:
    ds = _ds(ahi_local)
    bad: list[dict[str, Any]] = [
        {"NotAKeyword": "x"},
        {"Modality": "CT"},  # a series key, not a study key
        {"StudyInstanceUID": "1.2.*"},
        {"StudyDate": "2020-01-01"},
        {"StudyDate": (None, None)},
        {"PatientName": 5},
        {"PatientID": "a\nb"},
    ]
    for match in bad:
        with pytest.raises(QueryValidationError):
            dicomweb.search_studies(ds, match, qido=qido)
    with pytest.raises(QueryValidationError, match="includefield"):
        dicomweb.search_series(ds, includefield=["NotAKeyword"], qido=qido)
    with pytest.raises(QueryValidationError, match="datastore_id"):
        dicomweb.search_series("not-an-id", qido=qido)
    with pytest.raises(QueryValidationError, match="study_instance_uid"):
        dicomweb.search_series(ds, study_instance_uid="1.2.x", qido=qido)
    assert ahi_local.stats.requests == 0


def test_frames_are_typed_by_vr(ahi_local: LocalService, qido: QidoClient) -> None:
    ds = _ds(ahi_local)
    studies = dicomweb.search_studies(ds, StudyDate=(dt.date(2020, 1, 1), None), qido=qido)
    assert len(studies) > 0
    assert studies["StudyDate"].dtype == pd.ArrowDtype(__import__("pyarrow").date32())
    assert (studies["StudyDate"].dropna() >= dt.date(2020, 1, 1)).all()
    assert studies["NumberOfStudyRelatedSeries"].dtype == "Int64"
    assert studies["PatientName"].dtype == pd.StringDtype("pyarrow")
    assert studies["PatientName"].dropna().str.contains("^", regex=False).any()
    assert str(studies["ModalitiesInStudy"].dtype).startswith("list<")
    series = dicomweb.search_series(
        ds, Modality="MR", includefield=["SeriesDescription"], limit=30, page_size=7, qido=qido
    )
    assert len(series) == 30
    assert set(series["Modality"]) == {"MR"}
    assert series["SeriesNumber"].dtype == "Int64"
    assert series["SeriesDescription"].dtype == pd.StringDtype("pyarrow")
    assert series.attrs[dicomweb.ATTRS_KEY]["requests"] == 5
    assert series.attrs[dicomweb.ATTRS_KEY]["truncated"] is False
    study, uid = series.iloc[0][["StudyInstanceUID", "SeriesInstanceUID"]]
    instances = dicomweb.search_instances(
        ds, study_instance_uid=study, series_instance_uid=uid, includefield=["Rows"], qido=qido
    )
    assert instances["InstanceNumber"].dtype == "Int64"
    assert instances["Rows"].dtype == "Int64"
    assert instances["InstanceNumber"].tolist() == sorted(instances["InstanceNumber"].tolist())


def test_series_attributes_join_without_touching_archives(ahi_service_factory: Any) -> None:
    service = ahi_service_factory(image_sets=150, seed=4)
    client = service.client()
    frame = Query(_ds(service)).to_dataframe(client=client, progress=False, max_tps=None)
    archived = frame["storageTier"] == "ARCHIVE_INSTANT_ACCESS"
    assert archived.any()
    before = service.backend.image_sets(_ds(service))
    service.reset_stats()
    enriched = dicomweb.fetch_series_attributes(
        frame, ["0008103E", "Manufacturer"], client=client, max_tps=None
    )
    studies = frame["StudyInstanceUID"].nunique()
    assert service.stats.by_operation == {"SearchDICOMSeries": studies}
    assert list(enriched.index) == list(frame.index)
    assert enriched.attrs == frame.attrs
    assert enriched["Manufacturer"].dtype == pd.StringDtype("pyarrow")
    # QIDO sees primary image sets: a non-primary copy gets its series' primary values.
    documents = {
        r["DICOMTags"]["DICOMSeriesInstanceUID"]: metadata_document(_ds(service), r)
        for r in before
        if r["isPrimary"]
    }
    assert len(enriched) > len(documents)
    for row in enriched.itertuples():
        if row.SeriesInstanceUID not in documents:
            assert pd.isna(row.Manufacturer)
            continue
        (series,) = documents[row.SeriesInstanceUID]["Study"]["Series"].values()
        assert row.Manufacturer == series["DICOM"]["Manufacturer"]
        assert row.SeriesDescription == series["DICOM"]["SeriesDescription"]
    wide = dicomweb.fetch_series_attributes(
        frame, ["Manufacturer"], client=client, max_tps=None, scope="datastore"
    )
    assert wide["Manufacturer"].equals(enriched["Manufacturer"])
    after = service.backend.image_sets(_ds(service))
    assert [(r["storageTier"], r["lastAccessedAt"]) for r in after] == [
        (r["storageTier"], r["lastAccessedAt"]) for r in before
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchiveAccessWarning)
        frame.head(5).ahi.fetch_metadata(client=client, max_tps=None)
    touched = {r["imageSetId"]: r for r in service.backend.image_sets(_ds(service))}
    assert all(touched[i]["storageTier"] == "FREQUENT_ACCESS" for i in frame["imageSetId"].head(5))


def test_series_attributes_input_checks(ahi_local: LocalService, qido: QidoClient) -> None:
    frame = pd.DataFrame({"StudyInstanceUID": ["1.2"], "SeriesInstanceUID": ["1.2.3"]})
    with pytest.raises(QueryValidationError, match="datastore_id"):
        dicomweb.fetch_series_attributes(frame, ["Manufacturer"], qido=qido)
    with pytest.raises(QueryValidationError, match="already"):
        dicomweb.fetch_series_attributes(
            frame, ["SeriesInstanceUID"], qido=qido, datastore_id=_ds(ahi_local)
        )
    with pytest.raises(QueryValidationError, match="fields"):
        dicomweb.fetch_series_attributes(frame, "Manufacturer", qido=qido)  # type: ignore[arg-type]
    assert ahi_local.stats.requests == 0


# -- item 3 of issue 25: every page checked, a search ends on an empty page only ------------------


def test_a_server_that_caps_its_pages_costs_requests_never_records(
    ahi_local: LocalService, qido: QidoClient, truth: dict[str, Any]
) -> None:
    """Was: a page shorter than ``limit`` read as the last one (0 of 513 series)."""
    ahi_local.set_faults(qido_page_cap=7)
    every = qido.search(_ds(ahi_local), "series", {}, page_size=1000)
    assert len(every.records) == len(truth["series"])
    ahi_local.set_faults(qido_page_cap=None, qido_short_rate=0.6, seed=3)
    again = qido.search(_ds(ahi_local), "studies", {}, page_size=200)
    assert len(again.records) == len(truth["studies"])


@pytest.mark.parametrize("kind", ["empty", "object", "not_list", "not_objects", "missing_uid"])
def test_a_malformed_page_is_retried_then_a_typed_error(
    ahi_local: LocalService, truth: dict[str, Any], kind: str
) -> None:
    """Was: a zero-byte 200 or ``{}`` read as "no more matches" (0 of 95 rows)."""
    from healthimaging_df.errors import DICOMwebMalformedError

    qido = make_qido_client(ahi_local.client(), max_tps=None, retry_base=0.01)
    ahi_local.set_faults(qido_malformed_every=2, qido_malformed_kinds=(kind,))
    found = qido.search(_ds(ahi_local), "studies", {}, page_size=300)
    assert len(found.records) == len(truth["studies"])  # each bad page asked for again
    ahi_local.set_faults(qido_malformed_every=None, qido_malformed_rate=1.0)
    with pytest.raises(DICOMwebMalformedError) as caught:
        qido.search(_ds(ahi_local), "studies", {}, page_size=300)
    assert caught.value.code == "MalformedResponse"
    assert "attempt" in str(caught.value)
