"""The end of a run: calibrate and choose the threshold on validation, write figures, export the model."""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pneumo.config import TrainConfig
from pneumo.data.folders import reference_prevalence, subtype_of
from pneumo.evaluation.metrics import (
    evaluate_predictions,
    fit_temperature,
    operating_threshold,
    positive_index,
    softmax,
    threshold_record,
    write_evaluation_figures,
)
from pneumo.evaluation.summary import metrics_html, metrics_lines
from pneumo.infer.model_card import split_counts, write_model_card
from pneumo.infer.model_folder import LoadedModel, ModelMeta, save_model
from pneumo.infer.scope import fit_feature_scope, save_feature_scope, scope_features
from pneumo.nets.models import XrayNet
from pneumo.plots import plot_training_curves
from pneumo.run_folder import RunFolder, ValidPredictions


@dataclass
class RunResult:
    """What ``pneumo.train`` returns: where the run and its model lie, and what validation said."""

    run_dir: Path
    model_dir: Path
    history: list[dict]
    evaluation: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # the dataclass's would print the whole evaluation (kilobytes)
        lines = [
            f"RunResult(run_dir={str(self.run_dir)!r}, {len(self.history)} epochs",
            *metrics_lines(self.evaluation),
        ]
        return "\n".join(lines) + ")"

    def _repr_html_(self) -> str:
        return f"<p>run folder <code>{html.escape(str(self.run_dir))}</code></p>" + metrics_html(self.evaluation)


def finish_run(
    cfg: TrainConfig,
    run_dir: Path,
    model: XrayNet,
    data: Any,
    history: list[dict],
    device: torch.device,
    valid_logits: torch.Tensor | None,
    progress: bool,
) -> RunResult:
    """Temperature and threshold from validation only; ``valid_eval.json``, predictions, figures, model."""
    run = RunFolder(run_dir)
    model.eval()
    classes = data.classes
    binary = len(classes) == 2
    pos = positive_index(classes) if binary else None
    meta = ModelMeta(
        arch=cfg.arch,
        classes=classes,
        image_size=cfg.image_size,
        positive_class=classes[pos] if binary else None,
        trained_with=cfg.to_dict(),
    )
    if valid_logits is None:
        valid_logits = torch.from_numpy(LoadedModel(model, meta, device).logits(data.valid_pixels, tta=cfg.tta))
    logits = valid_logits.numpy().astype(np.float64)
    labels = np.array([s.label for s in data.valid])
    temperature = fit_temperature(logits, labels)
    probs = softmax(logits, temperature)
    patients = np.array([s.patient for s in data.valid])
    choice = operating_threshold(probs[:, pos], labels, cfg.threshold, pos, patients) if binary else None
    if choice is not None:
        meta.threshold, meta.threshold_method = choice["threshold"], choice["method"]
        meta.operating_points = threshold_record(choice)
    meta.temperature = temperature
    report = evaluate_predictions(
        probs,
        labels,
        classes,
        meta.operating_threshold,
        logits=logits,
        subtypes=[subtype_of(s.path.name) for s in data.valid],
        groups=patients,
        temperature=temperature,
        reweight_to=reference_prevalence(classes) if binary else None,
    )
    if choice is not None:
        report["threshold_choice"] = threshold_record(choice)
        if choice["warning"]:
            data.notes.append(choice["warning"])
            tqdm.write(f"warning: {choice['warning']}", file=sys.stderr)
    report["split"] = cfg.split
    report["n_train"], report["n_valid"] = len(data.train), len(data.valid)
    report["split_counts"] = split_counts(data.train, data.valid, classes)  # for the model card: counts only
    run.write_evaluation(report)
    run.write_predictions(
        ValidPredictions(classes, [str(s.path) for s in data.valid], labels, [s.patient for s in data.valid], probs)
    )
    write_evaluation_figures(report, probs, labels, run.path)
    plot_training_curves(history, run.figure("curves.png"))
    model_dir = save_model(model, meta, run.model_dir)
    if len(data.valid) >= 8:  # infer.scope: what "far from the training films" means for this model
        features = scope_features(LoadedModel(model, meta, device), data.valid_pixels)
        save_feature_scope(fit_feature_scope(features, cfg.seed), model_dir)
    try:
        write_model_card(model_dir)
    except Exception as exc:  # noqa: BLE001 - the model is saved: a card that cannot be written must not fail the run
        data.notes.append(f"MODEL_CARD.md not written ({type(exc).__name__}: {exc}); `pneumo card {model_dir}` retries")
    message = (
        f"model saved to {model_dir} (threshold {meta.threshold:.3f} by {meta.threshold_method}, "
        f"temperature {temperature:.2f})"
    )
    tqdm.write(message, file=sys.stdout if progress else sys.stderr)
    return RunResult(run.path, model_dir, history, report, data.notes)
