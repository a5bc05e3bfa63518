"""``pneumo export``, ``card`` and ``models``: a model folder's other files, and the backbones there are."""

from __future__ import annotations

import argparse

from pneumo.cli.common import Subcommands, add_command, emit_json


def add_export(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "export",
        cmd_export,
        "write the model as one ONNX graph (uint8 films in, calibrated probabilities out), checked against PyTorch",
    )
    p.add_argument("model", help="model folder (RUN/model), run folder or ensemble")
    p.add_argument("--onnx", default=None, metavar="OUT.onnx", help="where to write it (default: MODEL/model.onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    p.add_argument(
        "--check-on", default=None, metavar="FOLDER", help="films to check parity on (default: the bundled sample)"
    )
    p.add_argument("--json", action="store_true", help="print the files written and the parity figures as JSON")


def cmd_export(args: argparse.Namespace) -> int:
    from pneumo.infer.onnx import export_onnx, format_export

    report = export_onnx(args.model, args.onnx, opset=args.opset, check_on=args.check_on, progress=not args.json)
    emit_json(report) if args.json else print(format_export(report))
    return 0


def add_card(sub: Subcommands) -> None:
    p = add_command(
        sub, "card", cmd_card, "(re)write MODEL_CARD.md in a model folder from what it and its run recorded"
    )
    p.add_argument("model", help="model folder (RUN/model) or run folder")


def cmd_card(args: argparse.Namespace) -> int:
    from pneumo.infer.model_card import write_model_card

    print(f"model card written to {write_model_card(args.model)}")
    return 0


def add_models(sub: Subcommands) -> None:
    p = add_command(sub, "models", cmd_models, "list the supported backbones and where their weights come from")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def cmd_models(args: argparse.Namespace) -> int:
    from pneumo.nets.models import BACKBONES

    rows = [
        {"name": b.name, "weights": b.weights, "note": b.note, "trainable_stages": b.last_stages}
        for b in BACKBONES.values()
    ]
    if args.json:
        emit_json(rows)
    else:
        for r in rows:
            print(f"{r['name']:<20} {r['weights']:<6} {r['note']}\n{'':<28} --trainable-stages {r['trainable_stages']}")
    return 0
