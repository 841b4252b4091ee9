"""Fixtures: a seeded local service, its image-set frame, and the raw records behind it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query
from healthimaging_df.local import LocalService


@pytest.fixture(scope="session")
def cohort_service() -> Iterator[LocalService]:
    """2,000 image sets (about 540 studies, 210 patients); only read by the cohort tests."""
    with LocalService.seeded(image_sets=2000, seed=7) as service:
        yield service


@pytest.fixture(scope="session")
def cohort_frame(cohort_service: LocalService) -> pd.DataFrame:
    assert cohort_service.datastore_id is not None
    return Query(cohort_service.datastore_id).to_dataframe(
        client=cohort_service.client(), progress=False, max_tps=None
    )


@pytest.fixture
def frame(cohort_frame: pd.DataFrame) -> pd.DataFrame:
    """A fresh copy per test (attrs included), so one test cannot spoil another."""
    return cohort_frame.copy(deep=True)


@pytest.fixture(scope="session")
def records(cohort_service: LocalService) -> list[dict[str, Any]]:
    assert cohort_service.datastore_id is not None
    return cohort_service.backend.image_sets(cohort_service.datastore_id)


@pytest.fixture
def metadata_service() -> Iterator[LocalService]:
    """A small service of its own per test: metadata calls change storage tiers."""
    with LocalService.seeded(image_sets=120, seed=11) as service:
        yield service


@pytest.fixture
def metadata_frame(metadata_service: LocalService) -> pd.DataFrame:
    assert metadata_service.datastore_id is not None
    return Query(metadata_service.datastore_id).to_dataframe(
        client=metadata_service.client(), progress=False, max_tps=None
    )
