"""pytest fixtures running the local HealthImaging service (registered as a ``pytest11`` plugin).

Fixtures
--------
ahi_service
    Session scope: a started ``LocalService.seeded(image_sets=2000, seed=7)``.
ahi_local
    Function scope: that service after resetting its faults, deny list and counters; for the
    test, ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING`` names its DICOMweb address.
ahi_client
    Function scope: a boto3 ``medical-imaging`` client for ``ahi_local``.
ahi_service_factory
    Function scope: ``factory(image_sets=..., seed=..., **options)`` returning a started,
    fresh service (options: ``LocalService`` keywords such as ``deny`` or
    ``qido_record_cap``, ``Faults`` fields, ``fault_seed``, ``instances_per_series``,
    ``attributes_per_instance``); ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING`` names the DICOMweb
    address of the latest one made; all are stopped at teardown.
ahi_sqs_queue
    Function scope: a fresh SQS queue on a session-wide moto server (needs ``moto[server]``),
    for ``LocalService(events_queue_url=...)``: ``.url``, ``.endpoint_url``, ``.client`` and
    ``.receive()`` (every message body waiting, parsed).

Clients reach the services through their addresses; the one environment variable set is
undone after each test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from healthimaging_df.local.server import DICOMWEB_ENDPOINT_ENV, LocalService

__all__ = [
    "SqsQueue",
    "ahi_client",
    "ahi_local",
    "ahi_service",
    "ahi_service_factory",
    "ahi_sqs_queue",
]


@pytest.fixture(scope="session")
def ahi_service() -> Iterator[LocalService]:
    """A started local service with 2,000 generated image sets (seed 7), for the session."""
    with LocalService.seeded(image_sets=2000, seed=7) as service:
        yield service


@pytest.fixture
def ahi_local(ahi_service: LocalService, monkeypatch: pytest.MonkeyPatch) -> LocalService:
    """The session service with faults and deny list cleared and counters zeroed for this test."""
    ahi_service.reset_faults()
    ahi_service.reset_stats()
    monkeypatch.setenv(DICOMWEB_ENDPOINT_ENV, ahi_service.dicomweb_endpoint_url)
    return ahi_service


@pytest.fixture
def ahi_client(ahi_local: LocalService) -> Any:
    """A boto3 ``medical-imaging`` client pointed at :func:`ahi_local`."""
    return ahi_local.client()


@pytest.fixture
def ahi_service_factory(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., LocalService]]:
    """Make fresh started services: ``factory(image_sets=100, seed=0, **options)``."""
    services: list[LocalService] = []

    def factory(image_sets: int = 100, seed: int = 0, **options: Any) -> LocalService:
        service = LocalService.seeded(image_sets=image_sets, seed=seed, **options).start()
        services.append(service)
        monkeypatch.setenv(DICOMWEB_ENDPOINT_ENV, service.dicomweb_endpoint_url)
        return service

    yield factory
    for service in services:
        service.close()


@dataclass
class SqsQueue:
    """One SQS queue on moto's server: its URL, the server's endpoint and a boto3 client."""

    url: str
    endpoint_url: str
    client: Any

    def receive(self, wait_seconds: int = 0) -> list[dict[str, Any]]:
        """Every message waiting (received and deleted), bodies parsed as JSON, oldest first."""
        out: list[dict[str, Any]] = []
        while True:
            answer = self.client.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds
            )
            messages = answer.get("Messages", [])
            if not messages:
                return out
            for message in messages:
                out.append(json.loads(message["Body"]))
                self.client.delete_message(
                    QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"]
                )
            wait_seconds = 0


@pytest.fixture(scope="session")
def _ahi_moto_server() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def ahi_sqs_queue(_ahi_moto_server: str) -> Iterator[SqsQueue]:
    """A fresh SQS queue on a session-wide moto server."""
    import boto3

    client = boto3.client(
        "sqs",
        endpoint_url=_ahi_moto_server,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    url = client.create_queue(QueueName=f"ahi-events-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    try:
        yield SqsQueue(url, _ahi_moto_server, client)
    finally:
        client.delete_queue(QueueUrl=url)
