"""A local stand-in for AWS HealthImaging (``medical-imaging``), served over HTTP to boto3.

Self-contained on purpose: nothing here imports the rest of ``healthimaging_df``.

Examples
--------
>>> from healthimaging_df.local import LocalService
>>> with LocalService.seeded(image_sets=100, seed=0) as svc:
...     client = svc.client()
...     pages = client.get_paginator("search_image_sets").paginate(datastoreId=svc.datastore_id)
...     total = sum(len(page["imageSetsMetadataSummaries"]) for page in pages)
>>> total
100
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from healthimaging_df.local.backend import Backend
    from healthimaging_df.local.documents import SeriesShape
    from healthimaging_df.local.errors import (
        BackendError,
        ConflictError,
        ResourceNotFound,
        ValidationError,
    )
    from healthimaging_df.local.faults import Faults, Stats
    from healthimaging_df.local.generate import dump_jsonl, generate_image_sets, load_jsonl
    from healthimaging_df.local.server import LocalService

# Loaded on first use (PEP 562): `healthimaging-df --help` registers `local` without werkzeug.
_HOMES = {
    "Backend": "backend",
    "BackendError": "errors",
    "ConflictError": "errors",
    "ResourceNotFound": "errors",
    "ValidationError": "errors",
    "SeriesShape": "documents",
    "Faults": "faults",
    "Stats": "faults",
    "dump_jsonl": "generate",
    "generate_image_sets": "generate",
    "load_jsonl": "generate",
    "LocalService": "server",
}


def __getattr__(name: str) -> Any:
    try:
        home = importlib.import_module(f".{_HOMES[name]}", __name__)
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = globals()[name] = getattr(home, name)  # imported once, then a plain attribute
    return value


__all__ = [
    "Backend",
    "BackendError",
    "ConflictError",
    "Faults",
    "LocalService",
    "ResourceNotFound",
    "SeriesShape",
    "Stats",
    "ValidationError",
    "dump_jsonl",
    "generate_image_sets",
    "load_jsonl",
]
