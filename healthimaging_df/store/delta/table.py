"""``DeltaFormat``: a Delta table at one location behind the table-format interface."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow.dataset as pads

from healthimaging_df.store.delta import maintenance, merge, read, write
from healthimaging_df.store.delta.log import classify, options_for, table_location
from healthimaging_df.store.errors import translated
from healthimaging_df.store.table_format import (
    MergeResult,
    TableFormat,
    TableInfo,
    TableMerge,
    TableRead,
    TableVersion,
    TableWrite,
    WriteResult,
)

if TYPE_CHECKING:
    import pandas as pd


class DeltaFormat(TableFormat):
    """The Delta table at *uri* (a local folder or ``s3://bucket/prefix``), through delta-rs.

    *storage_options* are delta-rs' (``log.s3_storage_options`` builds them from a boto3
    session); for ``s3://`` without them, the default session's.
    """

    name: ClassVar[str] = "delta"

    def __init__(
        self, uri: str | os.PathLike[str], storage_options: Mapping[str, str] | None = None
    ) -> None:
        self.uri = table_location(uri)
        self.storage_options = options_for(self.uri, storage_options)

    def __repr__(self) -> str:
        return "DeltaFormat(<location>)"  # the path can embed values

    def exists(self) -> bool:
        """Whether a Delta log is there."""
        with translated("opening the snapshot"):
            return classify(self.uri, self.storage_options) == "table"

    def _write(self, request: TableWrite) -> WriteResult:
        """See ``write.write_table``."""
        return write.write_table(self.uri, storage_options=self.storage_options, **request)

    def _merge(self, request: TableMerge) -> MergeResult:
        """See ``merge.merge_table``."""
        return merge.merge_table(self.uri, storage_options=self.storage_options, **request)

    def _read(self, request: TableRead) -> TableVersion:
        """See ``read.read_table``."""
        return read.read_table(self.uri, storage_options=self.storage_options, **request)

    def scan(self, *, version: int | None = None, as_of: datetime | None = None) -> pads.Dataset:
        """See ``read.dataset``."""
        return read.dataset(
            self.uri, version=version, as_of=as_of, storage_options=self.storage_options
        )

    def history(self) -> pd.DataFrame:
        """See ``maintenance.history``."""
        return maintenance.history(self.uri, storage_options=self.storage_options)

    def expire(self, retain: timedelta, *, dry_run: bool = True) -> int:
        """``VACUUM``: see ``maintenance.vacuum``."""
        return maintenance.vacuum(
            self.uri, retain=retain, dry_run=dry_run, storage_options=self.storage_options
        )

    def optimize(
        self, provenance: Mapping[str, Any] | None = None, *, target_file_size: int | None = None
    ) -> MergeResult:
        """See ``maintenance.optimize``."""
        result: MergeResult = maintenance.optimize(
            self.uri,
            provenance,
            target_file_size=target_file_size,
            storage_options=self.storage_options,
        )
        return result

    def info(self) -> TableInfo:
        """See ``maintenance.info``."""
        described: TableInfo = maintenance.info(self.uri, storage_options=self.storage_options)
        return described

    def downgrade(self) -> dict[str, int]:
        """See ``maintenance.downgrade``: a reader-3 table rewritten at reader 1 / writer 2."""
        return maintenance.downgrade(self.uri, storage_options=self.storage_options)
