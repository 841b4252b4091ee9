"""Where single-file snapshots and checkpoints live: a local folder or an S3 prefix.

A store addresses files by ``/`` paths relative to its base. Writes are atomic per file: locally a
temp file, ``fsync`` and ``os.replace``; on S3 one PUT (or multipart upload), which S3 makes
visible all at once. ``open_target`` parses a snapshot path (``….parquet``, a folder, or
``s3://bucket/prefix``) into a store at its parent and the snapshot's name. Directory snapshots
are Delta tables (``healthimaging_df.store.delta``): this module only says where they are.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from healthimaging_df.errors import QueryValidationError, SnapshotError
from healthimaging_df.store.errors import translated

_F = TypeVar("_F", bound=Callable[..., Any])


def _typed(function: _F) -> _F:
    """Errors of the storage (a full disk, S3 not answering) as ``SnapshotError``, no path."""
    writes = function.__name__ in ("put", "put_stream", "delete")
    action = "writing the snapshot" if writes else "reading the snapshot"

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with translated(action):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


CHECKPOINT_SUFFIX = ".ahi-checkpoint"
FORMAT_VERSION = 1


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

    def put_stream(self, rel: str, fill: Callable[[IO[bytes]], None]) -> int:
        """Write what *fill* writes to a file object to *rel*, as atomically as :meth:`put`.

        The content never sits in memory whole; returns its size in bytes.
        """
        buffer = io.BytesIO()
        fill(buffer)
        self.put(rel, buffer.getvalue())
        return len(buffer.getvalue())

    def get(self, rel: str) -> bytes | None:
        raise NotImplementedError

    def delete(self, rels: Sequence[str]) -> None:
        raise NotImplementedError

    def list(self, rel_dir: str) -> list[str]:
        """Relative paths of every file below *rel_dir* (recursively)."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def check_writable(self) -> None:
        """Raise ``SnapshotError`` now if writes are sure to fail (checked before any request)."""

    def folder_of(self, rel: str) -> str | None:
        """The local folder that holds *rel*, or None when the store is not local."""
        return None


class _LocalStore(_Store):
    def __init__(self, base: str) -> None:
        from pyarrow import fs as pafs

        self.base = os.path.abspath(base)
        self.arrow_fs = pafs.LocalFileSystem()

    def _full(self, rel: str) -> str:
        return os.path.join(self.base, *rel.split("/"))

    def check_writable(self) -> None:
        """The nearest existing folder on the way to the snapshot must be a writable folder."""
        probe = self.base
        while not os.path.lexists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe):
            raise QueryValidationError("path", "runs through a file, not a folder")
        try:  # a real write: os.access says yes to root even on a read-only file system
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError:
            raise QueryValidationError("path", "its folder is not writable") from None

    def folder_of(self, rel: str) -> str | None:
        return os.path.dirname(self._full(rel))

    def arrow_path(self, rel: str) -> str:
        return self._full(rel)

    def uri(self, rel: str) -> str:
        return self._full(rel)

    @_typed
    def put(self, rel: str, data: bytes) -> None:
        self._replace(rel, lambda handle: handle.write(data))

    @_typed
    def put_stream(self, rel: str, fill: Callable[[IO[bytes]], None]) -> int:
        return self._replace(rel, fill)

    def _replace(self, rel: str, fill: Callable[[IO[bytes]], object]) -> int:
        """Write *rel* whole by *fill* into a temporary file renamed over it; its size."""
        target = self._full(rel)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temp, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
        _fsync_directory(directory)  # make the rename itself durable
        return size

    @_typed
    def get(self, rel: str) -> bytes | None:
        try:
            with open(self._full(rel), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    @_typed
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

    @_typed
    def list(self, rel_dir: str) -> list[str]:
        root = self._full(rel_dir)
        found = []
        for directory, _dirs, files in os.walk(root):
            for name in files:
                full = os.path.join(directory, name)
                found.append(os.path.relpath(full, self.base).replace(os.sep, "/"))
        return sorted(found)

    @_typed
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
        from healthimaging_df.aws import session as aws_session

        self.session = aws_session.resolve(boto3_session)
        self.region = region
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.kms_key_id = kms_key_id
        self.client = aws_session.client(
            "s3", self.session, region=region, endpoint_url=endpoint_url
        )

    @property
    def arrow_fs(self) -> Any:
        """The pyarrow S3 file system with the session's current credentials (per use)."""
        from healthimaging_df.aws import session as aws_session

        return aws_session.s3_filesystem(
            self.session, region=self.region, endpoint_url=self.endpoint_url
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

    @_typed
    def put(self, rel: str, data: bytes) -> None:
        extra = self._encryption()
        # upload_fileobj switches to a multipart upload for large bodies; S3 shows the object only
        # once it is complete, and boto3 aborts the upload if it fails.
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(rel), ExtraArgs=extra)

    @_typed
    def put_stream(self, rel: str, fill: Callable[[IO[bytes]], None]) -> int:
        # spooled to a local temp file (mode 0600), then one (multipart) upload
        with tempfile.TemporaryFile() as spool:
            fill(spool)
            size = spool.tell()
            spool.seek(0)
            self.client.upload_fileobj(
                spool, self.bucket, self._key(rel), ExtraArgs=self._encryption()
            )
        return size

    @_typed
    def get(self, rel: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except self.client.exceptions.NoSuchKey:
            return None
        body: bytes = response["Body"].read()
        return body

    @_typed
    def delete(self, rels: Sequence[str]) -> None:
        keys = [{"Key": self._key(rel)} for rel in rels]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
            )

    @_typed
    def list(self, rel_dir: str) -> list[str]:
        prefix = self._key(rel_dir).rstrip("/") + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            found += [item["Key"][skip:] for item in page.get("Contents", [])]
        return sorted(found)

    @_typed
    def size(self, rel: str) -> int:
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        return int(head["ContentLength"])


@dataclass(frozen=True)
class Target:
    """A snapshot location: a store at its parent plus the snapshot's relative name."""

    store: _Store
    name: str
    single_file: bool

    @property
    def checkpoint(self) -> str:
        """The export checkpoint folder's relative path."""
        return f"{self.name}{CHECKPOINT_SUFFIX}"


def open_target(
    path: str | os.PathLike[str],
    *,
    boto3_session: Any = None,
    region: str | None = None,
    s3_endpoint_url: str | None = None,
    kms_key_id: str | None = None,
) -> Target:
    """Parse a snapshot path (local or ``s3://``) into a store and a name."""
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
        return Target(store, name, single)
    if "://" in text:
        raise SnapshotError("snapshot paths are local paths or s3://bucket/prefix URIs")
    if kms_key_id:
        raise SnapshotError("kms_key_id applies to s3:// paths only")
    full = os.path.abspath(text.rstrip("/") or text)
    return Target(_LocalStore(os.path.dirname(full)), os.path.basename(full), single)


S3Store = _S3Store  # for callers that hand its session to delta-rs
Store = _Store


def local_store(base: str) -> Store:
    """A store of files below the local folder *base*."""
    return _LocalStore(base)
