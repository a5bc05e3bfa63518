"""Every training default in one commented block; the resolved config is saved with each run and model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pneumo.errors import PneumoError


@dataclass
class TrainConfig:
    # --- data -----------------------------------------------------------------------------------
    data: str = ""                   # a Kaggle-layout root or a folder of class folders
    image_size: int = 224            # square side the images are squashed to (the Kaggle copy's size)
    valid_pct: float | None = None   # None: a usable val folder if there is one, else 20% by patient
    split: str = "patient"           # "patient" (no patient on both sides) or "random" (tutorial only)
    keep_val: bool = False           # use a tiny val folder as it is instead of folding it into train
    patient_rule: str = "kermany"    # how a file name gives its patient: kermany | filename | regex:...
    # --- model ----------------------------------------------------------------------------------
    arch: str = "efficientnet_lite0"  # see `pneumo models`
    pretrained: str = "imagenet"     # "imagenet" or "none" (train from scratch)
    weights: str | None = None       # a local ImageNet checkpoint file (needed for ResNets offline)
    # --- recipe: the tutorial's fit_one_cycle(8, 3e-3) with the body frozen but for its last two
    # stages, class-balanced loss, two cached views per image: the winner of bench/experiments/recipe.md
    epochs: int = 8                  # first phase: body frozen (BatchNorm adapted), its last stages and the head learn
    lr: float = 3e-3                 # one-cycle peak learning rate
    batch_size: int = 64
    weight_decay: float = 0.01       # decoupled (AdamW), as fastai
    unfreeze_epochs: int = 0         # >0: then fine-tune the whole net with discriminative LRs
    unfreeze_lr: float | None = None  # peak LR of the fine-tuning phase; None: lr / 2 as fastai's fine_tune
    # --- how the frozen phase runs ------------------------------------------------------------------
    mode: str = "features"           # "features": adapt BN once, cache body features, train the head
                                     # (and trainable stages) on them, on any device: the recipe measured
                                     # in bench/; "full": augment and run the body every step ("auto",
                                     # in configs of older runs, means features)
    bn_adapt_images: int = 1024      # training images whose statistics re-estimate BatchNorm (features)
    bn_adapt_batch_size: int = 8     # images per batch of that pass: 8 runs 1.7x faster than 32 on a
                                     # CPU and ranked higher on the selection split (bench/experiments)
    feature_views: int = 2           # copies of each training image to cache (features mode): the
                                     # first as it is, the others augmented
    trainable_stages: int = 2        # the body's last N stages train with the head, at a tenth of its
                                     # LR (cached maps in features mode); 0 = the tutorial's frozen body
    augment: bool = True             # random rotation, zoom, shift, lighting, horizontal flip
    class_balance: str = "weights"   # "weights": loss weights inverse to class frequency, or "none"
    # --- decisions --------------------------------------------------------------------------------
    threshold: str = "youden"        # how validation chooses the stored decision threshold:
                                     # youden | sensitivity:0.95 | fixed:0.5
    tta: bool = False                # average predictions over flipped copies at evaluation
    # --- machinery --------------------------------------------------------------------------------
    seed: int = 42
    device: str = "auto"             # auto | cpu | cuda | cuda:1 ...
    precision: str = "auto"          # auto (bf16 on a GPU, fp32 on a CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    out: str | None = None           # run folder; None: a new folder under ./runs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise PneumoError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def validate(self) -> "TrainConfig":
        if self.mode not in ("auto", "features", "full"):
            raise PneumoError(f"mode must be auto, features or full, not {self.mode!r}")
        if self.class_balance not in ("none", "weights"):
            raise PneumoError(f"class_balance must be none or weights, not {self.class_balance!r}")
        if self.epochs < 0 or self.unfreeze_epochs < 0 or self.epochs + self.unfreeze_epochs == 0:
            raise PneumoError("train for at least one epoch (--epochs or --unfreeze-epochs)")
        if self.bn_adapt_batch_size < 2:
            raise PneumoError(f"--bn-adapt-batch-size must be 2 or more, not {self.bn_adapt_batch_size}")
        if self.trainable_stages < 0:
            raise PneumoError(f"--trainable-stages must be 0 or more, not {self.trainable_stages}")
        if not self.lr > 0:
            raise PneumoError(f"--lr must be positive, got {self.lr}")
        return self
