"""One AWS session: every client, S3 file system and delta-rs option, from the caller's boto3 session.

Every public function takes ``boto3_session=None`` (the default session then, as awswrangler does)
and hands it here; nothing else in the package calls ``boto3.Session()`` or ``session.client``.
So a profile, a region, an assumed role or an ``AWS_ENDPOINT_URL_<SERVICE>`` variable reaches
every service alike: the search, the QIDO-RS signer, S3, Glue, DynamoDB, STS, SQS.

Credentials are read when used, never frozen when a store opens: botocore refreshes temporary
credentials (an assumed role, SSO, instance metadata) inside ``get_frozen_credentials()``, and
:func:`credentials`, :func:`s3_filesystem` and :func:`delta_storage_options` call it on every use.
A store calls them per operation, so a run that outlives its first credentials keeps going.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any
from urllib.parse import urlparse

from healthimaging_df.core import logs
from healthimaging_df.errors import QueryValidationError

MEDICAL_IMAGING = "medical-imaging"
_RETRIES = {"mode": "standard", "max_attempts": 10}  # botocore's standard mode: throttling, 5xx

__all__ = [
    "MEDICAL_IMAGING",
    "client",
    "credentials",
    "delta_storage_options",
    "identity",
    "is_aws_endpoint",
    "make_client",
    "named",
    "resolve",
    "s3_filesystem",
]


def resolve(boto3_session: Any = None) -> Any:
    """*boto3_session*, or the default boto3 session (``boto3.Session()``) when None."""
    if boto3_session is not None:
        return boto3_session
    import boto3

    return boto3.Session()


def named(profile: str | None = None, region: str | None = None) -> Any:
    """A boto3 session of *profile* and *region* (the environment's for None): a caller's session.

    The command line makes its session here from ``--profile`` and ``--region``; an unknown
    profile is a ``QueryValidationError`` (field ``profile``).
    """
    import boto3
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.Session(profile_name=profile, region_name=region)
    except ProfileNotFound:
        raise QueryValidationError("profile", "no such profile in the AWS configuration") from None


def is_aws_endpoint(url: str | None) -> bool:
    """Whether *url* is an AWS endpoint (else a local service, moto, MinIO, a proxy)."""
    host = urlparse(url or "").hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def client(
    service: str,
    boto3_session: Any = None,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    max_concurrency: int = 8,
) -> Any:
    """A boto3 client of *service* from *boto3_session*: the one way the package makes a client.

    Standard-mode retries (throttling and 5xx, 10 attempts), a connection pool for
    *max_concurrency* threads, our name in the user agent. The endpoint is *endpoint_url*, else
    what the session configures (``AWS_ENDPOINT_URL_<SERVICE>``, ``AWS_ENDPOINT_URL``, a profile's
    ``endpoint_url``), else AWS. A given *endpoint_url* turns the ``runtime-`` host prefix of
    ``medical-imaging`` off (the local service answers on the host it was given). A configured
    endpoint that is not AWS keeps botocore's setting (``AWS_DISABLE_HOST_PREFIX_INJECTION``), as
    an unmodified boto3 client would; left on, every request would go to ``runtime-<host>``, so
    that is a ``QueryValidationError`` here, before any request.
    """
    from botocore.config import Config

    from healthimaging_df._version import __version__  # importlib.metadata: not at import time

    logs.refresh()  # loggers of botocore modules imported since then are covered too
    session = resolve(boto3_session)
    settings: dict[str, Any] = {
        "retries": dict(_RETRIES),
        "max_pool_connections": max(10, max_concurrency + 2),
        "user_agent_extra": f"healthimaging-df/{__version__}",
    }
    if endpoint_url:
        settings["inject_host_prefix"] = False
    made = session.client(
        service, region_name=region, endpoint_url=endpoint_url, config=Config(**settings)
    )
    if (
        service == MEDICAL_IMAGING
        and made.meta.config.inject_host_prefix
        and not is_aws_endpoint(made.meta.endpoint_url)
    ):
        raise QueryValidationError(
            "endpoint_url",
            "the endpoint from AWS_ENDPOINT_URL_MEDICAL_IMAGING (or the profile) is not an AWS "
            "host, and botocore would send to runtime-<host>: set "
            "AWS_DISABLE_HOST_PREFIX_INJECTION=true, or pass the endpoint as endpoint_url",
        )
    return made


def make_client(
    client_: Any, boto3_session: Any, max_concurrency: int = 8, endpoint_url: str | None = None
) -> Any:
    """*client_*, or a ``medical-imaging`` client from *boto3_session* (see :func:`client`)."""
    if client_ is not None:
        logs.refresh()
        return client_
    return client(
        MEDICAL_IMAGING, boto3_session, endpoint_url=endpoint_url, max_concurrency=max_concurrency
    )


def credentials(source: Any = None) -> Any:
    """The current credentials (``ReadOnlyCredentials``) of a boto3 session or client; None if none.

    *source* is a boto3 session, a botocore client, or None (the default session). Temporary
    credentials are refreshed here when they near expiry (botocore's ``RefreshableCredentials``):
    call it per operation, never once for a long-lived object.
    """
    get = getattr(source, "_get_credentials", None)  # a botocore client
    found = get() if callable(get) else resolve(source).get_credentials()
    return None if found is None else found.get_frozen_credentials()


def identity(client_: Any) -> str:
    """Whose quota *client_*'s requests draw on: the account when known, else the credentials.

    HealthImaging's quotas are per account. The account comes from the credentials when the
    configuration names it (``aws_account_id``, ``AWS_ACCOUNT_ID``, SSO: botocore's
    ``account_id``); otherwise the access key stands for it (a digest, never the key), so two
    accounts in one process are paced apart, and two keys of one account too (each at the full
    rate: pass a lower ``max_tps`` to share one quota between them). No request is sent (STS
    ``GetCallerIdentity`` would cost one per credential set). A client that is not botocore's,
    or has no credentials, is an identity of its own.
    """
    get = getattr(client_, "_get_credentials", None)
    found = get() if callable(get) else None
    if found is None:
        return f"client-{id(client_)}" if not callable(get) else "anonymous"
    account = getattr(found, "account_id", None)
    if account:
        return f"account-{account}"
    access_key = getattr(found, "access_key", None) or ""
    return "key-" + hashlib.sha256(str(access_key).encode()).hexdigest()[:16]


_filesystems: dict[tuple[Any, ...], Any] = {}
_filesystems_lock = threading.Lock()


def s3_filesystem(
    boto3_session: Any = None, *, region: str | None = None, endpoint_url: str | None = None
) -> Any:
    """A pyarrow ``S3FileSystem`` with the session's current credentials, region and endpoint.

    pyarrow takes static keys, so call this per operation: it returns the file system made for
    the same credentials (cached), or a new one once botocore has refreshed them.
    """
    from pyarrow import fs as pafs

    s3 = client("s3", boto3_session, region=region, endpoint_url=endpoint_url)
    frozen = credentials(boto3_session)
    endpoint = urlparse(s3.meta.endpoint_url)
    key = (tuple(frozen) if frozen is not None else None, s3.meta.region_name, endpoint.geturl())
    with _filesystems_lock:
        found = _filesystems.get(key)
        if found is None:
            found = pafs.S3FileSystem(
                access_key=frozen.access_key if frozen else None,
                secret_key=frozen.secret_key if frozen else None,
                session_token=frozen.token if frozen else None,
                anonymous=frozen is None,
                region=s3.meta.region_name,
                endpoint_override=endpoint.netloc,
                scheme=endpoint.scheme or "https",
            )
            if len(_filesystems) > 32:
                _filesystems.clear()
            _filesystems[key] = found
        return found


def delta_storage_options(
    boto3_session: Any = None,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    dynamodb_lock_table: str | None = None,
) -> dict[str, str]:
    """delta-rs ``storage_options`` from the session: its current credentials, region, endpoints.

    Call it per operation (credentials are as of now). Commits use S3's conditional PUT
    (``If-None-Match``); with *dynamodb_lock_table* they are coordinated through that DynamoDB
    table instead (delta-rs' ``dynamodb`` locking provider, for stores without conditional
    writes), reached through the session's DynamoDB endpoint and region.
    """
    s3 = client("s3", boto3_session, region=region, endpoint_url=endpoint_url)
    options: dict[str, str] = {"AWS_REGION": str(s3.meta.region_name or "us-east-1")}
    frozen = credentials(boto3_session)
    if frozen is not None:
        options["AWS_ACCESS_KEY_ID"] = str(frozen.access_key)
        options["AWS_SECRET_ACCESS_KEY"] = str(frozen.secret_key)
        if frozen.token:
            options["AWS_SESSION_TOKEN"] = str(frozen.token)
    endpoint = str(s3.meta.endpoint_url or "")
    if endpoint_url is not None or (endpoint and not is_aws_endpoint(endpoint)):
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if dynamodb_lock_table is None:
        options["conditional_put"] = "etag"
        return options
    options["AWS_S3_LOCKING_PROVIDER"] = "dynamodb"
    options["DELTA_DYNAMO_TABLE_NAME"] = dynamodb_lock_table
    dynamodb = client("dynamodb", boto3_session, region=region)
    options["AWS_REGION_DYNAMODB"] = str(dynamodb.meta.region_name or options["AWS_REGION"])
    if not is_aws_endpoint(dynamodb.meta.endpoint_url):
        options["AWS_ENDPOINT_URL_DYNAMODB"] = str(dynamodb.meta.endpoint_url)
    return options
