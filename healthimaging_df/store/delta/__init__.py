"""Delta Lake tables for directory snapshots: atomic commits, optimistic concurrency, time travel.

A directory snapshot is a Delta table written with ``deltalake`` (delta-rs); its transaction log
(``_delta_log/``) is the only commit point, and nothing here writes beside it by hand. The package
works on ``pyarrow.Table`` plus a provenance dict, beneath the snapshot and refresh code:

- ``write.write_table`` creates or replaces the table's content (one commit);
- ``merge.merge_table`` upserts changed rows by ``imageSetId`` and deletes leavers (one commit,
  rewriting only the files that hold those rows);
- ``read.read_table``, ``read.dataset`` read the latest version, ``version=N`` or ``as_of``;
- ``maintenance.history`` lists the versions, ``maintenance.vacuum`` deletes files no version
  within *retain* uses;
- ``log`` reads our commits and says what a folder holds; ``glue`` registers a table for Athena;
- :class:`DeltaFormat` is all of it behind the table-format interface
  (``healthimaging_df.store.table_format.TableFormat``).

Every commit carries the provenance: ``commitInfo.userMetadata`` holds it as JSON (Spark and
Databricks show it in ``DESCRIBE HISTORY``) and ``commitInfo.healthimaging_df`` holds the format
marker and the exact Arrow schema, so every version says where it came from and reads back with the
types it was written with. delta-rs 1.6 refuses table properties outside ``delta.*``, so the
provenance is not in the table properties.

Commits never retry by themselves: a writer whose base version is no longer the latest loses with
``SnapshotConflictError`` and the table keeps the winner's version, whole. On S3 commits are
conditional PUTs (``conditional_put: etag``); the DynamoDB lock of delta-rs is the alternative for
stores without conditional writes (see ``docs/snapshots.md``).

Error messages never quote a path inside the table: partition folders are named after values
(``PatientID=...`` is PHI), and delta-rs and pyarrow put such paths in their messages.
"""

from healthimaging_df.store.delta.glue import register_glue_table
from healthimaging_df.store.delta.log import COMMIT_KEY, FORMAT, FORMAT_VERSION, s3_storage_options
from healthimaging_df.store.delta.maintenance import downgrade, history, info, optimize, vacuum
from healthimaging_df.store.delta.merge import merge_table
from healthimaging_df.store.delta.read import dataset, read_table
from healthimaging_df.store.delta.table import DeltaFormat
from healthimaging_df.store.delta.write import write_table
from healthimaging_df.store.table_format import (
    MergeResult,
    TableVersion,
    WriteResult,
    check_filter,
    filter_expression,
    retry_on_conflict,
)

__all__ = [
    "COMMIT_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "DeltaFormat",
    "MergeResult",
    "TableVersion",
    "WriteResult",
    "check_filter",
    "dataset",
    "downgrade",
    "filter_expression",
    "history",
    "info",
    "merge_table",
    "optimize",
    "read_table",
    "register_glue_table",
    "retry_on_conflict",
    "s3_storage_options",
    "vacuum",
    "write_table",
]
