"""fastai's ``plot_top_losses`` and ``plot_confusion_matrix`` for a finished run's validation set.

Reads the run folder through ``RunFolder`` and decides with the model's own rule (``ModelMeta.decide``
at its stored threshold), so these figures, the report and the trainer agree on every film.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pneumo.data.imaging import prepare
from pneumo.decision import describe_reading, describe_rule
from pneumo.errors import PneumoError
from pneumo.evaluation.metrics import matrix_title
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

    Loss is -log p(actual class). Probabilities follow pneumo's one meaning: p(positive class),
    against the threshold; p(actual) is given too, labelled so (it is what fastai's titles show).
    Titles are drawn in vermillion when the prediction (at the stored threshold) is wrong.
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
    pos, threshold = meta.positive_index, meta.operating_threshold
    shown = classes[pos] if pos is not None else None
    top, tiles, titles, colours = [], [], [], []
    for i in order:
        actual, pred = classes[labels[i]], classes[predicted[i]]
        p_actual = float(probs[i, labels[i]])
        p_shown = float(probs[i, pos]) if pos is not None else float(probs[i, predicted[i]])
        top.append(
            {
                "path": preds.paths[i],
                "actual": actual,
                "predicted": pred,
                "loss": float(losses[i]),
                "p_positive": p_shown if pos is not None else None,
                "p_actual": p_actual,
                "reading": describe_reading(probs[i], classes, pos, threshold),
            }
        )
        tile, problem = _tile(preds.paths[i], run.path)
        tiles.append(tile)
        p_text = f"p({shown}) {p_shown:.2f}" if shown else f"p({pred}) {p_shown:.2f}"
        verdict = "wrong" if pred != actual else "right"
        titles.append(
            f"read {pred} ({verdict})\nactually {actual}\nloss {losses[i]:.2f}, {p_text}"
            + (f"\n({problem})" if problem else "")
        )
        colours.append(VERMILLION if pred != actual else "black")
    out_dir = Path(out) if out is not None else run.path
    rule = describe_rule(classes, pos, threshold)
    top_png = plot_image_grid(
        tiles,
        titles,
        out_dir / "top_losses.png",
        ncols=min(3, len(tiles)),
        suptitle=f"Top losses on validation (loss = -log p(actual)); decision: {rule}",
        title_colors=colours,
    )
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(cm, (labels, predicted), 1)
    cm_png = plot_confusion_matrix(
        cm,
        classes,
        out_dir / "confusion_matrix.png",
        title=matrix_title({"threshold": threshold, "positive_class": shown}),
    )
    return {
        "top_losses_png": str(top_png),
        "confusion_matrix_png": str(cm_png),
        "top_losses": top,
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        "threshold": threshold,
    }
