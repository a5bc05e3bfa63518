"""Every PNG figure pneumo draws, in one place.

Figures are ``matplotlib.figure.Figure`` objects made here, never through pyplot: no global
backend is chosen and no figure registry is touched, so importing pneumo leaves a notebook's
inline backend alone, servers need no display, and nothing has to be closed. Colours come from the
Okabe-Ito palette and perceptually uniform colour maps so they read under colour-vision
deficiency; every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from pneumo.errors import PneumoError
from pneumo.io_utils import atomic_write

# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, VERMILLION = "#0072B2", "#E69F00", "#009E73", "#D55E00"
SKY, PURPLE, YELLOW, GREY = "#56B4E9", "#CC79A7", "#F0E442", "#999999"
MATRIX_CMAP = "cividis"
DPI = 110


def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` without pyplot: a free-standing Figure and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def colormap_names() -> list[str]:
    return list(matplotlib.colormaps)


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG atomically (a free-standing Figure needs no closing)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def _fmt_lr(lr: float) -> str:
    return f"{lr:.2e}"


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestion: float | None,
    path: str | Path,
    extra_suggestions: dict[str, float] | None = None,
) -> Path:
    """Loss against learning rate on a log axis, the suggestion marked with a labelled red dot."""
    lrs_a, losses_a = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs_a.size == 0 or lrs_a.shape != losses_a.shape:
        raise PneumoError(f"LR finder plot needs equal, non-empty lists ({lrs_a.size} rates, {losses_a.size} losses)")
    fig, ax = subplots(figsize=(6.4, 4.2))
    ax.plot(lrs_a, losses_a, color=BLUE, lw=1.6, label="loss")
    ax.set_xscale("log")
    ok = np.isfinite(losses_a) & (lrs_a > 0)

    def mark(lr: float, colour: str, marker: str, label: str) -> None:
        if not (ok.any() and lr > 0):
            return
        y = float(np.interp(np.log(lr), np.log(lrs_a[ok]), losses_a[ok]))
        ax.plot([lr], [y], marker=marker, color=colour, ms=9, ls="none", label=f"{label}: {_fmt_lr(lr)}", zorder=3)
        ax.annotate(_fmt_lr(lr), (lr, y), textcoords="offset points", xytext=(6, 8), color=colour, fontsize=9)

    if suggestion is not None:
        mark(suggestion, VERMILLION, "o", "suggestion")
    for (name, lr), (colour, marker) in zip(
        (extra_suggestions or {}).items(), [(GREEN, "s"), (PURPLE, "^"), (ORANGE, "D"), (SKY, "v")]
    ):
        mark(lr, colour, marker, name)
    if ok.any():  # the diverging tail would flatten the interesting part of the curve
        finite = losses_a[ok]
        top = min(finite.max(), finite[0] + 2.0 * (finite[0] - finite.min()) + 1e-3)
        ax.set_ylim(finite.min() - 0.05 * abs(top - finite.min()) - 1e-6, top)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate finder")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return save_figure(fig, path)


def plot_training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Train/valid loss and error rate per epoch; a dotted line where training was unfrozen."""
    if not history:
        raise PneumoError("no training history to plot")
    epochs = [row.get("epoch") for row in history]
    # Epochs may restart at 1 in each phase: fall back to a running count so lines don't fold back.
    if any(not isinstance(e, (int, float)) for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:])):
        epochs = list(range(1, len(history) + 1))

    def column(key: str) -> np.ndarray:
        vals = [row.get(key) for row in history]
        return np.array([float(v) if v not in (None, "") else np.nan for v in vals])

    fig, (ax_loss, ax_err) = subplots(1, 2, figsize=(10.5, 4.0))
    ax_loss.plot(epochs, column("train_loss"), marker="o", color=BLUE, label="train loss")
    ax_loss.plot(epochs, column("valid_loss"), marker="s", color=ORANGE, label="valid loss")
    ax_err.plot(epochs, column("error_rate"), marker="o", color=VERMILLION, label="valid error rate")
    phases = [row.get("phase") for row in history]
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1] and phases[i]:
            x = (epochs[i - 1] + epochs[i]) / 2
            for ax in (ax_loss, ax_err):
                ax.axvline(x, color=GREY, ls=":", lw=1.2)
                ax.text(
                    x, 1.0, f" {phases[i]}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#555555"
                )
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    ax_err.set(title="Validation error rate", xlabel="epoch", ylabel="error rate")
    for ax in (ax_loss, ax_err):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return save_figure(fig, path)


def plot_confusion_matrix(
    cm: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Counts in cells, rows the actual class and columns the predicted one (as fastai draws it)."""
    m = np.asarray(cm, dtype=float)
    k = len(classes)
    if m.shape != (k, k):
        raise PneumoError(f"confusion matrix of shape {m.shape} does not match {k} classes")
    side = 2.2 + 1.1 * k
    fig, ax = subplots(figsize=(side, side))
    im = ax.imshow(m, cmap=MATRIX_CMAP, vmin=0, vmax=max(m.max(), 1.0))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(k):
        for j in range(k):
            v = m[i, j]
            text = f"{int(v)}" if float(v).is_integer() else f"{v:.1f}"
            light = im.cmap(im.norm(v))[:3]
            colour = "black" if 0.299 * light[0] + 0.587 * light[1] + 0.114 * light[2] > 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=12)
    ax.set_xticks(range(k), labels=list(classes), rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set(xlabel="Predicted", ylabel="Actual", title=title)
    return save_figure(fig, path)


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    auc: float | None,
    path: str | Path,
    operating_point: tuple[float, float] | None = None,
) -> Path:
    """ROC curve with the chance diagonal; ``operating_point`` is (fpr, tpr) at the chosen threshold."""
    fig, ax = subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], ls="--", color=GREY, lw=1, label="chance")
    auc_text = "n/a" if auc is None else f"{auc:.3f}"
    ax.plot(fpr, tpr, color=BLUE, lw=2, label=f"ROC (AUC = {auc_text})")
    if operating_point is not None:
        x, y = operating_point
        ax.plot(
            [x], [y], "o", color=VERMILLION, ms=9, zorder=3, label=f"operating point (sens {y:.2f}, spec {1 - x:.2f})"
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
        title="ROC curve",
    )
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return save_figure(fig, path)


def plot_reliability(bins: Sequence[dict], ece: float, path: str | Path) -> Path:
    """Reliability diagram (accuracy per confidence bin against the diagonal) over a count histogram."""
    fig, (ax, ax_n) = subplots(2, 1, figsize=(5.2, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lo = np.array([b["bin_lo"] for b in bins], dtype=float)
    width = np.array([b["bin_hi"] - b["bin_lo"] for b in bins], dtype=float)
    filled = [b.get("count", 0) > 0 and b.get("accuracy") is not None for b in bins]
    acc = np.array([b["accuracy"] if f else 0.0 for b, f in zip(bins, filled)], dtype=float)
    conf = np.array([b["confidence"] if f else np.nan for b, f in zip(bins, filled)], dtype=float)
    counts = np.array([b.get("count", 0) for b in bins], dtype=float)
    ax.plot([0, 1], [0, 1], ls="--", color=GREY, lw=1, label="perfect calibration")
    ax.bar(lo, acc, width=width, align="edge", color=BLUE, edgecolor="white", alpha=0.85, label="accuracy")
    ax.plot(conf, acc, "o", color=ORANGE, ms=5, label="mean confidence")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE = {ece:.3f})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax_n.bar(lo, counts, width=width, align="edge", color=GREY, edgecolor="white")
    ax_n.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="images")
    return save_figure(fig, path)


def plot_image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path,
    ncols: int = 4,
    suptitle: str | None = None,
    title_colors: Sequence[str] | None = None,
) -> Path:
    """Grey (H, W) or RGB (H, W, 3) uint8 images, each with a title (show-batch, top losses)."""
    if not images:
        raise PneumoError("no images to draw in the grid")
    if len(titles) != len(images) or (title_colors is not None and len(title_colors) != len(images)):
        raise PneumoError(f"{len(images)} images need as many titles (and title colours, if given)")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = subplots(nrows, ncols, figsize=(2.8 * ncols, 3.0 * nrows + (0.4 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= len(images):
            continue
        img = np.asarray(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(titles[i], fontsize=9, color=title_colors[i] if title_colors else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def overlay_heatmap_array(image_grey: np.ndarray, heat: np.ndarray, alpha: float = 0.4, *, cmap: str) -> np.ndarray:
    """Blend a [0, 1] heat map, resized bilinearly to the image, over a grey image: (H, W, 3) uint8.

    ``cmap`` has no default here: the one default is ``config.HEATMAP_CMAP`` (``infer.explain``).
    No figure is involved, so the web server can turn the result straight into a PNG.
    """
    grey = np.asarray(image_grey)
    if grey.ndim != 2:
        raise PneumoError(f"overlay needs a grey (H, W) image, got shape {grey.shape}")
    h = np.asarray(heat, dtype=np.float32)
    if h.ndim != 2 or h.size == 0:
        raise PneumoError(f"heat map must be a non-empty (h, w) array, got shape {h.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise PneumoError(f"alpha must lie in [0, 1], got {alpha}")
    h = np.clip(np.nan_to_num(h, nan=0.0), 0.0, 1.0)
    height, width = grey.shape
    if h.shape != (height, width):
        h = np.asarray(Image.fromarray(h, mode="F").resize((width, height), Image.BILINEAR), dtype=np.float32)
        h = np.clip(h, 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](h)[..., :3] * 255.0
    base = np.repeat(grey.astype(np.float32)[..., None], 3, axis=2)
    return np.clip((1.0 - alpha) * base + alpha * colour + 0.5, 0, 255).astype(np.uint8)


def plot_heatmap_overlay(
    image_grey: np.ndarray,
    heat: np.ndarray,
    path: str | Path,
    alpha: float = 0.4,
    *,
    cmap: str,
    title: str | None = None,
) -> Path:
    """Grad-CAM style overlay saved at the image's own pixel size (no axes, no resampling).

    Written with PIL rather than a matplotlib figure, so the size is exact; a title is burned
    into a dark strip along the top edge.
    """
    rgb = Image.fromarray(overlay_heatmap_array(image_grey, heat, alpha, cmap=cmap), mode="RGB")
    if title:
        draw = ImageDraw.Draw(rgb, "RGBA")
        size = max(10, rgb.height // 20)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
            font = ImageFont.load_default()
        box = draw.textbbox((4, 2), title, font=font)
        draw.rectangle((0, 0, rgb.width, box[3] + 3), fill=(0, 0, 0, 160))
        draw.text((4, 2), title, fill=(255, 255, 255, 255), font=font)
    return atomic_write(path, lambda tmp: rgb.save(tmp, format="PNG"))
