"""``pneumo dicom listen`` (a storage SCP that sends results back) and ``pneumo dicom poll`` (DICOMweb)."""

from __future__ import annotations

import argparse
import logging

from pneumo.cli.common import HelpFormatter, Subcommands, add_audit_arguments, add_command, add_runtime_argument
from pneumo.cli.serving import port_number


def add_dicom(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "dicom",
        cmd_dicom,
        "pneumo on the hospital network: read each chest film a PACS or modality sends, and store the "
        "result back as DICOM (a structured report and a Grad-CAM secondary capture)",
    )
    actions = p.add_subparsers(dest="dicom_command", metavar="ACTION", required=True)
    listen = actions.add_parser(
        "listen",
        help="a DICOM storage SCP (C-STORE, C-ECHO) for CR and DX images; results sent by C-STORE",
        description="A DICOM storage SCP for CR and DX images: each instance is spooled to disk before "
        "success is answered, read in arrival order, and its results (an SR and a secondary capture, "
        "new series in the same study) are stored at --send-to.",
        formatter_class=HelpFormatter,
    )
    listen.set_defaults(handler=cmd_dicom_listen)
    listen.add_argument("model", help="model folder (RUN/model) or run folder")
    listen.add_argument("--ae-title", default="PNEUMO", help="this node's AE title (associations must name it)")
    listen.add_argument("--host", default="0.0.0.0", help="address to listen on")
    listen.add_argument("--port", type=port_number, default=11112, help="TCP port")
    listen.add_argument("--send-to", required=True, metavar="AET@HOST:PORT", help="where results are stored (the PACS)")
    _common(listen)
    listen.add_argument(
        "--queue", type=int, default=64, help="films allowed to wait; past it the SCP answers Out of Resources (0xA700)"
    )
    listen.add_argument(
        "--spool",
        default=None,
        help="folder for received films until their results are delivered (default: MODEL/dicom_spool)",
    )
    listen.add_argument("--workers", type=int, default=1, help="films read at once")
    poll = actions.add_parser(
        "poll",
        help="DICOMweb: QIDO-RS for new CR/DX instances, WADO-RS to fetch, STOW-RS to store the results",
        description="The DICOMweb alternative to listen: ask the archive (QIDO-RS) for CR and DX instances "
        "that arrived since the last poll, fetch each (WADO-RS), read it, and store its results (STOW-RS). "
        "The poll state (what was seen) survives restarts.",
        formatter_class=HelpFormatter,
    )
    poll.set_defaults(handler=cmd_dicom_poll)
    poll.add_argument("model", help="model folder (RUN/model) or run folder")
    poll.add_argument(
        "--dicomweb", required=True, metavar="URL", help="the DICOMweb root, e.g. http://pacs:8042/dicom-web"
    )
    poll.add_argument("--state", default=None, help="poll state file (default: MODEL/dicomweb_poll.json)")
    poll.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    poll.add_argument("--once", action="store_true", help="poll once, read what is new, and exit")
    _common(poll)


def _common(p: argparse.ArgumentParser) -> None:
    add_runtime_argument(p)
    add_audit_arguments(p)
    p.add_argument(
        "--uid-root",
        default=None,
        help="UID root for the results' new UIDs (default: pydicom's, 1.2.826.0.1.3680043.8.498.)",
    )
    p.add_argument("--no-gradcam", action="store_true", help="secondary capture without the Grad-CAM map (faster)")


def cmd_dicom(args: argparse.Namespace) -> int:  # argparse requires an ACTION: never reached
    return 2


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it logs at INFO/DEBUG what peers send


def cmd_dicom_listen(args: argparse.Namespace) -> int:
    from pneumo.dicom_node.node import listen
    from pneumo.dicom_node.send import check_ae_title, parse_destination
    from pneumo.errors import PneumoError

    if args.queue < 1 or args.workers < 1:
        raise PneumoError("--queue and --workers must be at least 1")
    destination = parse_destination(args.send_to)
    _logging()
    listen(
        args.model,
        destination,
        ae_title=check_ae_title(args.ae_title),
        host=args.host,
        port=args.port,
        spool_dir=args.spool,
        queue_limit=args.queue,
        runtime=args.runtime,
        db=args.db,
        audit=not args.no_audit,
        uid_root=args.uid_root,
        workers=args.workers,
        gradcam=not args.no_gradcam,
    )
    return 0


def cmd_dicom_poll(args: argparse.Namespace) -> int:
    from pneumo.dicom_node.poll import poll

    _logging()
    poll(
        args.model,
        args.dicomweb,
        state=args.state,
        interval=args.interval,
        once=args.once,
        runtime=args.runtime,
        db=args.db,
        audit=not args.no_audit,
        uid_root=args.uid_root,
        gradcam=not args.no_gradcam,
    )
    return 0
