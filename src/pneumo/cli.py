"""``pneumo``: the only module that parses arguments. Each subcommand calls one library function.

Heavy imports (torch) happen inside the handlers, so ``pneumo --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from pneumo.config import (
    DEFAULT_UNFREEZE_EPOCHS,
    FIELDS,
    HEATMAP_CMAP,
    TrainConfig,
    expectation,
    field_kind,
    option_flag,
)
from pneumo.errors import PneumoError
from pneumo.nets.hub import check_weights_available
from pneumo.version import __version__

SAMPLE_DATA = Path(__file__).parent / "sample_data" / "chest_xray"


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# handlers
# --------------------------------------------------------------------------------------------
def cmd_data_check(args: argparse.Namespace) -> int:
    from pneumo.data.check import check_dataset, format_check

    report = check_dataset(args.path, patient_rule=args.patient_rule, progress=not args.json)
    emit_json(report) if args.json else print(format_check(report))
    return 1 if report["errors"] else 0


def cmd_show_batch(args: argparse.Namespace) -> int:
    from pneumo.data.show import show_batch

    path = show_batch(
        args.path,
        args.out,
        rows=args.rows,
        cols=args.cols,
        image_size=args.image_size,
        augment=not args.no_augment,
        seed=args.seed,
    )
    print(f"batch written to {path}")
    return 0


def training_options(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The TrainConfig options of ``pneumo COMMAND`` the user gave (each parser default is None: unset).

    Only the fields the command declares are read: lr-find's own ``--out`` (its plot folder) is not
    the training run folder of the same name."""
    return {f.name: getattr(args, f.name) for f in training_fields(command) if getattr(args, f.name) is not None}


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
    }
    if args.json:
        emit_json(summary)
    else:
        from pneumo.report.about import training_summary

        print(f"run folder: {result.run_dir}\nmodel: {result.model_dir}")
        print(training_summary(result.model_dir)["sentence"])
        print_validation(result.evaluation)
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


def print_validation(evaluation: dict) -> None:
    m = evaluation.get("metrics", {})
    if "sensitivity" in m:
        print(
            f"validation at threshold {evaluation['threshold']:.3f}: accuracy {m['accuracy']:.4f}, "
            f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, AUC {m['roc_auc']:.4f}"
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumo.infer.predict import evaluate_model_on_folder, format_evaluation

    adapt = None
    if args.adapt:
        from pneumo.infer.adapt import evaluation_adapter

        adapt = evaluation_adapter(
            args.model, args.threshold or "auto", allow_few=args.allow_few, progress=not args.json
        )
    elif args.threshold is not None or args.allow_few:
        raise PneumoError("--threshold and --allow-few say how to adapt: they go with --adapt")
    report = evaluate_model_on_folder(
        args.model, args.data, out=args.out, split=args.split, tta=args.tta, progress=not args.json, adapt=adapt
    )
    emit_json(report) if args.json else print(format_evaluation(report))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from pneumo.infer.adapt import adapt_films, format_adaptation

    result = adapt_films(
        args.model,
        args.films,
        args.out,
        threshold_rule=args.threshold or "auto",
        allow_few=args.allow_few,
        progress=not args.json,
    )
    if args.json:
        emit_json(result.summary())
    else:
        print(f"adapted model: {result.out}\n{format_adaptation(result.record)}")
        for path, why in result.skipped.items():
            print(f"  skipped {path}: {why}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.out is not None:  # an archive: streamed, bounded memory, resumable
        from pneumo.infer.batch import format_summary, predict_archive

        if args.csv:
            raise PneumoError("--csv prints rows; with --out the format follows the file name (.csv or .parquet)")
        trail = None
        if not args.no_audit:  # every reading recorded, a chunk at a time
            from pneumo.audit.record import AuditTrail
            from pneumo.infer.model_folder import model_folder

            trail = AuditTrail.open(args.db, model_folder(args.model))
        try:
            summary = predict_archive(
                args.model,
                args.paths,
                args.out,
                engine=args.engine,
                address=args.address,
                chunk_size=args.chunk_size,
                tta=args.tta,
                progress=not args.json,
                on_chunk=trail.record_files if trail else None,
            )
        finally:
            if trail is not None:
                trail.close()
        emit_json(summary.to_dict()) if args.json else print(format_summary(summary))
        return 1 if summary.predicted and summary.errors == summary.predicted else 0
    if args.engine != "local" or args.address is not None:
        raise PneumoError("--engine ray and --address write an archive's predictions: add --out FILE.csv|FILE.parquet")
    from pneumo.infer.predict import predict_files, write_predictions

    progress = not (args.json or args.csv)
    if args.no_audit:
        rows = predict_files(args.model, args.paths, tta=args.tta, progress=progress, runtime=args.runtime)
    else:
        from pneumo.audit.record import predict_and_record

        rows = predict_and_record(
            args.model, args.paths, db=args.db, tta=args.tta, progress=progress, runtime=args.runtime
        )
    write_predictions(rows, fmt="json" if args.json else "csv" if args.csv else "table", stream=sys.stdout)
    return 1 if rows and all(r.get("error") for r in rows) else 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from pneumo.infer.ensemble import make_ensemble

    report = make_ensemble(args.runs, args.out, threshold=args.threshold)
    if args.json:
        emit_json(report)
    else:
        print(f"ensemble model: {Path(args.out) / 'model'}")
        print_validation(report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pneumo.report.html import write_report

    print(f"report written to {write_report(Path(args.run), Path(args.out) if args.out else None)}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pneumo.infer.explain import default_out, explain_image

    result = explain_image(
        args.model,
        args.image,
        default_out(args.image, args.out),
        target_class=args.target_class,
        alpha=args.alpha,
        cmap=args.cmap,
        overwrite=args.overwrite,
    )
    emit_json(result) if args.json else print(
        f"{result['label']}: {result['reading']}\nGrad-CAM for {result['target_class']} written to {result['out']}"
    )
    return 0


def cmd_interpret(args: argparse.Namespace) -> int:
    from pneumo.report.interpret import interpret_run

    result = interpret_run(args.run, out=args.out, k=args.k)
    emit_json(result) if args.json else print(
        f"top losses: {result['top_losses_png']}\nconfusion matrix: {result['confusion_matrix_png']}"
    )
    return 0


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


def cmd_export(args: argparse.Namespace) -> int:
    from pneumo.infer.onnx import export_onnx, format_export

    report = export_onnx(args.model, args.onnx, opset=args.opset, check_on=args.check_on, progress=not args.json)
    emit_json(report) if args.json else print(format_export(report))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pneumo.infer.model_card import write_model_card

    print(f"model card written to {write_model_card(args.model)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pneumo.compare.experiment import run_compare

    result = run_compare(
        args.data,
        archs=args.arch,
        fractions=args.fractions,
        seeds=args.seeds,
        epochs=args.epochs,
        out=args.out,
        target_error=args.target_error,
        weights=args.weights,
        image_size=args.image_size,
        device=args.device,
        progress=not args.json,
    )
    emit_json(result) if args.json else print(result["answer"] + f"\nreport: {result['report']}")
    return 0


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


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------
TTA_HELP = (
    "test-time augmentation: average each image's prediction with its left-right mirror's "
    "(about twice the time; the model's threshold was chosen without it unless trained with --tta)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after an option's help, unless the help already says its default or
    there is none to say (flags, and options whose unset value means "decided later")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def port_number(text: str) -> int:
    """``--port``, refused here rather than by bind() after the model has loaded."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a TCP port is a whole number in 0..65535, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is a whole number in 0..65535, not {port}")
    return port


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


def add_adapt_arguments(p: argparse.ArgumentParser, evaluate: bool) -> None:
    """The options of ``pneumo adapt``, shared by ``evaluate --adapt``; pneumo.infer.adapt checks the values."""
    if evaluate:
        p.add_argument(
            "--adapt",
            action="store_true",
            help="first adapt the model to the evaluated films themselves, their labels unused (as pneumo adapt)",
        )
    with_adapt = "with --adapt: " if evaluate else ""
    p.add_argument(
        "--threshold",
        default=None,
        metavar="RULE",
        help=f"{with_adapt}how the threshold is re-derived without labels: keep, prior (moved by the prevalence "
        "estimated on the films) or auto (default: prior for a fixed: threshold, keep for youden and sensitivity:)",
    )
    p.add_argument(
        "--allow-few",
        action="store_true",
        help=f"{with_adapt}adapt on fewer films than the measured minimum (pneumo.infer.adapt.MIN_ADAPT_FILMS)",
    )


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
    p.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="torch (default) or onnx: onnxruntime on the model's ONNX export (pneumo export), without "
        "PyTorch; no Grad-CAM, no --tta",
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

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(handler=handler)
        return p

    data = sub.add_parser(
        "data", help="inspect a data set", description="inspect a data set", formatter_class=HelpFormatter
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser(
        "check",
        help="counts, unreadable files, duplicates, patients across splits",
        description="Check a data set: counts per split and class, image sizes, unreadable "
        "files, exact duplicates, patients in more than one split. Exits 1 "
        "when a problem would corrupt training.",
        formatter_class=HelpFormatter,
    )
    p.set_defaults(handler=cmd_data_check)
    p.add_argument("path", help="Kaggle 'chest_xray' folder or a folder of class folders")
    p.add_argument(
        "--patient-rule", default=TrainConfig.patient_rule, help="kermany (default), filename or regex:PATTERN"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("show-batch", cmd_show_batch, "write a grid of augmented training images with their labels")
    p.add_argument("path", help="Kaggle 'chest_xray' folder or a folder of class folders (its train split is drawn)")
    p.add_argument("--out", default="batch.png", help="PNG file to write")
    p.add_argument("--rows", type=int, default=3, help="rows of images in the grid")
    p.add_argument("--cols", type=int, default=None, help="columns of images (default: as many as rows)")
    p.add_argument("--image-size", type=int, default=TrainConfig.image_size, help="side in pixels, as training sees it")
    p.add_argument(
        "--no-augment", action="store_true", help="show the images as decoded, without training's augmentation"
    )
    p.add_argument("--seed", type=int, default=0, help="which images are drawn and how they are augmented")

    p = command("lr-find", cmd_lr_find, "LR range test: plot loss against learning rate, suggest one")
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

    p = command(
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

    p = command("evaluate", cmd_evaluate, "error rate, sensitivity, specificity, PPV, NPV, ROC-AUC on a folder")
    p.add_argument("model", help="model folder (RUN/model) or run folder")
    p.add_argument("data", help="folder of class folders, or a Kaggle root (its test split is used)")
    p.add_argument(
        "--split",
        default=None,
        help="with a Kaggle root: test (default), train or valid; a folder of class folders is read whole",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for evaluation.json and the figures; RUN/test keeps it in the run's report",
    )
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    add_adapt_arguments(p, evaluate=True)

    p = command(
        "adapt",
        cmd_adapt,
        "adapt a model to a new site from its unlabelled films: BatchNorm statistics re-estimated, "
        "threshold re-derived without labels (pneumo.infer.adapt)",
    )
    p.add_argument("model", help="model folder (RUN/model) or run folder")
    p.add_argument("films", help="folder of the site's images, searched recursively; labels are never read")
    p.add_argument("--out", required=True, help="folder for the adapted model (a model folder)")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    add_adapt_arguments(p, evaluate=False)

    p = command("predict", cmd_predict, "label and probability for image files or folders")
    p.add_argument("model", help="model folder (RUN/model) or run folder")
    p.add_argument("paths", nargs="+", help="image files, or folders searched recursively")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        action="store_true",
        help="one object per image: label, p_positive (p of the positive class), threshold, reading, p_CLASS",
    )
    fmt.add_argument("--csv", action="store_true", help="the same as CSV, one row per image")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    add_audit_arguments(p)
    add_runtime_argument(p)
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="stream the predictions into FILE.csv or FILE.parquet (a folder of parts) in chunks, memory bounded; "
        "a rerun skips the files already there",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="with --out: local (this process, the default) or ray (Ray Data; needs pneumo[ray])",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --engine ray: the cluster to join (auto, or ray://HEAD:10001); default: start one on this machine",
    )
    p.add_argument("--chunk-size", type=int, default=256, metavar="N", help="with --out: images per chunk")

    p = command(
        "ensemble",
        cmd_ensemble,
        "several runs validated on the same images as one model "
        "(mean probability, threshold chosen on their validation predictions)",
    )
    p.add_argument("runs", nargs="+", help="finished run folders (same data, split and seed)")
    p.add_argument("--out", required=True, help="folder for the ensemble (its model folder is OUT/model)")
    p.add_argument(
        "--threshold", default="youden", help="rule for the threshold: youden | sensitivity:0.95 | fixed:0.5"
    )
    p.add_argument("--json", action="store_true", help="print the ensemble's validation as JSON")

    p = command("report", cmd_report, "one offline HTML page summarising a training run")
    p.add_argument("run", help="run folder written by pneumo train")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")

    p = command("explain", cmd_explain, "Grad-CAM heatmap over the X-ray at its own resolution")
    p.add_argument("model", help="model folder (RUN/model) or run folder")
    p.add_argument("image", help="the X-ray (JPEG or PNG)")
    p.add_argument(
        "--out",
        default=None,
        help="PNG to write, or a folder for it (default: IMAGE_gradcam.png in the current folder, named after "
        "the image; never beside it, where it would join a class folder)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (else pneumo refuses)")
    p.add_argument("--class", dest="target_class", default=None, help="class to explain (default: the predicted one)")
    p.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity, 0..1")
    p.add_argument(
        "--cmap",
        default=HEATMAP_CMAP,
        help="matplotlib colormap (default %(default)s: perceptually uniform, colour-blind safe)",
    )
    p.add_argument("--json", action="store_true", help="print the reading and the output file as JSON")

    p = command("interpret", cmd_interpret, "top losses and confusion matrix of a run's validation set")
    p.add_argument("run", help="run folder written by pneumo train")
    p.add_argument("--out", default=None, help="folder for top_losses.png and confusion_matrix.png (default: RUN)")
    p.add_argument("--k", type=int, default=9, help="how many of the highest-loss images to show")
    p.add_argument("--json", action="store_true", help="print the top losses and the matrix as JSON")

    p = command("serve", cmd_serve, "web page and JSON API for reading an X-ray")
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

    p = command(
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

    p = command(
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

    p = command("card", cmd_card, "(re)write MODEL_CARD.md in a model folder from what it and its run recorded")
    p.add_argument("model", help="model folder (RUN/model) or run folder")

    p = command("compare", cmd_compare, "does transfer learning pay? pretrained vs scratch over data sizes")
    p.add_argument("data", help="training folder (Kaggle root or class folders); validation is split from it")
    p.add_argument("--arch", nargs="+", default=["efficientnet_lite0"], help="backbones to compare (see pneumo models)")
    p.add_argument(
        "--fractions",
        type=floats,
        default=[0.02, 0.05, 0.1, 0.25, 0.5, 1.0],
        help="comma-separated shares of the training images to train on",
    )
    p.add_argument("--seeds", type=int, default=3, help="repeats per arch, fraction and start")
    p.add_argument("--epochs", type=int, default=8, help="epochs per run")
    p.add_argument(
        "--target-error",
        type=float,
        default=None,
        help="error rate for the time-to-target comparison (default, per training-set size: the worse method's "
        "final error plus 2 points, or the better's when the worse is no better than chance; said in the answer)",
    )
    p.add_argument("--weights", default=None, help="ImageNet weights file for a ResNet offline (.pth or .safetensors)")
    p.add_argument("--image-size", type=int, default=224, help="square side in pixels")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default="runs/compare", help="folder for the runs, results and report")
    p.add_argument("--json", action="store_true", help="print the results and the answer as JSON")

    p = command("models", cmd_models, "list the supported backbones and where their weights come from")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
