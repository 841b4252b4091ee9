"""pytest fixtures running the local HealthImaging service (registered as a ``pytest11`` plugin).

Fixtures
--------
ahi_service
    Session scope: a started ``LocalService.seeded(image_sets=2000, seed=7)``.
ahi_local
    Function scope: that service after resetting its faults and counters.
ahi_client
    Function scope: a boto3 ``medical-imaging`` client for ``ahi_local``.
ahi_service_factory
    Function scope: ``factory(image_sets=..., seed=..., **options)`` returning a started,
    fresh service (options: ``Faults`` fields, ``fault_seed``, ``instances_per_series``,
    ``attributes_per_instance``); all are stopped at teardown.

Nothing is patched globally: clients reach the service through its ``endpoint_url``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from healthimaging_df.local.server import LocalService

__all__ = ["ahi_client", "ahi_local", "ahi_service", "ahi_service_factory"]


@pytest.fixture(scope="session")
def ahi_service() -> Iterator[LocalService]:
    """A started local service with 2,000 generated image sets (seed 7), for the session."""
    with LocalService.seeded(image_sets=2000, seed=7) as service:
        yield service


@pytest.fixture
def ahi_local(ahi_service: LocalService) -> LocalService:
    """The session service with faults cleared and counters zeroed for this test."""
    ahi_service.reset_faults()
    ahi_service.reset_stats()
    return ahi_service


@pytest.fixture
def ahi_client(ahi_local: LocalService) -> Any:
    """A boto3 ``medical-imaging`` client pointed at :func:`ahi_local`."""
    return ahi_local.client()


@pytest.fixture
def ahi_service_factory() -> Iterator[Callable[..., LocalService]]:
    """Make fresh started services: ``factory(image_sets=100, seed=0, **faults)``."""
    services: list[LocalService] = []

    def factory(image_sets: int = 100, seed: int = 0, **faults: Any) -> LocalService:
        service = LocalService.seeded(image_sets=image_sets, seed=seed, **faults).start()
        services.append(service)
        return service

    yield factory
    for service in services:
        service.stop()
