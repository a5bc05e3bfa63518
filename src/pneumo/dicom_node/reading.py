"""One received film read: the finding in words, p(positive), the scope verdict, the Grad-CAM overlay.

A film the DICOM tags place out of scope (another modality, body part or view: ``infer.scope``) is not
read at all: no pixel goes through the network. A film the network reads but the feature-distance
check places out of scope is "not assessed" too; its probabilities are kept for the audit trail only.
The overlay is the film at no more than ``OVERLAY_MAX_SIDE`` pixels a side with the same words as the
SR burnt into a banner above it (``plots.heatmap_overlay_image``); on the onnx runtime there is no
Grad-CAM (it needs the network) and the banner says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pneumo.audit.record import model_identity
from pneumo.data.imaging import open_image, prepare, to_grey_uint8
from pneumo.decision import describe_reading
from pneumo.errors import ImageError
from pneumo.infer.runtime import runtime_of
from pneumo.infer.scope import ScopeCheck, dicom_reasons
from pneumo.version import __version__

OVERLAY_MAX_SIDE = 1024  # the secondary capture: enough to see the map, small enough for any PACS viewer
SUSPECTED, NOT_SUSPECTED, NOT_ASSESSED = "suspected", "not suspected", "not assessed"
NOT_A_DIAGNOSIS = "Decision support only, not a diagnosis: a qualified reader must review the film."
MANUFACTURER = "pneumo"


@dataclass(frozen=True)
class ModelFacts:
    """What the results say about the model: its id, version, decision rule and how it was chosen."""

    name: str  # "pneumo efficientnet_lite0"
    version: str  # pneumo's version and the model's content hash
    model_id: str  # sha256 of model.json + weights (audit.record.model_identity)
    positive_class: str | None
    threshold: float | None
    threshold_method: str
    runtime: str

    @classmethod
    def of(cls, loaded: Any, folder: Any, runtime: str) -> ModelFacts:
        meta = loaded.meta
        model_id = model_identity(folder)
        return cls(
            name=f"pneumo {meta.arch}",
            version=f"pneumo {__version__}, model sha256:{model_id[:16]}",
            model_id=model_id,
            positive_class=meta.positive_class,
            threshold=loaded.threshold,
            threshold_method=meta.threshold_method,
            runtime=runtime,
        )

    @property
    def threshold_words(self) -> str:
        """How the threshold was chosen, in words (the rule and that it was fitted on validation films)."""
        return f"{self.threshold_method}, chosen on the training run's validation films"


@dataclass
class FilmReading:
    """What the node says about one film; ``overlay`` is None when its pixels could not be decoded."""

    finding: str  # SUSPECTED | NOT_SUSPECTED | NOT_ASSESSED
    reason: str  # why not assessed ("" when assessed)
    words: str  # the finding in one sentence, as the banner and the SR say it
    probabilities: list[float] | None  # None when the network never saw the film
    p_positive: float | None
    in_scope: bool
    overlay: Image.Image | None
    size: tuple[int, int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _words(facts: ModelFacts, finding: str, detail: str) -> str:
    condition = (facts.positive_class or "finding").upper()
    return f"{condition} {finding.upper()} (pneumo, {detail}). {NOT_A_DIAGNOSIS}"


def _banner_image(grey: np.ndarray, heat: np.ndarray | None, words: str) -> Image.Image:
    from pneumo.infer.explain import DEFAULT_CMAP  # torch only on the torch runtime: imported where drawn
    from pneumo.plots import heatmap_overlay_image

    alpha = 0.4 if heat is not None else 0.0
    heat = heat if heat is not None else np.zeros((8, 8), dtype=np.float32)
    return heatmap_overlay_image(grey, heat, alpha=alpha, cmap=DEFAULT_CMAP, title=words).convert("RGB")


def _film(img: Image.Image) -> np.ndarray:
    grey = Image.fromarray(to_grey_uint8(img), mode="L")
    grey.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.BILINEAR)
    return np.asarray(grey)


def read_film(model: Any, scope: ScopeCheck, facts: ModelFacts, data: bytes, gradcam: bool = True) -> FilmReading:
    """Read one Part 10 file's bytes (``model``: a ``LoadedModel`` or ``OnnxModel``)."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    tag_reasons = dicom_reasons(data)
    try:
        img = open_image(data)
    except ImageError as exc:
        reason = f"the pixel data could not be read ({exc.reason})"
        return FilmReading(NOT_ASSESSED, reason, _words(facts, NOT_ASSESSED, reason), None, None, False, None)
    seconds["decode"] = time.perf_counter() - start
    if tag_reasons:  # not what the model was made for: never read
        reason = "; ".join(tag_reasons)
        words = _words(facts, NOT_ASSESSED, f"not read: {reason}")
        overlay = _banner_image(_film(img), None, words)
        return FilmReading(NOT_ASSESSED, reason, words, None, None, False, overlay, img.size, seconds)
    pixels = np.array(prepare(img, model.meta.image_size))
    start = time.perf_counter()
    probs_of, verdicts = scope.read(pixels[None], [data])
    probs, verdict = probs_of[0], verdicts[0]
    seconds["model"] = time.perf_counter() - start
    positive = model.positive
    p_positive = None if positive is None else float(probs[positive])
    said = describe_reading(probs, list(model.classes), positive, model.threshold)
    if not verdict["in_scope"]:
        reason = verdict["scope_reason"]
        finding, words = NOT_ASSESSED, _words(facts, NOT_ASSESSED, f"out of scope: {reason}")
    else:
        reason = ""
        decided = int(model.decide(probs[None])[0])
        finding = SUSPECTED if positive is not None and decided == positive else NOT_SUSPECTED
        words = _words(facts, finding, said)
    heat = None
    if runtime_of(model) == "onnx" or not gradcam:
        words += " No Grad-CAM map: the onnx runtime has no network to take gradients from." if gradcam else ""
    elif finding != NOT_ASSESSED:
        from pneumo.infer.explain import gradcam_heatmap

        start = time.perf_counter()
        target = positive if positive is not None else int(model.decide(probs[None])[0])
        heat = gradcam_heatmap(model, pixels, target)
        seconds["gradcam"] = time.perf_counter() - start
        words += f" Map: Grad-CAM evidence for {model.classes[target]}."
    start = time.perf_counter()
    overlay = _banner_image(_film(img), heat, words)
    seconds["overlay"] = time.perf_counter() - start
    return FilmReading(
        finding,
        reason,
        words,
        [float(p) for p in probs],
        p_positive,
        bool(verdict["in_scope"]),
        overlay,
        img.size,
        seconds,
    )
