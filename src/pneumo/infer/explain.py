"""Why did the model say that? Grad-CAM over one X-ray, and the worst validation mistakes of a run.

Grad-CAM (Selvaraju et al., 2017) weights the last convolutional stage's feature maps by the mean
gradient of the class score and keeps the positive part. It is written out here (about twenty
lines) rather than taken from ``pytorch_grad_cam`` because the web server runs it from several
threads on one shared network: that package registers hooks per explainer object, so two
concurrent explainers on one model would read each other's activations. Here one forward hook per
network stores activations per thread, and gradients come from ``torch.autograd.grad`` (nothing
accumulates in ``.grad``). The test suite checks the result against ``pytorch_grad_cam``.

The heatmap is computed on the model-size input (``imaging.prepare``, as in training) and drawn
over the X-ray at its own resolution, so a radiologist sees every pixel of the original.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pneumo.config import HEATMAP_CMAP
from pneumo.data.imaging import prepare, to_grey_uint8
from pneumo.decision import describe_reading
from pneumo.errors import ModelError, PneumoError
from pneumo.infer.model_folder import EnsembleModel, LoadedModel, as_image, load_model
from pneumo.nets.models import XrayNet
from pneumo.plots import colormap_names, heatmap_overlay_image, save_overlay

DEFAULT_CMAP = HEATMAP_CMAP  # the one default (config.py): perceptually uniform, colour-blind safe

_capture = threading.local()
_hooked: WeakKeyDictionary[XrayNet, torch.utils.hooks.RemovableHandle] = WeakKeyDictionary()
_hook_lock = threading.Lock()


def _store_activation(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """Forward hook: keep the output only for the thread that asked for it (``_capture.on``)."""
    if getattr(_capture, "on", False):
        _capture.activation = output


def _ensure_hook(net: XrayNet) -> None:
    with _hook_lock:
        if net not in _hooked:
            _hooked[net] = net.cam_layer().register_forward_hook(_store_activation)


def gradcam_heatmap(model: LoadedModel, pixels: np.ndarray, target_index: int) -> np.ndarray:
    """Grad-CAM of class ``target_index`` for one uint8 ``(H, W)`` image of the model's size.

    Returns float32 ``(H, W)`` in [0, 1] (1 = the region that most raises the class score; all zeros
    when nothing raises it). Thread-safe: concurrent calls on one model do not interfere.
    """
    grey = np.asarray(pixels)
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise PneumoError(f"Grad-CAM needs one uint8 (H, W) image, got {grey.dtype} {grey.shape}")
    if not 0 <= target_index < len(model.classes):
        raise PneumoError(f"class index {target_index} out of range for classes {model.classes}")
    if isinstance(model, EnsembleModel):  # the members' maps, averaged and rescaled to [0, 1]
        cam = np.mean([gradcam_heatmap(m, grey, target_index) for m in model.members], axis=0)
        return (cam / cam.max() if cam.max() > 1e-12 else cam).astype(np.float32)
    net = model.net
    _ensure_hook(net)
    x = torch.from_numpy(grey).to(model.device).float().div(255).view(1, 1, *grey.shape)
    x.requires_grad_(True)  # a frozen body would otherwise give activations without a graph
    _capture.on, _capture.activation = True, None
    try:
        with torch.enable_grad():
            score = net(x)[0, target_index]
            act = _capture.activation  # (1, C, h, w)
            if act is None:
                raise ModelError(f"{net.arch}: the Grad-CAM layer produced no activation")
            (grad,) = torch.autograd.grad(score, act)  # (1, C, h, w)
    finally:
        _capture.on, _capture.activation = False, None
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))  # (1, 1, h, w)
    cam = F.interpolate(cam, size=grey.shape, mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    top = float(cam.max())
    cam = cam / top if top > 1e-12 else torch.zeros_like(cam)
    return cam.clamp_(0, 1).cpu().numpy().astype(np.float32)


def class_index(classes: list[str], name: str) -> int:
    """Index of ``name`` in ``classes`` (case-insensitive), or an error listing the valid names."""
    lowered = [c.lower() for c in classes]
    if name.lower() not in lowered:
        raise PneumoError(f"unknown class {name!r}; this model knows: {', '.join(classes)}")
    return lowered.index(name.lower())


def check_cmap(cmap: str) -> None:
    if cmap not in colormap_names():
        raise PneumoError(
            f"unknown colormap {cmap!r}; try viridis, cividis, magma or inferno "
            f"(colour-blind safe), or any matplotlib colormap name"
        )


class Explanation(dict):
    """What ``explain_image`` returns: the decision and where the overlay went (a dict, as the CLI's
    ``--json`` prints it), with the overlay itself as ``.image``, shown inline in a notebook."""

    def __init__(self, values: dict[str, Any], image: Image.Image):
        super().__init__(values)
        self.image = image

    def __repr__(self) -> str:
        return f"Explanation({self['label']}: {self['reading']}; Grad-CAM for {self['target_class']})"

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def default_out(image_path: str | Path, out: str | Path | None) -> Path:
    """Where ``pneumo explain`` writes: ``out`` as given, or ``IMAGE-STEM_gradcam.png`` inside ``out``
    when it is a folder or in the current folder when it is not given. Never beside the image by
    default: a PNG left in a class folder would be read as a training image next time."""
    name = f"{Path(image_path).stem}_gradcam.png"
    if out is None:
        return Path.cwd() / name
    out = Path(out)
    return out / name if out.is_dir() else out


def explain_image(
    model: str | Path | LoadedModel,
    image: str | Path | Image.Image | np.ndarray,
    out: str | Path | None = None,
    target_class: str | None = None,
    alpha: float = 0.4,
    cmap: str = DEFAULT_CMAP,
    overwrite: bool = False,
) -> Explanation:
    """Predict one image and draw a Grad-CAM overlay at the image's own resolution; write it to
    ``out`` (a PNG; refused when the file exists unless ``overwrite``), or nowhere when ``out`` is None.

    ``target_class`` chooses the class whose evidence is shown (default: the predicted one, which
    respects the model's stored decision threshold).
    """
    if not 0.0 <= alpha <= 1.0:
        raise PneumoError(f"--alpha must lie in [0, 1], got {alpha}")
    check_cmap(cmap)
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not overwrite:
        raise PneumoError(f"{out} exists: pass --overwrite to replace it, or another --out")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    target = None if target_class is None else class_index(loaded.classes, target_class)
    img = as_image(image)
    full = to_grey_uint8(img)  # (H, W) at the image's own size
    pixels = np.array(prepare(img, loaded.meta.image_size))  # (S, S): what the model sees
    probs = loaded.probabilities(pixels[None])[0]
    predicted = int(loaded.decide(probs[None])[0])
    target = predicted if target is None else target
    heat = gradcam_heatmap(loaded, pixels, target)
    label = loaded.classes[predicted]
    reading = describe_reading(probs, loaded.classes, loaded.positive, loaded.threshold)
    title = f"read {label}: {reading} | Grad-CAM for {loaded.classes[target]}"
    overlay = heatmap_overlay_image(full, heat, alpha=alpha, cmap=cmap, title=title)
    if out is not None:
        save_overlay(overlay, out)
    positive = loaded.positive
    values = {
        "label": label,
        "positive_class": None if positive is None else loaded.classes[positive],
        "p_positive": None if positive is None else float(probs[positive]),
        "threshold": loaded.threshold,
        "reading": reading,
        "probabilities": {c: float(p) for c, p in zip(loaded.classes, probs)},
        "target_class": loaded.classes[target],
        "out": None if out is None else str(out),
        "method": f"grad-cam on {type(loaded.net.cam_layer()).__name__} of {loaded.meta.arch}"
        + (f", averaged over {len(loaded.members)} members" if isinstance(loaded, EnsembleModel) else ""),
    }
    return Explanation(values, overlay)
