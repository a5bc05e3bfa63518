"""``pneumo audit DB`` (the summary of the audit trail) and ``pneumo audit export DB --out FOLDER``."""

from __future__ import annotations

import argparse

from pneumo.cli.common import Subcommands, add_command, emit_json
from pneumo.errors import PneumoError


def add_audit(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "audit",
        cmd_audit,
        "the audit trail: readings per model, decision rates, agreement with readers, sensitivity and "
        "specificity against readers' labels, weekly drift; or 'audit export DB --out FOLDER'",
    )
    p.usage = (
        "pneumo audit DB [--json] [--model FOLDER]\n"
        "       pneumo audit export DB --out FOLDER [--images FOLDER] [--include-agreed] [--json]"
    )
    p.add_argument(
        "target",
        nargs="+",
        metavar="DB",
        help="the audit database: a SQLite file, a model folder or a postgresql:// URL",
    )
    p.add_argument("--json", action="store_true", help="print the summary (or what was exported) as JSON")
    p.add_argument(
        "--model", default=None, help="model folder for the drift reference (default: where each model was loaded)"
    )
    p.add_argument("--out", default=None, help="export: folder for the class folders that pneumo train takes")
    p.add_argument("--images", default=None, help="export: the kept images (default: audit_images beside DB)")
    p.add_argument(
        "--include-agreed", action="store_true", help="export: also the images readers confirmed, not only corrected"
    )


def cmd_audit(args: argparse.Namespace) -> int:
    """``pneumo audit DB`` (the summary) or ``pneumo audit export DB --out FOLDER``."""
    if args.target[0] == "export":
        if len(args.target) != 2 or not args.out:
            raise PneumoError("usage: pneumo audit export DB --out FOLDER")
        from pneumo.audit.export import export_corrected

        result = export_corrected(args.target[1], args.out, images=args.images, include_agreed=args.include_agreed)
        classes = ", ".join(f"{label} {n}" for label, n in sorted(result["per_class"].items()))
        emit_json(result) if args.json else print(
            f"{result['exported']} corrected images written to {result['out']}"
            + (f" ({classes})" if classes else "")
            + "".join(f"\n  {note}" for note in result["notes"])
        )
        return 0
    if len(args.target) != 1:
        raise PneumoError("usage: pneumo audit DB [--json] (or pneumo audit export DB --out FOLDER)")
    from pneumo.audit.summary import format_summary, summarise

    report = summarise(args.target[0], model_dir=args.model)
    emit_json(report) if args.json else print(format_summary(report))
    return 0
