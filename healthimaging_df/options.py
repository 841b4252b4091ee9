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

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

if TYPE_CHECKING:
    from datetime import datetime

    from healthimaging_df.core.progress import Progress
    from healthimaging_df.engine.document_rows import Level
    from healthimaging_df.engine.enrichment import OnError
    from healthimaging_df.schema import DtypeBackend
    from healthimaging_df.store.redact import RedactionPolicy

__all__ = [
    "ExportOptions",
    "MetadataOptions",
    "ReadLocation",
    "RunOptions",
    "S3Location",
    "ScanOptions",
    "SnapshotReadOptions",
    "StoreOptions",
    "WriteLocation",
    "WriteOptions",
    "keywords",
    "subset",
]

F = TypeVar("F", bound=Callable[..., Any])


class ScanOptions(TypedDict, total=False):
    """How a search runs: the client, pacing and progress (``polars.scan_image_sets``)."""

    client: Any
    boto3_session: Any
    progress: Progress
    # an export's default stays 8 until snapshot.export_query takes None (rate x round trip)
    max_concurrency: int | None
    max_tps: float | None


class RunOptions(ScanOptions, total=False):
    """How a query runs: :class:`ScanOptions` and the DICOMweb endpoint (``Query.to_dataframe``)."""

    dicomweb_endpoint_url: str | None


class S3Location(TypedDict, total=False):
    """How a snapshot *path* on S3 is reached (``snapshot.locate``): session, region, endpoint."""

    boto3_session: Any
    region: str | None
    s3_endpoint_url: str | None


class ReadLocation(S3Location, total=False):
    """Where a snapshot is, for the functions that read or maintain one (``snapshot.locate``).

    A *path* beside these names a file or a Delta table; ``iceberg_table`` with ``catalog``
    (and ``warehouse``, ``catalog_properties``) names an Iceberg table instead.
    """

    iceberg_table: str | None
    catalog: str | None
    warehouse: str | None
    catalog_properties: Mapping[str, str] | None


class WriteLocation(ReadLocation, total=False):
    """Where a snapshot is written: :class:`ReadLocation` and the SSE-KMS key of new objects."""

    kms_key_id: str | None


class SnapshotReadOptions(ReadLocation, total=False):
    """``read_snapshot``'s keywords but ``chunk_rows`` (which picks the result's type)."""

    dtype_backend: DtypeBackend
    columns: Sequence[str] | None
    filters: Any
    version: int | None
    as_of: datetime | None


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


def keywords(group: type, *receivers: Callable[..., Any]) -> Callable[[F], F]:
    """Spell out *group*'s keys in the signature of a function taking ``**options: Unpack[group]``.

    The TypedDict is what mypy and editors check a call against; the decorated function's
    ``__signature__`` (what ``help()`` and ``inspect`` show) lists each key as a keyword-only
    parameter with the annotation and default of the first of *receivers* (the functions the
    options are passed on to) that takes it. A call with a keyword the signature lacks raises
    ``TypeError`` as a spelled-out signature would; the function is called with every key, the
    defaults filled in. A key no receiver takes is an error at import time.
    """
    received: dict[str, inspect.Parameter] = {}
    for receiver in receivers:
        for parameter in inspect.signature(receiver).parameters.values():
            received.setdefault(parameter.name, parameter)

    def decorate(function: F) -> F:
        own = inspect.signature(function)
        parameters = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for key in group.__annotations__:
            if key not in received:
                raise TypeError(f"{function.__qualname__}: no receiver takes {key!r}")
            parameters.append(received[key].replace(kind=inspect.Parameter.KEYWORD_ONLY))
        signature = own.replace(parameters=parameters)

        @functools.wraps(function)
        def checked(*args: Any, **options: Any) -> Any:
            try:
                bound = signature.bind(*args, **options)
            except TypeError as exc:
                raise TypeError(f"{function.__name__}() {exc}") from None
            bound.apply_defaults()  # the body gets every key: options["margin"] is the default
            return function(*bound.args, **bound.kwargs)

        checked.__signature__ = signature  # type: ignore[attr-defined]
        return checked  # type: ignore[return-value]

    return decorate


def subset(options: Mapping[str, object], group: type) -> dict[str, Any]:
    """The entries of *options* whose keys *group* (a TypedDict) has, to pass on."""
    return {key: value for key, value in options.items() if key in group.__annotations__}
