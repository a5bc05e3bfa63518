"""``pneumo ensemble``, ``report`` and ``interpret``: what is made of finished run folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumo.cli.common import (
    Subcommands,
    add_command,
    add_export_argument,
    emit_json,
    export_model,
    print_validation,
)
from pneumo.decision import DEFAULT_THRESHOLD_RULE


def add_ensemble(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "ensemble",
        cmd_ensemble,
        "several runs validated on the same images as one model "
        "(mean probability, threshold chosen on their validation predictions)",
    )
    p.add_argument("runs", nargs="+", help="finished run folders (same data, split and seed)")
    p.add_argument("--out", required=True, help="folder for the ensemble (its model folder is OUT/model)")
    p.add_argument(
        "--threshold",
        default=DEFAULT_THRESHOLD_RULE,
        help="rule for the threshold: youden | sensitivity:X | specificity:X | fixed:X",
    )
    p.add_argument("--json", action="store_true", help="print the ensemble's validation as JSON")
    add_export_argument(p)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from pneumo.infer.ensemble import make_ensemble

    report = make_ensemble(args.runs, args.out, threshold=args.threshold)
    exported = export_model(Path(args.out) / "model", args)
    if args.json:
        emit_json({**report, "onnx_export": exported})
    else:
        print(f"ensemble model: {Path(args.out) / 'model'}")
        print_validation(report)
        print(exported)
    return 0


def add_report(sub: Subcommands) -> None:
    p = add_command(sub, "report", cmd_report, "one offline HTML page summarising a training run")
    p.add_argument("run", help="run folder written by pneumo train")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")


def cmd_report(args: argparse.Namespace) -> int:
    from pneumo.report.html import write_report

    print(f"report written to {write_report(Path(args.run), Path(args.out) if args.out else None)}")
    return 0


def add_interpret(sub: Subcommands) -> None:
    p = add_command(sub, "interpret", cmd_interpret, "top losses and confusion matrix of a run's validation set")
    p.add_argument("run", help="run folder written by pneumo train")
    p.add_argument("--out", default=None, help="folder for top_losses.png and confusion_matrix.png (default: RUN)")
    p.add_argument("--k", type=int, default=9, help="how many of the highest-loss images to show")
    p.add_argument("--json", action="store_true", help="print the top losses and the matrix as JSON")


def cmd_interpret(args: argparse.Namespace) -> int:
    from pneumo.report.interpret import interpret_run

    result = interpret_run(args.run, out=args.out, k=args.k)
    emit_json(result) if args.json else print(
        f"top losses: {result['top_losses_png']}\nconfusion matrix: {result['confusion_matrix_png']}"
    )
    return 0
