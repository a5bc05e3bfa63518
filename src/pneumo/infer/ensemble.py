"""Several trained runs as one model: their calibrated probabilities averaged.

Members must have been validated on the same images (same data, split and seed), so that the
ensemble's decision threshold is chosen, as a single run's is, on validation predictions only:
the average of the members' ``valid_predictions.csv``. The ensemble is a model folder like any
other (``model.json`` naming its members, each a copied model folder under ``members/``), so
evaluate, predict, serve and explain take it unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np

from pneumo.data.folders import reference_prevalence, subtype_of
from pneumo.decision import DEFAULT_THRESHOLD_RULE
from pneumo.errors import PneumoError
from pneumo.evaluation.metrics import (
    evaluate_predictions,
    operating_threshold,
    positive_index,
    threshold_record,
    write_evaluation_figures,
)
from pneumo.infer.model_card import write_model_card
from pneumo.infer.model_folder import load_model
from pneumo.infer.scope import write_ensemble_scope
from pneumo.model_meta import ModelMeta, write_model_meta
from pneumo.run_folder import RunFolder, ValidPredictions


def read_member_predictions(run: RunFolder) -> ValidPredictions:
    if not run.predictions_file.is_file():
        raise PneumoError(
            f"{run.predictions_file}: missing; an ensemble member is a finished `pneumo train` run folder"
        )
    return run.read_predictions()


def same_films(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two runs' validation lists name the same films in the same order: a run started with a
    relative data path records relative paths, so each pair matches when one path's parts (leading
    ``..`` dropped) end the other's."""

    def parts(path: str) -> tuple[str, ...]:
        return tuple(p for p in PurePath(path).parts if p not in ("..", "."))

    def same(x: str, y: str) -> bool:
        px, py = parts(x), parts(y)
        short, long = sorted((px, py), key=len)
        return x == y or (len(short) >= 2 and long[-len(short) :] == short)

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def make_ensemble(run_dirs: Sequence[str | Path], out: str | Path, threshold: str = DEFAULT_THRESHOLD_RULE) -> dict:
    """Write an ensemble of finished runs to ``out`` (``out/model`` is the model folder); returns
    its validation report (also written to ``out/valid_eval.json``)."""
    runs = [RunFolder(r) for r in run_dirs]
    if len(runs) < 2:
        raise PneumoError("an ensemble needs at least two run folders")
    out_run = RunFolder(out)
    if (out_run.model_dir / "model.json").exists():
        raise PneumoError(f"{out} holds a model already; choose another --out")
    first = read_member_predictions(runs[0])
    probs = []
    for run in runs:
        preds = read_member_predictions(run)
        if preds.classes != first.classes or not same_films(preds.paths, first.paths) or preds.skipped:
            raise PneumoError(
                f"{run.path} was validated on other images or classes than {runs[0].path}: train the "
                f"members on the same data with the same --split, --valid-pct and --seed"
            )
        probs.append(preds.probs)
    members = [load_model(run.path) for run in runs]
    sizes = {m.meta.image_size for m in members}
    if len(sizes) > 1:
        raise PneumoError(f"members use different image sizes {sorted(sizes)}; train them at one --image-size")

    classes, labels = first.classes, first.labels
    mean = np.mean(probs, axis=0)
    binary = len(classes) == 2
    pos = positive_index(classes) if binary else None
    choice = operating_threshold(mean[:, pos], labels, threshold, pos, np.array(first.patients)) if binary else None
    chosen = choice["threshold"] if choice else 0.5
    report = evaluate_predictions(
        mean,
        labels,
        classes,
        chosen if binary else None,
        subtypes=[subtype_of(Path(p).name) for p in first.paths],
        groups=np.array(first.patients),
        reweight_to=reference_prevalence(classes) if binary else None,
    )
    report["members"] = [str(r.path) for r in runs]
    record = threshold_record(choice) if choice else {}
    if record:
        report["threshold_choice"] = record
    counts = runs[0].read_evaluation().get("split_counts") if runs[0].evaluation_file.is_file() else None
    if counts:  # the members share one split (same paths checked above): the model card reports it
        report["split_counts"] = counts

    model_dir = out_run.model_dir
    names = [f"{i}-{m.meta.arch}" for i, m in enumerate(members)]
    for run, name in zip(runs, names):
        source = run.model_dir if run.model_dir.is_dir() else run.path
        # a member's own ONNX export is left behind: the ensemble is exported as one graph
        exported = shutil.ignore_patterns("*.onnx", "*.meta.json", "*.parity.json")
        shutil.copytree(source, model_dir / "members" / name, dirs_exist_ok=True, ignore=exported)
    meta = ModelMeta(
        arch="ensemble:" + "+".join(m.meta.arch for m in members),
        classes=classes,
        image_size=sizes.pop(),
        threshold=chosen,
        positive_class=classes[pos] if binary else None,
        threshold_method=choice["method"] if choice else threshold,
        operating_points=record,
        members=[f"members/{n}" for n in names],
        trained_with={"members": [m.meta.trained_with for m in members]},
    )
    write_model_meta(model_dir / "model.json", meta)
    write_ensemble_scope([model_dir / "members" / n for n in names], model_dir)
    out_run.write_evaluation(report)
    out_run.write_predictions(ValidPredictions(classes, first.paths, labels, first.patients, mean))
    write_evaluation_figures(report, mean, labels, out_run.path)
    write_model_card(model_dir)
    return report
