"""The end of a run: calibrate and choose the threshold on validation, write figures, export the model."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pneumo.config import TrainConfig
from pneumo.data.folders import subtype_of
from pneumo.evaluation.metrics import (binary_metrics, choose_threshold, evaluate_predictions, fit_temperature,
                             positive_index, prevalence_weights, softmax, write_evaluation_figures)
from pneumo.io_utils import atomic_write_json, atomic_write_text
from pneumo.infer.model_folder import LoadedModel, ModelMeta, save_model
from pneumo.nets.models import XrayNet
from pneumo.plots import plot_training_curves

TEST_SPLIT_POSITIVE_FRACTION = 390 / 624  # Kaggle's official test split: 390 pneumonia, 234 normal


def write_predictions_csv(path: Path, samples, classes: list[str], probs: np.ndarray) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "label", "patient"] + [f"prob_{c}" for c in classes])
    for s, p in zip(samples, probs):
        writer.writerow([str(s.path), classes[s.label], s.patient] + [f"{v:.9g}" for v in p])
    atomic_write_text(path, out.getvalue())


def add_test_balance(report: dict, p_pos: np.ndarray, labels: np.ndarray, pos: int, threshold: float) -> None:
    """Validation metrics re-weighted to the official test split's balance, which is not train's."""
    weights = prevalence_weights(labels, pos, TEST_SPLIT_POSITIVE_FRACTION)
    report["reweighted_to_test_balance"] = binary_metrics(p_pos, labels, threshold, pos, weights)


def finish_run(cfg: TrainConfig, run_dir: Path, model: XrayNet, data, history: list[dict],
               device: torch.device, valid_logits: torch.Tensor | None, progress: bool):
    from pneumo.train.loop import RunResult

    model.eval()
    classes = data.classes
    binary = len(classes) == 2
    pos = positive_index(classes) if binary else None
    meta = ModelMeta(arch=cfg.arch, classes=classes, image_size=cfg.image_size,
                     positive_class=classes[pos] if binary else None, trained_with=cfg.to_dict())
    if valid_logits is None:
        valid_logits = torch.from_numpy(LoadedModel(model, meta, device).logits(data.valid_pixels, tta=cfg.tta))
    logits = valid_logits.numpy().astype(np.float64)
    labels = np.array([s.label for s in data.valid])
    temperature = fit_temperature(logits, labels)
    probs = softmax(logits, temperature)
    if binary:
        meta.threshold = choose_threshold(probs[:, pos], labels, cfg.threshold, pos)
        meta.threshold_method = cfg.threshold
    meta.temperature = temperature
    report = evaluate_predictions(probs, labels, classes, meta.threshold if binary else None, logits=logits,
                                  subtypes=[subtype_of(s.path.name) for s in data.valid],
                                  groups=np.array([s.patient for s in data.valid]), temperature=temperature)
    if binary:
        add_test_balance(report, probs[:, pos], labels, pos, meta.threshold)
    report["split"] = cfg.split
    report["n_train"], report["n_valid"] = len(data.train), len(data.valid)
    atomic_write_json(run_dir / "valid_eval.json", report)
    write_predictions_csv(run_dir / "valid_predictions.csv", data.valid, classes, probs)
    write_evaluation_figures(report, probs, labels, run_dir)
    plot_training_curves(history, run_dir / "curves.png")
    model_dir = save_model(model, meta, run_dir / "model")
    message = (f"model saved to {model_dir} (threshold {meta.threshold:.3f} by {meta.threshold_method}, "
               f"temperature {temperature:.2f})")
    tqdm.write(message, file=sys.stdout if progress else sys.stderr)
    return RunResult(run_dir, model_dir, history, report, data.notes)
