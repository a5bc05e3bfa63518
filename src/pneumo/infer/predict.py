"""Using a saved model: predict files and folders, evaluate on a labelled folder.

Both go through ``LoadedModel`` and therefore through ``imaging.prepare``: the same preprocessing
as training, with the threshold and temperature chosen on validation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from pneumo.data.cache import decode_images
from pneumo.data.folders import discover, is_image_file, printable, subtype_of
from pneumo.errors import DataError, PneumoError
from pneumo.evaluation.metrics import evaluate_predictions, write_evaluation_figures
from pneumo.infer.model_folder import LoadedModel, load_model
from pneumo.io_utils import atomic_write_json


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for JPEG and PNG images."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if is_image_file(f))
        else:
            out.append(p)
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return out


def predict_files(
    model: str | Path | LoadedModel, paths: Sequence[str | Path], tta: bool = False, progress: bool = True
) -> list[dict]:
    """One row per image: path, label, probability of that label, every class's probability, or error."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    files = expand_paths(paths)
    probs, ok, errors = loaded.predict_paths(files, progress=progress, tta=tta)
    return prediction_rows(loaded, files, probs, ok, errors)


def prediction_rows(
    loaded: LoadedModel, files: Sequence[str | Path], probs: np.ndarray, ok: np.ndarray, errors: dict[str, str]
) -> list[dict]:
    """The rows of ``predict_files`` for probabilities already computed (``LoadedModel.predict_paths``)."""
    decisions = loaded.decide(np.nan_to_num(probs))
    rows = []
    for path, p, good, label in zip(files, probs, ok, decisions):
        if not good:
            rows.append({"path": str(path), "error": errors.get(str(path), "unreadable")})
            continue
        rows.append(
            {
                "path": str(path),
                "label": loaded.classes[label],
                "probability": float(p[label]),
                "threshold": loaded.threshold,
                **{f"p_{c}": float(v) for c, v in zip(loaded.classes, p)},
            }
        )
    return rows


def write_predictions(rows: list[dict], fmt: str, stream: IO[str]) -> None:
    rows = [{**r, "path": printable(r["path"])} for r in rows]  # a name that is not UTF-8 prints as \xe9
    if fmt == "json":
        stream.write(json.dumps(rows, indent=2) + "\n")
        return
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "path", k != "label", k))
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        return
    for r in rows:
        if "error" in r:
            stream.write(f"{r['path']}: ERROR {r['error']}\n")
        else:
            stream.write(f"{r['path']}: {r['label']} (p={r['probability']:.3f})\n")


def evaluate_model_on_folder(
    model: str | Path | LoadedModel,
    data: str | Path,
    out: str | Path | None = None,
    split: str | None = None,
    tta: bool = False,
    progress: bool = True,
    adapt: Callable[[LoadedModel, np.ndarray], tuple[LoadedModel, dict]] | None = None,
) -> dict:
    """Metrics of a saved model on labelled images, at its stored threshold and temperature.

    ``data`` is a folder of class folders (Kaggle's ``test``) or a Kaggle root, whose ``test`` split
    is used unless ``split`` says otherwise. Class folders must match the model's classes.

    ``adapt`` (``pneumo evaluate --adapt``: ``infer.adapt.evaluation_adapter``) takes the model and
    the pixels of the evaluated films, never their labels, and returns the model to evaluate and
    what was done, reported under ``"adapted"``.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    dataset = discover(data)
    chosen = split or ("test" if "test" in dataset.splits else dataset.splits[0] if len(dataset.splits) == 1 else None)
    if chosen is None or chosen not in dataset.splits:
        raise DataError(f"{data}: choose a split with --split ({', '.join(dataset.splits)})")
    unknown = set(dataset.classes) - set(loaded.classes)
    if unknown:
        raise PneumoError(f"{data}: classes {sorted(unknown)} are not among the model's {loaded.classes}")
    samples = dataset.split(chosen)
    adapted = None
    if adapt is None:
        probs, ok, errors = loaded.predict_paths([s.path for s in samples], progress=progress, tta=tta)
    else:  # decoded once: the films adapt the model, then the adapted model reads them
        decoded = decode_images([s.path for s in samples], loaded.meta.image_size, progress=progress, use_cache=False)
        ok, errors = decoded.ok, decoded.errors
        pixels = np.asarray(decoded.pixels)[ok]
        loaded, adapted = adapt(loaded, pixels)
        probs = np.full((len(samples), len(loaded.classes)), np.nan, dtype=np.float32)
        probs[ok] = loaded.probabilities(pixels, tta=tta)
    kept = [s for s, good in zip(samples, ok) if good]
    labels = np.array([loaded.classes.index(dataset.classes[s.label]) for s in kept])
    report = evaluate_predictions(
        probs[ok],
        labels,
        loaded.classes,
        loaded.threshold,
        subtypes=[subtype_of(s.path.name) for s in kept],
        groups=np.array([s.patient for s in kept]),
    )
    report.update(data=str(dataset.root), split=chosen, model=loaded.meta.arch, skipped=errors)
    if adapted is not None:
        report["adapted"] = adapted
    if out:
        out = Path(out)
        write_evaluation_figures(report, probs[ok], labels, out)
        atomic_write_json(out / "evaluation.json", report)
        report["figures"] = str(out)
    return report


def format_evaluation(report: dict) -> str:
    m = report.get("metrics", {})
    lines = [
        f"{report.get('n', len(report.get('skipped', [])))} images from {report.get('data')} ({report.get('split')})"
    ]
    if "sensitivity" in m:
        ci = report.get("ci") or {}
        for key in ("accuracy", "error_rate", "sensitivity", "specificity", "ppv", "npv", "roc_auc"):
            if m.get(key) is None:
                continue
            interval = ci.get(key)
            extra = f"  (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""
            lines.append(f"  {key:<12} {m[key]:.4f}{extra}")
        lines.append(f"  threshold    {report.get('threshold'):.3f}")
        lines.append(f"  confusion    {report.get('confusion_matrix')} (rows actual, columns predicted)")
    else:
        lines += [f"  {k}: {v}" for k, v in m.items()]
    adapted = report.get("adapted")
    if adapted:
        t = adapted.get("threshold") or {}
        lines.append(
            f"  adapted      to these {adapted['films']} films, labels unused: BatchNorm re-estimated"
            + (f"; threshold {t['before']:.3f} -> {t['after']:.3f} ({t['rule']})" if t else "")
        )
    for path, why in (report.get("skipped") or {}).items():
        lines.append(f"  skipped {path}: {why}")
    if report.get("figures"):
        lines.append(f"figures in {report['figures']}")
    return "\n".join(lines)
