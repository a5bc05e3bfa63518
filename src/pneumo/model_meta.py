"""``model.json``: what a model folder says about itself, checked on load, and how it decides.

Everything inference needs besides the weights: classes, image size, backbone, temperature and the
decision threshold. The threshold lives here, on the model, and ``ModelMeta.decide`` is the one
place where a probability becomes a label. Every field is checked with limits when the file is
read, because a model folder can come from anywhere: a temperature of 0 would turn every
probability into NaN, an image size of 100,000 would allocate until the machine falls over.
Pure JSON: reading a model description loads neither torch nor the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.decision import decide
from pneumo.errors import ModelError
from pneumo.io_utils import atomic_write_json
from pneumo.version import __version__

MAX_IMAGE_SIZE = 2048  # far above any pneumo model; guards memory against a hostile model.json
MIN_IMAGE_SIZE = 16


@dataclass
class ModelMeta:
    arch: str
    classes: list[str]
    image_size: int
    threshold: float = 0.5  # on p(positive class); chosen on validation
    positive_class: str | None = None
    temperature: float = 1.0  # divides logits before softmax (fitted on validation)
    threshold_method: str = "fixed:0.5"
    hidden: int = 512
    dropout: float = 0.5
    normalisation: dict = field(default_factory=dict)  # informational: the model applies it itself
    pneumo_version: str = __version__
    trained_with: dict = field(default_factory=dict)  # the training config
    members: list[str] = field(default_factory=list)  # an ensemble's member model folders (relative)
    adaptation: dict = field(default_factory=dict)  # `pneumo adapt`: what was re-estimated, on how many films
    # how the threshold was chosen: its bootstrap interval, a fallback's reason, and the threshold of
    # every other rule on the same validation films (evaluation.metrics.operating_threshold)
    operating_points: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ the decision rule
    @property
    def positive_index(self) -> int | None:
        """Index of the positive class when the model decides by threshold, else None."""
        if len(self.classes) == 2 and self.positive_class in self.classes:
            return self.classes.index(self.positive_class)
        return None

    @property
    def operating_threshold(self) -> float | None:
        """The threshold on p(positive) in use, or None when the model decides by argmax."""
        return float(self.threshold) if self.positive_index is not None else None

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices for calibrated probabilities ``(N, K)``."""
        return decide(probs, self.positive_index, self.operating_threshold)

    # ------------------------------------------------------------------ checks
    def check(self, source: str = "model.json") -> ModelMeta:
        """Raise ModelError naming ``source`` and the field unless every field is usable."""

        def bad(name: str, why: str) -> ModelError:
            return ModelError(f"{source}: field {name!r} {why}")

        if not isinstance(self.arch, str) or not self.arch:
            raise bad("arch", "must name a backbone")
        if (
            not isinstance(self.classes, list)
            or len(self.classes) < 2
            or not all(isinstance(c, str) and c for c in self.classes)
            or len(set(self.classes)) != len(self.classes)
        ):
            raise bad("classes", f"must list at least two distinct class names, not {self.classes!r}")
        if not _is_int(self.image_size) or not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise bad(
                "image_size",
                f"must be a whole number of pixels in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], not {self.image_size!r}",
            )
        if not _is_number(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise bad("threshold", f"must be a probability in [0, 1], not {self.threshold!r}")
        if not _is_number(self.temperature) or not 0.01 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be a number in [0.01, 100], not {self.temperature!r}")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise bad("positive_class", f"{self.positive_class!r} is not one of the classes {self.classes}")
        if not isinstance(self.threshold_method, str):
            raise bad("threshold_method", "must be text")
        if not _is_int(self.hidden) or not 1 <= self.hidden <= 65536:
            raise bad("hidden", f"must be a whole number in [1, 65536], not {self.hidden!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must lie in [0, 1), not {self.dropout!r}")
        for name in ("normalisation", "trained_with", "adaptation", "operating_points"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "must be an object")
        for key in ("mean", "std"):  # informational, but shown by `serve` and the model card: sane or absent
            if key in self.normalisation and not _is_stat(self.normalisation[key], positive=key == "std"):
                raise bad(
                    "normalisation",
                    f"{key!r} must be a finite number{' above 0' if key == 'std' else ''}, or a list of 1 or 3 "
                    f"of them (grey or RGB), not {self.normalisation[key]!r}",
                )
        if not isinstance(self.pneumo_version, str):
            raise bad("pneumo_version", f"must be text, not {self.pneumo_version!r}")
        if not isinstance(self.members, list) or not all(isinstance(m, str) for m in self.members):
            raise bad("members", "must list member folders")
        return self


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def model_folder(path: str | Path) -> Path:
    """The model folder ``path`` names: itself, or ``path/model`` when it is a run folder.

    Here, not in ``infer.model_folder`` (which re-exports it), because the torch-free ONNX route and
    the audit trail resolve folders too."""
    folder = Path(path)
    if (folder / "model").is_dir() and not (folder / "model.json").exists():
        folder = folder / "model"
    return folder


def _is_stat(v: Any, positive: bool) -> bool:
    """A per-channel input statistic: one number (grey) or a list of 1 or 3 (RGB)."""
    values = v if isinstance(v, list) and len(v) in (1, 3) else [v]
    return all(_is_number(x) and (x > 0 or not positive) for x in values)


def read_model_meta(path: str | Path) -> ModelMeta:
    """``model.json`` as a checked ModelMeta; any problem is a ModelError naming the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{path}: missing; a model folder holds model.json and model.safetensors "
            f"(written by `pneumo train` under RUN/model)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a pneumo model description ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, dict):
        raise ModelError(f"{path}: not a pneumo model description (a JSON object is expected)")
    known = {f.name for f in fields(ModelMeta)}
    missing = [k for k in ("arch", "classes", "image_size") if k not in values]
    if missing:
        raise ModelError(f"{path}: not a pneumo model description (missing {', '.join(missing)})")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelError(f"{path}: unknown field(s) {', '.join(unknown)}: written by a newer pneumo?")
    return ModelMeta(**values).check(str(path))


def write_model_meta(path: str | Path, meta: ModelMeta) -> Path:
    return atomic_write_json(path, asdict(meta.check(str(path))))
