"""``Run``: how a plan runs (client, fetch options, progress), checked before any request.

Apart from ``engine/run.py`` so that the steps a run calls (``engine/qido.py``) can name it
without importing the pipeline that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from healthimaging_df import schema
from healthimaging_df.core.progress import Progress
from healthimaging_df.engine.fetch import FetchOptions, Prefetched


@dataclass(frozen=True)
class Run:
    """How to run a plan: checked by ``engine.prepare`` before any request is sent."""

    client: Any
    fetch: FetchOptions
    progress: Progress
    dtype_backend: schema.DtypeBackend
    # first pages a probe read that the chosen scan starts from (see ``engine.choose``)
    prefetched: Prefetched = field(default_factory=dict, repr=False, compare=False)
    dicomweb_endpoint_url: str | None = None  # where QIDO-RS lives, when given
