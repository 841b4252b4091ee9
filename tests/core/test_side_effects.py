"""Side effects stay inside the call: the user's client, the collector and Arrow's allocator.

A run registers botocore handlers on the client (pacing, the lean page parser), defers the
cyclic garbage collector while it parses metadata documents, and builds results on the system
allocator (docs/architecture.md, "Side effects"). After the call, returned or raised, each is
as it was.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

import healthimaging_df  # noqa: F401  (registers df.ahi)
from healthimaging_df import Query
from healthimaging_df.errors import MetadataFetchError, SearchError
from healthimaging_df.local import LocalService


def _ours(client: Any) -> list[str]:
    """Handler ids of ours still registered on *client* (botocore keeps them by unique id)."""
    handlers = client.meta.events._emitter._unique_id_handlers
    return sorted(name for name in handlers if name.startswith("healthimaging_df"))


@pytest.fixture
def process_state() -> Iterator[tuple[bool, str]]:
    """The collector's and the allocator's state before the test; checked unchanged after it."""
    before = gc.isenabled(), pa.default_memory_pool().backend_name
    yield before
    assert (gc.isenabled(), pa.default_memory_pool().backend_name) == before


def test_a_search_leaves_the_users_client_as_given(
    ahi_local: LocalService, process_state: tuple[bool, str]
) -> None:
    client = ahi_local.client()
    during: list[list[str]] = []
    frame = Query(ahi_local.datastore_id).to_dataframe(
        client=client, progress=lambda pages, rows: during.append(_ours(client)), max_tps=None
    )
    assert len(frame)
    assert during
    assert all(during)  # on the client while the run needs them ...
    assert _ours(client) == []  # ... and gone after it


def test_a_failed_search_leaves_the_users_client_as_given(
    ahi_local: LocalService, process_state: tuple[bool, str]
) -> None:
    ahi_local.set_faults(error_rate=1.0)
    client = ahi_local.client(retries={"mode": "standard", "max_attempts": 1})
    with pytest.raises(SearchError):
        Query(ahi_local.datastore_id).to_dataframe(client=client, progress=False, max_tps=None)
    assert _ours(client) == []


@pytest.mark.parametrize("fails", [False, True], ids=["returned", "raised"])
def test_metadata_leaves_client_collector_and_allocator_as_they_were(
    ahi_local: LocalService, process_state: tuple[bool, str], fails: bool
) -> None:
    client = ahi_local.client(retries={"mode": "standard", "max_attempts": 1})
    frame = (
        Query(ahi_local.datastore_id)
        .where(Modality="MG", storageTier="FREQUENT_ACCESS")
        .to_dataframe(client=client, progress=False, max_tps=None)
    )
    if fails:
        ahi_local.set_faults(error_rate=1.0)
        with pytest.raises(MetadataFetchError):
            frame.ahi.fetch_metadata(client=client, max_tps=None, allow_archive_access=True)
    else:
        got = frame.ahi.fetch_metadata(client=client, max_tps=None, allow_archive_access=True)
        assert len(got)
    assert _ours(client) == []


def test_a_collector_the_process_turned_off_stays_off(ahi_local: LocalService) -> None:
    client = ahi_local.client()
    frame = (
        Query(ahi_local.datastore_id)
        .where(Modality="MG", storageTier="FREQUENT_ACCESS")
        .to_dataframe(client=client, progress=False, max_tps=None)
    )
    gc.disable()
    try:
        frame.ahi.fetch_metadata(client=client, max_tps=None, allow_archive_access=True)
        assert not gc.isenabled()
    finally:
        gc.enable()
