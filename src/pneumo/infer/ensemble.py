"""Several trained runs as one model: their calibrated probabilities averaged.

Members must have been validated on the same images (same data, split and seed), so that the
ensemble's decision threshold is chosen, as a single run's is, on validation predictions only:
the average of the members' ``valid_predictions.csv``. The ensemble is a model folder like any
other (``model.json`` naming its members, each a copied model folder under ``members/``), so
evaluate, predict, serve and explain take it unchanged.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from pneumo.data.folders import Sample, subtype_of
from pneumo.errors import PneumoError
from pneumo.evaluation.metrics import choose_threshold, evaluate_predictions, positive_index, write_evaluation_figures
from pneumo.train.finish import add_test_balance, write_predictions_csv
from pneumo.io_utils import atomic_write_json
from pneumo.infer.model_folder import ModelMeta, load_model


def read_valid_predictions(run_dir: Path) -> tuple[list[dict], list[str]]:
    path = run_dir / "valid_predictions.csv"
    if not path.is_file():
        raise PneumoError(f"{path}: missing; an ensemble member is a finished `pneumo train` run folder")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [name[len("prob_"):] for name in rows[0] if name.startswith("prob_")] if rows else []
    return rows, classes


def make_ensemble(run_dirs: Sequence[str | Path], out: str | Path, threshold: str = "youden") -> dict:
    """Write an ensemble of finished runs to ``out`` (``out/model`` is the model folder); returns
    its validation report (also written to ``out/valid_eval.json``)."""
    runs = [Path(r) for r in run_dirs]
    if len(runs) < 2:
        raise PneumoError("an ensemble needs at least two run folders")
    out = Path(out)
    if (out / "model" / "model.json").exists():
        raise PneumoError(f"{out} holds a model already; choose another --out")
    first_rows, classes = read_valid_predictions(runs[0])
    probs = []
    for run in runs:
        rows, run_classes = read_valid_predictions(run)
        if run_classes != classes or [r["path"] for r in rows] != [r["path"] for r in first_rows]:
            raise PneumoError(f"{run} was validated on other images or classes than {runs[0]}: train the "
                              f"members on the same data with the same --split, --valid-pct and --seed")
        probs.append(np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]))
    members = [load_model(run) for run in runs]
    sizes = {m.meta.image_size for m in members}
    if len(sizes) > 1:
        raise PneumoError(f"members use different image sizes {sorted(sizes)}; train them at one --image-size")

    mean = np.mean(probs, axis=0)
    labels = np.array([classes.index(r["label"]) for r in first_rows])
    binary = len(classes) == 2
    pos = positive_index(classes) if binary else None
    chosen = choose_threshold(mean[:, pos], labels, threshold, pos) if binary else 0.5
    report = evaluate_predictions(mean, labels, classes, chosen if binary else None,
                                  subtypes=[subtype_of(Path(r["path"]).name) for r in first_rows],
                                  groups=np.array([r["patient"] for r in first_rows]))
    if binary:
        add_test_balance(report, mean[:, pos], labels, pos, chosen)
    report["members"] = [str(r) for r in runs]

    model_dir = out / "model"
    names = [f"{i}-{m.meta.arch}" for i, m in enumerate(members)]
    for run, name in zip(runs, names):
        source = run / "model" if (run / "model").is_dir() else run
        shutil.copytree(source, model_dir / "members" / name, dirs_exist_ok=True)
    meta = ModelMeta(arch="ensemble:" + "+".join(m.meta.arch for m in members), classes=classes,
                     image_size=sizes.pop(), threshold=chosen, positive_class=classes[pos] if binary else None,
                     threshold_method=threshold, members=[f"members/{n}" for n in names],
                     trained_with={"members": [m.meta.trained_with for m in members]})
    atomic_write_json(model_dir / "model.json", meta.__dict__)
    atomic_write_json(out / "valid_eval.json", report)
    samples = [Sample(Path(r["path"]), classes.index(r["label"]), "valid", r["patient"]) for r in first_rows]
    write_predictions_csv(out / "valid_predictions.csv", samples, classes, mean)
    write_evaluation_figures(report, mean, labels, out)
    return report
