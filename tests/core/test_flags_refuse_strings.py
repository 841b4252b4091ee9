"""A flag takes True or False only: the string ``"no"`` is truthy, so taking it would read "yes".

Each is refused before any request, with an error naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthimaging_df import Query, fetch_metadata
from healthimaging_df.errors import QueryValidationError
from healthimaging_df.snapshot import vacuum_snapshot

DS = "0" * 32
IMAGE_SET = "1" * 32
FRAME = pd.DataFrame(
    {
        "datastoreId": [DS],
        "imageSetId": [IMAGE_SET],
        "version": [1],
        "PatientID": ["P1"],
        "StudyInstanceUID": ["1.2"],
    }
)
UNREACHABLE: dict[str, Any] = {"progress": False}


def _client() -> Any:
    import boto3
    from botocore.config import Config

    # nothing listens on port 9: a request sent would fail with a connection error, not ours
    return boto3.client(
        "medical-imaging",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )


CASES: list[tuple[str, Callable[[Path], Any]]] = [
    ("ascending", lambda p: Query(DS).sort_by("createdAt", ascending="no")),
    ("case", lambda p: Query(DS).contains("PatientName", "x", case="no")),
    ("case", lambda p: Query(DS).matches("PatientName", "x", case="no")),
    (
        "case",
        lambda p: Query.from_dict(
            {
                "datastore_id": DS,
                "predicates": [
                    {"column": "PatientName", "op": "contains", "values": ["x"], "case": "no"}
                ],
            }
        ),
    ),
    (
        "ascending",
        lambda p: Query.from_dict({"datastore_id": DS, "sort_by": "createdAt", "ascending": "no"}),
    ),
    (
        "resume",
        lambda p: Query(DS).to_parquet(
            str(p / "x.parquet"), client=_client(), resume="no", **UNREACHABLE
        ),
    ),
    ("dry_run", lambda p: fetch_metadata(FRAME, client=_client(), dry_run="no")),
    ("dry_run", lambda p: FRAME.ahi.fetch_metadata(client=_client(), dry_run="no")),
    ("dry_run", lambda p: vacuum_snapshot(p, retain=pd.Timedelta(hours=1), dry_run="no")),
]


@pytest.mark.parametrize(
    ("field", "call"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)]
)
def test_the_string_no_is_refused_naming_the_field(
    field: str, call: Callable[[Path], Any], tmp_path: Path
) -> None:
    with pytest.raises(QueryValidationError, match=field) as caught:
        call(tmp_path)
    assert "True or False" in str(caught.value)
