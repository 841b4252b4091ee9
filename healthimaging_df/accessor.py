"""``df.ahi``: cohort work on an image-set frame, registered when ``healthimaging_df`` is imported.

pandas builds a new accessor object on every ``df.ahi`` access, so it keeps nothing but the frame:
each method reads the frame and returns something new (never mutating it), and provenance lives
in ``df.attrs``, which every returned frame carries on.

>>> import pandas as pd
>>> import healthimaging_df
>>> pd.DataFrame({"imageSetId": []}).ahi
Traceback (most recent call last):
...
AttributeError: df.ahi needs an image-set frame; missing column(s): version, PatientID, StudyInstanceUID
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import pandas as pd

# Imported by the package once pandas has loaded, possibly while another of our modules is
# half-imported: only bottom-layer modules, cohort and the quota table (which import only those)
# are imported here; metadata and the rest load in the methods that use them.
from healthimaging_df import cohort, schema
from healthimaging_df.aws.quotas import QIDO_TPS
from healthimaging_df.core.frames import with_attrs
from healthimaging_df.core.logs import engine_error_text
from healthimaging_df.errors import QueryValidationError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from typing_extensions import Unpack

    from healthimaging_df import metadata
    from healthimaging_df.options import MetadataOptions, WriteOptions
    from healthimaging_df.refresh import RefreshReport
    from healthimaging_df.snapshot import SnapshotInfo
    from healthimaging_df.store.redact import RedactionPolicy

__all__ = ["AHIAccessor", "SQLQueryError"]

_ROLLUPS = ("studies", "patients")


def _missing_extra(package: str, extra: str, what: str) -> ImportError:
    return ImportError(
        f'{what} needs {package}, an optional extra: pip install "healthimaging-df[{extra}]"'
    )


# DuckDB errors about the query itself: they name columns, tables, functions and syntax. Their
# first line is shown (with any '...' literal masked); the rest quotes the query text.
_SHOWN_ERRORS = ("ParserException", "BinderException", "CatalogException")
_LITERAL = re.compile(r"'(?:[^']|'')*'")


class SQLQueryError(QueryValidationError):
    """DuckDB could not run a ``df.ahi.sql()`` query.

    A parser, binder or catalog error (a mistyped column, a syntax error) is shown: its first
    line names columns and syntax, with quoted literals masked as ``'…'``. Any other error
    (a conversion error quotes the cell it could not convert: PHI) names only DuckDB's error
    class. DuckDB's whole message is always kept in ``engine_message``.
    """

    def __init__(self, kind: str, engine_message: str) -> None:
        text = engine_error_text("DuckDB", kind, engine_message, _SHOWN_ERRORS, _LITERAL)
        super().__init__("query", text)
        self.kind = kind
        self.engine_message = engine_message


@pd.api.extensions.register_dataframe_accessor("ahi")
class AHIAccessor:
    """Cohort methods on a frame from ``Query.to_dataframe`` (or a snapshot).

    Parameters
    ----------
    frame
        Must have the schema's key columns (imageSetId, version, PatientID, StudyInstanceUID);
        ``AttributeError`` names those missing.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        from healthimaging_df.schema import KEY_COLUMNS

        missing = [c for c in KEY_COLUMNS if c not in frame.columns]
        if missing:
            raise AttributeError(
                f"df.ahi needs an image-set frame; missing column(s): {', '.join(missing)}"
            )
        self._frame = frame

    # -- rollups -------------------------------------------------------------------------------

    def studies(self) -> pd.DataFrame:
        """One row per study; see :func:`healthimaging_df.cohort.studies`."""
        return cohort.studies(self._frame)

    def patients(self) -> pd.DataFrame:
        """One row per patient; see :func:`healthimaging_df.cohort.patients`."""
        return cohort.patients(self._frame)

    def primary(self) -> pd.DataFrame:
        """The primary image sets (isPrimary not False)."""
        return cohort.primary(self._frame)

    def latest(self) -> pd.DataFrame:
        """One row per imageSetId: the highest version."""
        return cohort.latest(self._frame)

    def age_at_study(self) -> pd.Series:
        """Age in whole years at StudyDate (``Int64``, NA when the dates cannot fix it)."""
        return cohort.age_at_study(self._frame)

    def summary(self) -> cohort.CohortSummary:
        """Counts by Modality, BodyPartExamined, PatientSex, study year and age band."""
        return cohort.summary(self._frame)

    def plot(self, **options: Any) -> Figure:
        """Draw :meth:`summary` with matplotlib (the ``plot`` extra); returns the Figure."""
        from healthimaging_df.plot import plot_summary

        return plot_summary(self.summary(), **options)

    # -- SQL -----------------------------------------------------------------------------------

    def sql(self, query: str, **frames: pd.DataFrame) -> pd.DataFrame:
        """Run DuckDB SQL over the frame (``image_sets``), its rollups and *frames*.

        ``studies`` and ``patients`` are the :meth:`studies` and :meth:`patients` rollups,
        computed only when the query names them; keyword *frames* add (or replace) tables.
        Needs the ``duckdb`` extra. The result has nullable dtypes and the frame's ``attrs``;
        e.g. ``df.ahi.sql("SELECT Modality, count(*) AS n FROM image_sets GROUP BY 1")``.
        A query DuckDB cannot run raises :class:`SQLQueryError`, whose text names only DuckDB's
        error class (DuckDB's message, which can quote values, is in ``engine_message``).
        """
        try:
            import duckdb
        except ImportError:
            raise _missing_extra("duckdb", "duckdb", "df.ahi.sql()") from None
        import pyarrow as pa

        tables: dict[str, pd.DataFrame] = {"image_sets": self._frame}
        for name in _ROLLUPS:
            if name not in frames and re.search(rf"\b{name}\b", query, re.IGNORECASE):
                tables[name] = getattr(self, name)()
        tables.update(frames)
        connection = duckdb.connect(":memory:")
        try:
            connection.execute("SET TimeZone = 'UTC'")
            for name, table in tables.items():
                connection.register(name, pa.Table.from_pandas(table, preserve_index=False))
            try:
                relation = connection.sql(query)
                if relation is None:
                    raise QueryValidationError(
                        "query", "sql() needs a query that returns rows (SELECT, WITH...)"
                    )
                to_table = getattr(relation, "to_arrow_table", None) or relation.arrow
                result = to_table()
            except duckdb.Error as exc:
                # DuckDB quotes cells ("Could not convert string '<value>'") and query text.
                raise SQLQueryError(type(exc).__name__, str(exc)) from None
        finally:
            connection.close()
        frame = result.to_pandas(types_mapper=schema.pandas_type)
        return with_attrs(frame, self._frame)

    # -- metadata ------------------------------------------------------------------------------

    @overload
    def fetch_metadata(
        self, *, dry_run: Literal[False] = ..., **options: Unpack[MetadataOptions]
    ) -> pd.DataFrame: ...

    @overload
    def fetch_metadata(
        self, *, dry_run: Literal[True], **options: Unpack[MetadataOptions]
    ) -> metadata.MetadataPlan: ...

    def fetch_metadata(
        self, *, dry_run: bool = False, **options: Unpack[MetadataOptions]
    ) -> pd.DataFrame | metadata.MetadataPlan:
        """GetImageSetMetadata per image set; see :func:`healthimaging_df.metadata.fetch_metadata`.

        Returns a long frame keyed by imageSetId, version, SeriesInstanceUID (and
        SOPInstanceUID at ``level="instance"``), ready to merge on ``imageSetId``; or, with
        ``dry_run=True``, a :class:`~healthimaging_df.metadata.MetadataPlan` (nothing sent).
        Warns once (``ArchiveAccessWarning``) when archived image sets would be accessed.
        Bad options raise ``QueryValidationError`` before any call, dry run or not. *options*
        are :class:`~healthimaging_df.options.MetadataOptions`.
        """
        from healthimaging_df import metadata

        return metadata.fetch_metadata(self._frame, dry_run=dry_run, **options)

    def fetch_series_attributes(
        self,
        fields: Sequence[str],
        *,
        client: Any = None,
        boto3_session: Any = None,
        dicomweb_endpoint_url: str | None = None,
        max_tps: float | None = QIDO_TPS,
        max_concurrency: int | None = None,
        on_truncation: Literal["raise", "report"] = "raise",
        scope: Literal["study", "datastore"] = "study",
        datastore_id: str | None = None,
    ) -> pd.DataFrame:
        """Series attributes through QIDO-RS ``includefield``, joined on; no image set is accessed.

        See :func:`healthimaging_df.dicomweb.fetch_series_attributes`: archived image sets stay
        archived, many series are read a request. Needs the ``dicomweb`` extra.
        """
        try:
            from healthimaging_df import dicomweb
        except ImportError:
            raise _missing_extra("dicomweb-client", "dicomweb", "fetch_series_attributes") from None
        from healthimaging_df import aws

        # The search client of the session, made as every client is (its endpoint, region and
        # refreshing credentials sign the QIDO-RS requests): AWS_ENDPOINT_URL_MEDICAL_IMAGING holds.
        client = aws.make_client(client, boto3_session, max_concurrency or aws.MAX_CONCURRENCY)
        return dicomweb.fetch_series_attributes(
            self._frame,
            fields,
            client=client,
            boto3_session=boto3_session,
            dicomweb_endpoint_url=dicomweb_endpoint_url,
            datastore_id=datastore_id,
            max_tps=max_tps,
            max_concurrency=max_concurrency,
            on_truncation=on_truncation,
            scope=scope,
        )

    # -- snapshots (shared with healthimaging_df.snapshot) ------------------------------------

    def to_parquet(
        self, path: str | os.PathLike[str], **options: Unpack[WriteOptions]
    ) -> SnapshotInfo:
        """Write the frame as one Parquet file (``….parquet``) with its provenance.

        *options* are :class:`~healthimaging_df.options.WriteOptions`, as
        ``snapshot.write_snapshot`` takes them; read it back with ``read_snapshot(path)``.
        A directory path still writes a Delta table, with a ``DeprecationWarning``: use
        :meth:`to_delta`.
        """
        from healthimaging_df.snapshot import _deprecated_directory, write_snapshot

        _deprecated_directory(path)
        return write_snapshot(self._frame, path, **options)

    def to_delta(
        self, path: str | os.PathLike[str], **options: Unpack[WriteOptions]
    ) -> SnapshotInfo:
        """Write the frame as a Delta table at *path* (a folder or ``s3://bucket/prefix``)."""
        from healthimaging_df.snapshot import check_table_path, write_snapshot

        check_table_path(path, "to_delta")
        return write_snapshot(self._frame, path, **options)

    def to_iceberg(
        self, iceberg_table: str, *, catalog: str, warehouse: str | None = None, **options: Any
    ) -> SnapshotInfo:
        """Write the frame as the Iceberg table ``NAMESPACE.TABLE`` of *catalog*."""
        from healthimaging_df.snapshot import write_snapshot

        return write_snapshot(
            self._frame,
            iceberg_table=iceberg_table,
            catalog=catalog,
            warehouse=warehouse,
            **options,
        )

    def refresh(self, *, client: Any = None, **options: Any) -> tuple[pd.DataFrame, RefreshReport]:
        """Bring the frame up to date (only image sets updated since it was fetched).

        Returns ``(frame, RefreshReport)``; ``snapshot.refresh_frame`` takes *options*.
        """
        from healthimaging_df.refresh import refresh_frame

        return refresh_frame(self._frame, client=client, **options)

    def redact(self, policy: RedactionPolicy) -> pd.DataFrame:
        """A redacted copy under *policy* (``healthimaging_df.store.redact.RedactionPolicy``).

        The provenance in ``attrs`` is redacted too: the query's values (PHI) are replaced by
        counts and the policy (without its key) is recorded, as in a redacted snapshot.
        """
        from healthimaging_df.snapshot import METADATA_KEY, redacted_provenance
        from healthimaging_df.store.redact import apply_redaction

        result = with_attrs(apply_redaction(self._frame, policy), self._frame)
        provenance = result.attrs.get(METADATA_KEY)
        if isinstance(provenance, dict):
            result.attrs[METADATA_KEY] = redacted_provenance(provenance, policy)
        return result
