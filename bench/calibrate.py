"""Issue 26: labelled site calibration (``pneumo adapt --labelled``) on outside-dev, and how many films it needs.

    python bench/calibrate.py MODEL [--films ../shared/data/chest_xray_224/outside_dev] [--out bench/results/NAME]

outside-dev (317 films, a patient-level half of Kaggle's official test split) stands in for a new
hospital's films. It is cut by patient, stratified by class, into a *calibration* half (the site's
labelled films) and an *evaluation* half that no calibration sees. On the evaluation half:
- plain: the model as saved; adapted: ``pneumo adapt`` (no labels) on the evaluation films themselves;
- calibrated: ``calibrate_loaded`` on N films a class drawn from the calibration half (``--draws``
  draws a size; "all" is the whole half), for each ``--fits`` (head: last layer + threshold;
  threshold: the threshold alone, after BatchNorm).
This is the one place outside-dev labels reach a model, and it says so: the labelled calibration exists
for exactly that. Prints JSON and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import OUTSIDE_DEV, run_report
from pneumo.evaluation.metrics import binary_metrics
from pneumo.infer.adapt import adapt_loaded
from pneumo.infer.calibrate import calibrate_loaded, labelled_films, patient_folds
from pneumo.infer.model_folder import load_model

KEYS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "roc_auc")


def scores(model: Any, pixels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p = model.probabilities(pixels)[:, model.positive]
    m = binary_metrics(p, labels, model.threshold, model.positive)
    return {k: round(float(m[k]), 4) for k in KEYS} | {"threshold": round(float(model.threshold), 4)}


def draw(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` films of each class (all of them for None), in film order."""
    if per_class is None:
        return np.arange(len(labels))
    picked = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def summarise(rows: list[dict[str, float]]) -> dict[str, Any]:
    return {
        k: {"mean": round(float(np.mean([r[k] for r in rows])), 4), "min": min(r[k] for r in rows)} for k in KEYS
    } | {"draws": len(rows)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    model = load_model(args.model)
    pixels, labels, patients, skipped = labelled_films(args.films, model.classes, model.meta.image_size, False)
    half = patient_folds(labels, patients, 2, seed=args.seed)
    cal, ev = half == 0, half == 1
    result: dict[str, Any] = {
        "model": str(Path(args.model).resolve()),
        "films": str(Path(args.films).resolve()),
        "what": "outside-dev cut by patient: the calibration half's labels calibrate, the evaluation half measures",
        "calibration_films": {c: int((labels[cal] == i).sum()) for i, c in enumerate(model.classes)},
        "evaluation_films": {c: int((labels[ev] == i).sum()) for i, c in enumerate(model.classes)},
        "plain": scores(model, pixels[ev], labels[ev]),
    }
    adapted = adapt_loaded(model, pixels[ev], threshold_rule="auto", allow_few=True, progress=False).model
    result["adapted_on_evaluation_films"] = scores(adapted, pixels[ev], labels[ev])
    # pneumo adapt without labels on N films of the site (the calibration half, labels unused), read on the
    # evaluation half: how many films the unlabelled adaptation needs, per method
    for method in [m for m in args.adapt_methods.split(",") if m]:
        per_size = {}
        for size in [int(s) for s in args.adapt_sizes.split(",") if s]:
            rows = []
            for d in range(args.draws):
                pick = np.random.default_rng(1000 * args.seed + d).choice(np.flatnonzero(cal), size, replace=False)
                done = adapt_loaded(model, pixels[np.sort(pick)], allow_few=True, progress=False, method=method)
                rows.append(scores(done.model, pixels[ev], labels[ev]))
                print(json.dumps({"adapt": method, "films": size, "draw": d, **rows[-1]}), flush=True)
            per_size[str(size)] = {"summary": summarise(rows), "draws": rows}
        result[f"adapted_{method}_by_films"] = per_size
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",") if s]
    for fit in [f for f in args.fits.split(",") if f]:
        per_size: dict[str, Any] = {}
        for size in sizes:
            rows = []
            for d in range(1 if size is None else args.draws):
                idx = np.flatnonzero(cal)[draw(labels[cal], size, np.random.default_rng(1000 * args.seed + d))]
                done = calibrate_loaded(
                    model, pixels[idx], labels[idx], patients[idx], fit=fit, allow_few=True, progress=False
                )
                rows.append(scores(done.model, pixels[ev], labels[ev]) | {"out_of_fold": done.record["out_of_fold"]})
                print(json.dumps({"fit": fit, "per_class": size or "all", "draw": d, **rows[-1]}), flush=True)
            per_size[str(size or "all")] = {"summary": summarise(rows), "draws": rows}
        result[f"calibrated_{fit}"] = per_size
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def markdown(result: dict[str, Any]) -> str:
    def row(name: str, r: dict) -> str:
        return (
            f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" if k != "roc_auc" else f"{r[k]:.3f}" for k in KEYS) + " |"
        )

    lines = [
        "# Labelled site calibration on outside-dev",
        "",
        f"Calibration half {result['calibration_films']}, evaluation half {result['evaluation_films']} "
        "(cut by patient). Figures on the evaluation half; calibrated rows: mean over draws (min in brackets "
        "for accuracy).",
        "",
        "| reading | accuracy | sensitivity | specificity | balanced acc. | AUC |",
        "| --- | --- | --- | --- | --- | --- |",
        row("plain", result["plain"]),
        row("adapted, no labels (on the evaluation films)", result["adapted_on_evaluation_films"]),
    ]
    for key in [k for k in result if k.endswith("_by_films")]:
        for size, block in result[key].items():
            s = block["summary"]
            mean = {k: s[k]["mean"] for k in KEYS}
            name = key.removeprefix("adapted_").removesuffix("_by_films")
            lines.append(row(f"adapted without labels ({name}) on {size} calibration-half films", mean))
    for key in [k for k in result if k.startswith("calibrated_")]:
        for size, block in result[key].items():
            s = block["summary"]
            mean = {k: s[k]["mean"] for k in KEYS}
            line = row(f"{key.replace('_', ': ', 1)}, {size} a class", mean)
            lines.append(
                line.replace(
                    f"| {100 * mean['accuracy']:.1f} |",
                    f"| {100 * mean['accuracy']:.1f} ({100 * s['accuracy']['min']:.1f}) |",
                    1,
                )
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model folder")
    p.add_argument("--films", default=str(OUTSIDE_DEV), help="labelled class folders (default: outside_dev)")
    p.add_argument("--sizes", default="10,20,30,all", help="films a class drawn for calibration ('all': the half)")
    p.add_argument("--draws", type=int, default=3, help="draws per size")
    p.add_argument("--fits", default="head,threshold", help="calibrate_loaded fit= values to measure")
    p.add_argument("--seed", type=int, default=0, help="seeds the halves and the draws")
    p.add_argument("--adapt-sizes", default="8,16,32,64,128", help="unlabelled films drawn for pneumo adapt")
    p.add_argument("--adapt-methods", default="batchnorm,self-training", help="pneumo adapt methods to measure")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    code = run_report(lambda: run(args), out.with_suffix(".json") if out else None)
    if out and code == 0:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
    return code


if __name__ == "__main__":
    sys.exit(main())
