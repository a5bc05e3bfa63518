"""``pneumo evaluate``, ``predict`` and ``explain``: what a model folder reads in films."""

from __future__ import annotations

import argparse
import sys

from pneumo.cli.adapt import add_adapt_arguments
from pneumo.cli.common import (
    TTA_HELP,
    Subcommands,
    add_audit_arguments,
    add_command,
    add_runtime_argument,
    emit_json,
    say_runtime,
)
from pneumo.config import HEATMAP_CMAP
from pneumo.errors import PneumoError


def add_evaluate(sub: Subcommands) -> None:
    p = add_command(
        sub, "evaluate", cmd_evaluate, "error rate, sensitivity, specificity, PPV, NPV, ROC-AUC on a folder"
    )
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
    add_runtime_argument(p)
    add_adapt_arguments(p, evaluate=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumo.infer.predict import evaluate_model_on_folder, format_evaluation

    adapt = None
    if args.adapt:
        from pneumo.infer.adapt import evaluation_adapter

        adapt = evaluation_adapter(
            args.model,
            args.threshold or "auto",
            allow_few=args.allow_few,
            progress=not args.json,
            method=args.method or "batchnorm",
        )
    elif args.threshold is not None or args.allow_few or args.method is not None:
        raise PneumoError("--threshold, --method and --allow-few say how to adapt: they go with --adapt")
    report = evaluate_model_on_folder(
        args.model,
        args.data,
        out=args.out,
        split=args.split,
        tta=args.tta,
        progress=not args.json,
        adapt=adapt,
        runtime=args.runtime,
    )
    say_runtime(report["runtime"], report["runtime_reason"])
    emit_json(report) if args.json else print(format_evaluation(report))
    return 0


def add_predict(sub: Subcommands) -> None:
    p = add_command(sub, "predict", cmd_predict, "label and probability for image files or folders")
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


def cmd_predict(args: argparse.Namespace) -> int:
    if args.out is not None:  # an archive: streamed, bounded memory, resumable
        return predict_into_archive(args)
    if args.engine != "local" or args.address is not None:
        raise PneumoError("--engine ray and --address write an archive's predictions: add --out FILE.csv|FILE.parquet")
    from pneumo.infer.predict import predict_files, write_predictions
    from pneumo.infer.runtime import open_chosen

    progress = not (args.json or args.csv)
    loaded, runtime, reason = open_chosen(args.model, args.runtime, tta=args.tta)
    say_runtime(runtime, reason)
    if args.no_audit:
        rows = predict_files(loaded, args.paths, tta=args.tta, progress=progress)
    else:
        from pneumo.audit.record import predict_and_record

        rows = predict_and_record(args.model, args.paths, db=args.db, tta=args.tta, progress=progress, loaded=loaded)
    if args.json:  # which runtime read the films, and why, with every row
        rows = [{**r, "runtime": runtime, "runtime_reason": reason} for r in rows]
    write_predictions(rows, fmt="json" if args.json else "csv" if args.csv else "table", stream=sys.stdout)
    return 1 if rows and all(r.get("error") for r in rows) else 0


def predict_into_archive(args: argparse.Namespace) -> int:
    """``pneumo predict ... --out FILE``: streamed in chunks, each recorded in the audit trail as it is written."""
    from pneumo.infer.batch import format_summary, predict_archive

    if args.csv:
        raise PneumoError("--csv prints rows; with --out the format follows the file name (.csv or .parquet)")
    trail = None
    if not args.no_audit:  # every reading recorded, a chunk at a time
        from pneumo.audit.record import AuditTrail
        from pneumo.infer.model_folder import model_folder

        trail = AuditTrail.open(args.db, model_folder(args.model))

    def chosen(runtime: str, reason: str) -> None:  # said before the first chunk; the trail records it
        say_runtime(runtime, reason)
        if trail is not None:
            trail.runtime = runtime

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
            runtime=args.runtime,
            on_runtime=chosen,
        )
    finally:
        if trail is not None:
            trail.close()
    emit_json(summary.to_dict()) if args.json else print(format_summary(summary))
    return 1 if summary.predicted and summary.errors == summary.predicted else 0


def add_explain(sub: Subcommands) -> None:
    p = add_command(sub, "explain", cmd_explain, "Grad-CAM heatmap over the X-ray at its own resolution")
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
