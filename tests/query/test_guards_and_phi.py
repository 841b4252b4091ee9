"""A server that breaks pagination, and PHI kept out of logs, errors and reprs."""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import boto3
import pytest
from botocore.config import Config
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from healthimaging_df import Query, redact_botocore_logs
from healthimaging_df.engine.fetch import Page
from healthimaging_df.engine.flatten import summaries_to_table
from healthimaging_df.errors import PaginationError
from healthimaging_df.local import LocalService
from healthimaging_df.snapshot import read_snapshot, write_snapshot
from tests.snapshot.conftest import S3, typed_frame

from .conftest import flat_row


def serve(body: dict[str, Any]) -> Iterator[str]:
    """A real HTTP server on loopback that answers every request with *body*."""

    @Request.application
    def app(request: Request) -> Response:
        return Response(json.dumps(body), content_type="application/json")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def client_for(endpoint: str) -> Any:
    return boto3.client(
        "medical-imaging",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(inject_host_prefix=False),
    )


@pytest.fixture
def looping_endpoint() -> Iterator[str]:
    """Always the same nextToken."""
    yield from serve({"imageSetsMetadataSummaries": [], "nextToken": "same-token-every-time"})


@pytest.fixture
def unsorted_endpoint() -> Iterator[str]:
    """A page out of createdAt order, with more to follow."""
    items = [
        {
            "imageSetId": "b" * 32,
            "version": 1,
            "createdAt": 1_700_000_100.5,
            "updatedAt": 1_700_000_100.5,
        },
        {
            "imageSetId": "a" * 32,
            "version": 1,
            "createdAt": 1_700_000_000.5,
            "updatedAt": 1_700_000_000.5,
        },
    ]
    yield from serve({"imageSetsMetadataSummaries": items, "nextToken": "t"})


def test_repeated_next_token_is_an_error_not_a_loop(looping_endpoint: str) -> None:
    with pytest.raises(PaginationError, match="already given"):
        Query("a" * 32).where(PatientID="P").to_dataframe(
            client=client_for(looping_endpoint), progress=False
        )


def test_a_window_out_of_order_is_an_error_not_lost_rows(unsorted_endpoint: str) -> None:
    with pytest.raises(PaginationError, match="out of createdAt order"):
        Query("a" * 32).to_dataframe(client=client_for(unsorted_endpoint), progress=False)


def phi_values(records: list[dict[str, Any]]) -> set[str]:
    values: set[str] = set()
    for record in records:
        row = flat_row(record)
        for column in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID"):
            if row[column] and len(row[column]) >= 6:
                values.add(row[column])
    return values


def test_debug_logs_hold_no_phi(
    service: LocalService, records: list, caplog: pytest.LogCaptureFixture
) -> None:
    patient = flat_row(records[0])["PatientID"]
    series = flat_row(records[0])["SeriesInstanceUID"]
    caplog.set_level(logging.DEBUG)
    Query(service.datastore_id).where(PatientID=patient).to_dataframe(
        client=service.client(), progress=False
    )
    Query(service.datastore_id).where(SeriesInstanceUID=series).to_dataframe(
        client=service.client(), progress=False
    )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "SearchImageSets" in text or "searchImageSets" in text  # botocore did log at DEBUG
    assert any(r.name.startswith("healthimaging_df") for r in caplog.records)
    leaked = [v for v in phi_values(records) if v in text]
    assert leaked == []


def test_the_filter_is_what_keeps_botocore_bodies_out(
    service: LocalService, records: list, caplog: pytest.LogCaptureFixture
) -> None:
    patient = flat_row(records[0])["PatientID"]
    caplog.set_level(logging.DEBUG)
    redact_botocore_logs(False)
    try:
        Query(service.datastore_id).where(PatientID=patient).to_dataframe(
            client=service.client(), progress=False
        )
    finally:
        redact_botocore_logs(True)
    assert patient in "\n".join(r.getMessage() for r in caplog.records)


def test_errors_and_reprs_hold_no_phi(service: LocalService, records: list) -> None:
    row = flat_row(records[0])
    query = (
        Query(service.datastore_id)
        .where(PatientID=row["PatientID"], SeriesInstanceUID=row["SeriesInstanceUID"])
        .contains("PatientName", row["PatientName"] or "x")
    )
    plan = query.compile()
    shown = repr(query) + query.explain() + repr(query.predicates) + repr(plan)
    shown += repr(plan.chains) + repr(Page(0, summaries_to_table(records[:3])))
    assert [v for v in phi_values(records[:1]) if v in shown] == []


def test_unknown_botocore_templates_are_redacted_by_default() -> None:
    from healthimaging_df.core import logs

    def passed(name: str, template: str, *args: object) -> str:
        record = logging.LogRecord(name, logging.DEBUG, __file__, 1, template, args, None)
        assert logs.PHIRedactingFilter().filter(record)
        return record.getMessage()

    assert passed("botocore.hooks", "Event %s: calling handler %s", "e", "h") == (
        "Event e: calling handler h"
    )
    shown = passed("botocore.endpoint", "Some new message with %s", "PAT-SECRET")
    assert "PAT-SECRET" not in shown
    assert shown.startswith("Some new message with: <redacted")


def test_loggers_created_later_are_covered(service: LocalService) -> None:
    from healthimaging_df.core import logs

    late = logging.getLogger("botocore.module_imported_later")
    assert logs._FILTER not in late.filters
    Query(service.datastore_id).where(PatientID="P").to_dataframe(
        client=service.client(), progress=False
    )
    assert logs._FILTER in late.filters


# -- S3 work: object keys hold partition values (PatientID=...) ------------------------------------


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1, as tests/snapshot/conftest.py starts it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3(f"http://{host}:{port}")
    finally:
        server.stop()


def new_bucket(moto_s3: S3) -> str:
    """A bucket no other test module names (moto's servers in one process share their state)."""
    name = f"phi-logs-{uuid.uuid4().hex[:12]}"
    moto_s3.client.create_bucket(Bucket=name)
    return name


def frame_values(frame: Any) -> set[str]:
    """PatientIDs, names and UIDs of *frame*, as written and as S3 keys spell them."""
    values: set[str] = set()
    for column in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID"):
        values |= {str(v) for v in frame[column].dropna() if len(str(v)) >= 6}
    return values | {quote(v, safe="") for v in values} | {quote(quote(v, safe="")) for v in values}


def test_a_patient_partitioned_s3_snapshot_logs_no_phi_at_root_debug(
    moto_s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    frame = typed_frame(60, seed=3)
    bucket = new_bucket(moto_s3)
    path = f"s3://{bucket}/prefix"
    # moto's request log (werkzeug) is the stand-in server's, not the client's: S3's access log.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    caplog.set_level(logging.DEBUG)
    write_snapshot(frame, path, partition_cols=["PatientID"], **moto_s3.options())
    back = read_snapshot(path, **moto_s3.options())
    assert sorted(back["imageSetId"]) == sorted(frame["imageSetId"])
    listed = moto_s3.client.list_objects_v2(Bucket=bucket)["Contents"]
    patients = {v for v in frame["PatientID"].dropna() if len(v) >= 6}
    assert any(p in unquote(o["Key"]) for o in listed for p in patients)  # keys hold PatientIDs
    # a single-file snapshot goes through boto3 (the Delta table through delta-rs, which logs
    # nothing through Python logging): a key that embeds a PatientID
    patient = sorted(patients)[0]
    write_snapshot(frame, f"s3://{bucket}/{patient}/cohort.parquet", **moto_s3.options())

    lines = [f"{r.name}: {r.getMessage()}" for r in caplog.records]
    lines += [caplog.text]  # what a formatter prints, tracebacks included
    names = {r.name.split(".")[0] for r in caplog.records}
    assert {"botocore", "urllib3"} <= names  # the SDK did log at DEBUG
    endpoint = [m for m in lines if "Calling endpoint provider with parameters" in m]
    assert endpoint  # the line that carried the key passes, the key masked
    assert any("'Key': '<redacted>'" in m for m in endpoint)
    phi = frame_values(frame)
    assert [m for m in lines if any(v in m for v in phi)] == []


def test_the_filter_is_what_keeps_s3_keys_out(
    moto_s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    frame = typed_frame(20, seed=4)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    caplog.set_level(logging.DEBUG)
    patient = sorted(v for v in frame["PatientID"].dropna() if len(v) >= 6)[0]
    redact_botocore_logs(False)
    try:  # a key that embeds a PatientID, written through boto3
        write_snapshot(
            frame, f"s3://{new_bucket(moto_s3)}/{patient}/cohort.parquet", **moto_s3.options()
        )
    finally:
        redact_botocore_logs(True)
    assert patient in caplog.text


def test_every_module_logger_of_the_sdk_is_covered_before_it_is_imported() -> None:
    from healthimaging_df.core import logs

    names = logs.module_logger_names()
    for name in ("s3transfer.tasks", "s3transfer.futures", "boto3.s3.transfer", "botocore.regions"):
        assert name in names
    for name in names:
        assert logs._FILTER in logging.getLogger(name).filters, name


def test_endpoint_parameters_f_strings_and_tracebacks_are_redacted() -> None:
    from healthimaging_df.core import logs

    def shown(name: str, template: str, *args: object, exc: BaseException | None = None) -> str:
        info = (type(exc), exc, None) if exc is not None else None
        record = logging.LogRecord(name, logging.DEBUG, __file__, 1, template, args, info)
        assert logs.PHIRedactingFilter().filter(record)
        handler = logging.StreamHandler(io.StringIO())
        return handler.format(record)

    params = {"Bucket": "b", "Key": "prefix/PatientID=PAT-SECRET/part.parquet", "Region": "r"}
    text = shown("botocore.regions", "Calling endpoint provider with parameters: %s", params)
    assert "PAT-SECRET" not in text
    assert "'Bucket': 'b'" in text
    assert "'Region': 'r'" in text
    assert "'Key': '<redacted>'" in text
    formatted = "Executing task PutObjectTask(transfer_id=0, {'key': 'PatientID=PAT-SECRET'})"
    text = shown("s3transfer.tasks", formatted)
    assert text == f"Executing task: {logs.REDACTED}"
    error = OSError("Could not connect to http://h/b/PatientID=PAT-SECRET/x.parquet")
    text = shown("botocore.endpoint", "Exception received when sending HTTP request.", exc=error)
    assert "PAT-SECRET" not in text
    assert text.startswith("Exception received when sending (OSError): <redacted")
    for message in ("PAT-SECRET was read", "DOE^JOHN %s", "1.2.840.5 %s"):  # values first
        text = shown("deltalake.query", message, 1)
        assert text == f"record: {logs.REDACTED}"
