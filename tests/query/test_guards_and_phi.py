"""A server that breaks pagination, and PHI kept out of logs, errors and reprs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from healthimaging_df import Query, redact_botocore_logs
from healthimaging_df.errors import PaginationError
from healthimaging_df.fetch import Page
from healthimaging_df.flatten import summaries_to_table
from healthimaging_df.local import LocalService

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
    from healthimaging_df import logs

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
    from healthimaging_df import logs

    late = logging.getLogger("botocore.module_imported_later")
    assert logs._FILTER not in late.filters
    Query(service.datastore_id).where(PatientID="P").to_dataframe(
        client=service.client(), progress=False
    )
    assert logs._FILTER in late.filters
