"""``healthimaging-df local serve`` and ``local dump``: the local service from a shell.

``serve`` runs a generated (or ``--data`` JSON Lines) datastore until interrupted; ``dump`` writes
a generated datastore as JSON Lines, for a cohort script's own test data. The service modules are
imported only when a command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from healthimaging_df.local.faults import Faults

__all__ = ["dump", "register", "serve"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``local`` command group (with ``serve``) to the top-level subparsers."""
    local = commands.add_parser("local", help="the local HealthImaging service for offline work")
    sub = local.add_subparsers(dest="local_command", metavar="SUBCOMMAND", required=True)
    serve_parser = sub.add_parser(
        "serve",
        help="serve a seeded datastore on 127.0.0.1 until interrupted",
        description="Serve a generated datastore on 127.0.0.1 over the medical-imaging REST API "
        "and, on a second address, DICOMweb QIDO-RS; print both addresses, the credentials "
        "requests must be signed with, and the environment to export; run until Ctrl-C.",
    )
    _generator_options(serve_parser)
    serve_parser.add_argument(
        "--port",
        type=_port,
        default=0,
        metavar="P",
        help="TCP port of the API address on 127.0.0.1 (0 to 65535; 0 = any free one)",
    )
    serve_parser.add_argument(
        "--dicomweb-port",
        type=_port,
        default=0,
        metavar="P",
        help="TCP port of the DICOMweb (QIDO-RS) address (0 to 65535; 0 = any free one)",
    )
    serve_parser.add_argument(
        "--access-key-id",
        default=None,
        metavar="ID",
        help="the access key id requests must be signed with (default: the documented "
        "local pair, AKIALOCALHEALTHIMAGING)",
    )
    serve_parser.add_argument(
        "--secret-access-key",
        default=None,
        metavar="SECRET",
        help="its secret (default: local-healthimaging-secret)",
    )
    serve_parser.add_argument(
        "--deny",
        action="append",
        default=[],
        metavar="ACTION",
        help="answer 403 AccessDeniedException for this IAM action, e.g. "
        "medical-imaging:SearchDICOMStudies (repeatable; the prefix is optional)",
    )
    serve_parser.add_argument(
        "--no-qido-cap",
        action="store_true",
        help="serve every QIDO-RS record (default: at most 10,000 per query, as the older "
        "developer guide states)",
    )
    serve_parser.add_argument(
        "--events-queue-url",
        default=None,
        metavar="URL",
        help="send every image-set change as an EventBridge-shaped event to this SQS queue",
    )
    serve_parser.add_argument(
        "--sqs-endpoint-url",
        default=None,
        metavar="URL",
        help="the SQS endpoint for --events-queue-url (default: the queue URL's host)",
    )
    serve_parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay added to every response, in milliseconds (default: 0)",
    )
    serve_parser.add_argument(
        "--tps",
        type=float,
        default=None,
        metavar="N",
        help="rate limit in requests per second; beyond it, 429 ThrottlingException (default: none)",
    )
    serve_parser.add_argument(
        "--burst",
        type=int,
        default=None,
        metavar="N",
        help="token-bucket capacity for --tps: requests allowed at once (default: --tps)",
    )
    serve_parser.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of requests (0 to 1) answered with a 500 InternalServerException",
    )
    serve_parser.add_argument(
        "--data",
        "--jsonl",
        dest="data",
        default=None,
        metavar="FILE.jsonl",
        help="serve the image-set summaries in FILE.jsonl (one per line, as `local dump` "
        "writes) instead of generated ones",
    )
    serve_parser.add_argument(
        "--window-tps",
        type=int,
        default=None,
        metavar="N",
        help="strict limit: at most N requests in any one-second window, else 429",
    )
    serve_parser.add_argument(
        "--documented-quotas",
        action="store_true",
        help="one token bucket per operation at the documented quotas (search 25/s, ...)",
    )
    serve_parser.add_argument(
        "--malformed-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of search pages (0 to 1) answered with a malformed 200 body",
    )
    serve_parser.add_argument(
        "--update-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="image sets given a new version before each search page (fractions: a probability)",
    )
    serve_parser.set_defaults(handler=serve)
    dump_parser = sub.add_parser(
        "dump",
        help="write a generated datastore as JSON Lines (for `local serve --data`)",
        description="Write the image-set summaries `local serve` would generate, one JSON object "
        "per line (timestamps ISO-8601 UTC), to FILE: edit them into a script's own test data and "
        "serve them with `local serve --data FILE`. The data is synthetic (no real patient).",
    )
    dump_parser.add_argument(
        "file", metavar="FILE.jsonl", help="the file to write ('-' for stdout)"
    )
    _generator_options(dump_parser)
    dump_parser.set_defaults(handler=dump)


def _port(text: str) -> int:
    """An argparse type: a TCP port from 0 to 65535 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer from 0 to 65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be an integer from 0 to 65535")
    return value


def _generator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-sets",
        type=int,
        default=1000,
        metavar="N",
        help="how many synthetic image sets to generate (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="random seed: the same seed gives the same data (default: %(default)s)",
    )


def dump(args: argparse.Namespace) -> int:
    """Write ``--image-sets`` generated summaries to ``args.file`` as JSON Lines; return 0 or 2."""
    from healthimaging_df.local.generate import dump_jsonl, generate_image_sets

    if args.image_sets < 0:
        print("healthimaging-df local dump: --image-sets must be >= 0", file=sys.stderr)
        return 2
    records = generate_image_sets(args.image_sets, args.seed)
    if args.file == "-":
        count = dump_jsonl(records, "/dev/stdout")
    else:
        if not Path(args.file).parent.is_dir():
            print(
                f"healthimaging-df local dump: the directory of {args.file} does not exist",
                file=sys.stderr,
            )
            return 2
        count = dump_jsonl(records, args.file)
    print(f"{count} image sets -> {args.file}", file=sys.stderr)
    return 0


def _faults(args: argparse.Namespace) -> Faults:
    """The fault settings the options ask for (``ValueError`` if they cannot be honoured).

    Each fault option's dest is the :class:`Faults` field it sets; ``--seed`` is the data's.
    """
    from healthimaging_df.local.faults import Faults

    return Faults(
        **{
            each.name: getattr(args, each.name)
            for each in fields(Faults)
            if each.name != "seed" and hasattr(args, each.name)
        }
    )


def serve(args: argparse.Namespace, *, stop: threading.Event | None = None) -> int:
    """Run the service for ``args``; return 0 on SIGINT/SIGTERM (or when ``stop`` is set)."""
    from healthimaging_df.local.backend import Backend, BackendError
    from healthimaging_df.local.generate import generate_image_sets, load_jsonl
    from healthimaging_df.local.qido import OLDER_RECORD_CAP
    from healthimaging_df.local.server import LocalService, seeded_datastore_id

    try:
        faults = _faults(args)
    except ValueError as error:
        print(f"healthimaging-df local serve: {error}", file=sys.stderr)
        return 2
    if args.image_sets < 0:
        print("healthimaging-df local serve: --image-sets must be >= 0", file=sys.stderr)
        return 2
    if (args.access_key_id is None) != (args.secret_access_key is None):
        print(
            "healthimaging-df local serve: give --access-key-id and --secret-access-key together",
            file=sys.stderr,
        )
        return 2
    if args.sqs_endpoint_url is not None and args.events_queue_url is None:
        print(
            "healthimaging-df local serve: --sqs-endpoint-url needs --events-queue-url",
            file=sys.stderr,
        )
        return 2
    backend = Backend()
    if args.data is not None:
        try:
            records = load_jsonl(args.data)
            digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
        except (OSError, ValueError) as error:  # names the file and line, never a value
            reason = error.strerror if isinstance(error, OSError) else str(error)
            print(f"healthimaging-df local serve: --data {args.data}: {reason}", file=sys.stderr)
            return 2
        datastore_id = hashlib.sha256(f"data:{digest}".encode()).hexdigest()[:32]
    else:
        records = generate_image_sets(args.image_sets, args.seed)
        datastore_id = seeded_datastore_id(args.image_sets, args.seed)
    backend.create_datastore("seeded", datastore_id=datastore_id)
    try:
        backend.add_image_sets(datastore_id, records)
    except (ValueError, BackendError) as error:  # a malformed or repeated record
        print(f"healthimaging-df local serve: --data {args.data}: {error}", file=sys.stderr)
        return 2
    credentials = {}
    if args.access_key_id is not None:
        credentials = {
            "access_key_id": args.access_key_id,
            "secret_access_key": args.secret_access_key,
        }
    try:
        service = LocalService(
            backend,
            port=args.port,
            dicomweb_port=args.dicomweb_port,
            faults=faults,
            deny=args.deny,
            qido_record_cap=None if args.no_qido_cap else OLDER_RECORD_CAP,
            events_queue_url=args.events_queue_url,
            sqs_endpoint_url=args.sqs_endpoint_url,
            **credentials,
        )
    except ValueError as error:
        print(f"healthimaging-df local serve: {error}", file=sys.stderr)
        return 2
    service.datastore_id = datastore_id
    done = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        try:
            service.start()
        except OSError as error:  # the port is taken or not ours to bind
            print(f"healthimaging-df local serve: cannot listen: {error.strerror}", file=sys.stderr)
            return 2
        with service:
            access_key_id, secret = service.credentials
            print(f"endpoint_url: {service.endpoint_url}")
            print(f"datastore_id: {datastore_id}  ({len(records)} image sets)")
            print(f"dicomweb_endpoint_url: {service.dicomweb_endpoint_url}")
            print(f"credentials: {access_key_id} / {secret}  (requests must be SigV4-signed)")
            if service.deny:
                print(f"denied: {', '.join(sorted('medical-imaging:' + a for a in service.deny))}")
            print("export these to point an unmodified boto3 client (and healthimaging-df) at it:")
            for name, value in service.env().items():
                print(f"  export {name}={value}")
            print("Ctrl-C to stop.", flush=True)
            while not done.wait(0.2):
                time.sleep(0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("stopped.", flush=True)
    return 0
