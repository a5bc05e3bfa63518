"""Labelled site calibration (``pneumo adapt MODEL SITE --labelled``): the step a hospital takes before use.

SITE is a folder of class folders holding the site's own labelled films. Unlike ``pneumo adapt``
without labels, this reads the labels, and ``model.json`` (and so the model card) says so. Moved:

1. **BatchNorm statistics of the body**, re-estimated on the site's films exactly as the unlabelled
   adaptation does (``infer.adapt.adapt_loaded``): labels are not needed for that part.
2. With ``fit="head"`` (the default): each network's **last linear layer** refitted on the site's
   films (the pooled features through the rest of the head, as trained), with class weights
   against the site's imbalance and an L2 pull towards the trained layer (L2-SP, Li et al. 2018):
   the penalty keeps what the training films taught where the site's few films do not speak,
   which is what mixing training films into the fit would do, without needing them at hand.
   ``fit="threshold"`` moves only the threshold.
3. **The temperature and the threshold**, chosen on out-of-fold predictions: the site's films are
   cut into folds by patient, each fold read by a layer fitted without it, so the threshold (Youden)
   and each network's temperature are never chosen on films the layer was fitted to.

How many labelled films are enough was measured on outside-dev (``bench/calibrate.py``):
``MIN_LABELLED_PER_CLASS`` a class; fewer are refused unless ``allow_few``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumo.data.cache import decode_images
from pneumo.data.folders import discover
from pneumo.errors import DataError, PneumoError
from pneumo.evaluation.metrics import binary_metrics, choose_threshold, fit_temperature, softmax
from pneumo.infer.adapt import adapt_loaded, films_hash, write_adapted
from pneumo.infer.model_card import write_model_card
from pneumo.infer.model_folder import EnsembleModel, LoadedModel, load_model, model_folder
from pneumo.infer.site_methods import fit_last_layer, hidden_activations
from pneumo.version import __version__

METHOD = "labelled site calibration"
FITS = ("head", "threshold")
MIN_LABELLED_PER_CLASS = 50  # measured (bench/results/calibrate_new_reference.json): 10 and 20 a class gave
# unstable thresholds (sensitivity 0.56 to 0.95 over draws); the calibration half of outside-dev (59 NORMAL,
# 100 PNEUMONIA) met the goals (accuracy 0.956, sensitivity 0.970, specificity 0.932); sizes between: not measured
FEWEST_PER_CLASS = 5  # even with allow_few: folds need a few films of each class
FOLDS = 5
THRESHOLD_RULE = "youden"
CALIBRATION_ANCHOR = 1e-2  # L2 pull towards the trained last layer, per weight, against the mean loss per film


@dataclass
class Calibration:
    """A calibrated model in memory (the given model is untouched) and what ``model.json`` records."""

    model: LoadedModel
    record: dict[str, Any]


def _members(model: LoadedModel) -> list[LoadedModel]:
    return list(getattr(model, "members", None) or [model])


def patient_folds(labels: np.ndarray, patients: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per film: patients kept together, classes spread evenly (StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = int(min(folds, np.bincount(labels).min()))
    if k < 2:
        raise PneumoError("labelled calibration needs at least 2 films of each class")
    fold = np.zeros(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
        fold[held] = i
    return fold


def check_enough(counts: dict[str, int], allow_few: bool, where: str) -> None:
    need = FEWEST_PER_CLASS if allow_few else MIN_LABELLED_PER_CLASS
    short = {c: n for c, n in counts.items() if n < need}
    if short:
        said = ", ".join(f"{n} {c}" for c, n in short.items())
        hint = "" if allow_few else f" (--allow-few calibrates on fewer, at least {FEWEST_PER_CLASS} a class)"
        raise PneumoError(
            f"{where}: {said} readable film(s); labelled calibration needs at least {need} films of each class"
            f" (measured: bench/calibrate.py){hint}"
        )


def calibrate_loaded(
    model: LoadedModel,
    pixels: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    fit: str = "head",
    anchor: float = CALIBRATION_ANCHOR,
    allow_few: bool = False,
    where: str = "the site's films",
    progress: bool = True,
) -> Calibration:
    """``model`` calibrated on the site's labelled films (uint8 ``(N, size, size)``, labels as class indices
    of ``model.classes``, a patient id per film for the folds)."""
    if fit not in FITS:
        raise PneumoError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    pos = model.positive
    if pos is None:
        raise PneumoError("labelled calibration needs a two-class model with a positive class")
    pixels, labels, patients = np.asarray(pixels), np.asarray(labels, dtype=int), np.asarray(patients)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(model.classes)}
    check_enough(counts, allow_few, where)
    adapted = adapt_loaded(model, pixels, threshold_rule="keep", allow_few=True, where=where, progress=progress)
    members = _members(adapted.model)  # adapt_loaded's own copies: the given model stays untouched
    fold = patient_folds(labels, patients, FOLDS)
    oof_probs, temperatures = [], []
    for member in members:
        last = member.net.head[-1].weight
        hidden = hidden_activations(member, pixels)
        if fit == "head":
            oof = np.zeros((len(labels), last.shape[0]), np.float64)
            for k in np.unique(fold):
                w = fit_last_layer(hidden[fold != k], labels[fold != k], last, anchor)
                oof[fold == k] = hidden[fold == k] @ w.numpy().T
            with torch.no_grad():
                last.copy_(fit_last_layer(hidden, labels, last, anchor))
            temperature = fit_temperature(oof, labels)
        else:
            oof = hidden.astype(np.float64) @ last.detach().numpy().T.astype(np.float64)
            temperature = float(member.meta.temperature)
        member.meta = replace(member.meta, temperature=temperature)
        temperatures.append(temperature)
        oof_probs.append(softmax(oof, temperature))
    p_oof = np.mean(oof_probs, axis=0)
    threshold = choose_threshold(p_oof[:, pos], labels, THRESHOLD_RULE, pos)
    figures = binary_metrics(p_oof[:, pos], labels, threshold, pos)
    before = float(model.meta.threshold)
    record: dict[str, Any] = {
        "method": METHOD,
        "description": (
            "BatchNorm statistics of the body re-estimated on the site's films; "
            + (
                f"the head's last linear layer refitted on their labels (class-weighted, L2 pull {anchor:g} "
                "towards the trained layer); "
                if fit == "head"
                else ""
            )
            + f"temperature and threshold ({THRESHOLD_RULE}) chosen on out-of-fold predictions "
            f"({int(fold.max()) + 1} folds by patient)"
        ),
        "labels_used": True,
        "fit": fit,
        "anchor": anchor if fit == "head" else None,
        "films": int(len(labels)),
        "films_per_class": counts,
        "films_sha256": films_hash(pixels),
        "folds": int(fold.max()) + 1,
        "min_films_per_class": MIN_LABELLED_PER_CLASS,
        "few_films_allowed": bool(allow_few and min(counts.values()) < MIN_LABELLED_PER_CLASS),
        "temperatures": [round(t, 4) for t in temperatures],
        "out_of_fold": {k: figures.get(k) for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
        "threshold": {
            "before": before,
            "after": threshold,
            "rule": THRESHOLD_RULE,
            "how": "on out-of-fold site predictions",
        },
        "batchnorm_layers": adapted.record["batchnorm_layers"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pneumo_version": __version__,
    }
    meta = replace(model.meta, threshold=threshold, adaptation=record)
    if getattr(model, "members", None):
        for m in members:
            m.meta = replace(
                m.meta, adaptation={**record, "threshold": None, "note": "member of a calibrated ensemble"}
            )
        calibrated: LoadedModel = EnsembleModel(members, meta, model.device)
    else:
        calibrated = LoadedModel(members[0].net, replace(meta, temperature=temperatures[0]), model.device)
    return Calibration(calibrated, record)


def labelled_films(site: str | Path, classes: list[str], size: int, progress: bool = True):
    """Pixels, class indices (of ``classes``), patients and unreadable files of a folder of class folders."""
    data = discover(site)
    unknown = set(data.classes) - set(classes)
    if unknown:
        raise DataError(f"{site}: classes {sorted(unknown)} are not among the model's {classes}")
    samples = [s for split in data.splits for s in data.split(split)]
    if not samples:
        raise DataError(
            f"{site}: no films found; expected class folders of images ({', '.join(f'{site}/{c}' for c in classes)})"
        )
    decoded = decode_images([s.path for s in samples], size, progress=progress, use_cache=False)
    ok = decoded.ok
    kept = [s for s, good in zip(samples, ok) if good]
    labels = np.array([classes.index(data.classes[s.label]) for s in kept], dtype=int)
    patients = np.array([s.patient for s in kept])
    return np.asarray(decoded.pixels)[ok], labels, patients, dict(decoded.errors)


def calibrate_films(
    model: str | Path,
    site: str | Path,
    out: str | Path,
    fit: str = "head",
    allow_few: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """Calibrate the model folder ``model`` on the labelled class folders ``site``; write it to ``out``."""
    out = Path(out)
    if (out / "model.json").exists():
        raise PneumoError(f"{out} holds a model already; choose another --out")
    if fit not in FITS:
        raise PneumoError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    loaded = load_model(model_folder(model), device)
    pixels, labels, patients, skipped = labelled_films(site, loaded.classes, loaded.meta.image_size, progress)
    where = str(site) + (f" ({len(skipped)} unreadable, skipped)" if skipped else "")
    done = calibrate_loaded(
        loaded, pixels, labels, patients, fit=fit, allow_few=allow_few, where=where, progress=progress
    )
    done.record["films_skipped"] = len(skipped)
    write_adapted(done.model, out)
    write_model_card(out)  # the card says that the site's labels were used
    return out, done.record, skipped


def format_calibration(record: dict[str, Any]) -> str:
    per = ", ".join(f"{n} {c}" for c, n in record["films_per_class"].items())
    t, o = record["threshold"], record["out_of_fold"]
    lines = [
        f"calibrated on {record['films']} labelled site films ({per}; labels used): {record['description']}",
        f"  threshold    {t['before']:.4f} -> {t['after']:.4f} ({t['rule']} {t['how']})",
        "  out-of-fold  "
        + ", ".join(
            f"{k} {o[k]:.3f}" for k in ("accuracy", "sensitivity", "specificity", "roc_auc") if o.get(k) is not None
        ),
    ]
    if record.get("few_films_allowed"):
        lines.append(
            f"  note: fewer than the {record['min_films_per_class']} films a class calibration is measured for"
        )
    return "\n".join(lines)
