"""The fast path for a frozen body: adapt BatchNorm once, then compute body features once.

With the body frozen, fastai still runs it forward and backward on every step so that BatchNorm can
follow the X-ray statistics. Here BatchNorm's running statistics are re-estimated in one pass over
training images, the body is then fixed, and the head trains on pooled features computed once per
image: the expensive network runs about twice per image instead of twice per image per epoch. With
``trainable_stages`` the last stages of the body (a small share of its cost) train too, on cached
feature maps from the stage before them.

``cached_features`` is what a run calls: both passes once, stored in the run folder
(``RUN/checkpoints/features.pt``) and in the shared cache, keyed by everything they depend on.
The frozen prefix runs on the runtime ``prefix_runtime.frozen_prefix`` chooses (onnxruntime on a
CPU once it agrees with PyTorch on the first batch); ``RUN/features_runtime.json`` says which and why.
The key leaves the runtime out: both give the same features within the parity tolerance (below the
float16 rounding the stored training maps get anyway), as PyTorch with another thread count does.
The record of the runtime that computed them travels in the cached file, so a run reusing a cache
says truthfully what computed its features; a resumed run reads its own file, so it stays exact.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from pneumo.config import TrainConfig
from pneumo.data.augment import augment_batch
from pneumo.data.cache import cache_key, default_cache_dir, shared_cache_enabled
from pneumo.errors import TrainingError
from pneumo.nets.batchnorm import adapt_batchnorm
from pneumo.nets.models import XrayNet
from pneumo.run_folder import RunFolder
from pneumo.training import distributed
from pneumo.training.prefix_runtime import Features, Prefix, frozen_prefix, torch_prefix
from pneumo.training.setup import RunSetup, TrainData, timed


def fold_batchnorm(model: XrayNet) -> XrayNet:
    """A copy for inference in which every BatchNorm that follows a convolution is folded into it.

    Fixed statistics make BatchNorm an affine map per channel, so the convolution can apply it: one
    pass over each activation instead of two (features ~30% faster on a 2-core CPU). A BatchNorm's
    activation (timm's ``BatchNormAct2d``) stays in its place. Pairs are found in registration
    order, which is forward order in timm's EfficientNets and ResNets (a test checks the outputs).
    """
    model = copy.deepcopy(model).eval()
    for parent in list(model.body.modules()):
        names = list(parent._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
                parent._modules[bn_name] = nn.Sequential(*after) if after else nn.Identity()
    return model


def feature_batch_size(device: torch.device) -> int:
    """Small batches on a CPU (activations stay in cache: 8 images took 17 ms each on a 2-core EPYC,
    16 took 20 ms); large ones on a GPU, where each batch costs a few hundred kernel launches."""
    return 8 if device.type == "cpu" else 256


@torch.inference_mode()
def extract_features(
    model: XrayNet,
    pixels: np.ndarray,
    device: torch.device,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    desc: str = "computing features",
    trainable_stages: int = 0,
    half: bool = True,
    augment_policy: str = "standard",
    prefix: Features | None = None,
) -> torch.Tensor:
    """What the frozen part of the body gives, augmented (by ``augment_policy``) when a ``generator`` is given.

    Pooled features ``(N, F)`` (float32) when only the head trains; with ``trainable_stages`` the
    feature maps entering those stages ``(N, C, H, W)``, in float16 (half the memory) unless ``half``
    is False: validation maps stay float32, so that the stored validation predictions, threshold and
    temperature are those of the saved network. ``batch_size`` None: ``feature_batch_size(device)``.
    ``prefix``: what runs the frozen part (``prefix_runtime.frozen_prefix``); None: PyTorch on a
    BatchNorm-folded copy of ``model``.
    """
    prefix = prefix or torch_prefix(fold_batchnorm(model), trainable_stages)
    batch_size = batch_size or feature_batch_size(device)
    out = []
    for i in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.ascontiguousarray(pixels[i : i + batch_size])).unsqueeze(1).to(device)
        if generator is not None:
            x = augment_batch(x, generator, policy=augment_policy)
        f = prefix(x)
        out.append(f.to(torch.float16 if trainable_stages and half else torch.float32).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# the features cache of a run
# ---------------------------------------------------------------------------------------------
def features_key_parts(cfg: TrainConfig, data: TrainData) -> list:
    """Everything the cached features depend on: backbone, weights, images, size, adaptation, views."""
    weights = cfg.weights and Path(cfg.weights)
    stamp = f"{weights}:{weights.stat().st_mtime_ns}" if weights and weights.exists() else str(weights)
    images = [cache_key([s.path for s in samples], cfg.image_size) for samples in (data.train, data.valid)]
    parts = [cfg.arch, cfg.pretrained, stamp, cfg.image_size, cfg.bn_adapt_images, cfg.bn_adapt_batch_size]
    parts += [cfg.feature_views, cfg.augment, cfg.trainable_stages, cfg.seed, *images]
    if cfg.augment_policy != "standard":  # a standard run's key stays as it was: its caches stay valid
        parts.append(cfg.augment_policy)
    return parts


def features_key(cfg: TrainConfig, data: TrainData) -> str:
    return hashlib.sha256(repr(features_key_parts(cfg, data)).encode()).hexdigest()[:24]


def cached_features(setup: RunSetup, folder: RunFolder, progress: bool) -> dict[str, torch.Tensor]:
    """BatchNorm adapted on a seeded sample of training images, then features for every image.

    Stored with the adapted body in the run folder (a resumed run skips both passes) and in the
    shared cache (``lr-find`` then ``train``, or runs that differ only in the head, compute them once).
    The two passes add their seconds to ``setup.timings`` (``bn_adapt_s``, ``features_s``).
    """
    cfg, model, data, device, generator = setup.cfg, setup.model, setup.data, setup.device, setup.generator
    ctx = distributed.current()
    key = features_key(cfg, data)
    own = folder.features_file
    shared = default_cache_dir() / f"features-{key}.pt"
    use_shared = shared_cache_enabled()
    found = _saved_features(folder, (own, shared) if use_shared else (own,), key)
    if all(f is not None for f in distributed.all_gather_object(found and found[0])):  # every rank holds them
        candidate, saved = found
        model.body.load_state_dict(saved["body"])
        generator.set_state(saved["generator"])
        if ctx.is_main:
            folder.write_features_runtime(
                {**cached_runtime(saved), "read_from": "cache" if candidate != own else "run"}
            )
            if candidate != own:
                folder.save_checkpoint(own, **saved)
        return {"train": saved["train"], "valid": saved["valid"]}
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.permutation(len(data.train_pixels))[: cfg.bn_adapt_images])
    if cfg.bn_adapt_images > 0:
        with timed(setup.timings, "bn_adapt_s"):
            if ctx.is_main:  # one estimate, sent to every rank: the ranks' bodies stay identical
                adapt_batchnorm(model, data.train_pixels[sample], device, cfg.bn_adapt_batch_size, progress=progress)
            distributed.broadcast_module(model.body)
    with timed(setup.timings, "features_s"):  # under torchrun each rank computes its share, then all gather
        prefix = choose_prefix(setup)
        views = []
        for v in range(cfg.feature_views):
            augmenter = distributed.rank_generator(generator) if cfg.augment and v > 0 else None

            def train_view(rows: slice, v: int = v, augmenter: torch.Generator | None = augmenter) -> torch.Tensor:
                return extract_features(
                    model,
                    data.train_pixels[rows],
                    device,
                    progress=progress,
                    generator=augmenter,
                    augment_policy=cfg.augment_policy,
                    desc=f"features, train view {v + 1}/{cfg.feature_views}",
                    trainable_stages=cfg.trainable_stages,
                    prefix=prefix.run,
                )

            views.append(distributed.gather_shards(len(data.train_pixels), train_view))
        valid = distributed.gather_shards(
            len(data.valid_pixels),
            lambda rows: extract_features(
                model,
                data.valid_pixels[rows],
                device,
                progress=progress,
                desc="features, valid",
                trainable_stages=cfg.trainable_stages,
                half=False,
                prefix=prefix.run,
            ),
        )
    feats = {"train": torch.stack(views), "valid": valid}
    if ctx.is_main:
        folder.write_features_runtime(prefix.record)
        saved = dict(key=key, body=model.body.state_dict(), generator=generator.get_state(), **feats)
        saved["prefix_runtime"] = prefix.record
        folder.save_checkpoint(own, **saved)
        if use_shared:
            try:
                folder.save_checkpoint(shared, **saved)
            except OSError:
                pass  # a read-only cache costs time next run, never this one
    return feats


def choose_prefix(setup: RunSetup) -> Prefix:
    """The runtime of this run's features pass (``prefix_runtime.frozen_prefix``), checked on the
    first batch of the pass: the first training images, as they are."""
    cfg, device = setup.cfg, setup.device
    first = torch.from_numpy(np.ascontiguousarray(setup.data.train_pixels[: feature_batch_size(device)]))
    return frozen_prefix(fold_batchnorm(setup.model), cfg.trainable_stages, device, first.unsqueeze(1))


def cached_runtime(saved: dict) -> dict:
    """The runtime record stored with cached features; features cached before it was stored came
    from PyTorch."""
    record = saved.get("prefix_runtime")
    if isinstance(record, dict):
        return dict(record)
    return {"runtime": "torch", "max_abs_diff": None, "reason": "features cached before the runtime was recorded"}


def _saved_features(folder: RunFolder, candidates: tuple[Path, ...], key: str) -> tuple[Path, dict] | None:
    """The first candidate file holding features under ``key``: (path, contents), else None."""
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            saved = folder.load_checkpoint(candidate)
        except TrainingError:  # a damaged cache file is computed again, never trusted
            continue
        if saved.get("key") == key:  # else another data set or config wrote this folder before
            return candidate, saved
    return None
