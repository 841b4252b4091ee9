"""HealthImaging's default request quotas, per operation: the one place a default ``max_tps`` comes from.

The quotas are the account's, per region and operation, and adjustable (developer guide "Throttling
limits"; docs/service-facts). Each operation has its own bucket: a metadata enrichment does not eat
the search quota. A signature writes ``max_tps: float | None = SEARCH_TPS`` (or the operation's
constant), never the number: a user with a raised quota passes their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Quota:
    """An operation's default quota: *rate* requests per second, bursts up to *burst*."""

    rate: float
    burst: int


QUOTAS = MappingProxyType(
    {
        "SearchImageSets": Quota(25.0, 50),
        "GetImageSet": Quota(25.0, 50),
        "ListImageSetVersions": Quota(25.0, 50),
        "GetImageSetMetadata": Quota(50.0, 100),
        "GetDICOMSeriesMetadata": Quota(50.0, 100),
        "GetDICOMInstanceMetadata": Quota(50.0, 100),
        "GetDatastore": Quota(10.0, 20),
        "ListDatastores": Quota(5.0, 10),
        "UpdateImageSetMetadata": Quota(10.0, 40),
        "GetImageFrame": Quota(1000.0, 2000),
    }
)
"""Default quotas by API operation (rate TPS, burst TPS)."""

SEARCH_TPS = QUOTAS["SearchImageSets"].rate
"""SearchImageSets: every search path (scan, fan-out, probes, refresh)."""

METADATA_TPS = QUOTAS["GetImageSetMetadata"].rate
"""GetImageSetMetadata: ``fetch_metadata``'s documents."""

GET_IMAGE_SET_TPS = QUOTAS["GetImageSet"].rate
"""GetImageSet: the storage-tier look-ups before an enrichment (not an access)."""

QIDO_TPS = SEARCH_TPS
"""SearchDICOMStudies/Series/Instances (QIDO-RS): AWS lists no quota; SearchImageSets' is assumed.

An undocumented assumption, kept configurable: every QIDO-RS function takes ``max_tps``.
"""


def default_tps(operation: str) -> float:
    """The default rate of *operation*; an operation AWS lists no quota for gets SearchImageSets'."""
    quota = QUOTAS.get(operation)
    return quota.rate if quota is not None else SEARCH_TPS
