"""``pneumo compare``: does transfer learning pay? pretrained against scratch over training-set sizes."""

from __future__ import annotations

import argparse

from pneumo.cli.common import Subcommands, add_command, emit_json


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_compare(sub: Subcommands) -> None:
    p = add_command(sub, "compare", cmd_compare, "does transfer learning pay? pretrained vs scratch over data sizes")
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
