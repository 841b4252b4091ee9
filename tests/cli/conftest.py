"""Run the installed ``healthimaging-df`` entry point in a subprocess against a local service.

The subprocess gets a clean AWS environment: the service's ``env()`` (endpoint, dummy keys, region,
host-prefix injection off) and no profile or config file, so nothing reaches real AWS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from healthimaging_df.local import LocalService
from healthimaging_df.local.backend import study_datetime

ENTRY_POINT = Path(sys.executable).parent / "healthimaging-df"

# Written independently of healthimaging_df.schema: where each column lives in a summary.
TAGS = {
    "PatientID": "DICOMPatientId",
    "PatientName": "DICOMPatientName",
    "StudyInstanceUID": "DICOMStudyInstanceUID",
    "AccessionNumber": "DICOMAccessionNumber",
    "Modality": "DICOMSeriesModality",
    "BodyPartExamined": "DICOMSeriesBodyPart",
    "SeriesNumber": "DICOMSeriesNumber",
    "StudyDescription": "DICOMStudyDescription",
}

Run = Callable[..., subprocess.CompletedProcess[str]]


def row(record: dict[str, Any]) -> dict[str, Any]:
    """A summary as a flat dict keyed by frame column names."""
    tags = record.get("DICOMTags") or {}
    flat = {k: record.get(k) for k in ("imageSetId", "createdAt", "updatedAt", "isPrimary")}
    flat.update({name: tags.get(key) for name, key in TAGS.items()})
    flat["StudyDateTime"] = study_datetime(tags)
    return flat


def ids(rows: list[dict[str, Any]]) -> set[str]:
    return {r["imageSetId"] for r in rows}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment without AWS settings, plus *extra*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("CI", "PYTHONWARNINGS")
    }
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def service() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=600, seed=7) as svc:
        yield svc


@pytest.fixture(scope="session")
def rows(service: LocalService) -> list[dict[str, Any]]:
    assert service.datastore_id is not None
    return [row(r) for r in service.backend.image_sets(service.datastore_id)]


@pytest.fixture
def datastore_id(service: LocalService) -> str:
    assert service.datastore_id is not None
    return service.datastore_id


def runner(service: LocalService, cwd: Path) -> Run:
    """``run(*args, env=None, input=None)``: the entry point in *cwd*, pointed at *service*."""

    def run(
        *args: str, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ENTRY_POINT), *args],
            cwd=cwd,
            env=env if env is not None else clean_env(service.env()),
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


@pytest.fixture
def cli(service: LocalService, tmp_path: Path) -> Run:
    """The entry point, run in *tmp_path* against the session's service."""
    return runner(service, tmp_path)


def one_error_line(stderr: str) -> str:
    """The stderr of a failed command: exactly one line, with no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def naive(text: str) -> datetime:
    return datetime.fromisoformat(text)


UID = re.compile(r"\d+(\.\d+)+")
