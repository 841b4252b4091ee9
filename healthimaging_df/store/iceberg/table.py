"""``IcebergFormat``: an Apache Iceberg table behind the table-format interface, through pyiceberg.

Each write, merge or compaction is one Iceberg snapshot in one catalog commit: the data files are
written first (pyiceberg's writer), then the commit replaces the files it retires with the files
it wrote. A crash before the commit leaves only unreferenced files (``expire`` removes them); the
table stays at its previous snapshot. Every snapshot's summary carries the provenance
(``healthimaging_df.provenance``, JSON) and our marker (``healthimaging_df``: format, the exact
Arrow schema, partition columns, row counts), as a Delta commit does.

Iceberg has a naive ``timestamp`` type, so StudyDateTime is stored as it is. Rows are kept in
``createdAt`` order within each partition, and a merge rewrites only the files holding touched
rows (new image sets go into new files): see ``healthimaging_df.store.merging``.

Commits are not retried by pyiceberg (``commit.retry.num-retries=0``): a writer whose snapshot is
no longer the current one loses with ``SnapshotConflictError``, as with Delta, and
``refresh_snapshot`` reads again and retries.

Uses pyiceberg's ``_dataframe_to_data_files`` (private in 0.12; hence the pin ``<0.13``) to
write files for a commit that both deletes and adds files in one snapshot: the public
``Transaction.delete`` + ``append`` makes two snapshots, the first a half-done refresh.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from healthimaging_df.errors import QueryValidationError, SnapshotConflictError, SnapshotError
from healthimaging_df.store import layout, opaque
from healthimaging_df.store.errors import CONFLICT_HELP, kind, translated
from healthimaging_df.store.iceberg.catalog import IcebergTarget
from healthimaging_df.store.merging import (
    check_incoming,
    check_removed,
    plan_merge,
    replace_going,
)
from healthimaging_df.store.table_format import (
    MergeResult,
    TableFormat,
    TableInfo,
    TableMerge,
    TableRead,
    TableVersion,
    TableWrite,
    WriteResult,
    check_data,
    check_filter,
    check_names,
    check_partition_types,
    check_provenance,
    check_version,
    filter_expression,
    history_frame,
)

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "healthimaging_df.store.iceberg-snapshot"
FORMAT_VERSION = 1
META_KEY = "healthimaging_df"
PROVENANCE_KEY = "healthimaging_df.provenance"
_CHUNK_ROWS = 128 * 1024  # rows handed to the file writer at a time (a streamed write's memory)
# pyiceberg sizes files by in-memory Arrow bytes; about 4x the compressed Parquet size here
_ARROW_PER_PARQUET_BYTE = 4


class IcebergFormat(TableFormat):
    """The Iceberg table *target* names (``NAMESPACE.TABLE`` in a catalog)."""

    name: ClassVar[str] = "iceberg"

    def __init__(self, target: IcebergTarget) -> None:
        self.target = target
        self._catalog: Any = None

    def __repr__(self) -> str:
        return "IcebergFormat(<table>)"

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def catalog(self) -> Any:
        """The pyiceberg catalog, loaded once."""
        if self._catalog is None:
            with translated("opening the Iceberg catalog"):
                self._catalog = self.target.load_catalog()
        return self._catalog

    def _load(self, action: str) -> Any:
        """The table, or None when the catalog has none of that name."""
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            with translated(action):
                return self.catalog.load_table(self.target.identifier)
        except SnapshotError as exc:
            if isinstance(exc.__context__, (NoSuchTableError, NoSuchNamespaceError)):
                return None
            raise

    def _table(self, action: str) -> Any:
        table = self._load(action)
        if table is None:
            raise SnapshotError(f"{action}: there is no snapshot there (no such Iceberg table)")
        if table.properties.get("healthimaging_df.format") != FORMAT:
            raise SnapshotError(
                "this Iceberg table was not written by healthimaging_df; read it with "
                "pyiceberg, or write the snapshot to a new table"
            )
        return table

    def _snapshot(
        self, table: Any, version: int | None, as_of: datetime | None, action: str
    ) -> Any:
        check_version(version, as_of)
        if version is not None:
            found = table.snapshot_by_id(version)
        elif as_of is not None:
            moment = as_of if as_of.tzinfo else as_of.replace(tzinfo=timezone.utc)
            found = table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
        else:
            found = table.current_snapshot()
        if found is None:
            raise SnapshotError(
                f"{action}: no such version (before the first commit, unknown, or expired)"
            )
        return found

    def _fs(self, table: Any, location: str) -> tuple[Any, str]:
        """The pyarrow file system of *location* (the table's own FileIO) and its path in it."""
        from pyiceberg.io.pyarrow import PyArrowFileIO

        io = table.io
        if not isinstance(io, PyArrowFileIO):  # another FileIO: a fresh one with its properties
            io = PyArrowFileIO(properties=dict(table.io.properties))
        scheme, netloc, path = io.parse_location(location)
        return io.fs_by_scheme(scheme, netloc), path

    # -- reading -------------------------------------------------------------------------------

    def _described(self, snapshot: Any) -> tuple[dict[str, Any], dict[str, Any], pa.Schema]:
        """Our marker, the provenance and the Arrow schema of one snapshot."""
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        try:
            meta = json.loads(props.get(META_KEY) or "null")
            prov = json.loads(props.get(PROVENANCE_KEY) or "null")
        except ValueError:
            raise SnapshotError("the table's snapshot metadata is damaged (provenance)") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SnapshotError(
                "this Iceberg snapshot was not written by healthimaging_df (its summary has no "
                "provenance); read it with pyiceberg, or write the snapshot to a new table"
            )
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise SnapshotError("the table was written by a newer healthimaging_df; upgrade")
        if not isinstance(prov, dict):
            raise SnapshotError("the table's snapshot metadata is damaged (provenance)")
        try:
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(meta["arrow_schema"])))
        except (KeyError, ValueError, TypeError, pa.ArrowException):
            raise SnapshotError("the table's snapshot metadata is damaged (schema)") from None
        return meta, prov, schema

    def _dataset(
        self, table: Any, snapshot: Any, schema: pa.Schema, action: str, *, footers: bool
    ) -> tuple[pads.Dataset, dict[str, Any]]:
        """The snapshot's data files as a dataset, each checked: there, its size, (its rows)."""
        from pyarrow import fs as pafs

        damaged = (
            f"{action} failed: a data file is damaged or truncated (it does not match the log)"
        )
        with translated(action):
            tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
        if any(task.delete_files for task in tasks):
            raise SnapshotError(
                f"{action}: the table has delete files (merge-on-read, another tool's): "
                "read it with pyiceberg"
            )
        files: dict[str, Any] = {}
        filesystem = None
        for task in tasks:
            with translated(action):
                filesystem, path = self._fs(table, task.file.file_path)
            files[path] = task.file
        if filesystem is None:
            return pads.dataset(schema.empty_table()), {}
        with translated(action):
            infos = filesystem.get_file_info(list(files))
        for info in infos:
            if info.type != pafs.FileType.File:
                raise SnapshotError(f"{action} failed: {kind(FileNotFoundError())}")
            if info.size != files[info.path].file_size_in_bytes:
                raise SnapshotError(damaged)
        with translated(action):
            scan, names = opaque.dataset(filesystem, [(path, None) for path in files], schema)
            if footers:
                for fragment in scan.get_fragments():
                    if fragment.metadata.num_rows != files[names[str(fragment.path)]].record_count:
                        raise SnapshotError(damaged)
        return scan, {name: files[path] for name, path in names.items()}

    def exists(self) -> bool:
        """Whether the catalog has the table."""
        return self._load("opening the snapshot") is not None

    def _read(self, request: TableRead) -> TableVersion:
        """One snapshot's rows (types as written) and provenance; ``version`` is a snapshot id."""
        version, columns, filters = request["version"], request["columns"], request["filters"]
        action = "reading the snapshot"
        table = self._table(action)
        snapshot = self._snapshot(table, version, request["as_of"], action)
        meta, prov, schema = self._described(snapshot)
        wanted = None if columns is None else check_names("columns", columns, schema)
        expression = filter_expression(filters)
        check_filter(expression, schema)
        nothing = isinstance(filters, pc.Expression) and filters.equals(pc.scalar(False))
        if nothing:
            rows = schema.empty_table()
            rows = rows if wanted is None else rows.select(wanted)
        else:
            scan, _ = self._dataset(table, snapshot, schema, action, footers=True)
            with translated(action):
                rows = scan.to_table(columns=wanted, filter=expression)
        expected = schema if wanted is None else pa.schema([schema.field(c) for c in wanted])
        with translated(action):
            rows = rows.select(expected.names).cast(expected)
        return TableVersion(
            rows.replace_schema_metadata(None),
            prov,
            int(snapshot.snapshot_id),
            datetime.fromtimestamp(snapshot.timestamp_ms / 1000, timezone.utc),
            tuple(str(c) for c in meta.get("partition_by") or ()),
        )

    def scan(self, *, version: int | None = None, as_of: datetime | None = None) -> pads.Dataset:
        """A lazy dataset of one snapshot's data files, typed as written, every file checked."""
        action = "scanning the snapshot"
        table = self._table(action)
        snapshot = self._snapshot(table, version, as_of, action)
        _, _, schema = self._described(snapshot)
        return self._dataset(table, snapshot, schema, action, footers=False)[0]

    # -- writing -------------------------------------------------------------------------------

    def _properties(self, target_file_size: int | None) -> dict[str, str]:
        size = target_file_size or layout.DEFAULT_TARGET_FILE_SIZE
        return {
            "healthimaging_df.format": FORMAT,
            "commit.retry.num-retries": "0",  # a conflict is ours to see (SnapshotConflictError)
            "write.target-file-size-bytes": str(size * _ARROW_PER_PARQUET_BYTE),
            "write.parquet.compression-codec": "zstd",
        }

    @staticmethod
    def _summary(prov: dict[str, Any], meta: dict[str, Any]) -> dict[str, str]:
        marker = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        return {
            META_KEY: json.dumps(marker, sort_keys=True),
            PROVENANCE_KEY: json.dumps(prov, sort_keys=True, allow_nan=False),
        }

    def _files_of(self, metadata: Any, io: Any, uuid: Any, chunks: Iterator[pa.Table]) -> Any:
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        counter = itertools.count(0)
        for chunk in chunks:
            if chunk.num_rows:
                yield from _dataframe_to_data_files(
                    table_metadata=metadata, df=chunk, io=io, write_uuid=uuid, counter=counter
                )

    def _write(self, request: TableWrite) -> WriteResult:
        """Create the table or replace its content, in one snapshot (rows in the order given)."""
        action = "writing the snapshot"
        partition_by, expected_version = request["partition_by"], request["expected_version"]
        data, rows = check_data(request["table"], request["num_rows"])
        prov = check_provenance(request["provenance"])
        check_version(expected_version, None)
        schema = data.schema.remove_metadata()
        parts = [] if partition_by is None else check_names("partition_by", partition_by, schema)
        check_partition_types(schema, parts)
        existing = self._load(action)
        chunks = _chunks(data)
        meta: dict[str, Any] = {
            "operation": "write",
            "arrow_schema": base64.b64encode(schema.serialize().to_pybytes()).decode(),
            "rows": rows,
            "added": rows,
            "updated": 0,
        }
        from pyiceberg.exceptions import TableAlreadyExistsError

        if existing is None:
            if expected_version is not None:
                raise SnapshotError(f"{action}: there is no table at the expected version")
            meta.update(partition_by=parts, removed=0)
            with translated(action):
                self.catalog.create_namespace_if_not_exists(self.target.namespace)
                txn = self.catalog.create_table_transaction(
                    self.target.identifier,
                    schema=_iceberg_schema(schema),
                    properties=self._properties(request["target_file_size"]),
                )
                if parts:
                    with txn.update_spec() as spec:
                        for name in parts:
                            spec.add_identity(name)
                with txn.update_snapshot(
                    snapshot_properties=self._summary(prov, meta)
                ).fast_append() as append:
                    for item in self._files_of(
                        txn.table_metadata, txn._table.io, append.commit_uuid, chunks
                    ):
                        append.append_data_file(item)
                try:
                    txn.commit_transaction()
                except TableAlreadyExistsError:
                    raise SnapshotConflictError(f"{action}: {CONFLICT_HELP}") from None
            return self._written(action, rows, prov, parts, set())
        table = self._table(action)
        current = table.current_snapshot()
        if expected_version is not None and (
            current is None or current.snapshot_id != expected_version
        ):
            raise SnapshotConflictError(f"{action}: {CONFLICT_HELP}")
        old_parts = _partition_columns(table)
        if partition_by is None:
            parts = old_parts
        stored = _arrow_of(table)
        if parts != old_parts or [f.name for f in stored] != schema.names:
            raise SnapshotError(
                f"{action}: the Iceberg table has other columns or partitions; write these rows "
                "to a new table"
            )
        before: set[str] = set()
        removed = 0
        with translated(action):
            if current is not None:
                tasks = list(table.scan().plan_files())
                before = {task.file.file_path for task in tasks}
                removed = sum(task.file.record_count for task in tasks)
            meta.update(partition_by=parts, removed=removed)
            with table.transaction() as txn:
                producer = txn.update_snapshot(snapshot_properties=self._summary(prov, meta))
                with producer.overwrite() if current is not None else producer.fast_append() as op:
                    if current is not None:
                        for task in tasks:
                            op.delete_data_file(task.file)
                    for item in self._files_of(
                        txn.table_metadata, table.io, op.commit_uuid, chunks
                    ):
                        op.append_data_file(item)
        return self._written(action, rows, prov, parts, before)

    def _written(
        self, action: str, rows: int, prov: dict[str, Any], parts: list[str], before: set[str]
    ) -> WriteResult:
        table = self._table(action)
        snapshot = table.current_snapshot()
        with translated(action):
            files = {t.file.file_path: t.file.file_size_in_bytes for t in table.scan().plan_files()}
        return WriteResult(
            version=int(snapshot.snapshot_id),
            rows=rows,
            files=tuple(files),
            bytes=sum(files.values()),
            bytes_written=sum(size for path, size in files.items() if path not in before),
            partition_by=tuple(parts),
            provenance=prov,
        )

    def _merge(self, request: TableMerge) -> MergeResult:
        """Upsert and delete by ``imageSetId`` in one snapshot, rewriting only touched files.

        Files are as the table's properties size them (``target_file_size`` is a write's).
        """
        expected_version = request["expected_version"]
        action = "merging into the snapshot"
        key = "imageSetId"
        prov = check_provenance(request["provenance"])
        check_version(expected_version, None)
        removed = check_removed(request["removed_ids"])
        table = self._table(action)
        snapshot = self._snapshot(table, expected_version, None, action)
        current = table.current_snapshot()
        if current is None or current.snapshot_id != snapshot.snapshot_id:
            raise SnapshotConflictError(f"{action}: {CONFLICT_HELP}")
        meta, _, schema = self._described(snapshot)
        incoming = check_incoming(request["incoming"], schema, key, removed, action)
        rows_before = int(snapshot.summary.additional_properties.get("total-records", 0))
        if incoming.num_rows == 0 and not removed:
            return MergeResult(None, 0, 0, 0, rows_before, 0, 0, 0)
        scan, files = self._dataset(table, snapshot, schema, action, footers=False)
        with translated(action):
            plan = plan_merge(scan, incoming, removed, key, schema)
        if plan.empty:
            return MergeResult(None, 0, 0, 0, rows_before, 0, 0, 0)
        touched = sorted(plan.files)
        with translated(action):
            kept = scan.to_table(filter=pc.scalar(False))
            if touched:
                kept = pads.FileSystemDataset(
                    [f for f in scan.get_fragments() if str(f.path) in plan.files],
                    schema,
                    scan.format,
                    scan.filesystem,
                ).to_table()
        data = replace_going(kept, plan, key, action).cast(schema)
        merge_meta = {
            "operation": "merge",
            "arrow_schema": meta["arrow_schema"],
            "partition_by": meta.get("partition_by", []),
            "added": plan.inserted.num_rows,
            "updated": plan.updated.num_rows,
            "removed": plan.deleted,
            "rewritten_rows": data.num_rows,
        }
        with translated(action):
            with table.transaction() as txn:
                producer = txn.update_snapshot(snapshot_properties=self._summary(prov, merge_meta))
                with producer.overwrite() if touched else producer.fast_append() as op:
                    for path in touched:
                        op.delete_data_file(files[path])
                    written = list(
                        self._files_of(txn.table_metadata, table.io, op.commit_uuid, iter([data]))
                    )
                    for item in written:
                        op.append_data_file(item)
            table = self._table(action)
        new = table.current_snapshot()
        return MergeResult(
            version=int(new.snapshot_id),
            added=plan.inserted.num_rows,
            updated=plan.updated.num_rows,
            removed=plan.deleted,
            rows=int(new.summary.additional_properties.get("total-records", 0)),
            files_added=len(written),
            files_removed=len(touched),
            bytes_written=sum(item.file_size_in_bytes for item in written),
        )

    # -- history and maintenance ------------------------------------------------------------

    def history(self) -> pd.DataFrame:
        """Every snapshot still in the table's metadata, newest first (``version``: its id)."""
        action = "reading the snapshot history"
        table = self._table(action)
        rows = []
        for snapshot in sorted(table.snapshots(), key=lambda s: s.timestamp_ms, reverse=True):
            try:
                meta, prov, _ = self._described(snapshot)
            except SnapshotError:
                meta, prov = {}, None
            operation = snapshot.summary.operation.value if snapshot.summary else ""
            rows.append(
                {
                    "version": int(snapshot.snapshot_id),
                    "timestamp": datetime.fromtimestamp(snapshot.timestamp_ms / 1000, timezone.utc),
                    "operation": str(meta.get("operation") or operation).upper(),
                    "rows_added": int(meta.get("added", 0)),
                    "rows_updated": int(meta.get("updated", 0)),
                    "rows_removed": int(meta.get("removed", 0)),
                    "provenance": prov,
                }
            )
        return history_frame(rows)

    def expire(self, retain: timedelta, *, dry_run: bool = True) -> int:
        """Expire snapshots older than *retain* (never the current one) and delete their files.

        Also deletes data files under the table's ``data/`` folder that no snapshot names and
        that are older than *retain* (debris of a writer killed before its commit). Returns the
        number of data files deleted (or that would be).
        """
        action = "expiring old snapshots"
        if not isinstance(retain, timedelta) or retain < timedelta(0):
            raise QueryValidationError("retain", "must be a timedelta of zero or more")
        if not isinstance(dry_run, bool):
            raise QueryValidationError("dry_run", "must be True or False")
        from pyarrow import fs as pafs

        table = self._table(action)
        cutoff = datetime.now(timezone.utc) - retain
        cutoff_ms = int(cutoff.timestamp() * 1000)
        current = table.current_snapshot()
        keep = [s for s in table.snapshots() if s.timestamp_ms >= cutoff_ms or s is current]
        keep_ids = {s.snapshot_id for s in keep} | ({current.snapshot_id} if current else set())
        with translated(action):
            kept_files = set()
            all_files = set()
            for snapshot in table.snapshots():
                names = {
                    t.file.file_path
                    for t in table.scan(snapshot_id=snapshot.snapshot_id).plan_files()
                }
                all_files |= names
                if snapshot.snapshot_id in keep_ids:
                    kept_files |= names
            filesystem, data_dir = self._fs(table, table.location().rstrip("/") + "/data")
            listed = filesystem.get_file_info(
                pafs.FileSelector(data_dir, recursive=True, allow_not_found=True)
            )
        referenced = {self._fs(table, name)[1] for name in all_files}
        kept = {self._fs(table, name)[1] for name in kept_files}
        doomed = {self._fs(table, name)[1] for name in all_files - kept_files} - kept
        doomed |= _debris(listed, referenced, cutoff)
        if dry_run:
            return len(doomed)
        with translated(action):
            if len(keep_ids) < len(table.snapshots()):
                table.maintenance.expire_snapshots().older_than(cutoff).commit()
            for path in doomed:
                filesystem.delete_file(path)
        return len(doomed)

    def optimize(
        self, provenance: Mapping[str, Any] | None = None, *, target_file_size: int | None = None
    ) -> MergeResult:
        """Rewrite every data file into ``createdAt``-sorted files of the target size (one snapshot)."""
        action = "optimizing the snapshot"
        current = self.read()
        prov = dict(provenance) if provenance is not None else current.provenance
        result = self.write(
            layout.file_order(current.table),
            prov,
            partition_by=list(current.partition_by),
            expected_version=current.version,
            target_file_size=target_file_size,
        )
        del action
        return MergeResult(
            version=result.version,
            added=0,
            updated=0,
            removed=0,
            rows=result.rows,
            files_added=len(result.files),
            files_removed=0,
            bytes_written=result.bytes_written,
        )

    def info(self) -> TableInfo:
        """Format, snapshot id, format version, size and provenance of the current snapshot."""
        action = "describing the snapshot"
        table = self._table(action)
        snapshot = self._snapshot(table, None, None, action)
        _, prov, _ = self._described(snapshot)
        summary = snapshot.summary.additional_properties
        return TableInfo(
            format="iceberg",
            version=int(snapshot.snapshot_id),
            rows=int(summary.get("total-records", 0)),
            files=int(summary.get("total-data-files", 0)),
            bytes=int(summary.get("total-files-size", 0)),
            partition_by=tuple(_partition_columns(table)),
            protocol={"format_version": int(table.format_version)},
            features=(),
            provenance=prov,
        )


def _debris(listed: list[Any], referenced: set[str], cutoff: datetime) -> set[str]:
    """Parquet files of *listed* no snapshot names, last written before *cutoff*."""
    from pyarrow import fs as pafs

    out = set()
    for info in listed:
        if info.type != pafs.FileType.File or info.path in referenced:
            continue
        mtime = (
            info.mtime
            if info.mtime is None or info.mtime.tzinfo
            else info.mtime.replace(tzinfo=timezone.utc)
        )
        if mtime is not None and mtime < cutoff and info.path.endswith(".parquet"):
            out.add(info.path)
    return out


def _chunks(data: pa.Table | pa.RecordBatchReader) -> Iterator[pa.Table]:
    """*data* in tables of about :data:`_CHUNK_ROWS` rows, in order (a reader read as it goes)."""
    if isinstance(data, pa.Table):
        for start in range(0, data.num_rows, _CHUNK_ROWS):
            yield data.slice(start, _CHUNK_ROWS)
        return
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in data:
        pending.append(batch)
        count += batch.num_rows
        if count >= _CHUNK_ROWS:
            yield pa.Table.from_batches(pending, schema=data.schema)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending, schema=data.schema)


def _iceberg_schema(schema: pa.Schema) -> pa.Schema:
    """*schema* for a new table (pyiceberg converts it; unsigned integers would change type)."""
    for item in schema:
        if pa.types.is_unsigned_integer(item.type):
            raise QueryValidationError(
                "table", f"column {item.name!r}: Iceberg has no unsigned integers"
            )
    return schema


def _arrow_of(table: Any) -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(table.schema(), include_field_ids=False)


def _partition_columns(table: Any) -> list[str]:
    schema = table.schema()
    return [schema.find_column_name(field.source_id) for field in table.spec().fields]
