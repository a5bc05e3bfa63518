"""``pneumo lr-find`` and ``pneumo train``: their options are TrainConfig's fields, read from pneumo.config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from pneumo.cli.common import (
    Subcommands,
    add_command,
    add_export_argument,
    emit_json,
    export_model,
    print_validation,
)
from pneumo.config import (
    DEFAULT_UNFREEZE_EPOCHS,
    FIELDS,
    TrainConfig,
    expectation,
    field_kind,
    option_flag,
)
from pneumo.errors import PneumoError
from pneumo.nets.hub import check_weights_available


def training_fields(command: str) -> list[Field]:
    """The TrainConfig fields ``pneumo COMMAND`` takes as options: every one for train; for lr-find,
    those that shape the first phase (not its epochs, LR, fine-tuning, decision or run folder)."""
    return [
        f
        for f in fields(TrainConfig)
        if not f.metadata["positional"] and (command == "train" or not f.metadata["train_only"])
    ]


def add_training_arguments(p: argparse.ArgumentParser, command: str) -> argparse._ArgumentGroup:
    """One option per TrainConfig field, its help, choices and default read from the field. Every
    parser default is None, so that the handler knows which options the user gave; TrainConfig
    checks the values (argparse only converts types), so that every mistake reads the same."""
    g = p.add_argument_group("training options", "defaults and checks: pneumo.config.TrainConfig")
    for f in training_fields(command):
        kind, _ = field_kind(f.name)
        choices = f.metadata["choices"]
        if kind is bool:
            text = f"{f.metadata['help']} (default: {'on' if f.default else 'off'})"
            g.add_argument(
                option_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text.replace("%", "%%")
            )
            continue
        text = f.metadata["help"]
        if not (choices or f.metadata["path"]):  # (choices show in the metavar)
            text += f"; {expectation(f.name, unset=False)}"
        if f.default is not None:
            text += f" (default: {f.default})"
        metavar = "{" + ",".join(choices) + "}" if choices else {int: "N", float: "X"}.get(kind)
        g.add_argument(option_flag(f.name), type=kind, default=None, help=text.replace("%", "%%"), metavar=metavar)
    return g


def training_options(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The TrainConfig options of ``pneumo COMMAND`` the user gave (each parser default is None: unset).

    Only the fields the command declares are read: lr-find's own ``--out`` (its plot folder) is not
    the training run folder of the same name."""
    return {f.name: getattr(args, f.name) for f in training_fields(command) if getattr(args, f.name) is not None}


def add_lr_find(sub: Subcommands) -> None:
    p = add_command(sub, "lr-find", cmd_lr_find, "LR range test: plot loss against learning rate, suggest one")
    p.add_argument("data", help=FIELDS["data"].metadata["help"])
    p.add_argument(
        "--out",
        default=None,
        help="folder for lr_find.png (default: runs/lr_find); the features it computes are kept only in the "
        "shared cache, where pneumo train finds them",
    )
    p.add_argument("--start-lr", type=float, default=1e-7, help="learning rate of the first step")
    p.add_argument(
        "--end-lr", type=float, default=10.0, help="learning rate of the last step, if the loss has not diverged"
    )
    p.add_argument("--num-it", type=int, default=100, help="steps of the exponential LR ramp")
    p.add_argument(
        "--suggest",
        choices=["valley", "steep", "minimum"],
        default="valley",
        help="rule for the suggestion: valley (fastai's: the middle of the longest fall), steep "
        "(fastest fall) or minimum (a tenth of the LR at the lowest loss)",
    )
    p.add_argument("--json", action="store_true", help="print the suggestions and the curve as JSON")
    add_training_arguments(p, "lr-find")


def cmd_lr_find(args: argparse.Namespace) -> int:
    options = training_options(args, "lr-find")
    cfg = TrainConfig.from_dict({**options, "data": args.data})  # a mistyped option fails before any data is read
    check_weights_available(cfg.arch, cfg.pretrained, cfg.weights)  # offline: before torch is even imported
    from pneumo.training.lr_finder import lr_find

    result = lr_find(
        args.data,
        out=args.out,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_it=args.num_it,
        method=args.suggest,
        progress=not args.json,
        **options,
    )
    plot = Path(args.out or "runs/lr_find") / "lr_find.png"
    if args.json:
        emit_json(
            {
                "suggestion": result.suggestion,
                "method": result.method,
                "suggestions": result.suggestions,
                "plot": str(plot),
                "lrs": result.lrs,
                "losses": result.losses,
            }
        )
    else:
        others = ", ".join(f"{k} {v:.2e}" for k, v in result.suggestions.items() if k != result.method)
        print(f"suggested lr ({result.method}): {result.suggestion:.2e}   [{others}]\nplot: {plot}")
    return 0


def add_train(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "train",
        cmd_train,
        "train with the one-cycle policy, body frozen but for its last stages (then optionally fine-tuned)",
    )
    p.add_argument("data", nargs="?", default=None, help=FIELDS["data"].metadata["help"])
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with the options it was started with",
    )
    p.add_argument("--json", action="store_true", help="print the run folder, history and validation metrics as JSON")
    p.add_argument(
        "--track",
        action="append",
        default=[],
        metavar="tensorboard|mlflow",
        help="log the run to TensorBoard (RUN/tensorboard) and/or MLflow ($MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db here); repeat or comma-separate; needs pneumo[tensorboard] / pneumo[mlflow]",
    )
    add_export_argument(p)
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train with N processes on this machine (DDP through torchrun: one per GPU, or gloo on CPUs); "
        "same as torchrun --standalone --nproc-per-node N -m pneumo train ...",
    )
    add_training_arguments(p, "train").add_argument(
        "--unfreeze",
        action="store_true",
        help=f"shorthand for --unfreeze-epochs {DEFAULT_UNFREEZE_EPOCHS}: then "
        "fine-tune the whole network (--unfreeze-epochs N, if given, says for how long)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    options = training_options(args, "train")
    if args.resume:
        if not args.out:
            raise PneumoError("--resume needs --out RUN_DIR (the folder of the run to continue)")
        given = (
            [option_flag(name) for name in options if name != "out"]
            + ["--unfreeze"] * args.unfreeze
            + ["DATA"] * (args.data is not None)
        )
        if given:
            raise PneumoError(
                f"--resume continues {args.out} with the options it was started with; these cannot "
                f"change: {', '.join(given)} (drop them, or start a new run with another --out)"
            )
        options = {"resume": True, "out": args.out}
    else:
        if args.data is None:
            raise PneumoError("give the data folder: pneumo train DATA")
        if args.unfreeze:
            if options.get("unfreeze_epochs") == 0:
                raise PneumoError("--unfreeze asks for fine-tuning but --unfreeze-epochs is 0; drop one of them")
            options.setdefault("unfreeze_epochs", DEFAULT_UNFREEZE_EPOCHS)
        cfg = TrainConfig.from_dict({**options, "data": args.data})  # a mistyped option fails before any data is read
        check_weights_available(cfg.arch, cfg.pretrained, cfg.weights)  # offline: before torch is even imported
    from pneumo.training.distributed import launch, launched_rank, launched_world_size

    if args.nproc is not None and args.nproc != 1 and launched_world_size() == 1:
        launch(args.nproc, without_option(args.argv, "--nproc"))  # torchrun's launcher starts N copies of this command
        return 0
    from pneumo.training.loop import train

    result = train(args.data, progress=not args.json, track=args.track, **options)
    if launched_rank() != 0:  # under torchrun rank 0 alone reports
        return 0
    summary = {
        "run_dir": str(result.run_dir),
        "model_dir": str(result.model_dir),
        "history": result.history,
        "valid": result.evaluation.get("metrics"),
        "ci": result.evaluation.get("ci"),
        "threshold": result.evaluation.get("threshold"),
        "notes": result.notes,
        "onnx_export": export_model(result.model_dir, args),
    }
    if args.json:
        emit_json(summary)
    else:
        from pneumo.report.about import training_summary

        print(f"run folder: {result.run_dir}\nmodel: {result.model_dir}")
        print(training_summary(result.model_dir)["sentence"])
        print_validation(result.evaluation)
        print(summary["onnx_export"])
    return 0


def without_option(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` less ``flag VALUE`` / ``flag=VALUE`` (the copies torchrun starts must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith(flag + "="):
            skip = False
            continue
        skip = arg == flag
        if not skip:
            out.append(arg)
    return out
