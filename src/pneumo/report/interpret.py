"""fastai's ``plot_top_losses`` and ``plot_confusion_matrix`` for a finished run's validation set.

Reads the run folder through ``RunFolder`` and decides with the model's own rule (``ModelMeta.decide``
at its stored threshold), so these figures, the report and the trainer agree on every film.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pneumo.data.imaging import prepare
from pneumo.errors import PneumoError
from pneumo.plots import VERMILLION, plot_confusion_matrix, plot_image_grid
from pneumo.run_folder import RunFolder

GRID_PX = 224  # side of each tile in the top-losses grid


def _tile(path_text: str, run_dir: Path) -> tuple[np.ndarray, str | None]:
    """A GRID_PX square grey tile of the image, or a blank tile and the reason it is missing."""
    for candidate in (Path(path_text), run_dir / path_text):
        if candidate.is_file():
            try:
                return prepare(candidate, GRID_PX), None
            except PneumoError as exc:
                return np.full((GRID_PX, GRID_PX), 40, np.uint8), str(exc).rsplit(": ", 1)[-1]
    return np.full((GRID_PX, GRID_PX), 40, np.uint8), "image not found"


def interpret_run(run_dir: str | Path, out: str | Path | None = None, k: int = 9) -> dict[str, Any]:
    """Top losses and the confusion matrix of a run's validation predictions.

    Loss is -log p(actual class); titles read "predicted/actual/loss/p(predicted)" and are drawn in
    vermillion when the prediction (at the stored threshold) is wrong.
    """
    run = RunFolder(run_dir)
    if k < 1:
        raise PneumoError(f"--k must be at least 1, got {k}")
    meta = run.read_model_meta()
    classes = meta.classes
    preds = run.read_predictions(classes)
    if not len(preds.labels):
        raise PneumoError(f"{run.predictions_file}: no usable prediction rows for classes {classes}")
    probs, labels = preds.probs, preds.labels
    predicted = meta.decide(probs)
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))
    order = np.argsort(-losses, kind="stable")[:k]
    top, tiles, titles, colours = [], [], [], []
    for i in order:
        actual, pred = classes[labels[i]], classes[predicted[i]]
        p_pred = float(probs[i, predicted[i]])
        top.append(
            {
                "path": preds.paths[i],
                "actual": actual,
                "predicted": pred,
                "loss": float(losses[i]),
                "probability": p_pred,
            }
        )
        tile, problem = _tile(preds.paths[i], run.path)
        tiles.append(tile)
        titles.append(f"{pred}/{actual}/{losses[i]:.2f}/{p_pred:.2f}" + (f"\n({problem})" if problem else ""))
        colours.append(VERMILLION if pred != actual else "black")
    out_dir = Path(out) if out is not None else run.path
    top_png = plot_image_grid(
        tiles,
        titles,
        out_dir / "top_losses.png",
        ncols=min(3, len(tiles)),
        suptitle="prediction/actual/loss/probability",
        title_colors=colours,
    )
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(cm, (labels, predicted), 1)
    threshold = meta.operating_threshold
    at = f" (threshold {threshold:.3f})" if threshold is not None else ""
    cm_png = plot_confusion_matrix(
        cm, classes, out_dir / "confusion_matrix.png", title=f"Confusion matrix, validation{at}"
    )
    return {
        "top_losses_png": str(top_png),
        "confusion_matrix_png": str(cm_png),
        "top_losses": top,
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        "threshold": threshold,
    }
