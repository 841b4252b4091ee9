"""Parquet snapshots: export a query, read it back typed, refresh it incrementally, resume exports.

Layout (see ``docs/snapshots.md``):

- ``…/name.parquet``: one Parquet file, replaced atomically (a local rename; on S3 one PUT, which
  S3 makes visible all at once).
- any other path: a directory (or S3 prefix) holding Hive-partitioned files
  ``Modality=CT/part-<version>-00000.parquet`` plus a manifest ``_healthimaging_df.json`` that lists
  the files of the current version. Data files of a new version get new names and are written
  under ``_staging-<version>/`` (skipped by pyarrow.dataset, Spark and partition-depth globs), then
  moved into place; the manifest is replaced last (atomically), so ``read_snapshot`` never sees a
  half-written snapshot on a local disk or on S3, where nothing can be renamed atomically; the
  previous version's files and the staging folder are then deleted. Readers that glob the folder
  can see old and new files together only between the first move and the last delete.

Every data file carries the provenance in its Parquet key-value metadata (key ``healthimaging_df``);
``read_snapshot`` puts it back in ``df.attrs["healthimaging_df"]``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from healthimaging_df import schema
from healthimaging_df.errors import HealthImagingDFError, QueryValidationError, SnapshotError
from healthimaging_df.redact import RedactionPolicy, apply_redaction, redact_query_json

if TYPE_CHECKING:
    from healthimaging_df.progress import Progress
    from healthimaging_df.query import Query

log = logging.getLogger(__name__)

METADATA_KEY = "healthimaging_df"
MANIFEST_NAME = "_healthimaging_df.json"
CHECKPOINT_SUFFIX = ".ahi-checkpoint"
FORMAT_VERSION = 1
DERIVED_COLUMNS: dict[str, str] = {"StudyYear": "year of StudyDateTime (derived for partitioning)"}
DEFAULT_MARGIN = timedelta(minutes=5)
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
STAGING_PREFIX = "_staging-"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_OUR_PART = re.compile(r"part-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}-[0-9]{5}\.parquet")


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    """What a write produced.

    Attributes
    ----------
    path
        The snapshot's path as given.
    rows
        Rows written.
    files
        Data files of this version (full paths or ``s3://`` URIs).
    bytes
        Total size of the data files.
    partition_cols
        Hive partition columns (empty for an unpartitioned snapshot).
    provenance
        The provenance stored with it (also in ``read_snapshot(path).attrs``).
    resumed_tasks
        Fetch tasks taken from a checkpoint of an interrupted run (0 for a fresh run).
    """

    path: str
    rows: int
    files: tuple[str, ...]
    bytes: int
    partition_cols: tuple[str, ...]
    provenance: dict[str, Any] = field(repr=False)
    resumed_tasks: int = 0

    def __str__(self) -> str:
        resumed = f", resumed {self.resumed_tasks} checkpointed tasks" if self.resumed_tasks else ""
        return (
            f"snapshot {self.path}: {self.rows} rows in {len(self.files)} file(s), "
            f"{self.bytes} bytes{resumed}"
        )


@dataclass(frozen=True)
class RefreshReport:
    """What a refresh changed.

    Attributes
    ----------
    added
        imageSetIds now in the result that were not before.
    updated
        imageSetIds still in the result whose version or updatedAt changed.
    removed
        imageSetIds that left the result (they no longer match the query).
    fetched
        Image sets the service returned for the updatedAt range.
    since
        Lower bound of the updatedAt range that was fetched.
    rows
        Rows in the refreshed result.
    watermark
        Highest updatedAt in the refreshed result.
    """

    added: tuple[str, ...]
    updated: tuple[str, ...]
    removed: tuple[str, ...]
    fetched: int
    since: datetime
    rows: int
    watermark: datetime | None

    @property
    def changed(self) -> bool:
        """Whether anything was added, updated or removed."""
        return bool(self.added or self.updated or self.removed)

    def __str__(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed "
            f"({self.fetched} image sets updated since {self.since.isoformat()}; {self.rows} rows)"
        )


# -- storage ----------------------------------------------------------------------------------------


class _Store:
    """Files under one base location, addressed by relative ``/`` paths."""

    arrow_fs: Any

    def arrow_path(self, rel: str) -> str:
        raise NotImplementedError

    def uri(self, rel: str) -> str:
        raise NotImplementedError

    def put(self, rel: str, data: bytes) -> None:
        """Write *data* to *rel* so that readers see the old content or the new, nothing between."""
        raise NotImplementedError

    def get(self, rel: str) -> bytes | None:
        raise NotImplementedError

    def delete(self, rels: Sequence[str]) -> None:
        raise NotImplementedError

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        """Move each (source, destination) file; a destination appears whole or not at all.

        Locally each move is one ``os.replace``; on S3 it is a server-side copy (with the same
        encryption as a PUT), and the sources are deleted once every copy is done.
        """
        raise NotImplementedError

    def prune(self, rel_dir: str, prefix: str) -> None:
        """Remove the empty folders of *rel_dir* named ``<prefix>…`` (and below); S3 has none."""

    def list(self, rel_dir: str) -> list[str]:
        """Relative paths of every file below *rel_dir* (recursively)."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError


class _LocalStore(_Store):
    def __init__(self, base: str) -> None:
        from pyarrow import fs as pafs

        self.base = os.path.abspath(base)
        self.arrow_fs = pafs.LocalFileSystem()

    def _full(self, rel: str) -> str:
        return os.path.join(self.base, *rel.split("/"))

    def arrow_path(self, rel: str) -> str:
        return self._full(rel)

    def uri(self, rel: str) -> str:
        return self._full(rel)

    def put(self, rel: str, data: bytes) -> None:
        target = self._full(rel)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
        _fsync_directory(directory)  # make the rename itself durable

    def get(self, rel: str) -> bytes | None:
        try:
            with open(self._full(rel), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def delete(self, rels: Sequence[str]) -> None:
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._full(rel))
        for rel in rels:  # prune directories the deletions emptied (partition folders)
            parent = os.path.dirname(self._full(rel))
            while parent.startswith(self.base + os.sep):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        touched: set[str] = set()
        for source, destination in moves:
            target = self._full(destination)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(self._full(source), target)
            touched.add(os.path.dirname(target))
        for directory in sorted(touched):  # make the renames durable before the manifest names them
            _fsync_directory(directory)

    def prune(self, rel_dir: str, prefix: str) -> None:
        root = self._full(rel_dir)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for name in os.listdir(root):
                if not name.startswith(prefix):
                    continue
                for directory, _dirs, _files in os.walk(os.path.join(root, name), topdown=False):
                    with contextlib.suppress(OSError):  # not empty: keep it
                        os.rmdir(directory)

    def list(self, rel_dir: str) -> list[str]:
        root = self._full(rel_dir)
        found = []
        for directory, _dirs, files in os.walk(root):
            for name in files:
                full = os.path.join(directory, name)
                found.append(os.path.relpath(full, self.base).replace(os.sep, "/"))
        return sorted(found)

    def size(self, rel: str) -> int:
        return os.path.getsize(self._full(rel))


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class _S3Store(_Store):
    """S3 through boto3 (writes: SSE-KMS, atomic PUTs) and pyarrow's S3FileSystem (dataset reads)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        boto3_session: Any,
        region: str | None,
        endpoint_url: str | None,
        kms_key_id: str | None,
    ) -> None:
        import boto3
        from pyarrow import fs as pafs

        session = boto3_session if boto3_session is not None else boto3.Session()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.kms_key_id = kms_key_id
        self.client = session.client("s3", region_name=region, endpoint_url=endpoint_url)
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
        endpoint = urlparse(self.client.meta.endpoint_url)
        self.arrow_fs = pafs.S3FileSystem(
            access_key=frozen.access_key if frozen else None,
            secret_key=frozen.secret_key if frozen else None,
            session_token=frozen.token if frozen else None,
            anonymous=frozen is None,
            region=self.client.meta.region_name,
            endpoint_override=endpoint.netloc,
            scheme=endpoint.scheme or "https",
        )

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def arrow_path(self, rel: str) -> str:
        return f"{self.bucket}/{self._key(rel)}"

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"

    def _encryption(self) -> dict[str, str]:
        if self.kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        return {}

    def put(self, rel: str, data: bytes) -> None:
        extra = self._encryption()
        # upload_fileobj switches to a multipart upload for large bodies; S3 shows the object only
        # once it is complete, and boto3 aborts the upload if it fails.
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(rel), ExtraArgs=extra)

    def get(self, rel: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except self.client.exceptions.NoSuchKey:
            return None
        body: bytes = response["Body"].read()
        return body

    def delete(self, rels: Sequence[str]) -> None:
        keys = [{"Key": self._key(rel)} for rel in rels]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
            )

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        extra = self._encryption()
        for source, destination in moves:
            # a managed copy: one CopyObject, or a multipart copy for objects over its threshold;
            # either way the destination appears only once complete
            self.client.copy(
                {"Bucket": self.bucket, "Key": self._key(source)},
                self.bucket,
                self._key(destination),
                ExtraArgs=extra,
            )
        self.delete([source for source, _ in moves])

    def list(self, rel_dir: str) -> list[str]:
        prefix = self._key(rel_dir).rstrip("/") + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            found += [item["Key"][skip:] for item in page.get("Contents", [])]
        return sorted(found)

    def size(self, rel: str) -> int:
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        return int(head["ContentLength"])


@dataclass(frozen=True)
class _Target:
    """A snapshot location: a store at its parent plus the snapshot's relative name."""

    store: _Store
    name: str
    single_file: bool

    @property
    def manifest(self) -> str:
        return f"{self.name}/{MANIFEST_NAME}"

    @property
    def checkpoint(self) -> str:
        return f"{self.name}{CHECKPOINT_SUFFIX}"


def _target(
    path: str | os.PathLike[str],
    *,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
) -> _Target:
    if not isinstance(path, (str, os.PathLike)):
        raise QueryValidationError("path", "must be a str or os.PathLike")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise QueryValidationError("path", "must be text, not bytes")
    single = text.rstrip("/").endswith(".parquet")
    if text.startswith("s3://"):
        parsed = urlparse(text)
        key = parsed.path.strip("/")
        if not parsed.netloc or not key:
            raise SnapshotError("an S3 snapshot path needs a bucket and a key: s3://bucket/prefix")
        parent, _, name = key.rpartition("/")
        store: _Store = _S3Store(
            parsed.netloc,
            parent,
            boto3_session=boto3_session,
            region=region,
            endpoint_url=s3_endpoint_url,
            kms_key_id=kms_key_id,
        )
        return _Target(store, name, single)
    if "://" in text:
        raise SnapshotError("snapshot paths are local paths or s3://bucket/prefix URIs")
    if kms_key_id:
        raise SnapshotError("kms_key_id applies to s3:// paths only")
    full = os.path.abspath(text.rstrip("/") or text)
    return _Target(_LocalStore(os.path.dirname(full)), os.path.basename(full), single)


# -- frames <-> tables ----------------------------------------------------------------------------


def frame_to_table(df: pd.DataFrame) -> pa.Table:
    """Convert a frame to Arrow: schema columns get the declared types, others pyarrow's guess."""
    arrays = []
    fields = []
    for name in df.columns:
        if not isinstance(name, str):
            raise SnapshotError("column names must be strings")
        series = df[name]
        declared = schema.BY_NAME.get(name)
        try:
            if declared is not None:
                array = pa.array(series, type=declared.arrow_type, from_pandas=True)
            else:
                array = pa.array(series, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            # the exception text can quote a value (PHI): keep only the column and the error kind
            raise SnapshotError(
                f"column {name!r} cannot be stored as {declared.kind if declared else 'Arrow'} "
                f"({type(exc).__name__})"
            ) from None
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        arrays.append(array)
        fields.append(pa.field(name, declared.arrow_type if declared else array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _dtype_backend_of(df: pd.DataFrame) -> schema.DtypeBackend:
    if any(isinstance(df[c].dtype, pd.ArrowDtype) for c in df.columns if c in schema.BY_NAME):
        return "pyarrow"
    return "numpy_nullable"


def _table_to_frame(
    table: pa.Table, dtype_backend: schema.DtypeBackend, order: Sequence[str] | None = None
) -> pd.DataFrame:
    frame = schema.arrow_to_pandas(table, dtype_backend)
    if order is not None:
        frame = frame[[c for c in order if c in frame.columns]]
    out: pd.DataFrame = frame.reset_index(drop=True)
    return out


def _watermark(table: pa.Table) -> datetime | None:
    if "updatedAt" not in table.column_names or table.num_rows == 0:
        return None
    value = pc.max(table.column("updatedAt")).as_py()
    return value if isinstance(value, datetime) else None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(timezone.utc).isoformat()


def _parse_iso(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SnapshotError("the provenance holds a timestamp that is not ISO 8601") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# -- write --------------------------------------------------------------------------------------


def write_snapshot(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    partition_cols: Sequence[str] | None = None,
    redact: RedactionPolicy | None = None,
    provenance: dict[str, Any] | None = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
) -> SnapshotInfo:
    """Write *df* as a snapshot, atomically replacing any previous snapshot at *path*.

    Parameters
    ----------
    df
        A frame of this library (its ``attrs`` provenance is stored) or any frame whose columns of
        schema names have schema-compatible values.
    path
        ``….parquet`` for one file; anything else for a directory of Hive partitions with a
        manifest. Local path or ``s3://bucket/prefix``.
    partition_cols
        Hive partition columns (directory snapshots only), e.g. ``["Modality"]``; ``"StudyYear"``
        is derived from ``StudyDateTime`` when the frame lacks it.
    redact
        A :class:`~healthimaging_df.redact.RedactionPolicy` to apply first; None writes the frame
        as it is, PHI included.
    provenance
        Provenance to store; ``df.attrs["healthimaging_df"]`` when None.
    boto3_session, region, s3_endpoint_url
        How to reach S3 (default session and its region; an endpoint for S3-compatible stores).
    kms_key_id
        Encrypt S3 objects with SSE-KMS under this key (ID, alias or ARN).
    compression, row_group_size
        Parquet settings.

    Returns
    -------
    SnapshotInfo
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    _check_redact(redact)
    _check_parquet_options(compression, row_group_size)
    target = _target(
        path,
        boto3_session=boto3_session,
        region=region,
        s3_endpoint_url=s3_endpoint_url,
        kms_key_id=kms_key_id,
    )
    prov = dict(provenance if provenance is not None else df.attrs.get(METADATA_KEY) or {})
    if redact is not None:
        if prov.get("redaction"):
            raise SnapshotError("the frame is already redacted; pass redact=None")
        df = apply_redaction(df, redact)
        prov = redacted_provenance(prov, redact)
    return _write(
        target,
        os.fspath(path),
        frame_to_table(df),
        prov,
        partition_cols,
        compression,
        row_group_size,
    )


def _check_redact(redact: Any) -> None:
    if redact is not None and not isinstance(redact, RedactionPolicy):
        raise QueryValidationError("redact", "must be a RedactionPolicy or None")


def _check_parquet_options(compression: Any, row_group_size: Any) -> None:
    if not isinstance(compression, str) or (
        compression.lower() != "none" and not _codec_available(compression)
    ):
        raise QueryValidationError("compression", "must be a Parquet codec pyarrow has (or none)")
    if (
        isinstance(row_group_size, bool)
        or not isinstance(row_group_size, int)
        or row_group_size < 1
    ):
        raise QueryValidationError("row_group_size", "must be a positive integer")


def _codec_available(name: str) -> bool:
    try:
        return bool(pa.Codec.is_available(name))
    except ValueError:
        return False


def _names_argument(argument: str, names: Sequence[str] | None) -> list[str] | None:
    """*names* as a list, refusing one string (which would read as a list of letters)."""
    if names is None:
        return None
    if isinstance(names, str):
        raise QueryValidationError(argument, "must be a list of column names, not one string")
    out = list(names)
    for position, name in enumerate(out):
        if not isinstance(name, str):
            raise QueryValidationError(argument, "column names must be strings", position)
    return out


def redacted_provenance(prov: dict[str, Any], policy: RedactionPolicy) -> dict[str, Any]:
    """Provenance without PHI: the query's values and the plan's requests are replaced."""
    out = dict(prov)
    plan_text = None
    if isinstance(prov.get("query"), str):
        with contextlib.suppress(Exception):  # a foreign or damaged query: drop the plan
            from healthimaging_df.plan import compile_query
            from healthimaging_df.query import Query

            query = Query.from_dict(json.loads(prov["query"]))
            plan_text = compile_query(query, _parse_iso(prov.get("fetched_at"))).explain(False)
    out["query"] = redact_query_json(prov.get("query"))
    out["plan"] = plan_text
    out["redaction"] = json.dumps(policy.describe(), sort_keys=True)
    return out


def _write(
    target: _Target,
    display_path: str,
    table: pa.Table,
    provenance: dict[str, Any],
    partition_cols: Sequence[str] | None,
    compression: str = "zstd",
    row_group_size: int = 128 * 1024,
) -> SnapshotInfo:
    from healthimaging_df import __version__

    parts = _names_argument("partition_cols", partition_cols) or []
    if len(set(parts)) != len(parts):
        raise SnapshotError("partition_cols has a repeated column")
    if target.single_file and parts:
        raise SnapshotError("partition_cols needs a directory path (not one ending in .parquet)")
    derived = []
    for name in parts:
        if name in table.column_names:
            continue
        if name == "StudyYear" and "StudyDateTime" in table.column_names:
            table = table.append_column(
                "StudyYear", pc.cast(pc.year(table.column("StudyDateTime")), pa.int64())
            )
            derived.append(name)
        else:
            raise SnapshotError(f"partition column {name!r} is not in the frame")
    for name in parts:
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise SnapshotError(f"partition column {name!r} must hold text, integers or flags")
    if len(parts) >= table.num_columns:
        raise SnapshotError("partition_cols cannot cover every column")

    watermark = _watermark(table)
    prov = dict(provenance)
    prov.setdefault("schema_version", schema.SCHEMA_VERSION)
    prov.setdefault("library_version", __version__)
    prov.setdefault("redaction", None)
    prov["row_count"] = table.num_rows
    prov["watermark"] = _iso(watermark)
    meta = {
        "format": "healthimaging_df.snapshot",
        "format_version": FORMAT_VERSION,
        "written_at": datetime.now(timezone.utc).isoformat(),
        "written_by": __version__,
        "partition_cols": parts,
        "derived_columns": derived,
        "columns": [c for c in table.column_names if c not in derived],
        "provenance": prov,
    }
    file_meta = {METADATA_KEY.encode(): json.dumps(meta, sort_keys=True).encode()}
    store = target.store
    if target.single_file:
        data = _parquet_bytes(table, file_meta, compression, row_group_size)
        store.put(target.name, data)
        return SnapshotInfo(
            display_path, table.num_rows, (store.uri(target.name),), len(data), (), prov
        )

    old = _load_manifest(target)
    if old is None and not _only_our_debris(target):
        raise SnapshotError(
            f"{store.uri(target.name)} exists and is not a snapshot (no {MANIFEST_NAME}); "
            "refusing to write into it"
        )
    version = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    staging = f"{target.name}/{STAGING_PREFIX}{version}"
    files: list[dict[str, Any]] = []
    total = 0
    # 1. every data file goes to a staging folder that readers globbing the snapshot skip
    for number, (values, part) in enumerate(_split(table, parts)):
        folder = "/".join(f"{c}={_hive_value(v)}" for c, v in zip(parts, values, strict=True))
        rel = "/".join(x for x in (folder, f"part-{version}-{number:05d}.parquet") if x)
        data = _parquet_bytes(part, file_meta, compression, row_group_size)
        store.put(f"{staging}/{rel}", data)
        files.append({"path": rel, "rows": part.num_rows, "bytes": len(data)})
        total += len(data)
    # 2. complete: move them into place (new names, so the previous version stays readable)
    store.move([(f"{staging}/{f['path']}", f"{target.name}/{f['path']}") for f in files])
    manifest = {
        "format": "healthimaging_df.snapshot-manifest",
        "format_version": FORMAT_VERSION,
        "version": version,
        "files": files,
        "arrow_schema": base64.b64encode(table.schema.remove_metadata().serialize()).decode(),
        **{k: v for k, v in meta.items() if k not in ("format", "format_version")},
    }
    # 3. the commit point: one atomic replace of the manifest
    store.put(target.manifest, json.dumps(manifest, indent=1, sort_keys=True).encode())
    # 4. the previous version's files, and debris of crashed writes
    _collect_garbage(target, {f["path"] for f in files})
    return SnapshotInfo(
        display_path,
        table.num_rows,
        tuple(store.uri(f"{target.name}/{f['path']}") for f in files),
        total,
        tuple(parts),
        prov,
    )


def _collect_garbage(target: _Target, keep: set[str]) -> None:
    """Delete data files of earlier versions and of crashed writes (never foreign files)."""
    prefix = f"{target.name}/"
    stale = []
    for rel in target.store.list(target.name):
        inner = rel[len(prefix) :]
        base = inner.rsplit("/", 1)[-1]
        ours = base.startswith("part-") and base.endswith(".parquet")
        if (ours and inner not in keep) or (base.startswith(".") and ".tmp-" in base):
            stale.append(rel)
    if stale:
        target.store.delete(stale)
    target.store.prune(target.name, STAGING_PREFIX)  # the (now empty) staging folders


def _only_our_debris(target: _Target) -> bool:
    """Whether a folder without a manifest holds nothing but what a crashed first write left.

    Only this library's own names count (``part-<version>-NNNNN.parquet`` and temp files of a
    PUT), so a folder of some other tool's Parquet files (Spark's ``part-00000-….parquet``) is
    never written into or cleaned up.
    """
    prefix = f"{target.name}/"
    for rel in target.store.list(target.name):
        base = rel[len(prefix) :].rsplit("/", 1)[-1]
        if not (_OUR_PART.fullmatch(base) or (base.startswith(".") and ".tmp-" in base)):
            return False
    return True


def _parquet_bytes(
    table: pa.Table, metadata: dict[bytes, bytes], compression: str, row_group_size: int
) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata({**metadata, b"pandas": _pandas_metadata(table)}),
        sink,
        compression=compression,
        row_group_size=row_group_size,
    )
    return bytes(sink.getvalue().to_pybytes())


def _pandas_metadata(table: pa.Table) -> bytes:
    """Return the schema note pandas writes, so a plain ``pd.read_parquet`` gets Int64 and boolean."""
    empty = schema.arrow_to_pandas(table.slice(0, 0))
    note: bytes = pa.Table.from_pandas(empty, preserve_index=False).schema.metadata[b"pandas"]
    return note


def _split(table: pa.Table, parts: list[str]) -> Iterator[tuple[tuple[Any, ...], pa.Table]]:
    """Yield (partition values, rows without the partition columns); one empty file if no rows."""
    if not parts:
        yield (), table
        return
    if table.num_rows == 0:
        return
    keys = table.select(parts).group_by(parts, use_threads=False).aggregate([])
    rest = [c for c in table.column_names if c not in parts]
    for row in keys.to_pylist():
        mask = None
        for name in parts:
            value = row[name]
            column = table.column(name)
            hit = (
                pc.is_null(column)
                if value is None
                else pc.fill_null(pc.equal(column, value), False)
            )
            mask = hit if mask is None else pc.and_(mask, hit)
        yield tuple(row[n] for n in parts), table.filter(mask).select(rest)


def _hive_value(value: Any) -> str:
    if value is None:
        return _HIVE_NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    return quote(str(value), safe="")


def _load_manifest(target: _Target) -> dict[str, Any] | None:
    data = target.store.get(target.manifest)
    if data is None:
        return None
    try:
        manifest: dict[str, Any] = json.loads(data)
    except ValueError:
        raise SnapshotError(f"{target.store.uri(target.manifest)} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != (
        "healthimaging_df.snapshot-manifest"
    ):
        raise SnapshotError(f"{target.store.uri(target.manifest)} is not a snapshot manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise SnapshotError("the snapshot was written by a newer healthimaging_df; upgrade")
    return manifest


# -- read ---------------------------------------------------------------------------------------


def read_snapshot(
    path: str | os.PathLike[str],
    *,
    dtype_backend: schema.DtypeBackend = "numpy_nullable",
    columns: Sequence[str] | None = None,
    filters: Any = None,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> pd.DataFrame:
    """Read a snapshot back as a typed frame with its provenance in ``attrs``.

    Parameters
    ----------
    path
        What ``write_snapshot``/``to_parquet`` wrote: a ``.parquet`` file or a snapshot directory.
    dtype_backend
        ``"numpy_nullable"`` or ``"pyarrow"``.
    columns
        Only these columns (in this order); partition and derived columns may be named.
    filters
        Row filter: a ``pyarrow.compute`` expression or DNF tuples as in ``pandas.read_parquet``
        (``[("Modality", "==", "CT")]``); partition filters skip whole files.
    boto3_session, region, s3_endpoint_url
        How to reach S3.

    Returns
    -------
    pandas.DataFrame
        The same columns, dtypes and values as written. A partitioned snapshot comes back in the
        query's result order (sort column, then imageSetId).
    """
    if dtype_backend not in schema.DTYPE_BACKENDS:
        raise QueryValidationError("dtype_backend", f"must be one of {schema.DTYPE_BACKENDS}")
    columns = _names_argument("columns", columns)
    target = _target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    table, meta = _read_table(target, columns, filters)
    order = list(columns) if columns is not None else meta["columns"]
    frame = _table_to_frame(table, dtype_backend, order)
    if meta["partition_cols"] and columns is None:
        frame = _canonical_order(frame, meta["provenance"])
    frame.attrs[METADATA_KEY] = dict(meta["provenance"])
    return frame


def _read_table(
    target: _Target, columns: Sequence[str] | None, filters: Any, _retry: bool = True
) -> tuple[pa.Table, dict[str, Any]]:
    store = target.store
    expression = _filter_expression(filters)
    if target.single_file:
        location = store.arrow_path(target.name)
        try:
            file_schema = pq.read_schema(location, filesystem=store.arrow_fs)
        except (FileNotFoundError, OSError) as exc:
            raise SnapshotError(f"no snapshot at {store.uri(target.name)}") from exc
        meta = _file_meta(file_schema.metadata, store.uri(target.name))
        _check_filter(expression, file_schema.remove_metadata())
        table = pq.read_table(
            location,
            filesystem=store.arrow_fs,
            columns=_columns(columns, meta),
            filters=expression,
            partitioning=None,
        )
        return table.replace_schema_metadata(None), meta

    manifest = _load_manifest(target)
    if manifest is None:
        raise SnapshotError(f"no snapshot at {store.uri(target.name)} (no {MANIFEST_NAME})")
    full_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["arrow_schema"])))
    _check_filter(expression, full_schema)
    parts = list(manifest["partition_cols"])
    partitioning = None
    if parts:
        partitioning = pads.partitioning(
            pa.schema([full_schema.field(n) for n in parts]), flavor="hive"
        )
    paths = [store.arrow_path(f"{target.name}/{f['path']}") for f in manifest["files"]]
    wanted = _columns(columns, manifest)
    if not paths:
        empty = full_schema.empty_table()
        return empty.select(wanted) if wanted is not None else empty, manifest
    try:
        dataset = pads.dataset(
            paths,
            schema=full_schema,
            filesystem=store.arrow_fs,
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=store.arrow_path(target.name),
        )
        table = dataset.to_table(columns=wanted, filter=expression)
    except FileNotFoundError:
        if not _retry:
            raise
        return _read_table(target, columns, filters, _retry=False)  # a writer swapped versions
    if columns is None:
        derived = [c for c in manifest["derived_columns"] if c in table.column_names]
        table = table.drop_columns(derived)
    return table.replace_schema_metadata(None), manifest


def _columns(columns: Sequence[str] | None, meta: dict[str, Any]) -> list[str] | None:
    if columns is None:
        return None
    known = set(meta["columns"]) | set(meta.get("derived_columns", ()))
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise SnapshotError(f"columns not in the snapshot: {', '.join(unknown)}")
    return list(columns)


def _file_meta(metadata: dict[bytes, bytes] | None, where: str) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY.encode())
    if raw is None:
        raise SnapshotError(f"{where} has no healthimaging_df metadata; read it with pandas")
    try:
        meta: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise SnapshotError(f"{where} has damaged healthimaging_df metadata") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("provenance"), dict):
        raise SnapshotError(f"{where} has damaged healthimaging_df metadata")
    return meta


def _filter_expression(filters: Any) -> Any:
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    try:
        return pq.filters_to_expression(filters)
    except (TypeError, ValueError, KeyError, IndexError):  # pyarrow's text can quote a value
        raise QueryValidationError(
            "filters", "must be a pyarrow.compute expression or DNF tuples (column, op, value)"
        ) from None


def _check_filter(expression: Any, table_schema: pa.Schema) -> None:
    """Apply *expression* to no rows of *table_schema*: a bad column or type fails here, typed."""
    if expression is None:
        return
    try:
        pads.dataset(table_schema.empty_table()).to_table(filter=expression)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        raise QueryValidationError(
            "filters", "names a column the snapshot lacks or compares it with the wrong type"
        ) from None


def _sort_spec(provenance: dict[str, Any]) -> tuple[str, bool]:
    with contextlib.suppress(Exception):
        query = json.loads(provenance["query"])
        if query.get("sort_by"):
            return str(query["sort_by"]), bool(query.get("ascending"))
    return "updatedAt", False


def _canonical_order(frame: pd.DataFrame, provenance: dict[str, Any]) -> pd.DataFrame:
    column, ascending = _sort_spec(provenance)
    keys = [c for c in (column, "imageSetId") if c in frame.columns]
    if not keys:
        return frame
    ordered = frame.sort_values(
        keys, ascending=[ascending, True][: len(keys)], kind="stable", na_position="last"
    )
    out: pd.DataFrame = ordered.reset_index(drop=True)
    return out


def snapshot_provenance(
    path: str | os.PathLike[str],
    *,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
) -> dict[str, Any]:
    """The provenance of a snapshot, without reading its rows."""
    target = _target(
        path, boto3_session=boto3_session, region=region, s3_endpoint_url=s3_endpoint_url
    )
    if target.single_file:
        try:
            metadata = pq.read_schema(
                target.store.arrow_path(target.name), filesystem=target.store.arrow_fs
            ).metadata
        except (FileNotFoundError, OSError) as exc:
            raise SnapshotError(f"no snapshot at {target.store.uri(target.name)}") from exc
        return dict(_file_meta(metadata, target.store.uri(target.name))["provenance"])
    manifest = _load_manifest(target)
    if manifest is None:
        raise SnapshotError(f"no snapshot at {target.store.uri(target.name)}")
    return dict(manifest["provenance"])


# -- export with checkpoints ----------------------------------------------------------------


def _fingerprint(query: Query) -> str:
    text = json.dumps(query.to_dict(), sort_keys=True) + "|" + schema.SCHEMA_VERSION
    return hashlib.sha256(text.encode()).hexdigest()


class _Checkpoint:
    """Completed fetch tasks and their (filtered) rows, stored next to the snapshot."""

    def __init__(self, target: _Target, fingerprint: str) -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.parts: list[str] = []
        self.now = datetime.now(timezone.utc)
        self.started_at = self.now
        self.resumed_tasks = 0
        self.tasks = 0
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_tasks = 0
        self._flushed = time.monotonic()

    @property
    def state_rel(self) -> str:
        return f"{self.target.checkpoint}/state.json"

    def load(self) -> Any:
        """Return the saved coverage (a ``fetch.Coverage``), or None to start afresh."""
        from healthimaging_df.fetch import Coverage

        raw = self.target.store.get(self.state_rel)
        if raw is None:
            return None
        state = json.loads(raw)
        if state.get("fingerprint") != self.fingerprint:
            log.warning(
                "ignoring the checkpoint at %s: it belongs to a different query",
                self.target.store.uri(self.target.checkpoint),
            )
            self.discard()
            return None
        self.now = datetime.fromisoformat(state["now"])
        self.started_at = datetime.fromisoformat(state["started_at"])
        self.parts = list(state["parts"])
        self.tasks = self.resumed_tasks = int(state["tasks"])
        self.rows = int(state["rows"])
        windows = {
            int(chain): [(datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in spans]
            for chain, spans in state["windows"].items()
        }
        return Coverage(chains=set(state["chains"]), windows=windows)

    def add(self, table: pa.Table, coverage: Any, interval: float) -> None:
        """Record one finished task; persist when *interval* seconds passed since the last save."""
        self._pending.append(table)
        self._pending_tasks += 1
        if time.monotonic() - self._flushed >= interval:
            self.flush(coverage)

    def flush(self, coverage: Any) -> None:
        if not self._pending_tasks:
            return
        rows = pa.concat_tables(self._pending)
        if rows.num_rows:
            name = f"part-{uuid.uuid4().hex}.parquet"
            self.target.store.put(
                f"{self.target.checkpoint}/{name}", _parquet_bytes(rows, {}, "zstd", 128 * 1024)
            )
            self.parts.append(name)
        self.tasks += self._pending_tasks
        self.rows += rows.num_rows
        state = {
            "format": "healthimaging_df.checkpoint",
            "fingerprint": self.fingerprint,
            "now": self.now.isoformat(),
            "started_at": self.started_at.isoformat(),
            "chains": sorted(coverage.chains),
            "windows": {
                str(chain): [[a.isoformat(), b.isoformat()] for a, b in spans]
                for chain, spans in coverage.windows.items()
            },
            "parts": self.parts,
            "tasks": self.tasks,
            "rows": self.rows,
        }
        self.target.store.put(self.state_rel, json.dumps(state).encode())  # the commit point
        self._pending = []
        self._pending_tasks = 0
        self._flushed = time.monotonic()

    def tables(self) -> list[pa.Table]:
        """Rows of every saved and pending task."""
        saved = []
        for name in self.parts:
            data = self.target.store.get(f"{self.target.checkpoint}/{name}")
            if data is None:
                raise SnapshotError("a checkpoint part file is missing; rerun with resume=False")
            saved.append(pq.read_table(pa.BufferReader(data)))
        return saved + self._pending

    def discard(self) -> None:
        store = self.target.store
        store.delete(store.list(self.target.checkpoint))


def export_query(
    query: Query,
    path: str | os.PathLike[str],
    *,
    client: Any = None,
    boto3_session: Any = None,
    progress: Progress = None,
    max_concurrency: int = 8,
    max_tps: float | None = 25.0,
    partition_cols: Sequence[str] | None = None,
    redact: RedactionPolicy | None = None,
    resume: bool = True,
    checkpoint_interval: float = 5.0,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
    compression: str = "zstd",
) -> SnapshotInfo:
    """Run *query* and write its result as a snapshot at *path*, checkpointing as it goes.

    Finished fetch tasks (request chains, or createdAt windows of a scan) and their rows are saved
    next to the target (``<path>.ahi-checkpoint``) at most every *checkpoint_interval* seconds. If
    the process dies, the same call resumes from there: the result equals an uninterrupted run.
    The checkpoint is deleted once the snapshot is written. It holds unredacted rows (PHI).

    Parameters
    ----------
    query
        The query (``Query.to_parquet`` calls this).
    path
        Where to write; see :func:`write_snapshot`.
    client, boto3_session, progress, max_concurrency, max_tps
        As in ``Query.to_dataframe``; *boto3_session* also reaches S3.
    partition_cols, redact, region, s3_endpoint_url, kms_key_id, compression
        As in :func:`write_snapshot`.
    resume
        Continue from a checkpoint of the same query if there is one; False starts afresh.
    checkpoint_interval
        Seconds between checkpoint saves (0 saves after every finished task).

    Returns
    -------
    SnapshotInfo
    """
    from healthimaging_df import fetch, frame
    from healthimaging_df.plan import compile_query

    _check_redact(redact)
    _check_parquet_options(compression, 128 * 1024)
    partition_cols = _names_argument("partition_cols", partition_cols)
    target = _target(
        path,
        boto3_session=boto3_session,
        region=region,
        s3_endpoint_url=s3_endpoint_url,
        kms_key_id=kms_key_id,
    )
    if target.single_file and partition_cols:
        raise SnapshotError("partition_cols needs a directory path (not one ending in .parquet)")
    options = fetch.FetchOptions(max_concurrency=max_concurrency, max_tps=max_tps)
    client = fetch.make_client(client, boto3_session, max_concurrency)

    if query.row_limit is not None:  # a small, sorted result: no checkpoints needed
        started = datetime.now(timezone.utc)
        df = query.to_dataframe(client, None, progress, max_concurrency, max_tps)
        prov = dict(df.attrs.get(METADATA_KEY) or {})
        prov["fetch_started_at"] = started.isoformat()
        return _finish_write(target, os.fspath(path), df, prov, partition_cols, redact, compression)

    checkpoint = _Checkpoint(target, _fingerprint(query))
    coverage = checkpoint.load() if resume else None
    if not resume:
        checkpoint.discard()
    plan = compile_query(query, now=checkpoint.now)
    if coverage is None:
        coverage = fetch.Coverage()
    buffers: dict[int, list[dict[str, Any]]] = {}
    with fetch.stream(plan, client, options, progress, resume=coverage) as pages:
        for page in pages:
            if not page.done:
                buffers.setdefault(page.task, []).extend(page.items)
                continue
            items = buffers.pop(page.task, [])
            rows = frame.apply_predicates(frame.summaries_to_table(items), plan.predicates)
            coverage.add(page)
            checkpoint.add(rows, coverage, checkpoint_interval)
    if buffers and any(buffers.values()):
        raise SnapshotError("the fetch ended with unfinished tasks; rerun to resume")
    tables = checkpoint.tables()
    table = pa.concat_tables(tables) if tables else schema.arrow_schema().empty_table()
    df = frame.dedupe_and_sort(schema.arrow_to_pandas(table), plan)
    prov = fetch.provenance(query, plan, client)
    prov["fetch_started_at"] = checkpoint.started_at.isoformat()
    info = _finish_write(target, os.fspath(path), df, prov, partition_cols, redact, compression)
    checkpoint.discard()
    if checkpoint.resumed_tasks:
        info = SnapshotInfo(
            info.path,
            info.rows,
            info.files,
            info.bytes,
            info.partition_cols,
            info.provenance,
            checkpoint.resumed_tasks,
        )
    return info


def _finish_write(
    target: _Target,
    display_path: str,
    df: pd.DataFrame,
    prov: dict[str, Any],
    partition_cols: Sequence[str] | None,
    redact: RedactionPolicy | None,
    compression: str,
) -> SnapshotInfo:
    if redact is not None:
        df = apply_redaction(df, redact)
        prov = redacted_provenance(prov, redact)
    return _write(target, display_path, frame_to_table(df), prov, partition_cols, compression)


# -- refresh ------------------------------------------------------------------------------------


def refresh_frame(
    df: pd.DataFrame,
    *,
    client: Any = None,
    boto3_session: Any = None,
    query: Query | None = None,
    redact: RedactionPolicy | None = None,
    margin: timedelta = DEFAULT_MARGIN,
    progress: Progress = None,
    max_concurrency: int = 8,
    max_tps: float | None = 25.0,
) -> tuple[pd.DataFrame, RefreshReport]:
    """Bring a frame from this library up to date without re-reading the whole datastore.

    Fetches every image set of the datastore updated since the last fetch started (minus
    *margin*), upserts them by imageSetId keeping the highest version, and drops rows that no
    longer match the query (an ``isPrimary`` flip or a tag change can move an image set out of the
    cohort). The result equals a fresh run of the same query, except for ``lastAccessedAt`` and
    ``storageTier``, which change without a new ``updatedAt``; image sets deleted from the
    datastore are not detected either.

    Parameters
    ----------
    df
        A frame with provenance in ``attrs["healthimaging_df"]`` (from ``to_dataframe``, a
        snapshot or an earlier refresh).
    client, boto3_session, progress, max_concurrency, max_tps
        As in ``Query.to_dataframe``.
    query
        The original query; read from the provenance when None (required for a redacted frame,
        whose provenance no longer holds the query's values).
    redact
        The policy the frame was redacted with (same key); required for a redacted frame.
    margin
        Safety margin below the last fetch's start, for clock skew between client and service.

    Returns
    -------
    tuple of (pandas.DataFrame, RefreshReport)
    """
    if not isinstance(df, pd.DataFrame):
        raise QueryValidationError("df", "must be a pandas DataFrame")
    prov = dict(df.attrs.get(METADATA_KEY) or {})
    table = frame_to_table(df)
    new_table, new_prov, report = _refresh_table(
        table,
        prov,
        client=client,
        boto3_session=boto3_session,
        query=query,
        redact=redact,
        margin=margin,
        progress=progress,
        max_concurrency=max_concurrency,
        max_tps=max_tps,
    )
    out = _table_to_frame(new_table, _dtype_backend_of(df), list(df.columns))
    out.attrs[METADATA_KEY] = new_prov
    return out, report


def refresh_snapshot(
    path: str | os.PathLike[str],
    *,
    client: Any = None,
    boto3_session: Any = None,
    query: Query | None = None,
    redact: RedactionPolicy | None = None,
    margin: timedelta = DEFAULT_MARGIN,
    progress: Progress = None,
    max_concurrency: int = 8,
    max_tps: float | None = 25.0,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
) -> RefreshReport:
    """Refresh the snapshot at *path* in place (atomically); see :func:`refresh_frame`.

    The partitioning and redaction of the snapshot are kept. Returns what changed.
    """
    store_args: dict[str, Any] = {
        "boto3_session": boto3_session,
        "region": region,
        "s3_endpoint_url": s3_endpoint_url,
    }
    target = _target(path, kms_key_id=kms_key_id, **store_args)
    table, meta = _read_table(target, None, None)
    if meta["derived_columns"]:
        derived = [c for c in meta["derived_columns"] if c in table.column_names]
        table = table.drop_columns(derived)
    new_table, new_prov, report = _refresh_table(
        table,
        dict(meta["provenance"]),
        client=client,
        boto3_session=boto3_session,
        query=query,
        redact=redact,
        margin=margin,
        progress=progress,
        max_concurrency=max_concurrency,
        max_tps=max_tps,
    )
    _write(target, os.fspath(path), new_table, new_prov, meta["partition_cols"])
    return report


def _refresh_table(
    table: pa.Table,
    prov: dict[str, Any],
    *,
    client: Any,
    boto3_session: Any,
    query: Query | None,
    redact: RedactionPolicy | None,
    margin: timedelta,
    progress: Progress,
    max_concurrency: int,
    max_tps: float | None,
) -> tuple[pa.Table, dict[str, Any], RefreshReport]:
    from healthimaging_df import fetch, frame
    from healthimaging_df.plan import compile_query
    from healthimaging_df.query import Query

    _check_redact(redact)
    if query is not None and not isinstance(query, Query):
        raise QueryValidationError("query", "must be a Query or None")
    if not isinstance(margin, timedelta) or margin < timedelta(0):
        raise QueryValidationError("margin", "must be a timedelta of zero or more")
    redaction = prov.get("redaction")
    if redaction:
        if query is None or redact is None:
            raise SnapshotError(
                "a redacted snapshot holds no query values: pass the original query= and the "
                "redact= policy (same key) to refresh it"
            )
        try:
            recorded = json.loads(redaction) if isinstance(redaction, str) else redaction
        except ValueError:
            raise SnapshotError("the provenance 'redaction' is damaged") from None
        if not isinstance(recorded, dict):
            raise SnapshotError("the provenance 'redaction' is damaged")
        if recorded.get("key_fingerprint") != redact.key_fingerprint():
            raise SnapshotError("redact= uses a different key than the snapshot was made with")
        if recorded != redact.describe():
            raise SnapshotError("redact= is not the policy the snapshot was made with")
    elif redact is not None:
        raise SnapshotError("the snapshot is not redacted; pass redact=None")
    if query is None:
        if not isinstance(prov.get("query"), str):
            raise SnapshotError("no query in the provenance: pass query= to refresh")
        try:
            query = Query.from_dict(json.loads(prov["query"]))
        except HealthImagingDFError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SnapshotError("the provenance query cannot be read: pass query=") from None
    if query.row_limit is not None:
        raise SnapshotError(
            "a query with a limit cannot be refreshed incrementally (the first N rows can change "
            "in ways an update scan does not show); export it again"
        )
    if prov.get("datastore_id") not in (None, query.datastore_id):
        raise SnapshotError("query= is for a different datastore than the snapshot")
    for needed in ("imageSetId", "version", "updatedAt"):
        if needed not in table.column_names:
            raise SnapshotError(f"cannot refresh without the {needed} column")

    since = _refresh_since(prov, table, margin)
    started = datetime.now(timezone.utc)
    upper = started + timedelta(days=2)
    changes = Query(query.datastore_id).between("updatedAt", since, upper)
    change_plan = compile_query(changes)
    options = fetch.FetchOptions(max_concurrency=max_concurrency, max_tps=max_tps)
    client = fetch.make_client(client, boto3_session, max_concurrency)
    items: list[dict[str, Any]] = []
    with fetch.stream(change_plan, client, options, progress) as pages:
        for page in pages:
            items.extend(page.items)
    fetched = _latest_versions(frame.summaries_to_table(items))
    fetched_count = fetched.num_rows

    old_ids = table.column("imageSetId")
    old_versions = dict(zip(old_ids.to_pylist(), table.column("version").to_pylist(), strict=True))
    old_updated = dict(zip(old_ids.to_pylist(), table.column("updatedAt").to_pylist(), strict=True))
    # an older state than the one held (a stale read) never replaces it; same order as
    # _latest_versions: version, then updatedAt, nulls lowest
    newer = pa.array(
        [
            i not in old_versions or _rank(v, u) >= _rank(old_versions[i], old_updated[i])
            for i, v, u in zip(
                fetched.column("imageSetId").to_pylist(),
                fetched.column("version").to_pylist(),
                fetched.column("updatedAt").to_pylist(),
                strict=True,
            )
        ],
        pa.bool_(),
    )
    fetched = fetched.filter(newer)
    matching = frame.apply_predicates(fetched, query.predicates)
    replaced = pc.is_in(old_ids, value_set=fetched.column("imageSetId").combine_chunks())
    kept = table.filter(pc.invert(pc.fill_null(replaced, False)))
    incoming_df = schema.arrow_to_pandas(matching)
    if redact is not None:
        incoming_df = apply_redaction(incoming_df, redact)
    incoming = frame_to_table(incoming_df[[c for c in table.column_names if c in incoming_df]])
    missing = [c for c in table.column_names if c not in incoming.column_names]
    if missing:
        raise SnapshotError(f"cannot refresh columns not in the schema: {', '.join(missing)}")
    merged = pa.concat_tables([kept, incoming.select(table.column_names).cast(table.schema)])
    plan = compile_query(query)
    result_df = frame.dedupe_and_sort(schema.arrow_to_pandas(merged, "pyarrow"), plan)
    result = frame_to_table(result_df)

    new_ids = set(result.column("imageSetId").to_pylist())
    before = set(old_versions)
    incoming_ids = incoming.column("imageSetId").to_pylist()
    incoming_state = dict(
        zip(
            incoming_ids,
            zip(
                incoming.column("version").to_pylist(),
                incoming.column("updatedAt").to_pylist(),
                strict=True,
            ),
            strict=True,
        )
    )
    added = sorted(new_ids - before)
    removed = sorted(before - new_ids)
    updated = sorted(
        i
        for i in new_ids & before
        if i in incoming_state and incoming_state[i] != (old_versions[i], old_updated[i])
    )
    watermark = _watermark(result)
    meta = getattr(client, "meta", None)
    new_prov = dict(prov)
    new_prov.update(
        {
            "fetched_at": datetime.now(timezone.utc).isoformat(),
            "fetch_started_at": started.isoformat(),
            "endpoint_url": getattr(meta, "endpoint_url", prov.get("endpoint_url")),
            "region": getattr(meta, "region_name", prov.get("region")),
            "row_count": result.num_rows,
            "watermark": _iso(watermark),
            "refreshed_since": since.isoformat(),
        }
    )
    report = RefreshReport(
        tuple(added),
        tuple(updated),
        tuple(removed),
        fetched_count,
        since,
        result.num_rows,
        watermark,
    )
    return result, new_prov, report


def _refresh_since(prov: dict[str, Any], table: pa.Table, margin: timedelta) -> datetime:
    """Lower updatedAt bound of a refresh: when the last fetch started, minus *margin*.

    Any change the snapshot misses happened after its fetch started, so its updatedAt is later
    (up to clock skew, which *margin* covers). The highest updatedAt seen (the watermark) is not
    used on its own: a change made while a long export ran can carry an earlier updatedAt than
    rows read later, and a small cohort's watermark can lag far behind the datastore's activity.
    """
    for key in ("fetch_started_at", "fetched_at"):
        moment = _parse_iso(prov.get(key))
        if moment is not None:
            return moment - margin
    watermark = _parse_iso(prov.get("watermark")) or _watermark(table)
    if watermark is None:
        raise SnapshotError("the frame has no fetch time or updatedAt to refresh from")
    return watermark - margin


def _rank(version: int | None, updated_at: datetime | None) -> tuple[bool, int, bool, int]:
    """Order of two states of one image set: version, then updatedAt; a null is lowest."""
    micros = 0
    if updated_at is not None:
        aware = updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=timezone.utc)
        micros = (aware - _EPOCH) // timedelta(microseconds=1)
    return (version is not None, version or 0, updated_at is not None, micros)


def _latest_versions(table: pa.Table) -> pa.Table:
    """One row per imageSetId: the highest version, then the latest updatedAt (nulls lowest).

    Rows without an imageSetId are dropped (they cannot be upserted).
    """
    table = table.filter(pc.is_valid(table.column("imageSetId")))
    if table.num_rows == 0:
        return table
    # nulls sort last in either direction (pyarrow's default), so a null version or updatedAt
    # never beats a known one; the sort is stable
    ordered = table.sort_by(
        [("imageSetId", "ascending"), ("version", "descending"), ("updatedAt", "descending")]
    )
    ids = ordered.column("imageSetId").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), first])
    return ordered.filter(keep)
