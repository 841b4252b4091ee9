"""AWS HealthImaging image-set search as typed pandas DataFrames.

>>> import healthimaging_df as ahi
>>> ahi.schema.COLUMN_NAMES[:3]
('imageSetId', 'version', 'createdAt')
"""

from __future__ import annotations

from healthimaging_df import accessor as _accessor  # noqa: F401  (registers df.ahi)
from healthimaging_df import errors, schema
from healthimaging_df._version import __version__
from healthimaging_df.logs import redact_botocore_logs
from healthimaging_df.query import Query, search
from healthimaging_df.refresh import refresh_snapshot
from healthimaging_df.snapshot import read_snapshot, write_snapshot

redact_botocore_logs()

__all__ = [
    "Query",
    "__version__",
    "errors",
    "read_snapshot",
    "redact_botocore_logs",
    "refresh_snapshot",
    "schema",
    "search",
    "write_snapshot",
]
