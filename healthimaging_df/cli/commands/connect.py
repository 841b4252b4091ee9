"""Where a command's requests go: a boto3 client for AWS, or the bundled local service."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from healthimaging_df.cli.commands.options import (
    LOCAL_IMAGE_SETS,
    LOCAL_SEED,
    ConfigError,
    UsageError,
)

if TYPE_CHECKING:
    from healthimaging_df.local import LocalService

log = logging.getLogger("healthimaging_df.cli")


@dataclass
class Connection:
    """A ready ``medical-imaging`` client and the datastore the command works on ("" if unknown)."""

    client: Any
    datastore_id: str


class Target:
    """Where requests go: AWS (profile, region, endpoint) or an in-process local service.

    The datastore is known before connecting, so a query is validated before any set-up.
    """

    def __init__(
        self, args: argparse.Namespace, datastore_id: str | None = None, *, required: bool = True
    ) -> None:
        self.args = args
        self._local: LocalService | None = None
        given = datastore_id or getattr(args, "datastore_id", None)
        if args.local:
            if args.endpoint_url or args.profile:
                raise UsageError("--local runs without AWS: leave out --endpoint-url and --profile")
            from healthimaging_df.local import LocalService

            self._local = LocalService.seeded(image_sets=LOCAL_IMAGE_SETS, seed=LOCAL_SEED)
            given = given or self._local.datastore_id
        if required and not given:
            raise UsageError("--datastore-id is required (or --local to try the bundled service)")
        self.datastore_id: str = given or ""

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """Yield a client; a local service runs for the duration of the ``with`` block."""
        if self._local is not None:
            # QIDO-RS lives on the service's own DICOMweb address, found through the env.
            with self._local as service, service.dicomweb_environment():
                log.info("local service at %s", service.endpoint_url)
                with dicomweb_address(self.args):
                    yield Connection(service.client(), self.datastore_id)
            return
        with dicomweb_address(self.args):
            yield Connection(aws_client(self.args), self.datastore_id)


@contextmanager
def dicomweb_address(args: argparse.Namespace) -> Iterator[None]:
    """``--dicomweb-endpoint-url`` as ``AWS_ENDPOINT_URL_DICOM_MEDICAL_IMAGING`` for the command.

    Every library call of the command (queries, snapshots, series attributes, doctor) then finds
    DICOMweb there; the variable is restored when the command ends.
    """
    url = getattr(args, "dicomweb_endpoint_url", None)
    if not url:
        yield
        return
    from healthimaging_df.dicomweb import ENV_VAR, resolve_endpoint
    from healthimaging_df.errors import QueryValidationError

    try:
        resolve_endpoint(dicomweb_endpoint_url=url)
    except QueryValidationError as error:
        raise UsageError(f"--dicomweb-endpoint-url: {error.rule}") from None
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


def aws_client(args: argparse.Namespace) -> Any:
    """A ``medical-imaging`` client from --profile, --region and --endpoint-url (or the env)."""
    from botocore.exceptions import NoRegionError

    from healthimaging_df.aws import make_client
    from healthimaging_df.aws import session as aws_session
    from healthimaging_df.aws.limiter import MAX_CONCURRENCY
    from healthimaging_df.errors import QueryValidationError

    try:
        session = aws_session.named(args.profile, args.region)
    except QueryValidationError:
        raise ConfigError("the profile given by --profile or AWS_PROFILE does not exist") from None
    try:
        threads = args.max_concurrency or MAX_CONCURRENCY
        client = make_client(None, session, threads, endpoint_url=args.endpoint_url)
    except NoRegionError:
        raise ConfigError(
            "no AWS region: pass --region, set AWS_DEFAULT_REGION, or set region in the "
            "profile (~/.aws/config, AWS_PROFILE)"
        ) from None
    except QueryValidationError as exc:  # a configured endpoint botocore would prefix
        raise ConfigError(exc.rule.replace("endpoint_url", "--endpoint-url")) from None
    except ValueError:
        raise ConfigError("--endpoint-url is not a valid URL") from None
    if session.get_credentials() is None:
        raise ConfigError(
            "no AWS credentials: pass --profile, or set AWS_PROFILE or AWS_ACCESS_KEY_ID"
        )
    log.info(
        "client: region %s, endpoint %s",
        client.meta.region_name,
        client.meta.endpoint_url,
    )
    return client
