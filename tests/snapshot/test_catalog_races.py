"""Two first commits racing on an SQL catalog: the loser sees a conflict, never a bare failure."""

from __future__ import annotations

import pytest

from healthimaging_df.errors import SnapshotConflictError
from healthimaging_df.store.errors import translate


def test_an_sql_catalogs_integrity_error_is_a_conflict() -> None:
    exc = pytest.importorskip("sqlalchemy.exc")
    # what pyiceberg's SQL catalog lets through when another writer inserted the row first
    raced = exc.IntegrityError("INSERT INTO iceberg_tables ...", {}, Exception("UNIQUE failed"))
    found = translate(raced, "writing the snapshot")
    assert isinstance(found, SnapshotConflictError)
    assert "INSERT" not in str(found)
    assert "UNIQUE" not in str(found)
