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
from PIL.PngImagePlugin import PngInfo

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
    """Reliability diagram over a count histogram: for each non-empty confidence bin, a bar of its
    accuracy and a dot at (its images' mean confidence, their accuracy), joined to the diagonal by the
    gap. Empty bins draw nothing (an empty bin has no accuracy, not an accuracy of 0)."""
    fig, (ax, ax_n) = subplots(2, 1, figsize=(5.2, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [b for b in bins if b.get("count", 0) > 0 and b.get("accuracy") is not None]
    lo = np.array([b["bin_lo"] for b in filled], dtype=float)
    width = np.array([b["bin_hi"] - b["bin_lo"] for b in filled], dtype=float)
    acc = np.array([b["accuracy"] for b in filled], dtype=float)
    conf = np.array([b["confidence"] for b in filled], dtype=float)
    ax.plot([0, 1], [0, 1], ls="--", color=GREY, lw=1, label="perfect calibration")
    ax.bar(lo, acc, width=width, align="edge", color=BLUE, edgecolor="white", alpha=0.55, label="accuracy of the bin")
    ax.vlines(conf, np.minimum(acc, conf), np.maximum(acc, conf), color=VERMILLION, lw=1.5, label="gap")
    ax.plot(conf, acc, "o", color=ORANGE, mec="black", ms=6, label="at the bin's mean confidence")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE = {ece:.3f})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(
        [b["bin_lo"] for b in bins],
        [b.get("count", 0) for b in bins],
        width=[b["bin_hi"] - b["bin_lo"] for b in bins],
        align="edge",
        color=GREY,
        edgecolor="white",
    )
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


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def heatmap_overlay_image(
    image_grey: np.ndarray, heat: np.ndarray, alpha: float = 0.4, *, cmap: str, title: str | None = None
) -> Image.Image:
    """Grad-CAM style overlay with the film at its own pixel size (no axes, no resampling).

    Nothing is drawn over the film: the title sits in a strip above it and a colour bar (the heat
    map's scale, 0 to its maximum) beside it. Made with PIL rather than a matplotlib figure, so the
    film's pixels are exact. ``info`` keeps the title (``pneumo:title``) and where the film lies
    (``pneumo:film``, "left,top,width,height"); ``save_overlay`` writes both into the PNG.
    """
    film = Image.fromarray(overlay_heatmap_array(image_grey, heat, alpha, cmap=cmap), mode="RGB")
    w, h = film.size
    size = max(10, min(h, w) // 28)
    font = _font(size)
    measure = ImageDraw.Draw(film)
    bar_w, gap = max(6, size), max(4, size // 2)
    label_w = max(measure.textbbox((0, 0), t, font=font)[2] for t in ("max", "0")) + gap
    width = w + gap + bar_w + label_w
    lines = _wrap(title or "", lambda t: measure.textlength(t, font=font), width - 8)
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    strip = line_h * len(lines) + 6 if lines else 0
    canvas = Image.new("RGB", (width, h + strip), (20, 20, 20))
    canvas.paste(film, (0, strip))
    ramp = np.linspace(1.0, 0.0, h)[:, None].repeat(bar_w, axis=1)  # top = strongest evidence
    bar = (matplotlib.colormaps[cmap](ramp)[..., :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(bar, mode="RGB"), (w + gap, strip))
    draw = ImageDraw.Draw(canvas)
    draw.text((w + gap + bar_w + gap // 2, strip), "max", fill=(255, 255, 255), font=font)
    draw.text((w + gap + bar_w + gap // 2, strip + h - size - 2), "0", fill=(255, 255, 255), font=font)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * line_h), line, fill=(255, 255, 255), font=font)
    canvas.info.update({"pneumo:title": title or "", "pneumo:film": f"0,{strip},{w},{h}"})
    return canvas


def _wrap(text: str, width_of: Any, limit: float) -> list[str]:
    """Words greedily on lines no wider than ``limit`` (a word longer than that gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and width_of(f"{lines[-1]} {word}") <= limit:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def save_overlay(image: Image.Image, path: str | Path) -> Path:
    """Write an overlay as PNG atomically, its ``pneumo:`` notes as text chunks."""
    info = PngInfo()
    for key, value in image.info.items():
        if str(key).startswith("pneumo:"):
            info.add_text(key, str(value))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def plot_heatmap_overlay(
    image_grey: np.ndarray,
    heat: np.ndarray,
    path: str | Path,
    alpha: float = 0.4,
    *,
    cmap: str,
    title: str | None = None,
) -> Path:
    """``heatmap_overlay_image`` written to ``path``."""
    return save_overlay(heatmap_overlay_image(image_grey, heat, alpha, cmap=cmap, title=title), path)


def film_box(path: str | Path) -> tuple[int, int, int, int] | None:
    """(left, top, width, height) of the film inside an overlay written by ``plot_heatmap_overlay``."""
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get("pneumo:film")
    return tuple(int(v) for v in text.split(",")) if text else None  # type: ignore[return-value]


class Picture:
    """A PNG figure as a Python value: a notebook shows it inline (``_repr_png_``), a REPL prints its
    size and file. What the notebook-facing functions of ``pneumo`` return instead of a bare path."""

    def __init__(self, png: bytes, path: str | Path | None = None):
        self.png, self.path = png, None if path is None else Path(path)

    @classmethod
    def from_file(cls, path: str | Path) -> Picture:
        return cls(Path(path).read_bytes(), path)

    @property
    def size(self) -> tuple[int, int]:
        import io

        with Image.open(io.BytesIO(self.png)) as img:
            return img.size

    def _repr_png_(self) -> bytes:
        return self.png

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"<Picture {self.size[0]}x{self.size[1]} PNG{where}>"
