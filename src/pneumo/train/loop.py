"""The training loop, read top to bottom: data -> model -> phases of one-cycle epochs -> evaluation.

Phase 1 is the tutorial's ``fit_one_cycle(epochs, lr)`` with the body frozen (BatchNorm adapted to
X-rays). By default it runs on cached body features (see ``features.py``) on a CPU and a GPU alike;
``mode="full"`` runs the body every step on augmented batches taken straight from the uint8 image
cache on the device, as training from scratch and phase 2 always do. Phase 2 (``unfreeze_epochs`` >
0) fine-tunes the whole network with discriminative learning rates.

Every epoch ends with an atomic checkpoint holding the model, optimizer, RNG states (the GPU's
too), the fp16 loss scale and history, so ``resume=True`` continues a killed run and ends exactly
where an uninterrupted run ends (on a CPU; GPU kernels need not be deterministic).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pneumo.data.cache import decode_images
from pneumo.config import TrainConfig
from pneumo.data.folders import Sample, discover, make_split
from pneumo.errors import PneumoError
from pneumo.train.features import adapt_batchnorm, extract_features
from pneumo.io_utils import atomic_write, atomic_write_json, atomic_write_text
from pneumo.nets.models import XrayNet, create_model, set_body_trainable
from pneumo.train.phases import FullNetwork, HeadOnFeatures, Phase, make_optimizer
from pneumo.train.schedule import discriminative_lrs

METRIC_FIELDS = ["epoch", "phase", "train_loss", "valid_loss", "error_rate", "time"]


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    history: list[dict]
    evaluation: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class StopRequested(Exception):
    """Raised after a checkpoint when ``stop_after_epoch`` is reached: stands in for a kill in tests."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise PneumoError(f"--device {spec}: no CUDA GPU is visible to PyTorch; use --device cpu")
    return torch.device(spec)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def resolve_mode(cfg: TrainConfig) -> str:
    """``features`` unless ``full`` is asked for; ``auto`` comes from configs written before features
    mode became the default on every device (it was full on a GPU, never measured for accuracy)."""
    return "full" if cfg.mode == "full" else "features"


def first_phase_name(cfg: TrainConfig) -> str:
    """"frozen" over pretrained weights; "scratch" (nothing frozen) when there are none."""
    return "scratch" if cfg.pretrained == "none" and cfg.weights is None else "frozen"


def loss_weights(cfg: TrainConfig, train_y: torch.Tensor, n_classes: int, device: torch.device
                 ) -> torch.Tensor | None:
    """``--class-balance weights``: each class weighs inversely to its share of the training images."""
    if cfg.class_balance != "weights":
        return None
    counts = torch.bincount(train_y, minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).to(device)


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device, pretrained: bool = True) -> XrayNet:
    """The network as training runs it (train and lr-find alike): on the device, channels-last if
    asked (on a CPU, features computed by a channels-first network are about half as fast)."""
    model = create_model(cfg.arch, num_classes, cfg.pretrained if pretrained else "none", cfg.weights).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.arch}"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    train_pixels: np.ndarray  # uint8 (N, H, W)
    valid_pixels: np.ndarray
    notes: list[str]


def load_data(cfg: TrainConfig, progress: bool = True) -> TrainData:
    """Discover, split by patient, decode once (cached) and drop unreadable images with a note."""
    dataset = discover(cfg.data, cfg.patient_rule)
    split = make_split(dataset, cfg.valid_pct, cfg.split, cfg.seed, cfg.keep_val)
    if not split.valid:
        raise PneumoError(f"{cfg.data}: the validation split is empty; lower --valid-pct or add images")
    decoded = decode_images([s.path for s in split.train + split.valid], cfg.image_size, progress=progress)
    notes = list(split.notes) + [f"skipped unreadable {p}: {why}" for p, why in decoded.errors.items()]
    n = len(split.train)
    ok_train, ok_valid = decoded.ok[:n], decoded.ok[n:]
    train = [s for s, ok in zip(split.train, ok_train) if ok]
    valid = [s for s, ok in zip(split.valid, ok_valid) if ok]
    pixels = np.asarray(decoded.pixels)
    return TrainData(dataset.classes, train, valid, pixels[:n][ok_train], pixels[n:][ok_valid], notes)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, **state: Any) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows({k: row[k] for k in METRIC_FIELDS} for row in history)
    atomic_write_text(run_dir / "metrics.csv", out.getvalue())


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------
def train(data: str | Path | None = None, *, resume: bool = False, progress: bool = True,
          stop_after_epoch: int | None = None, **options: Any) -> RunResult:
    """Train a model as ``pneumo train`` does; ``options`` are TrainConfig fields.

    With ``resume=True`` and ``out=RUN_DIR``, the run continues from its last checkpoint with the
    config it was started with.
    """
    run_dir = Path(options["out"]) if options.get("out") else None
    checkpoint_file = run_dir / "checkpoints" / "last.pt" if run_dir else None
    state: dict | None = None
    if resume:
        if checkpoint_file is None or not (run_dir / "config.json").exists():
            raise PneumoError(f"--resume needs --out RUN_DIR of an earlier run (no config.json in {run_dir})")
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())).validate()
        state = load_checkpoint(checkpoint_file) if checkpoint_file.exists() else None
    else:
        cfg = TrainConfig.from_dict({**options, "data": str(data)}).validate()
        run_dir = new_run_dir(cfg)
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise PneumoError(f"{run_dir} holds a run already: add --resume to continue it, or choose another --out")
        cfg.out = str(run_dir)
    checkpoint_file = run_dir / "checkpoints" / "last.pt"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())

    started = time.perf_counter()
    log = lambda line: tqdm.write(line, file=sys.stdout if progress else sys.stderr)  # noqa: E731
    run = prepare_run(cfg, progress, pretrained=state is None)
    model, data_, generator, valid_y = run.model, run.data, run.generator, run.valid_y
    for note in data_.notes:
        log(f"note: {note}")
    atomic_write_json(run_dir / "split.json", {
        "method": cfg.split, "classes": data_.classes, "notes": data_.notes,
        "train": [str(s.path) for s in data_.train], "valid": [str(s.path) for s in data_.valid]})

    history: list[dict] = json.loads(state["history"]) if state else []
    valid_logits: torch.Tensor | None = None
    start_phase, start_epoch = (state["phase"], state["epoch"]) if state else (0, 0)
    if state:
        model.load_state_dict(state["model"])

    phases = [(first_phase_name(cfg), cfg.epochs), ("unfrozen", cfg.unfreeze_epochs)]
    header = f"{'epoch':>5}  {'phase':<8}  {'train_loss':>10}  {'valid_loss':>10}  {'error_rate':>10}  {'time':>6}"
    log(header)
    for row in history:
        log(format_row(row))
    for phase_index, (name, epochs) in enumerate(phases):
        if epochs == 0 or phase_index < start_phase:
            continue
        phase = run.phase(name, run_dir, progress)
        first = start_epoch if phase_index == start_phase else 0
        if state and phase_index == start_phase and first > 0:  # continue mid-phase exactly
            model.load_state_dict(state["model"])  # building the phase may have reloaded cached body weights
            phase.opt.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") and run.device.type == "cuda":  # dropout on a GPU draws from it
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if state.get("scaler") and phase.scaler is not None:  # fp16 loss scale
                phase.scaler.load_state_dict(state["scaler"])
        for epoch in range(first, epochs):
            t0 = time.perf_counter()
            train_loss = phase.train_epoch(epoch, progress)
            t1 = time.perf_counter()
            logits = valid_logits = phase.valid_logits().cpu()
            valid_loss = F.cross_entropy(logits, valid_y).item()
            error = (logits.argmax(1) != valid_y).float().mean().item()
            row = {"epoch": len(history) + 1, "phase": name, "train_loss": round(train_loss, 6),
                   "valid_loss": round(valid_loss, 6), "error_rate": round(error, 6),
                   "time": round(time.perf_counter() - t0, 2), "valid_time": round(time.perf_counter() - t1, 2),
                   "elapsed": round(time.perf_counter() - started, 2)}
            history.append(row)
            log(format_row(row))
            done_phase, done_epoch = (phase_index, epoch + 1)
            save_checkpoint(checkpoint_file, phase=done_phase, epoch=done_epoch, model=model.state_dict(),
                            optimizer=phase.opt.state_dict(), generator=generator.get_state(),
                            torch_rng=torch.get_rng_state(), history=json.dumps(history),
                            cuda_rng=torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
                            scaler=phase.scaler.state_dict() if phase.scaler is not None else {})
            write_metrics(run_dir, history)
            if stop_after_epoch is not None and len(history) >= stop_after_epoch:
                raise StopRequested(f"stopped after epoch {len(history)} as asked")
        start_phase, start_epoch = phase_index + 1, 0

    from pneumo.train.finish import finish_run  # evaluation and model export
    if cfg.tta:
        valid_logits = None  # predict afresh with flipped copies
    return finish_run(cfg, run_dir, model, data_, history, run.device, valid_logits, progress)


@dataclass
class RunSetup:
    """What a training run and an LR range test both build from a config, in the same order."""
    cfg: TrainConfig
    device: torch.device
    mode: str                          # "features" or "full"
    data: TrainData
    model: XrayNet
    generator: torch.Generator         # augmentation and shuffling; saved in checkpoints
    train_y: torch.Tensor
    valid_y: torch.Tensor
    class_weights: torch.Tensor | None

    def phase(self, name: str, run_dir: Path, progress: bool) -> Phase:
        return build_phase(name, self.cfg, self.mode, self.model, self.data, self.device, self.generator,
                           self.train_y, self.valid_y, self.class_weights,
                           autocast_dtype(self.cfg.precision, self.device), run_dir, progress)


def prepare_run(cfg: TrainConfig, progress: bool = True, pretrained: bool = True) -> RunSetup:
    """Seed, device, data (split and decoded), model, labels and class weights."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    mode = resolve_mode(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    data = load_data(cfg, progress)
    model = build_model(cfg, len(data.classes), device, pretrained)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_y = torch.tensor([s.label for s in data.train])
    valid_y = torch.tensor([s.label for s in data.valid])
    return RunSetup(cfg, device, mode, data, model, generator, train_y, valid_y,
                    loss_weights(cfg, train_y, len(data.classes), device))


def format_row(row: dict) -> str:
    minutes, seconds = divmod(int(row["time"]), 60)
    return (f"{row['epoch']:>5}  {row['phase']:<8}  {row['train_loss']:>10.4f}  {row['valid_loss']:>10.4f}  "
            f"{row['error_rate']:>10.4f}  {minutes:02d}:{seconds:02d}")


def build_phase(name: str, cfg: TrainConfig, mode: str, model: XrayNet, data: TrainData, device: torch.device,
                generator: torch.Generator, train_y: torch.Tensor, valid_y: torch.Tensor,
                class_weights: torch.Tensor | None, amp: torch.dtype | None, run_dir: Path,
                progress: bool) -> Phase:
    common = dict(n_train=len(data.train), generator=generator, class_weights=class_weights, device=device)
    if name == "frozen" and mode == "features":
        feats = cached_features(cfg, model, data, device, generator, run_dir, progress)
        set_body_trainable(model, False, train_bn=False, trainable_stages=cfg.trainable_stages)
        opt = make_optimizer(*frozen_phase_groups(model, cfg), cfg.weight_decay)
        return HeadOnFeatures(model, opt, cfg.epochs, cfg.batch_size, train_feats=feats["train"].to(device),
                              train_y=train_y.to(device), valid_feats=feats["valid"].to(device),
                              trainable_stages=cfg.trainable_stages, **common)
    if name == "frozen":
        set_body_trainable(model, False, train_bn=True, trainable_stages=cfg.trainable_stages)
        opt = make_optimizer(*frozen_phase_groups(model, cfg, with_body_bn=True), cfg.weight_decay)
        epochs = cfg.epochs
    elif name == "scratch":  # from scratch nothing is frozen: random features teach nothing
        set_body_trainable(model, True)
        opt = make_optimizer([list(model.parameters())], [cfg.lr], cfg.weight_decay)
        epochs = cfg.epochs
    else:
        set_body_trainable(model, True)
        lr = cfg.unfreeze_lr or cfg.lr / 2
        groups = model.parameter_groups()
        opt = make_optimizer(groups, discriminative_lrs(lr, len(groups)), cfg.weight_decay)
        epochs = cfg.unfreeze_epochs
    return FullNetwork(model, opt, epochs, cfg.batch_size, name=name,
                       train_x=torch.from_numpy(data.train_pixels).to(device), train_y=train_y.to(device),
                       valid_x=torch.from_numpy(data.valid_pixels).to(device), augment=cfg.augment, amp=amp,
                       channels_last=cfg.channels_last, **common)


TAIL_LR_RATIO = 0.1  # the trainable body stages learn at a tenth of the head's rate (bench/experiments)


def frozen_phase_groups(model: XrayNet, cfg: TrainConfig, with_body_bn: bool = False
                        ) -> tuple[list[list[torch.nn.Parameter]], list[float]]:
    """Parameter groups and peak LRs of the frozen phase: [the rest of the body: BN only], the
    trainable stages, the head."""
    tail = list(model.tail(cfg.trainable_stages).parameters())
    tail_ids = {id(p) for p in tail}
    rest = [p for p in model.body.parameters() if p.requires_grad and id(p) not in tail_ids] if with_body_bn else []
    return [rest, tail, list(model.head.parameters())], [cfg.lr, cfg.lr * TAIL_LR_RATIO, cfg.lr]


def features_key(cfg: TrainConfig, data: TrainData) -> str:
    """Everything the cached features depend on: backbone, weights, images, size, adaptation, views."""
    from pneumo.data.cache import cache_key
    weights = cfg.weights and Path(cfg.weights)
    stamp = f"{weights}:{weights.stat().st_mtime_ns}" if weights and weights.exists() else str(weights)
    parts = [cfg.arch, cfg.pretrained, stamp, cfg.image_size, cfg.bn_adapt_images, cfg.bn_adapt_batch_size,
             cfg.feature_views, cfg.augment, cfg.trainable_stages, cfg.seed, cache_key([s.path for s in data.train], cfg.image_size),
             cache_key([s.path for s in data.valid], cfg.image_size)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def cached_features(cfg: TrainConfig, model: XrayNet, data: TrainData, device: torch.device,
                    generator: torch.Generator, run_dir: Path, progress: bool) -> dict[str, torch.Tensor]:
    """BatchNorm adapted on a seeded sample of training images, then features for every image.

    Stored with the adapted body in the run folder (a resumed run skips both passes) and in the
    shared cache (``lr-find`` then ``train``, or runs that differ only in the head, compute them once).
    """
    from pneumo.data.cache import default_cache_dir
    key = features_key(cfg, data)
    path = run_dir / "checkpoints" / "features.pt"
    shared = default_cache_dir() / f"features-{key}.pt"
    use_shared = os.environ.get("PNEUMO_NO_CACHE") != "1"
    for candidate in (path, shared) if use_shared else (path,):
        if candidate.exists():
            saved = load_checkpoint(candidate)
            if saved.get("key") != key:  # another data set or config wrote this folder before
                continue
            model.body.load_state_dict(saved["body"])
            generator.set_state(saved["generator"])
            if candidate != path:
                save_checkpoint(path, **saved)
            return {"train": saved["train"], "valid": saved["valid"]}
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.permutation(len(data.train_pixels))[:cfg.bn_adapt_images])
    if cfg.bn_adapt_images > 0:
        adapt_batchnorm(model, data.train_pixels[sample], device, cfg.bn_adapt_batch_size, progress=progress)
    views = [extract_features(model, data.train_pixels, device, progress=progress,
                              generator=generator if (cfg.augment and v > 0) else None,
                              desc=f"features, train view {v + 1}/{cfg.feature_views}",
                              trainable_stages=cfg.trainable_stages)
             for v in range(cfg.feature_views)]
    valid = extract_features(model, data.valid_pixels, device, progress=progress, desc="features, valid",
                             trainable_stages=cfg.trainable_stages, half=False)
    feats = {"train": torch.stack(views), "valid": valid}
    saved = dict(key=key, body=model.body.state_dict(), generator=generator.get_state(), **feats)
    save_checkpoint(path, **saved)
    if use_shared:
        try:
            save_checkpoint(shared, **saved)
        except OSError:
            pass  # a read-only cache costs time next run, never this one
    return feats
