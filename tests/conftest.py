"""Suite-wide: the planner's statistics cache lives in a temporary folder, never the user's;
each test starts with fresh rate limiters (a throttle one test provokes widens a shared one) and
knows nothing of DICOMweb (a refusal one test provokes is remembered per endpoint, and a port
is reused by a later service)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_statistics_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("ahi-cache")
    previous = os.environ.get("HEALTHIMAGING_DF_CACHE")
    os.environ["HEALTHIMAGING_DF_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("HEALTHIMAGING_DF_CACHE", None)
    else:
        os.environ["HEALTHIMAGING_DF_CACHE"] = previous


@pytest.fixture(autouse=True)
def _fresh_rate_limiters() -> Iterator[None]:
    from healthimaging_df import aws

    aws.forget_limiters()
    yield
    aws.forget_limiters()


@pytest.fixture(autouse=True)
def _fresh_dicomweb_findings() -> Iterator[None]:
    from healthimaging_df.engine import qido, statistics

    statistics.forget_capabilities()
    qido.forget_warnings()
    yield
    statistics.forget_capabilities()
