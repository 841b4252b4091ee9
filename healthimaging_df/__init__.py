"""AWS HealthImaging image-set search as typed pandas DataFrames.

>>> import healthimaging_df as ahi
>>> ahi.schema.COLUMN_NAMES[:3]
('imageSetId', 'version', 'createdAt')
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from healthimaging_df import errors, schema

try:
    __version__ = version("healthimaging-df")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = ["__version__", "errors", "schema"]
