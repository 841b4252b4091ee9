"""``healthimaging-df local serve``: run the local HealthImaging service until interrupted."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from healthimaging_df.local.backend import Backend
from healthimaging_df.local.faults import Faults
from healthimaging_df.local.generate import generate_image_sets, load_jsonl
from healthimaging_df.local.server import LocalService

__all__ = ["register", "serve"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``local`` command group (with ``serve``) to the top-level subparsers."""
    local = commands.add_parser("local", help="the local HealthImaging service for offline work")
    sub = local.add_subparsers(dest="local_command", metavar="SUBCOMMAND", required=True)
    serve_parser = sub.add_parser(
        "serve",
        help="serve a seeded datastore on 127.0.0.1 until interrupted",
        description="Serve a generated datastore over the medical-imaging REST API on "
        "127.0.0.1, print the endpoint and the environment to export, run until Ctrl-C.",
    )
    serve_parser.add_argument("--image-sets", type=int, default=1000, metavar="N")
    serve_parser.add_argument("--seed", type=int, default=0, metavar="S")
    serve_parser.add_argument("--port", type=int, default=0, metavar="P", help="0 = any free")
    serve_parser.add_argument("--latency-ms", type=float, default=0.0, metavar="MS")
    serve_parser.add_argument("--tps", type=float, default=None, help="rate limit (429 beyond)")
    serve_parser.add_argument("--burst", type=int, default=None, help="token-bucket capacity")
    serve_parser.add_argument("--error-rate", type=float, default=0.0, metavar="F")
    serve_parser.add_argument(
        "--window-tps", type=int, default=None, metavar="N", help="strict 1-second window limit"
    )
    serve_parser.add_argument(
        "--documented-quotas",
        action="store_true",
        help="one token bucket per operation at the documented quotas",
    )
    serve_parser.add_argument(
        "--malformed-rate", type=float, default=0.0, metavar="F", help="malformed search pages"
    )
    serve_parser.add_argument(
        "--update-rate", type=float, default=0.0, metavar="R", help="updates per search request"
    )
    serve_parser.add_argument(
        "--jsonl", default=None, metavar="PATH", help="load image sets from JSON Lines instead"
    )
    serve_parser.set_defaults(handler=serve)


def serve(args: argparse.Namespace, *, stop: threading.Event | None = None) -> int:
    """Run the service for ``args``; return 0 on SIGINT/SIGTERM (or when ``stop`` is set)."""
    try:
        faults = Faults(
            latency_ms=args.latency_ms,
            tps=args.tps,
            burst=args.burst,
            error_rate=args.error_rate,
            window_tps=args.window_tps,
            documented_quotas=args.documented_quotas,
            malformed_rate=args.malformed_rate,
            update_rate=args.update_rate,
        )
    except ValueError as error:
        print(f"healthimaging-df local serve: {error}", file=sys.stderr)
        return 2
    if args.image_sets < 0:
        print("healthimaging-df local serve: --image-sets must be >= 0", file=sys.stderr)
        return 2
    backend = Backend()
    datastore_id = backend.create_datastore("seeded")
    records = (
        load_jsonl(args.jsonl) if args.jsonl else generate_image_sets(args.image_sets, args.seed)
    )
    backend.add_image_sets(datastore_id, records)
    service = LocalService(backend, port=args.port, faults=faults)
    service.datastore_id = datastore_id
    done = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        with service:
            print(f"endpoint_url: {service.endpoint_url}")
            print(f"datastore_id: {datastore_id}  ({len(records)} image sets)")
            print("export these to point an unmodified boto3 client at it:")
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
