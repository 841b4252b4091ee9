"""The conformance target: the local service, with its ground truth.

The checks that need no ground truth are shipped in the package (``healthimaging_df.conformance``,
run by ``healthimaging-df doctor --conformance``); ``test_package_checks.py`` runs them against
the local service and, when AHI_LIVE_DATASTORE_ID is set, against real AWS. The checks here
compare the stand-in with an independent brute-force model (``reference.py``); those that need
no ground truth run against real AWS too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from healthimaging_df.local import Backend, LocalService


@dataclass
class Target:
    name: str
    client: Any
    datastore_id: str
    backend: Backend | None  # only for the local target: ground truth for brute-force checks
    service: LocalService | None

    @property
    def local(self) -> bool:
        return self.backend is not None


@pytest.fixture(scope="session")
def conformance_service() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=3000, seed=11) as service:
        yield service


@pytest.fixture(params=["local", pytest.param("live", marks=pytest.mark.live)])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "local":
        service: LocalService = request.getfixturevalue("conformance_service")
        service.reset_faults()
        assert service.datastore_id is not None
        return Target("local", service.client(), service.datastore_id, service.backend, service)
    datastore_id = os.environ.get("AHI_LIVE_DATASTORE_ID")
    if not datastore_id:
        pytest.skip("set AHI_LIVE_DATASTORE_ID (and AWS credentials) to run against real AWS")
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "medical-imaging", config=Config(retries={"mode": "standard", "max_attempts": 10})
    )
    return Target("live", client, datastore_id, None, None)
