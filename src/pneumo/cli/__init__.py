"""``pneumo``: the only package that parses arguments. Each subcommand calls one library function.

One module per group of commands, each holding its commands' options (``add_NAME(sub)``) beside their
handlers (``cmd_NAME(args)``); this module only assembles them and runs the one asked for. A new
group is a new module here and its ``add_*`` functions in ``COMMANDS``. Heavy imports (torch) happen
inside the handlers, so ``pneumo --help`` answers at once and ``--runtime onnx`` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pneumo.cli import adapt, audit, compare, data, dicom, models, reading, runs, serving, training
from pneumo.cli.common import HelpFormatter, Subcommands
from pneumo.errors import PneumoError
from pneumo.version import __version__

# in the order `pneumo --help` lists them: the workflow's, from the data to the served model
COMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    data.add_data,
    data.add_show_batch,
    training.add_lr_find,
    training.add_train,
    reading.add_evaluate,
    adapt.add_adapt,
    reading.add_predict,
    runs.add_ensemble,
    runs.add_report,
    reading.add_explain,
    runs.add_interpret,
    serving.add_serve,
    dicom.add_dicom,
    audit.add_audit,
    models.add_export,
    models.add_card,
    compare.add_compare,
    models.add_models,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumo",
        formatter_class=HelpFormatter,
        description="Transfer learning on chest X-rays: check the data, "
        "split it by patient, find a learning rate, train, evaluate, explain, serve.",
    )
    parser.add_argument("--version", action="version", version=f"pneumo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: a PneumoError is one line on stderr and exit status 2, never a traceback."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc N` hands to torchrun
    try:
        return args.handler(args)
    except PneumoError as exc:
        print(f"pneumo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pneumo predict ... | head`: the reader left, nothing went wrong
        sys.stderr.close()
        return 0
