"""``pneumo adapt``: a model moved to a new site, from its unlabelled films or (``--labelled``) labelled ones."""

from __future__ import annotations

import argparse

from pneumo.cli.common import Subcommands, add_command, add_export_argument, emit_json, export_model
from pneumo.errors import PneumoError


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
        help=f"{with_adapt}adapt on fewer films than the measured minimum (pneumo.infer.adapt.MIN_ADAPT_FILMS"
        + ("" if evaluate else "; with --labelled: calibrate.MIN_LABELLED_PER_CLASS a class")
        + ")",
    )
    p.add_argument(
        "--method",
        default=None,
        metavar="NAME",
        help=f"{with_adapt}how to adapt without labels: batchnorm (BatchNorm statistics; the default), tent "
        "(then the body's BatchNorm scales and shifts by entropy minimisation) or self-training (then the last "
        "layer on confident pseudo-labels)",
    )


def add_adapt(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "adapt",
        cmd_adapt,
        "adapt a model to a new site from its unlabelled films: BatchNorm statistics re-estimated, "
        "threshold re-derived without labels (pneumo.infer.adapt); or, with --labelled, calibrate it on the "
        "site's labelled films (pneumo.infer.calibrate)",
    )
    p.add_argument("model", help="model folder (RUN/model) or run folder")
    p.add_argument(
        "films",
        help="folder of the site's images, searched recursively; labels are never read (with --labelled: "
        "class folders, FILMS/NORMAL and FILMS/PNEUMONIA, whose labels are used)",
    )
    p.add_argument("--out", required=True, help="folder for the adapted model (a model folder)")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    add_export_argument(p)
    add_adapt_arguments(p, evaluate=False)
    p.add_argument(
        "--labelled",
        action="store_true",
        help="labelled site calibration: BatchNorm re-estimated, the last layer refitted on the site's labels and "
        "the threshold chosen on out-of-fold predictions; model.json and the card record that labels were used",
    )
    p.add_argument(
        "--fit",
        default=None,
        metavar="WHAT",
        help="with --labelled: head (the last layer, temperature and threshold; the default) or threshold (the "
        "threshold alone)",
    )


def cmd_adapt(args: argparse.Namespace) -> int:
    if args.labelled:
        return calibrate(args)
    if args.fit is not None:
        raise PneumoError("--fit says what labelled calibration fits: it goes with --labelled")
    from pneumo.infer.adapt import adapt_films, format_adaptation

    result = adapt_films(
        args.model,
        args.films,
        args.out,
        threshold_rule=args.threshold or "auto",
        allow_few=args.allow_few,
        progress=not args.json,
        method=args.method or "batchnorm",
    )
    exported = export_model(result.out, args)
    if args.json:
        emit_json({**result.summary(), "onnx_export": exported})
    else:
        print(f"adapted model: {result.out}\n{format_adaptation(result.record)}")
        for path, why in result.skipped.items():
            print(f"  skipped {path}: {why}")
        print(exported)
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """``pneumo adapt --labelled``: the labelled site calibration."""
    if args.threshold is not None or args.method is not None:
        raise PneumoError(
            "--threshold and --method say how to adapt without labels; --labelled chooses both by the labels"
        )
    from pneumo.infer.calibrate import calibrate_films, format_calibration

    out, record, skipped = calibrate_films(
        args.model, args.films, args.out, fit=args.fit or "head", allow_few=args.allow_few, progress=not args.json
    )
    exported = export_model(out, args)
    if args.json:
        emit_json({"out": str(out), "adaptation": record, "skipped": skipped, "onnx_export": exported})
    else:
        print(f"calibrated model: {out}\n{format_calibration(record)}")
        for path, why in skipped.items():
            print(f"  skipped {path}: {why}")
        print(exported)
    return 0
