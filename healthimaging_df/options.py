"""The option groups of the run and write methods, as TypedDicts: one list of keywords each.

``Query.to_parquet(path, **options)`` and ``df.ahi.to_parquet(path, **options)`` pass their
keywords on; the groups here say which keywords those are and their types, so a type checker and
an editor see them (``**options: Unpack[ExportOptions]``), and a test keeps each group equal to
the keywords of the function that takes them. Every key is optional; the defaults are the
receiving function's.

>>> from healthimaging_df.options import ExportOptions
>>> options: ExportOptions = {"max_tps": 10.0, "partition_cols": ["Modality"]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from healthimaging_df.core.progress import Progress
    from healthimaging_df.engine.document_rows import Level
    from healthimaging_df.engine.enrichment import OnError
    from healthimaging_df.store.redact import RedactionPolicy

__all__ = ["ExportOptions", "MetadataOptions", "RunOptions", "StoreOptions", "WriteOptions"]


class RunOptions(TypedDict, total=False):
    """How a query runs: the client, pacing and progress (as ``Query.to_dataframe`` takes them)."""

    client: Any
    boto3_session: Any
    progress: Progress
    # an export's default stays 8 until snapshot.export_query takes None (rate x round trip)
    max_concurrency: int | None
    max_tps: float | None
    dicomweb_endpoint_url: str | None


class StoreOptions(TypedDict, total=False):
    """Where and how a snapshot is stored: partitions, redaction, S3, compression, Glue, Iceberg.

    A path names a file or a Delta table; ``iceberg_table`` with ``catalog`` (and ``warehouse``
    for new tables) names an Iceberg table instead.
    """

    partition_cols: Sequence[str] | None
    redact: RedactionPolicy | None
    region: str | None
    s3_endpoint_url: str | None
    kms_key_id: str | None
    compression: str
    glue_table: str | None
    iceberg_table: str | None
    catalog: str | None
    warehouse: str | None
    catalog_properties: Mapping[str, str] | None


class ExportOptions(RunOptions, StoreOptions, total=False):
    """``Query.to_parquet`` (``snapshot.export_query``): a run, written as it goes, resumable."""

    resume: bool
    checkpoint_interval: float


class MetadataOptions(TypedDict, total=False):
    """``fetch_metadata`` and ``df.ahi.fetch_metadata``, ``dry_run`` aside (it picks the result)."""

    client: Any
    boto3_session: Any
    level: Level
    max_tps: float | None
    max_concurrency: int | None
    progress: Progress
    on_error: OnError
    datastore_id: str | None
    allow_archive_access: bool


class WriteOptions(StoreOptions, total=False):
    """``df.ahi.to_parquet`` (``snapshot.write_snapshot``): a frame in memory, written once."""

    boto3_session: Any
    provenance: dict[str, Any] | None
    row_group_size: int
