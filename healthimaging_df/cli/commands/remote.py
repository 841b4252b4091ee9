"""Command outputs and inputs on S3: ``--out s3://bucket/key`` and ``--from s3://bucket/key``.

S3 is reached with the command's own ``--profile`` and ``--region`` (not with ``--local``, which
refuses a profile: the default session then), ``--s3-endpoint-url`` or ``AWS_ENDPOINT_URL_S3``, and
``--kms-key-id`` for SSE-KMS.

Text and plain Parquet outputs go up as one multipart upload, opened before anything is written:
a missing bucket or a denied write fails before the search runs (when the output is streamed),
parts of 8 MiB go up as rows arrive (memory stays bounded, no PHI touches the local disk), and the
object appears whole, at once, when the upload completes; on any failure the upload is aborted and
nothing appears. Nothing here imports boto3 until a command needs S3 (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from healthimaging_df.cli.commands.options import ConfigError, UsageError

SCHEME = "s3://"
PART_SIZE = 8 * 1024 * 1024  # S3 takes parts of 5 MiB and more (the last one may be smaller)
MAX_PARTS = 10_000  # S3's limit: the part size doubles every 1,000 parts to stay far below it


def is_s3(path: str | None) -> bool:
    """Whether *path* is an ``s3://`` URL."""
    return isinstance(path, str) and path.startswith(SCHEME)


def split(url: str, option: str = "--out") -> tuple[str, str]:
    """``(bucket, key)`` of an object URL; ``UsageError`` if either is missing."""
    parts = urlsplit(url)
    key = parts.path.lstrip("/")
    if not parts.netloc or not key or key.endswith("/"):
        raise UsageError(f"{option} {url}: an S3 object needs a bucket and a key: s3://bucket/key")
    return parts.netloc, key


@dataclass(frozen=True)
class S3Settings:
    """How a command reaches S3: the same profile and region as its service client."""

    profile: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    kms_key_id: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> S3Settings:
        """The settings of a parsed command line (options it lacks are None)."""
        local = bool(getattr(args, "local", False))
        return cls(
            profile=None if local else getattr(args, "profile", None),
            region=getattr(args, "region", None),
            endpoint_url=getattr(args, "s3_endpoint_url", None),
            kms_key_id=getattr(args, "kms_key_id", None),
        )

    def session(self) -> Any:
        """A boto3 session of the profile and region (``ConfigError`` if the profile is unknown)."""
        from healthimaging_df.aws import session
        from healthimaging_df.errors import QueryValidationError

        try:
            return session.named(self.profile, self.region)
        except QueryValidationError:
            raise ConfigError(
                "the profile given by --profile or AWS_PROFILE does not exist"
            ) from None

    def client(self) -> Any:
        """An S3 client; ``ConfigError`` before any request if there are no credentials."""
        from healthimaging_df.aws import session as aws_session

        session = self.session()
        if session.get_credentials() is None:
            raise ConfigError(
                "no AWS credentials for S3: pass --profile, or set AWS_PROFILE or AWS_ACCESS_KEY_ID"
            )
        try:
            return aws_session.client("s3", session, endpoint_url=self.endpoint_url)
        except ValueError:
            raise ConfigError("--s3-endpoint-url is not a valid URL") from None

    def snapshot_options(self) -> dict[str, Any]:
        """Keyword arguments of ``write_snapshot`` / ``read_snapshot`` for these settings."""
        return {
            "boto3_session": self.session(),
            "region": self.region,
            "s3_endpoint_url": self.endpoint_url,
        }

    def encryption(self) -> dict[str, str]:
        """Upload arguments for SSE-KMS, when a key was given."""
        if self.kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        return {}


class MultipartWriter(io.BufferedIOBase):
    """A write-only binary stream into one S3 object, through a multipart upload.

    The upload is created at once (so a wrong bucket or a denied write fails before any data);
    parts go up as the buffer fills; :meth:`commit` completes the upload (the object appears then)
    and :meth:`abort` drops it. An empty object is put with one PUT (S3 refuses empty parts).
    """

    def __init__(self, client: Any, bucket: str, key: str, extra: dict[str, str]) -> None:
        super().__init__()
        self._client = client
        self._bucket = bucket
        self._key = key
        self._extra = extra
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._part_size = PART_SIZE
        self.size = 0
        self._aborted = False
        created = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
        self._upload_id: str | None = created["UploadId"]

    @property
    def name(self) -> str:
        """The object's URL (as given on the command line)."""
        return f"{SCHEME}{self._bucket}/{self._key}"

    def writable(self) -> bool:
        """Always: the stream is for writing."""
        return True

    def write(self, data: Any) -> int:
        """Buffer *data*; send a part whenever the buffer holds a part's worth."""
        if self._upload_id is None:
            if self._aborted:  # text still buffered above an aborted upload: dropped
                return len(memoryview(data))
            raise ValueError("write to a finished upload")
        view = memoryview(data).cast("B")
        self._buffer += view
        self.size += len(view)
        while len(self._buffer) >= self._part_size:
            chunk = bytes(self._buffer[: self._part_size])
            del self._buffer[: self._part_size]
            self._send(chunk)
        return len(view)

    def _send(self, chunk: bytes) -> None:
        number = len(self._parts) + 1
        response = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=chunk,
        )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
        if number % 1000 == 0:  # 10,000 parts at most: larger parts as the object grows
            self._part_size *= 2

    def commit(self) -> None:
        """Send the last part and complete the upload: the object appears, whole."""
        if self._upload_id is None:
            return
        if self.size == 0:
            self.abort()
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=b"", **self._extra)
            return
        if self._buffer or not self._parts:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        upload_id, self._upload_id = self._upload_id, None
        self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        """Drop the upload and its parts: nothing appears."""
        upload_id, self._upload_id = self._upload_id, None
        self._aborted = True
        self._buffer.clear()
        if upload_id is not None:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id
            )


@contextmanager
def upload_text(url: str, settings: S3Settings) -> Iterator[IO[str]]:
    """A UTF-8 text stream whose content becomes the object *url* when the block succeeds.

    On an exception inside the block the upload is aborted (no object appears) and the exception
    propagates; an abort that fails too does not hide it.
    """
    bucket, key = split(url)
    writer = MultipartWriter(settings.client(), bucket, key, settings.encryption())
    stream = io.TextIOWrapper(writer, encoding="utf-8", newline="")
    try:
        yield stream
        stream.flush()
        writer.commit()
    except BaseException:
        with contextlib.suppress(Exception):  # the first failure is the one to report
            writer.abort()
        raise
    finally:
        with contextlib.suppress(Exception):
            stream.close()


def put(url: str, data: bytes, settings: S3Settings) -> None:
    """Write *data* as the object *url* (one multipart upload, as :func:`upload_text`)."""
    bucket, key = split(url)
    writer = MultipartWriter(settings.client(), bucket, key, settings.encryption())
    try:
        writer.write(data)
        writer.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.abort()
        raise


def get(url: str, settings: S3Settings, option: str = "--from") -> bytes:
    """The object *url*'s bytes; ``UsageError`` naming *url* if there is no such object."""
    from botocore.exceptions import ClientError

    from healthimaging_df import aws

    bucket, key = split(url, option)
    client = settings.client()
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = aws.failure(exc).code
        if code in ("NoSuchKey", "404", "NotFound"):
            raise UsageError(f"no such object: {url}") from None
        if code == "NoSuchBucket":
            raise UsageError(f"{option} {url}: no such bucket") from None
        raise
    body: bytes = response["Body"].read()
    return body
