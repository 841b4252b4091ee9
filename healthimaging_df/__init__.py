"""AWS HealthImaging image-set search as typed pandas DataFrames.

>>> import healthimaging_df as ahi
>>> ahi.schema.COLUMN_NAMES[:3]
('imageSetId', 'version', 'createdAt')

The public names load on first use (PEP 562); ``df.ahi`` is registered on import, except under
the console script (``healthimaging_df_cli``), which starts without pandas.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from healthimaging_df.core.logs import redact_botocore_logs

if TYPE_CHECKING:
    __version__: str

    from healthimaging_df import dicomweb, errors, options, schema
    from healthimaging_df.checkup import doctor
    from healthimaging_df.core import logs
    from healthimaging_df.local import LocalService
    from healthimaging_df.metadata import fetch_metadata
    from healthimaging_df.polars import scan_image_sets, sql
    from healthimaging_df.query import Query, search
    from healthimaging_df.refresh import RefreshReport, refresh_snapshot
    from healthimaging_df.snapshot import (
        SnapshotInfo,
        downgrade_snapshot,
        optimize_snapshot,
        read_snapshot,
        scan_snapshot,
        snapshot_history,
        snapshot_info,
        snapshot_provenance,
        vacuum_snapshot,
        write_snapshot,
    )
    from healthimaging_df.store.redact import RedactionPolicy, generate_key
    from healthimaging_df.sync import SyncReport, sync_snapshot

_LAZY = {
    "LocalService": "healthimaging_df.local",
    "Query": "healthimaging_df.query",
    "RedactionPolicy": "healthimaging_df.store.redact",
    "RefreshReport": "healthimaging_df.refresh",
    "SnapshotInfo": "healthimaging_df.snapshot",
    "SyncReport": "healthimaging_df.sync",
    "doctor": "healthimaging_df.checkup",
    "fetch_metadata": "healthimaging_df.metadata",
    "generate_key": "healthimaging_df.store.redact",
    "read_snapshot": "healthimaging_df.snapshot",
    "refresh_snapshot": "healthimaging_df.refresh",
    "scan_snapshot": "healthimaging_df.snapshot",
    "scan_image_sets": "healthimaging_df.polars",
    "search": "healthimaging_df.query",
    "sql": "healthimaging_df.polars",
    "snapshot_history": "healthimaging_df.snapshot",
    "snapshot_info": "healthimaging_df.snapshot",
    "optimize_snapshot": "healthimaging_df.snapshot",
    "downgrade_snapshot": "healthimaging_df.snapshot",
    "snapshot_provenance": "healthimaging_df.snapshot",
    "sync_snapshot": "healthimaging_df.sync",
    "vacuum_snapshot": "healthimaging_df.snapshot",
    "write_snapshot": "healthimaging_df.snapshot",
}
_MODULES = {
    "dicomweb": "dicomweb",  # QIDO-RS (the dicomweb extra)
    "errors": "errors",
    "logs": "core.logs",
    "options": "options",  # the typed option groups of to_parquet
    "schema": "schema",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata costs tens of milliseconds: read it on demand
        value: Any = importlib.import_module(f"{__name__}._version").__version__
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


redact_botocore_logs()
if "healthimaging_df_cli" not in sys.modules:  # the console script defers pandas to its commands
    from healthimaging_df import accessor as _accessor  # noqa: F401  (registers df.ahi)

__all__ = [
    "LocalService",
    "Query",
    "RedactionPolicy",
    "RefreshReport",
    "SnapshotInfo",
    "SyncReport",
    "__version__",
    "dicomweb",
    "doctor",
    "downgrade_snapshot",
    "errors",
    "fetch_metadata",
    "generate_key",
    "logs",
    "optimize_snapshot",
    "options",
    "read_snapshot",
    "redact_botocore_logs",
    "refresh_snapshot",
    "scan_image_sets",
    "scan_snapshot",
    "schema",
    "search",
    "snapshot_history",
    "snapshot_info",
    "snapshot_provenance",
    "sql",
    "sync_snapshot",
    "vacuum_snapshot",
    "write_snapshot",
]
