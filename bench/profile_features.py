"""Where the time of pneumo's CPU features mode goes: decode, model build, BatchNorm adaptation,
feature extraction, head epochs; with extraction batch sizes and thread counts to compare.

Calls pneumo's own functions (``decode_images``, ``create_model``, ``adapt_batchnorm``,
``extract_features``, the ``HeadOnFeatures`` phase) with timers around them; pneumo is not edited.
Each timing follows a warm-up batch, so oneDNN's first-call setup is reported on its own line.
Prints one JSON object::

    .venv/bin/python bench/profile_features.py --limit 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common import DEFAULT_DATA, stratified_subset  # the same subset as the speed benchmark
from pneumo.config import TrainConfig
from pneumo.data.cache import decode_images
from pneumo.nets.batchnorm import adapt_batchnorm
from pneumo.nets.models import create_model, set_body_trainable
from pneumo.training.features import extract_features
from pneumo.training.phases import HeadOnFeatures, make_optimizer


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def rate(n: int, seconds: float) -> dict[str, float]:
    return {"s": round(seconds, 2), "img_per_s": round(n / seconds, 1)}


@torch.inference_mode()
def features_nchw(model, pixels: np.ndarray, batch_size: int) -> torch.Tensor:
    """extract_features without channels_last: is the memory format paying on this CPU?"""
    model.eval()
    return torch.cat(
        [
            model.features(torch.from_numpy(pixels[i : i + batch_size]).unsqueeze(1))
            for i in range(0, len(pixels), batch_size)
        ]
    )


def profile(
    data: Path,
    limit: int,
    image_size: int,
    epochs: int,
    batch_sizes: Sequence[int],
    threads: Sequence[int],
    seed: int,
    workdir: Path,
) -> dict:
    from pneumo.data.folders import discover

    root = stratified_subset(data, limit, seed, workdir / "subset")
    samples = discover(root).samples
    paths = [s.path for s in samples]
    labels = torch.tensor([s.label for s in samples])
    n = len(paths)
    out: dict = {
        "n_images": n,
        "image_size": image_size,
        "default_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }

    decode = {}
    for workers in (1, 2):
        s, decoded = timed(
            decode_images, paths, image_size, cache_dir=workdir / f"cache{workers}", workers=workers, progress=False
        )
        decode[f"workers_{workers}"] = rate(n, s)
    s, _ = timed(decode_images, paths, image_size, cache_dir=workdir / "cache2", progress=False)
    decode["from_cache"] = rate(n, s)
    out["decode"] = decode
    pixels = np.asarray(decoded.pixels)

    s, model = timed(create_model, "efficientnet_lite0", 2, "imagenet")
    out["create_model_s"] = round(s, 2)
    device = torch.device("cpu")
    model = model.to(memory_format=torch.channels_last)
    s, _ = timed(extract_features, model, pixels[:8], device, batch_size=8, progress=False)
    out["first_batch_warmup_s"] = round(s, 2)
    s, _ = timed(adapt_batchnorm, model, pixels[:8], device, batch_size=8, progress=False)
    out["first_bn_batch_warmup_s"] = round(s, 2)

    default = torch.get_num_threads()
    bn_images = min(TrainConfig.bn_adapt_images, n)
    out["bn_adapt"], out["features"] = {}, {}
    for t in threads:
        torch.set_num_threads(t)
        for bs in (16, 32, 64):
            s, _ = timed(adapt_batchnorm, model, pixels[:bn_images], device, batch_size=bs, progress=False)
            out["bn_adapt"][f"threads_{t}_bs_{bs}"] = rate(bn_images, s)
        for bs in batch_sizes:
            s, feats = timed(extract_features, model, pixels, device, batch_size=bs, progress=False)
            out["features"][f"threads_{t}_bs_{bs}"] = rate(n, s)
        s, _ = timed(features_nchw, model, pixels, batch_sizes[0])
        out["features"][f"threads_{t}_bs_{batch_sizes[0]}_nchw"] = rate(n, s)
    torch.set_num_threads(default)

    # the head phase exactly as train() builds it, on the features just computed
    gen = torch.Generator().manual_seed(seed)
    set_body_trainable(model, False, train_bn=False)
    opt = make_optimizer([list(model.head.parameters())], [3e-3], 0.01)
    phase = HeadOnFeatures(
        model,
        opt,
        epochs,
        64,
        n_train=n,
        generator=gen,
        class_weights=None,
        device=torch.device("cpu"),
        train_feats=feats[None],
        train_y=labels,
        valid_feats=feats,
    )
    t0 = time.perf_counter()
    for e in range(epochs):
        phase.train_epoch(e, progress=False)
        phase.valid_logits()
    out["head_epochs"] = {"epochs": epochs, "s": round(time.perf_counter() - t0, 3)}
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=512)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pneumo_profile_") as tmp:
        result = profile(
            args.data, args.limit, args.image_size, args.epochs, args.batch_sizes, args.threads, args.seed, Path(tmp)
        )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
