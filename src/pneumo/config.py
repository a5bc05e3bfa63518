"""Every training default in one commented block; the resolved config is saved with each run and model.

Each field carries its own help text, choices and range (``field(metadata=...)``): ``pneumo train``
and ``pneumo lr-find`` build their options from them, and ``__post_init__`` checks every value
against them, so a mistyped option fails when the config is made, with a message naming the option
as the CLI spells it (``--batch-size``), before any data is read or any folder written.
Importing this module loads neither torch nor the data: the checks use pure-data modules only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from pneumo.data.folders import PATIENT_RULES
from pneumo.decision import DEFAULT_THRESHOLD_RULE, THRESHOLD_METHODS, parse_threshold_method
from pneumo.errors import PneumoError
from pneumo.nets.registry import BACKBONES

DEFAULT_UNFREEZE_EPOCHS = 4  # what `pneumo train --unfreeze` fine-tunes for when --unfreeze-epochs is not given
MAX_STAGES = 4  # --trainable-stages: every backbone's body has more (ResNets 5, EfficientNets 9)
HEATMAP_CMAP = "viridis"  # Grad-CAM overlay colour map: perceptually uniform and colour-blind safe
MAX_SEED = 2**32 - 1  # numpy's generators refuse negative seeds

SPLITS = ("patient", "random")
PRETRAINED = ("imagenet", "none")
MODES = ("auto", "features", "full")  # auto: what configs of older runs say, run as features
BALANCE = ("none", "weights")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUGMENT_POLICIES = ("standard", "radiograph")  # implemented in data.augment (which imports torch)

# a field's own rule: None when the value is fine, else what is wrong ("" when `expect` says it all)
Check = Callable[[Any], "str | None"]


def option_flag(name: str) -> str:
    """The CLI spelling of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Check | None = None,
    path: bool = False,
    train_only: bool = False,
    positional: bool = False,
) -> Any:
    """A TrainConfig field with what the CLI and the checks need to know about it.

    ``choices``: the allowed strings; ``ge``/``gt``/``le``/``lt``: the numeric range (>=, >, <=, <);
    ``check``: any further rule (see ``rule``); ``path``: a path-like value is stored as a string;
    ``train_only``: ``pneumo lr-find`` does not take it; ``positional``: the CLI takes it as an
    argument, not an option.
    """
    return field(
        default=default,
        metadata=dict(
            help=help,
            choices=choices,
            ge=ge,
            gt=gt,
            le=le,
            lt=lt,
            check=check,
            path=path,
            train_only=train_only,
            positional=positional,
        ),
    )


def rule(expect: str) -> Callable[[Check], Check]:
    """Marks a check with what it allows, in words, for its error message and the CLI's help."""

    def mark(check: Check) -> Check:
        check.expect = expect  # type: ignore[attr-defined]
        return check

    return mark


# ---------------------------------------------------------------------------------------------
# the rules that are more than a type, a choice or a range
# ---------------------------------------------------------------------------------------------
@rule("kermany, filename or regex:PATTERN whose first (group) is the patient")
def _patient_rule(spec: str) -> str | None:
    """Mirrors pneumo.data.folders.patient_rule, whose ``regex:`` rule takes the first group as the patient."""
    if spec in PATIENT_RULES:
        return None
    if not spec.startswith("regex:"):
        return ""
    try:
        compiled = re.compile(spec[len("regex:") :])
    except re.error as exc:
        return f"the pattern does not compile: {exc}"
    return None if compiled.groups else "the pattern has no (group) to capture the patient"


@rule(THRESHOLD_METHODS)
def _threshold(method: str) -> str | None:
    try:
        parse_threshold_method(method)
    except PneumoError as exc:  # keep only what the list of methods does not say already
        detail = str(exc).split(f"{method!r}: ", 1)[-1]
        return "" if detail.startswith("use ") else detail
    return None


@rule("auto, cpu, mps, cuda or cuda:N")
def _device(spec: str) -> str | None:
    return None if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec) else ""


@rule("one of " + ", ".join(BACKBONES))
def _arch(name: str) -> str | None:
    return None if name in BACKBONES else "see `pneumo models`"


@dataclass
class TrainConfig:
    # One line per option: default, help (as `pneumo train --help` shows it), then what it allows.
    # --- data -----------------------------------------------------------------------------------
    data: str = option("", "a Kaggle-layout root or a folder of class folders", path=True, positional=True)
    image_size: int = option(224, "square side the images are squashed to (the Kaggle copy's)", ge=32, le=1024)
    valid_pct: float | None = option(None, "validation share (unset: the val folder if usable, else 0.2)", gt=0, lt=1)
    #  a usable val folder has 100+ images; the share is split off train by patient (see --split)
    split: str = option("patient", "no patient on both sides, or the tutorial's random split", choices=SPLITS)
    keep_val: bool = option(False, "use a tiny val folder as it is instead of folding it into train")
    patient_rule: str = option("kermany", "how a file name gives its patient", check=_patient_rule)
    # --- model ----------------------------------------------------------------------------------
    arch: str = option("efficientnet_lite0", "backbone (see `pneumo models`)", check=_arch)
    pretrained: str = option("imagenet", "ImageNet weights, or none: train from scratch", choices=PRETRAINED)
    weights: str | None = option(None, "ImageNet weights file, .pth or .safetensors (ResNets offline)", path=True)
    # --- recipe: the tutorial's fit_one_cycle(8, 3e-3) with the body frozen but for its last two
    # stages, class-balanced loss, two cached views per image: the winner of bench/experiments/recipe.md
    epochs: int = option(8, "first phase: body frozen but for its last stages", ge=0, train_only=True)
    lr: float = option(
        3e-3,
        "one-cycle peak learning rate; the default was measured best on the full Kaggle data "
        "(bench/experiments/recipe.md); `pneumo lr-find` suggests one for other data",
        gt=0,
        train_only=True,
    )
    batch_size: int = option(64, "images per step (BatchNorm in the head needs two)", ge=2)
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW), as fastai", ge=0)
    unfreeze_epochs: int = option(0, "then fine-tune the whole net with discriminative LRs", ge=0, train_only=True)
    unfreeze_lr: float | None = option(None, "fine-tuning peak LR (unset: lr / 2)", gt=0, train_only=True)
    #  spread lr/100..lr over the body's stages; lr / 2 is fastai's fine_tune
    # --- how the frozen phase runs ----------------------------------------------------------------
    mode: str = option("features", "train on cached body features, or run the full net", choices=MODES)
    #  "features": adapt BN once, cache body features, train the head (and trainable stages) on them,
    #  on any device: the recipe measured in bench/; "full": augment and run the body every step.
    #  "auto", in configs of older runs, means features.
    bn_adapt_images: int = option(1024, "features: images that re-estimate BatchNorm (0: ImageNet's)", ge=0)
    bn_adapt_batch_size: int = option(8, "features: images per batch of the BatchNorm pass", ge=2)
    #  8 runs 1.7x faster than 32 on a CPU and ranked higher on the selection split (bench/experiments)
    feature_views: int = option(4, "features: copies of each image to cache, the first as it is", ge=1)
    #  4 with the radiograph policy won the robust rule on the selection split (issue 15, bench/experiments)
    trainable_stages: int = option(2, "the body's last N stages train with the head", ge=0, le=MAX_STAGES)
    #  at a tenth of the head's LR (on cached maps in features mode); 0 = the tutorial's frozen body;
    #  what each N trains: `pneumo models`
    augment: bool = option(True, "random rotation, zoom, shift, lighting, horizontal flip")
    augment_policy: str = option(
        "radiograph",
        "with --augment: standard, or radiograph: random resized crops, gamma, contrast, blur or sharpen, noise, "
        "JPEG quality",
        choices=AUGMENT_POLICIES,
    )
    #  radiograph: the outside films' differences (data.shifts) drawn at random, for films pneumo never saw;
    #  the default since issue 15: under shift it kept balanced accuracy 0.944 where standard fell to 0.873
    consistency: float = option(
        0.0,
        "features: weight of a loss asking two views of one film for the same reading (AugMix's "
        "Jensen-Shannon consistency); 0: off",
        ge=0,
        train_only=True,
    )
    #  against the consistency table of bench/outside.py (a re-encoded film read differently); each step
    #  then takes half a batch of films, two different views of each
    class_balance: str = option("weights", "loss weights inverse to class frequency, or none", choices=BALANCE)
    # --- decisions --------------------------------------------------------------------------------
    threshold: str = option(
        DEFAULT_THRESHOLD_RULE,
        "how validation sets the decision threshold (youden | sensitivity:X | specificity:X | fixed:X)",
        check=_threshold,
        train_only=True,
    )
    tta: bool = option(
        False,
        "test-time augmentation: validation averages each image's prediction with its left-right mirror's "
        "(about twice the inference time)",
        train_only=True,
    )
    # --- machinery --------------------------------------------------------------------------------
    seed: int = option(42, "seeds the split, the head, augmentation and batch order", ge=0, le=MAX_SEED)
    device: str = option("auto", "auto: a CUDA GPU if there is one", check=_device)
    precision: str = option("auto", "autocast: auto is bf16 on a GPU, fp32 on a CPU", choices=PRECISIONS)
    channels_last: bool = option(True, "channels-last memory layout (about 2x faster on a CPU)")
    out: str | None = option(None, "run folder (unset: a new folder under ./runs)", path=True, train_only=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Check (and normalise: ints, floats, path strings) every field; return self."""
        for f in fields(self):
            setattr(self, f.name, checked(f.name, getattr(self, f.name)))
        if self.epochs + self.unfreeze_epochs == 0:
            raise PneumoError("train for at least one epoch (--epochs or --unfreeze-epochs above 0)")
        if self.consistency and (self.mode == "full" or self.feature_views < 2):
            raise PneumoError(
                "--consistency compares two cached views of a film: "
                "it needs --mode features and --feature-views 2 or more"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from saved or given values; the saved configs of older runs (``mode: auto``) load."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise PneumoError(
                f"unknown training option(s): {', '.join(sorted(unknown))}; "
                f"known: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# checking one value
# ---------------------------------------------------------------------------------------------
FIELDS = {f.name: f for f in fields(TrainConfig)}
KINDS = {"str": str, "int": int, "float": float, "bool": bool}


def field_kind(name: str) -> tuple[type, bool]:
    """(str | int | float | bool, whether None is allowed), read from the field's annotation."""
    annotation = str(FIELDS[name].type)
    optional = annotation.endswith(" | None")
    return KINDS[annotation.removesuffix(" | None")], optional


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def expectation(name: str, unset: bool = True) -> str:
    """What a field allows, in words: ``an integer >= 2``, ``one of patient, random``; ``unset``:
    say that None is allowed too, where it is."""
    meta = FIELDS[name].metadata
    kind, optional = field_kind(name)
    if meta["check"]:
        text = meta["check"].expect
    elif meta["path"]:
        text = "a path"
    elif meta["choices"]:
        text = "one of " + ", ".join(meta["choices"])
    else:
        text = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}[kind]
        low = (">=", meta["ge"]) if meta["ge"] is not None else (">", meta["gt"])
        high = ("<=", meta["le"]) if meta["le"] is not None else ("<", meta["lt"])
        if low[1] is not None and high[1] is not None:
            if low[0] == ">=" and high[0] == "<=":
                text += f" in {_number(low[1])}..{_number(high[1])}"
            else:  # (the only such field, --valid-pct, is open at both ends)
                text += f" strictly between {_number(low[1])} and {_number(high[1])}"
        elif low[1] is not None:
            text += f" {low[0]} {_number(low[1])}"
        elif high[1] is not None:
            text += f" {high[0]} {_number(high[1])}"
    return text + (" (or unset)" if optional and unset else "")


def checked(name: str, value: Any) -> Any:
    """``value`` as the field ``name`` stores it, or a PneumoError naming the option and what it allows."""
    meta = FIELDS[name].metadata
    kind, optional = field_kind(name)

    def refuse(problem: str = "") -> PneumoError:
        why = f" ({problem})" if problem else ""
        return PneumoError(f"{option_flag(name)} must be {expectation(name)}, not {value!r}{why}")

    if value is None:
        if optional:
            return None
        raise refuse()
    if kind is bool:
        if not isinstance(value, bool):
            raise refuse()
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise refuse()
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise refuse()
        value = float(value)
        if not math.isfinite(value):
            raise refuse()
    else:
        if meta["path"] and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise refuse()
    if meta["choices"] and value not in meta["choices"]:
        raise refuse()
    if kind in (int, float) and not (
        (meta["ge"] is None or value >= meta["ge"])
        and (meta["gt"] is None or value > meta["gt"])
        and (meta["le"] is None or value <= meta["le"])
        and (meta["lt"] is None or value < meta["lt"])
    ):
        raise refuse()
    if meta["check"]:
        problem = meta["check"](value)
        if problem is not None:
            raise refuse(problem)
    return value
