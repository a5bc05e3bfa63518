"""How much LR range test lr-find needs: cached views and sweep iterations against the suggestion.

Features are computed once, as ``pneumo lr-find`` computes them (BatchNorm adapted, ``--feature-views``
views per training image, seed ``--seed``). Then, for each seed, views and iteration count, the
range test runs on the frozen phase with a freshly initialised head (seeded), a generator seeded
alike (batch order, view draws), and only the first ``views`` cached views. The BatchNorm sample
stays that of ``--seed``: seeds vary the head, the batches and the views, not the adapted body.
A setting gives "the same suggestion" when its suggestions over seeds stay within the spread
of the reference's (most views, most iterations). Prints one JSON object::

    nice -n 10 .venv/bin/python bench/lr_find_sweep.py --limit 400 --views 1 2 4 --iters 30 50 100 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common import DEFAULT_DATA, stratified_subset
from pneumo.config import TrainConfig
from pneumo.nets.models import set_body_trainable
from pneumo.run_folder import RunFolder
from pneumo.training.features import cached_features
from pneumo.training.lr_finder import find_lr
from pneumo.training.phases import HeadOnFeatures, frozen_phase_groups, make_optimizer
from pneumo.training.setup import prepare_run


def reset_head(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.head.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def sweep(setup, base: torch.nn.Module, feats: dict, views: int, num_it: int, seed: int) -> dict:
    cfg = setup.cfg
    model = copy.deepcopy(base)
    reset_head(model, seed)
    set_body_trainable(model, False, train_bn=False, trainable_stages=cfg.trainable_stages)
    opt = make_optimizer(*frozen_phase_groups(model, cfg), cfg.weight_decay)
    phase = HeadOnFeatures(
        model,
        opt,
        cfg.epochs,
        cfg.batch_size,
        n_train=len(setup.data.train),
        generator=torch.Generator().manual_seed(seed),
        class_weights=setup.class_weights,
        device=setup.device,
        train_feats=feats["train"][:views],
        train_y=setup.train_y,
        valid_feats=feats["valid"],
        trainable_stages=cfg.trainable_stages,
    )
    t0 = time.perf_counter()
    result = find_lr(model, phase, num_it=num_it)
    return {"s": round(time.perf_counter() - t0, 2), "steps": len(result.lrs), **result.suggestions}


def summary(rows: list[dict], method: str) -> dict:
    values = [r[method] for r in rows]
    logs = [math.log10(v) for v in values]
    return {
        "median": statistics.median(values),
        "log10_spread": round(max(logs) - min(logs), 3),  # 0.3: a factor of 2 between seeds
        "mean_s": round(statistics.mean(r["s"] for r in rows), 2),
        "mean_steps": round(statistics.mean(r["steps"] for r in rows), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--iters", type=int, nargs="+", default=[30, 50, 100])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=42, help="the subset's and the features' seed")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lr-sweep-") as tmp:
        root = stratified_subset(args.data, args.limit, args.seed, Path(tmp) / "subset")
        options = dict(image_size=args.image_size, seed=args.seed, device="cpu", batch_size=64, lr=3e-3)
        cfg = TrainConfig.from_dict(dict(data=str(root), feature_views=max(args.views), **options))  # as speed.py
        setup = prepare_run(cfg, progress=False)
        t0 = time.perf_counter()
        feats = cached_features(setup, RunFolder(Path(tmp) / "run"), progress=False)
        features_s = time.perf_counter() - t0
        base = copy.deepcopy(setup.model)
        rows = []
        for seed in args.seeds:  # interleaved: a busy machine slows every setting alike
            for views in args.views:
                for num_it in args.iters:
                    row = {"seed": seed, "views": views, "num_it": num_it}
                    row.update(sweep(setup, base, feats, views, num_it, seed))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    settings = {
        f"views={v},num_it={n}": {
            m: summary([r for r in rows if r["views"] == v and r["num_it"] == n], m) for m in ("valley", "steep")
        }
        for v in args.views
        for n in args.iters
    }
    print(
        json.dumps(
            {"n_train": len(setup.data.train), "features_s": round(features_s, 1), "settings": settings, "rows": rows},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
