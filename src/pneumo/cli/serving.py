"""``pneumo serve``: the web page and JSON API, with the limits that keep it up under load."""

from __future__ import annotations

import argparse
import os

from pneumo.cli.common import Subcommands, add_audit_arguments, add_command, add_runtime_argument


def port_number(text: str) -> int:
    """``--port``, refused here rather than by bind() after the model has loaded."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a TCP port is a whole number in 0..65535, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is a whole number in 0..65535, not {port}")
    return port


def add_serve(sub: Subcommands) -> None:
    p = add_command(sub, "serve", cmd_serve, "web page and JSON API for reading an X-ray")
    p.add_argument("model", help="model folder (RUN/model) or run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, in MB")
    p.add_argument("--workers", type=int, default=2, help="inference threads")
    p.add_argument("--queue", type=int, default=32, help="requests allowed to wait before 503")
    p.add_argument("--max-megapixels", type=float, default=36.0, help="larger images are refused (413)")
    p.add_argument(
        "--pixel-budget-megapixels", type=float, default=72.0, help="decoded at once across workers; past it, 503"
    )
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds for a request's body (then 408)")
    p.add_argument("--max-connections", type=int, default=100, help="past it the longest-idle one is closed")
    add_runtime_argument(p)
    add_audit_arguments(p)
    p.add_argument(
        "--keep-images",
        action="store_true",
        help="also store each read image (its pixels as PNG, no metadata) beside the audit database, "
        "so that readers' corrections can be exported for training (pneumo audit export)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="access token the API requires (header 'Authorization: Bearer TOKEN'); default $PNEUMO_TOKEN; "
        "required when --host is not loopback",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from pneumo.serve.app import serve
    from pneumo.serve.server import ConnectionLimits

    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        inference_workers=args.workers,
        queue_limit=args.queue,
        db=args.db,
        audit=not args.no_audit,
        keep_images=args.keep_images,
        token=args.token or os.environ.get("PNEUMO_TOKEN") or None,
        max_pixels=int(args.max_megapixels * 1e6),
        pixel_budget=int(args.pixel_budget_megapixels * 1e6),
        limits=ConnectionLimits(
            header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, max_connections=args.max_connections
        ),
        runtime=args.runtime,
    )
    return 0
