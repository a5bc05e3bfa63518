"""What the command modules share: JSON output, the help layout, how a command is added, and the
options that more than one command takes (so that they read the same everywhere)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]
Subcommands = argparse._SubParsersAction  # what ``parser.add_subparsers()`` returns; every add_* function takes it

TTA_HELP = (
    "test-time augmentation: average each image's prediction with its left-right mirror's "
    "(about twice the time; the model's threshold was chosen without it unless trained with --tta)"
)


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after an option's help, unless the help already says its default or
    there is none to say (flags, and options whose unset value means "decided later")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def add_command(sub: Subcommands, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    """``pneumo NAME``: its one-line help is its description too, and ``main`` calls ``handler(args)``."""
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    p.set_defaults(handler=handler)
    return p


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    """--db and --no-audit, shared by predict and serve (pneumo.audit records every reading)."""
    p.add_argument(
        "--db",
        default=None,
        metavar="PATH|URL",
        help="audit database: a SQLite file or postgresql://user@host/db (default: MODEL/audit.sqlite)",
    )
    p.add_argument("--no-audit", action="store_true", help="do not record the readings in the audit database")


def add_runtime_argument(p: argparse.ArgumentParser) -> None:
    """--runtime, shared by the reading commands: with onnx their handlers never import torch."""
    p.add_argument(
        "--runtime",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="auto (default): onnx when the model folder holds a parity-checked ONNX export of this very model "
        "and onnxruntime is installed, else torch (the choice and its reason go to stderr); torch; or onnx: "
        "onnxruntime on the model's ONNX export (pneumo export), without PyTorch, no Grad-CAM, no --tta",
    )


def add_export_argument(p: argparse.ArgumentParser) -> None:
    """--no-export, shared by the commands that write a model folder (train, ensemble, adapt)."""
    p.add_argument(
        "--no-export",
        action="store_true",
        help="do not write the ONNX export (MODEL/model.onnx, parity-checked against PyTorch) that is "
        "otherwise written at the end when pneumo[onnx] is installed, for --runtime auto to read through",
    )


def export_model(folder: str | Path, args: argparse.Namespace) -> str:
    """The ONNX export at the end of train, ensemble and adapt (``infer.onnx.export_after``), or why
    there is none: one line; it never fails the command."""
    if args.no_export:
        return "no ONNX export: --no-export"
    from pneumo.infer.onnx import export_after

    return export_after(folder)


def say_runtime(runtime: str, reason: str) -> None:
    """The runtime a reading command uses and why, on stderr (stdout stays the command's output)."""
    print(f"runtime: {runtime} ({reason})", file=sys.stderr)


def print_validation(evaluation: dict) -> None:
    """One line of validation figures, printed by train and ensemble."""
    m = evaluation.get("metrics", {})
    if "sensitivity" in m:
        print(
            f"validation at threshold {evaluation['threshold']:.3f}: accuracy {m['accuracy']:.4f}, "
            f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, AUC {m['roc_auc']:.4f}"
        )
