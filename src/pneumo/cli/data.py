"""``pneumo data check`` and ``pneumo show-batch``: look at a data set before training on it."""

from __future__ import annotations

import argparse

from pneumo.cli.common import HelpFormatter, Subcommands, add_command, emit_json
from pneumo.config import TrainConfig


def add_data(sub: Subcommands) -> None:
    """``pneumo data ACTION``: a group, so that the coming data actions sit under one word."""
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


def cmd_data_check(args: argparse.Namespace) -> int:
    from pneumo.data.check import check_dataset, format_check

    report = check_dataset(args.path, patient_rule=args.patient_rule, progress=not args.json)
    emit_json(report) if args.json else print(format_check(report))
    return 1 if report["errors"] else 0


def add_show_batch(sub: Subcommands) -> None:
    p = add_command(sub, "show-batch", cmd_show_batch, "write a grid of augmented training images with their labels")
    p.add_argument("path", help="Kaggle 'chest_xray' folder or a folder of class folders (its train split is drawn)")
    p.add_argument("--out", default="batch.png", help="PNG file to write")
    p.add_argument("--rows", type=int, default=3, help="rows of images in the grid")
    p.add_argument("--cols", type=int, default=None, help="columns of images (default: as many as rows)")
    p.add_argument("--image-size", type=int, default=TrainConfig.image_size, help="side in pixels, as training sees it")
    p.add_argument(
        "--no-augment", action="store_true", help="show the images as decoded, without training's augmentation"
    )
    p.add_argument("--seed", type=int, default=0, help="which images are drawn and how they are augmented")


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
