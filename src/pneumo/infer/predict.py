"""Using a saved model: predict files and folders, evaluate on a labelled folder.

Both go through ``LoadedModel`` and therefore through ``imaging.prepare``: the same preprocessing
as training, with the threshold and temperature chosen on validation.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from pneumo.data.cache import decode_images
from pneumo.data.folders import SPLIT_ALIASES, ChestXrayFolder, discover, is_image_file, printable, subtype_of
from pneumo.decision import describe_reading
from pneumo.errors import DataError, PneumoError
from pneumo.evaluation.summary import Evaluation
from pneumo.infer.runtime import open_chosen
from pneumo.infer.scope import ScopeCheck
from pneumo.io_utils import atomic_write_json

if TYPE_CHECKING:  # torch is imported only on the torch runtime (infer.runtime.open_model)
    from pneumo.infer.model_folder import LoadedModel


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for JPEG, PNG and DICOM images."""
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
    model: str | Path | LoadedModel,
    paths: Sequence[str | Path],
    tta: bool = False,
    progress: bool = True,
    runtime: str = "auto",
) -> list[dict]:
    """One row per image (``PREDICTION_COLUMNS``), or its path and error.

    One meaning of probability: ``p_positive`` is p(positive class), compared with ``threshold``;
    ``reading`` says so in words. ``p_<CLASS>`` columns give every class's probability.
    ``runtime="onnx"`` reads the model's ONNX export with onnxruntime, torch never imported; ``auto``
    does so when the export is this model's (``infer.runtime.resolve_runtime``).
    Every row says whether the film is in scope (``infer.scope``; DICOM tags only on the onnx
    runtime); an out-of-scope film gets no label and no reading (its probabilities are kept, for the
    record) and a warning line on stderr.
    """
    loaded = open_chosen(model, runtime, tta=tta)[0]
    files = expand_paths(paths)
    decoded = decode_images(files, loaded.meta.image_size, progress=progress, use_cache=False)
    probs, verdicts = read_films(ScopeCheck(loaded), files, decoded.ok, readable_pixels(decoded), tta)
    return prediction_rows(loaded, files, probs, decoded.ok, decoded.errors, verdicts)


def readable_pixels(decoded: Any) -> np.ndarray:
    """The pixels of the films ``decode_images`` could read, in order."""
    return np.asarray(decoded.pixels)[decoded.ok]


def probabilities_of(loaded: Any, ok: np.ndarray, pixels: np.ndarray, tta: bool = False) -> np.ndarray:
    """One row of probabilities per file: the model's for the readable ``pixels``, NaN for the others.

    Any runtime's model (``LoadedModel``, ``OnnxModel``): predict, evaluate and the archive engines
    all fill their tables here."""
    return _per_file(ok, loaded.probabilities(pixels, tta=tta) if len(pixels) else None, len(loaded.classes))


def _per_file(ok: np.ndarray, readable: np.ndarray | None, n_classes: int) -> np.ndarray:
    """The readable films' rows of probabilities in their files' places, NaN rows for the others."""
    probs = np.full((len(ok), n_classes), np.nan, dtype=np.float32)
    if readable is not None:
        probs[ok] = readable
    return probs


def read_films(
    scope: ScopeCheck, files: Sequence[str | Path], ok: np.ndarray, pixels: np.ndarray, tta: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """Probabilities for every file (NaN rows for the unreadable, as ``probabilities_of``) and a scope
    verdict per readable film, from one pass through the network (``ScopeCheck.read``): what
    predict, the archive engines and ``prediction_rows`` take."""
    if not len(pixels):
        return _per_file(ok, None, len(scope.model.classes)), []
    readable, verdicts = scope.read(pixels, [Path(f) for f, good in zip(files, ok) if good], tta)
    return _per_file(ok, readable, len(scope.model.classes)), verdicts


def prediction_rows(
    loaded: LoadedModel,
    files: Sequence[str | Path],
    probs: np.ndarray,
    ok: np.ndarray,
    errors: dict[str, str],
    verdicts: Sequence[dict] | None = None,
) -> list[dict]:
    """The rows of ``predict_files`` for probabilities already computed; ``verdicts``: one scope
    verdict per readable film (``ScopeCheck.check``), or None when scope was not checked."""
    unchecked = {"in_scope": None, "scope_reason": "not checked", "scope_distance": None}
    verdict_of = iter(verdicts) if verdicts is not None else None
    decisions = loaded.decide(np.nan_to_num(probs))
    rows = []
    for path, p, good, label in zip(files, probs, ok, decisions):
        if not good:
            rows.append({"path": str(path), "error": errors.get(str(path), "unreadable")})
            continue
        verdict = next(verdict_of) if verdict_of is not None else unchecked
        positive, in_scope = loaded.positive, verdict["in_scope"] is not False
        rows.append(
            {
                "path": str(path),
                "label": loaded.classes[label] if in_scope else None,
                "positive_class": None if positive is None else loaded.classes[positive],
                "p_positive": None if positive is None else float(p[positive]),
                "threshold": loaded.threshold,
                "reading": describe_reading(p, loaded.classes, positive, loaded.threshold) if in_scope else None,
                **{f"p_{c}": float(v) for c, v in zip(loaded.classes, p)},
                **verdict,
            }
        )
        if not in_scope:
            sys.stderr.write(f"warning: {path}: out of scope, no label given: {verdict['scope_reason']}\n")
    return rows


# The columns of ``pneumo predict --csv`` (then one p_<CLASS> per class, and error for unreadable files).
PREDICTION_COLUMNS = ["path", "label", "positive_class", "p_positive", "threshold", "reading"]
SCOPE_COLUMNS = ["in_scope", "scope_reason", "scope_distance"]


def output_columns(classes: Sequence[str]) -> list[str]:
    """The columns of an archive's predictions file (``predict --out``), the same for every engine and rerun."""
    return [*PREDICTION_COLUMNS, *[f"p_{c}" for c in classes], *SCOPE_COLUMNS, "error"]


def write_predictions(rows: list[dict], fmt: str, stream: IO[str]) -> None:
    rows = [{**r, "path": printable(r["path"])} for r in rows]  # a name that is not UTF-8 prints as \xe9
    if fmt == "json":
        stream.write(json.dumps(rows, indent=2) + "\n")
        return
    present = {k for r in rows for k in r}
    keys = [k for k in PREDICTION_COLUMNS if k in present] + sorted(present - set(PREDICTION_COLUMNS))
    if fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        return
    for r in rows:
        if "error" in r:
            stream.write(f"{r['path']}: ERROR {r['error']}\n")
        elif r.get("in_scope") is False:
            stream.write(f"{r['path']}: OUT OF SCOPE ({r['scope_reason']})\n")
        else:
            stream.write(f"{r['path']}: {r['label']} ({r['reading']})\n")
    # what the scope check could not use (an untrusted distance check), said once, not on every line
    for note in dict.fromkeys(r["scope_reason"] for r in rows if r.get("in_scope") and r.get("scope_reason")):
        stream.write(f"scope: {note}\n")


def evaluate_model_on_folder(
    model: str | Path | LoadedModel,
    data: str | Path,
    out: str | Path | None = None,
    split: str | None = None,
    tta: bool = False,
    progress: bool = True,
    adapt: Callable[[LoadedModel, np.ndarray], tuple[LoadedModel, dict]] | None = None,
    runtime: str = "auto",
) -> Evaluation:
    """Metrics of a saved model on labelled images, at its stored threshold and temperature.

    ``data`` is a folder of class folders (Kaggle's ``test``) or a Kaggle root, whose ``test`` split
    is used unless ``split`` says otherwise. Class folders must match the model's classes.

    ``adapt`` (``pneumo evaluate --adapt``: ``infer.adapt.evaluation_adapter``) takes the model and
    the pixels of the evaluated films, never their labels, and returns the model to evaluate and
    what was done, reported under ``"adapted"``. ``runtime``: as ``predict_files`` (adapting needs the
    network: torch); the evaluation records which one read the films, and why.
    """
    from pneumo.evaluation.metrics import evaluate_predictions, write_evaluation_figures

    loaded, runtime, runtime_reason = open_chosen(
        model, runtime, tta=tta, needs_network="--adapt" if adapt is not None else None
    )
    dataset = discover(data)
    if dataset.layout != "kaggle":  # a folder of class folders is read whole
        if split is not None:
            raise DataError(f"{data}: --split picks a split of a Kaggle root; this folder holds class folders only")
        chosen = dataset.splits[0]
    else:
        chosen = split or ("test" if "test" in dataset.splits else None)
    if chosen is None or chosen not in dataset.splits:
        raise DataError(f"{data}: choose a split with --split ({', '.join(dataset.splits)})")
    unknown = set(dataset.classes) - set(loaded.classes)
    if unknown:
        raise PneumoError(f"{data}: classes {sorted(unknown)} are not among the model's {loaded.classes}")
    samples = dataset.split(chosen)
    decoded = decode_images([s.path for s in samples], loaded.meta.image_size, progress=progress, use_cache=False)
    ok, errors, pixels = decoded.ok, decoded.errors, readable_pixels(decoded)
    adapted = None
    if adapt is not None:  # decoded once: the films adapt the model, then the adapted model reads them
        loaded, adapted = adapt(loaded, pixels)
    probs = probabilities_of(loaded, ok, pixels, tta)
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
    report.update(
        data=str(dataset.root), split=evaluated_split(dataset, chosen), model=loaded.meta.arch, skipped=errors
    )
    report["evaluated_on"] = f"{report['split']} ({dataset.root.name})"
    report.update(runtime=runtime, runtime_reason=runtime_reason)
    if adapted is not None:
        report["adapted"] = adapted
    if out:
        out = Path(out)
        write_evaluation_figures(report, probs[ok], labels, out)
        atomic_write_json(out / "evaluation.json", report)
        report["figures"] = str(out)
    return Evaluation(report)


def evaluated_split(dataset: ChestXrayFolder, chosen: str) -> str:
    """The name of the evaluated split: the Kaggle split chosen, or for a folder of class folders
    (which ``discover`` reads as one pool) the folder's own split name (``test``, ``valid``) when it
    has one, else "all images" of it."""
    if dataset.layout == "kaggle":
        return chosen
    return SPLIT_ALIASES.get(dataset.root.name.lower(), "all images")


def format_evaluation(report: dict) -> str:
    m = report.get("metrics", {})
    n = report.get("n", len(report.get("skipped", [])))
    lines = [f"{n} images, split {report.get('split')}, from {report.get('data')}"]
    if "sensitivity" in m:
        ci = report.get("ci") or {}
        for key in ("accuracy", "error_rate", "sensitivity", "specificity", "ppv", "npv", "roc_auc"):
            if m.get(key) is None:
                continue
            interval = ci.get(key)
            extra = f"  (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""
            lines.append(f"  {key:<12} {m[key]:.4f}{extra}")
        positive = report.get("positive_class", "the positive class")
        lines.append(f"  threshold    {report.get('threshold'):.3f} (call {positive} when p({positive}) reaches it)")
        lines.append(
            f"  confusion    {report.get('confusion_matrix')} (rows actual, columns predicted; "
            f"classes {', '.join(report.get('classes', []))})"
        )
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
