"""Figures: valid PNGs, written atomically, closed after saving, overlays at the image's own size."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from pneumo import plots
from pneumo.errors import PneumoError


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.fixture(autouse=True)
def _no_leaks(tmp_path):
    yield
    assert plt.get_fignums() == [], "a figure was left open"
    assert not list(tmp_path.glob(".*.tmp*")), "a temporary file was left behind"


def test_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


GREY = (np.arange(60 * 80) % 256).astype(np.uint8).reshape(60, 80)

CASES = {
    "lr_find": lambda p: plots.plot_lr_find(
        [1e-6, 1e-4, 1e-2, 1.0], [0.7, 0.5, 0.4, 3.0], 1e-3, p, extra_suggestions={"valley": 1e-4}
    ),
    "lr_find_no_suggestion": lambda p: plots.plot_lr_find([1e-5, 1e-3], [0.6, 0.5], None, p),
    "curves": lambda p: plots.plot_training_curves(
        [
            {"epoch": 1, "phase": "frozen", "train_loss": 0.6, "valid_loss": 0.5, "error_rate": 0.2},
            {"epoch": 1, "phase": "unfrozen", "train_loss": 0.4, "valid_loss": None, "error_rate": 0.1},
        ],
        p,
    ),
    "confusion": lambda p: plots.plot_confusion_matrix([[40, 3], [5, 52]], ["NORMAL", "PNEUMONIA"], p),
    "confusion_weighted_3": lambda p: plots.plot_confusion_matrix(np.eye(3) * 2.5, ["a", "b", "c"], p),
    "roc": lambda p: plots.plot_roc([0, 0.1, 1], [0, 0.8, 1], 0.85, p, operating_point=(0.1, 0.8)),
    "roc_no_auc": lambda p: plots.plot_roc([0, 1], [0, 1], None, p),
    "reliability": lambda p: plots.plot_reliability(
        [
            {"bin_lo": 0.5, "bin_hi": 0.75, "confidence": 0.6, "accuracy": 0.5, "count": 4},
            {"bin_lo": 0.75, "bin_hi": 1.0, "confidence": 0.9, "accuracy": 1.0, "count": 6},
            {"bin_lo": 0.0, "bin_hi": 0.5, "confidence": None, "accuracy": None, "count": 0},
        ],
        0.07,
        p,
    ),
    "grid": lambda p: plots.plot_image_grid(
        [GREY, np.stack([GREY] * 3, axis=2), GREY],
        ["a", "b", "c"],
        p,
        ncols=2,
        suptitle="batch",
        title_colors=["black", "#D55E00", "black"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_figure_writes_a_valid_png(tmp_path, name):
    path = tmp_path / "sub" / f"{name}.png"  # the folder is created on demand
    assert CASES[name](path) == path
    width, height = _png_size(path)
    assert width > 100 and height > 100


def test_save_figure_replaces_an_existing_file(tmp_path):
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")
    fig, ax = plots.subplots(figsize=(3, 2))
    ax.plot([0, 1])
    plots.save_figure(fig, path)
    _png_size(path)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plots.plot_lr_find([1e-3, 1e-2], [0.5], None, p),
        lambda p: plots.plot_lr_find([], [], None, p),
        lambda p: plots.plot_training_curves([], p),
        lambda p: plots.plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], p),
        lambda p: plots.plot_image_grid([], [], p),
        lambda p: plots.plot_image_grid([GREY, GREY], ["only one title"], p),
    ],
)
def test_bad_inputs_raise_a_pneumo_error_and_write_nothing(tmp_path, call):
    path = tmp_path / "bad.png"
    with pytest.raises(PneumoError):
        call(path)
    assert not path.exists()


def test_overlay_blends_by_alpha_with_known_colours():
    grey = np.full((5, 7), 100, dtype=np.uint8)
    cold = np.asarray(matplotlib.colormaps["inferno"](0.0)[:3]) * 255
    hot = np.asarray(matplotlib.colormaps["inferno"](1.0)[:3]) * 255
    assert (plots.overlay_heatmap_array(grey, np.zeros((2, 2)), alpha=0.0, cmap="viridis") == 100).all()
    half = plots.overlay_heatmap_array(grey, np.zeros((2, 2)), alpha=0.5, cmap="inferno")
    assert half.shape == (5, 7, 3) and half.dtype == np.uint8
    assert np.abs(half[0, 0] - (50 + 0.5 * cold)).max() <= 1
    full = plots.overlay_heatmap_array(grey, np.ones((3, 3)), alpha=1.0, cmap="inferno")
    assert np.abs(full - hot).max() <= 1


def test_overlay_resizes_heat_to_the_image_and_follows_it():
    grey = np.zeros((40, 60), dtype=np.uint8)
    heat = np.zeros((4, 4))
    heat[:, 2:] = 1.0  # hot right half
    out = plots.overlay_heatmap_array(grey, heat, alpha=0.6, cmap="viridis")
    assert out.shape == (40, 60, 3)
    brightness = out.astype(float).sum(axis=2)
    assert brightness[:, -5:].mean() > brightness[:, :5].mean() + 100


@pytest.mark.parametrize("shape", [(224, 224), (53, 37), (300, 410)])
def test_heatmap_overlay_png_has_the_images_own_size_and_changes_pixels(tmp_path, shape):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    heat = rng.random((7, 7))
    path = plots.plot_heatmap_overlay(
        grey, heat, tmp_path / "cam.png", alpha=0.4, cmap="viridis", title="PNEUMONIA 0.93"
    )
    left, top, width, height = plots.film_box(path)
    assert (width, height) == (shape[1], shape[0]) and top > 0  # the film at its own size, below the title
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
        assert img.text["pneumo:title"] == "PNEUMONIA 0.93"
    film = pixels[top : top + height, left : left + width]
    assert np.abs(film - grey[..., None]).mean() > 5
    bar = pixels[top : top + height, width + 4 :]  # the colour bar beside it: bright at the top, dark below
    assert bar.shape[1] > 0 and bar[: height // 4].mean() > bar[-height // 4 :].mean()


def test_reliability_dots_sit_at_mean_confidence_and_empty_bins_draw_nothing(monkeypatch, tmp_path):
    drawn = {}
    real = plots.save_figure

    def keep(fig, path, dpi=plots.DPI):
        drawn["ax"] = fig.axes[0]
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep)
    bins = [
        {"bin_lo": 0.5, "bin_hi": 0.75, "confidence": 0.6, "accuracy": 0.5, "count": 4},
        {"bin_lo": 0.75, "bin_hi": 1.0, "confidence": 0.9, "accuracy": 1.0, "count": 6},
        {"bin_lo": 0.0, "bin_hi": 0.5, "confidence": None, "accuracy": None, "count": 0},
    ]
    plots.plot_reliability(bins, 0.07, tmp_path / "r.png")
    dots = next(line for line in drawn["ax"].lines if line.get_label() == "at the bin's mean confidence")
    assert list(dots.get_xdata()) == [0.6, 0.9] and list(dots.get_ydata()) == [0.5, 1.0]
    assert len(drawn["ax"].patches) == 2  # one bar per filled bin, none for the empty one


@pytest.mark.parametrize(
    "grey, heat, alpha",
    [
        (np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((2, 2)), 0.4),
        (np.zeros((4, 4), dtype=np.uint8), np.zeros(4), 0.4),
        (np.zeros((4, 4), dtype=np.uint8), np.zeros((2, 2)), 1.5),
    ],
)
def test_overlay_rejects_bad_inputs(grey, heat, alpha):
    with pytest.raises(PneumoError):
        plots.overlay_heatmap_array(grey, heat, alpha, cmap="viridis")


def test_importing_and_drawing_leave_matplotlib_backend_alone(tmp_path) -> None:
    """A notebook's inline backend must survive `import pneumo...` and a drawn figure."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); before = matplotlib.get_backend()\n"
        "import pneumo.plots, pneumo.infer.explain, pneumo.report.interpret\n"
        f"pneumo.plots.plot_roc([0, 0.5, 1], [0, 0.8, 1], 0.8, r'{tmp_path / 'roc.png'}')\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "import matplotlib.pyplot as plt; assert plt.get_fignums() == []\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "roc.png").stat().st_size > 1000
