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

import threading
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
import torch.nn.functional as F

from pneumo.config import HEATMAP_CMAP
from pneumo.data.imaging import open_image, prepare, to_grey_uint8
from pneumo.errors import ModelError, PneumoError
from pneumo.infer.model_folder import EnsembleModel, LoadedModel, load_model
from pneumo.nets.models import XrayNet
from pneumo.plots import colormap_names, plot_heatmap_overlay

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


def explain_image(
    model_dir: str | Path,
    image_path: str | Path,
    out: str | Path,
    target_class: str | None = None,
    alpha: float = 0.4,
    cmap: str = DEFAULT_CMAP,
) -> dict[str, Any]:
    """Predict one image and write a Grad-CAM overlay PNG at the image's own resolution.

    ``target_class`` chooses the class whose evidence is shown (default: the predicted one, which
    respects the model's stored decision threshold).
    """
    if not 0.0 <= alpha <= 1.0:
        raise PneumoError(f"--alpha must lie in [0, 1], got {alpha}")
    check_cmap(cmap)
    model = load_model(model_dir)
    target = None if target_class is None else class_index(model.classes, target_class)
    img = open_image(image_path)
    full = to_grey_uint8(img)  # (H, W) at the image's own size
    pixels = np.array(prepare(img, model.meta.image_size))  # (S, S): what the model sees
    probs = model.probabilities(pixels[None])[0]
    predicted = int(model.decide(probs[None])[0])
    target = predicted if target is None else target
    heat = gradcam_heatmap(model, pixels, target)
    label = model.classes[predicted]
    title = f"{label} p={probs[predicted]:.2f} | Grad-CAM: {model.classes[target]}"
    plot_heatmap_overlay(full, heat, out, alpha=alpha, cmap=cmap, title=title)
    return {
        "label": label,
        "probability": float(probs[predicted]),
        "probabilities": {c: float(p) for c, p in zip(model.classes, probs)},
        "threshold": model.threshold,
        "target_class": model.classes[target],
        "out": str(out),
        "method": f"grad-cam on {type(model.net.cam_layer()).__name__} of {model.meta.arch}"
        + (f", averaged over {len(model.members)} members" if isinstance(model, EnsembleModel) else ""),
    }
