"""What a training run and an LR range test both build from a config, in the same order.

``prepare_run`` seeds, picks the device, loads the data (split and decoded) and builds the model; the
returned ``RunSetup`` is all a phase needs (``phases.build_phase``). ``RunSetup.timings`` records
how long the costly stages took (``decode_s``, ``create_model_s``, then ``bn_adapt_s`` and
``features_s`` when the features phase computes its cache), so benchmarks read them instead of
wrapping pneumo's functions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from pneumo.config import TrainConfig
from pneumo.data.cache import decode_images, duplicate_groups
from pneumo.data.check import require_trainable
from pneumo.data.folders import Sample, discover, make_split, printable
from pneumo.errors import DataError, PneumoError
from pneumo.nets.models import XrayNet, create_model
from pneumo.training import distributed


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
    """ "frozen" over pretrained weights; "scratch" (nothing frozen) when there are none."""
    return "scratch" if cfg.pretrained == "none" and cfg.weights is None else "frozen"


def loss_weights(cfg: TrainConfig, train_y: torch.Tensor, n_classes: int, device: torch.device) -> torch.Tensor | None:
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


@contextmanager
def timed(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[name]`` (nothing when ``timings`` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


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


def load_data(cfg: TrainConfig, progress: bool = True, timings: dict[str, float] | None = None) -> TrainData:
    """Discover, refuse what ``data check`` fails, split by patient (byte-identical copies kept on one
    side), decode once (cached) and drop unreadable images with a note."""
    dataset = discover(cfg.data, cfg.patient_rule)
    require_trainable(dataset)
    groups = None
    if cfg.split == "patient":
        pool = dataset.split("train") + dataset.split("valid")
        groups = duplicate_groups([s.path for s in pool], progress=progress)
    split = make_split(dataset, cfg.valid_pct, cfg.split, cfg.seed, cfg.keep_val, groups=groups)
    for side, samples in (("training", split.train), ("validation", split.valid)):
        if not samples:
            raise DataError(f"{cfg.data}: the {side} split is empty; change --valid-pct or add images")
    with timed(timings, "decode_s"):
        decoded = decode_images([s.path for s in split.train + split.valid], cfg.image_size, progress=progress)
    notes = list(split.notes) + [f"skipped unreadable {printable(p)}: {why}" for p, why in decoded.errors.items()]
    n = len(split.train)
    ok_train, ok_valid = decoded.ok[:n], decoded.ok[n:]
    train = [s for s, ok in zip(split.train, ok_train) if ok]
    valid = [s for s, ok in zip(split.valid, ok_valid) if ok]
    for side, samples, readable in (("training", split.train, train), ("validation", split.valid, valid)):
        _require_readable(side, samples, readable, decoded.errors, dataset.classes)
    pixels = np.asarray(decoded.pixels)
    return TrainData(dataset.classes, train, valid, _rows(pixels[:n], ok_train), _rows(pixels[n:], ok_valid), notes)


def _rows(pixels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The readable rows: a view when all are (a memory-mapped decode cache stays shared between the
    ranks of a distributed run, one copy per node), else a copy without the unreadable ones."""
    return pixels if ok.all() else pixels[ok]


def _require_readable(
    side: str, samples: list[Sample], readable: list[Sample], errors: dict[str, str], classes: list[str]
) -> None:
    """A DataError when unreadable files leave a side of the split, or a class on it, without images."""
    if len(readable) == len(samples):
        return
    bad = [s for s in samples if str(s.path) in errors]
    example = f"e.g. {printable(bad[0].path)}: {errors[str(bad[0].path)]}" if bad else ""
    if not readable:
        raise DataError(f"all {len(samples)} {side} images are unreadable ({example}); `pneumo data check` lists them")
    missing = sorted({classes[s.label] for s in samples} - {classes[s.label] for s in readable})
    if missing:
        raise DataError(
            f"no readable {side} images of {', '.join(missing)}: {len(bad)} of {len(samples)} {side} images "
            f"are unreadable ({example}); `pneumo data check` lists them"
        )


# ---------------------------------------------------------------------------------------------
# everything a phase is built from
# ---------------------------------------------------------------------------------------------
@dataclass
class RunSetup:
    """What a training run and an LR range test both build from a config, in the same order."""

    cfg: TrainConfig
    device: torch.device
    mode: str  # "features" or "full"
    data: TrainData
    model: XrayNet
    generator: torch.Generator  # augmentation and shuffling; saved in checkpoints
    train_y: torch.Tensor
    valid_y: torch.Tensor
    class_weights: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per costly stage, as they happen

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of full-network steps (None: fp32)."""
        return autocast_dtype(self.cfg.precision, self.device)


def prepare_run(cfg: TrainConfig, progress: bool = True, pretrained: bool = True) -> RunSetup:
    """Seed, device, data (split and decoded), model, labels and class weights."""
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    mode = resolve_mode(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    with distributed.main_first():  # under torchrun the other ranks then read rank 0's decode cache
        data = load_data(cfg, progress, timings)
    with timed(timings, "create_model_s"):
        model = build_model(cfg, len(data.classes), device, pretrained)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_y = torch.tensor([s.label for s in data.train])
    valid_y = torch.tensor([s.label for s in data.valid])
    return RunSetup(
        cfg,
        device,
        mode,
        data,
        model,
        generator,
        train_y,
        valid_y,
        loss_weights(cfg, train_y, len(data.classes), device),
        timings,
    )
