"""One self-contained HTML page that summarises a training run folder.

Images are embedded as base64 data URIs and the CSS is inline, so the page can be mailed or
archived and read offline, with no external request. Every piece is optional: a missing or
unreadable file becomes a note on the page, never a crash. This module reads the run folder into
plain values; the page itself is ``templates/report.html`` (Jinja2, escaped), which someone who
does not read Python can edit.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from PIL import Image

from pneumo.config import TrainConfig
from pneumo.data.imaging import open_image, to_grey_uint8
from pneumo.errors import PneumoError
from pneumo.io_utils import atomic_write_text
from pneumo.model_meta import ModelMeta
from pneumo.report.about import training_summary
from pneumo.run_folder import RunFolder, ValidPredictions

N_WORST = 12
THUMB_PX = 160
RATIO_METRICS = ["accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "error_rate"]
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "error_rate": "Error rate",
    "roc_auc": "ROC AUC",
}
SMALL_VALID = 100  # fewer validation images: the threshold and metrics are warned about


# ---------------------------------------------------------------- the template


class _OneLine(jinja2.ext.Extension):
    """Drop every line break of an ``.html`` template and the indentation after it, as it is read:
    the template is laid out for reading, the page stays one line (its final line break kept)."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        if not (name or "").endswith(".html"):
            return source
        body = source.rstrip("\r\n")
        return re.sub(r"\r?\n[ \t]*", "", body) + source[len(body) :]


def _num(v: Any, pct: bool = False) -> str:
    """A number as the page writes it: "n/a" when absent, three decimals, or a percentage."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pneumo.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        extensions=[_OneLine],
    )
    env.filters.update(num=_num, pct=lambda v: _num(v, True), fmt=format)
    return env.get_template("report.html")


# ---------------------------------------------------------------- reading the run folder


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return {"name": name, "uri": _png_uri(path.read_bytes()) if path.is_file() else None}


def _load(path: Path, read: Any, unread: list[dict[str, Any]]) -> Any:
    """Read an optional run file through ``RunFolder``; on absence or damage, note why and return None."""
    if not path.is_file():
        unread.append({"name": path.name, "reason": None})
        return None
    try:
        return read()
    except PneumoError as exc:
        unread.append({"name": path.name, "reason": str(exc).removeprefix(f"{path}: ")})
        return None


def _config_rows(config: TrainConfig | None) -> list[tuple[str, Any]] | None:
    if config is None:
        return None
    values = config.to_dict()
    for key in ("data", "out", "weights"):  # folder names only: no absolute paths on the page
        if values.get(key):
            values[key] = Path(str(values[key])).name
    return [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in values.items()]


def _model_rows(model: ModelMeta | None) -> list[tuple[str, Any]] | None:
    if model is None:
        return None
    values = asdict(model)
    keys = [k for k in ("arch", "classes", "image_size", "threshold", "temperature") if k in values]
    keys += [k for k in values if k not in keys and not isinstance(values[k], (dict, list))]
    return [(k, ", ".join(map(str, values[k])) if isinstance(values[k], list) else values[k]) for k in keys]


def _reweighted(ev: dict) -> tuple[dict, float | None]:
    """Metrics re-weighted to the population's class balance (``evaluate_predictions(reweight_to=...)``)."""
    block = ev.get("reweighted")
    if isinstance(block, dict) and isinstance(block.get("metrics"), dict):
        return block["metrics"], block.get("target_pos_fraction")
    return {}, None


def _evaluation(ev: dict) -> dict[str, Any]:
    """What the page shows of an evaluation: per class (multiclass) or per metric with intervals."""
    metrics = ev.get("metrics") or {}
    if ev.get("task") == "multiclass" or "per_class" in metrics:
        per_class = [
            {"name": c, "recall": v.get("recall"), "precision": v.get("precision"), "n": v.get("n")}
            for c, v in (metrics.get("per_class") or {}).items()
        ]
        return {
            "per_class": per_class,
            "accuracy": metrics.get("accuracy"),
            "macro_auc": metrics.get("macro_auc_ovr"),
            "n": ev.get("n"),
        }
    ci, at_half = ev.get("ci") or {}, ev.get("metrics_at_0.5") or {}
    reweighted, target = _reweighted(ev)
    rows = [
        {
            "label": METRIC_LABELS.get(key, key),
            "pct": key != "roc_auc",
            "value": metrics[key],
            "interval": ci.get(key),
            "at_half": at_half.get(key),
            "reweighted": reweighted.get(key),
        }
        for key in RATIO_METRICS + ["roc_auc"]
        if key in metrics
    ]
    cells = ("tp", "fp", "tn", "fn")
    counts = {k: metrics[k] for k in cells} if all(k in metrics for k in cells) else None
    return {
        "per_class": None,
        "positive_class": ev.get("positive_class", "?"),
        "threshold": ev.get("threshold"),
        "n": metrics.get("n", ev.get("n")),
        "n_pos": metrics.get("n_pos"),
        "n_neg": metrics.get("n_neg"),
        "ci_unit": ev.get("ci_unit", "image"),
        "reweighted": bool(reweighted),
        "reweighted_to": target,
        "rows": rows,
        "counts": counts,
    }


def _lead(ev: dict | None) -> dict[str, Any] | None:
    """The result in a sentence: the validation metrics at the threshold, with their intervals."""
    m = (ev or {}).get("metrics") or {}
    if ev is None or "sensitivity" not in m:
        return None
    ci, choice = ev.get("ci") or {}, ev.get("threshold_choice") or {}
    lead = {
        "n": m.get("n"),
        "positive": ev.get("positive_class", "?"),
        "threshold": ev.get("threshold"),
        "method": choice.get("method"),
        "interval": choice.get("interval"),
        "roc_auc": m.get("roc_auc"),
    }
    for key in ("accuracy", "sensitivity", "specificity"):
        lead[key], lead[f"{key}_ci"] = m.get(key), ci.get(key)
    return lead


def _calibration(ev: dict | None) -> dict[str, Any] | None:
    if ev is None:
        return None
    cal = ev.get("calibration") or {}
    scaling = None
    if cal:
        scaling = {
            "source": cal.get("temperature_source", ""),
            "temperature": cal.get("temperature"),
            "before": cal.get("ece_before"),
            "after": cal.get("ece_after"),
        }
    return {"ece": ev.get("ece"), "scaling": scaling}


def _thumbnail(path_text: str, run_dir: Path) -> str | None:
    """A ~160 px grey PNG data URI of the image, or None when it cannot be found or read."""
    for candidate in (Path(path_text), run_dir / path_text):
        if candidate.is_file():
            try:
                img = Image.fromarray(to_grey_uint8(open_image(candidate)), mode="L")
            except PneumoError:
                return None
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return _png_uri(buf.getvalue())
    return None


def worst_mistakes(preds: ValidPredictions, meta: ModelMeta | None = None, n: int = N_WORST) -> list[dict[str, Any]]:
    """Validation images ranked by loss -log p(true class), highest first.

    The predicted class is what the model decides (``ModelMeta.decide`` at its stored threshold: what
    the clinician would have been told); without a model description, the most probable class.
    """
    if not len(preds.labels):
        return []
    probs, labels = preds.probs, preds.labels
    predicted = meta.decide(probs) if meta is not None and meta.classes == preds.classes else probs.argmax(axis=1)
    p_true = probs[np.arange(len(labels)), labels]
    ranked = [
        {
            "path": preds.paths[i],
            "label": preds.classes[labels[i]],
            "patient": preds.patients[i],
            "pred": preds.classes[predicted[i]],
            "p_true": float(p_true[i]),
            "p_positive": float(probs[i, meta.positive_index])
            if meta is not None and meta.positive_index is not None and meta.classes == preds.classes
            else None,
            "loss": -math.log(max(float(p_true[i]), 1e-12)),
        }
        for i in range(len(labels))
    ]
    ranked.sort(key=lambda r: r["loss"], reverse=True)
    return ranked[:n]


def _mistakes(preds: ValidPredictions | None, run_dir: Path, meta: ModelMeta | None) -> dict[str, Any] | None:
    """The worst validation films as cards: thumbnail (or None), verdict, probabilities; no file name."""
    if preds is None:
        return None
    pos = meta.positive_index if meta is not None and meta.classes == preds.classes else None
    cards = [  # no path nor patient: the page never shows them
        {
            **{key: r[key] for key in ("pred", "label", "p_true", "p_positive", "loss")},
            "uri": _thumbnail(r["path"], run_dir),
            "wrong": r["pred"] != r["label"],
        }
        for r in worst_mistakes(preds, meta)
    ]
    return {
        "cards": cards,
        "missing": sum(card["uri"] is None for card in cards),
        "positive": preds.classes[pos] if pos is not None else None,
        "threshold": meta.operating_threshold if pos is not None else None,
    }


def _stored_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluations that ``pneumo evaluate --out RUN/NAME`` stored inside the run folder (a test split)."""
    out = []
    for path in sorted(run_dir.glob("*/evaluation.json")):
        folder = path.parent.name
        try:
            ev = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            out.append({"folder": folder, "error": type(exc).__name__})
            continue
        if not isinstance(ev, dict):
            continue
        out.append(
            {
                "folder": folder,
                "error": None,
                "where": ev.get("evaluated_on") or ev.get("split") or folder,
                "evaluation": _evaluation(ev),
                "confusion": _figure(path.parent, "confusion_matrix.png"),
            }
        )
    return out


def _gradcam_examples(run_dir: Path, preds: ValidPredictions | None, meta: ModelMeta | None) -> list[dict[str, Any]]:
    """A validation film read right and one read wrong, with Grad-CAM drawn now, plus overlays that
    ``pneumo explain --out RUN/...`` stored in the run folder (captioned by their own titles)."""
    cams = []
    if preds is not None and meta is not None and len(preds.labels) and meta.classes == preds.classes:
        cams += _validation_examples(run_dir, preds, meta)
    for path in sorted(run_dir.glob("**/*.png")):
        if len(path.relative_to(run_dir).parts) > 3:
            continue
        try:
            with Image.open(path) as img:
                title = getattr(img, "text", {}).get("pneumo:title")
        except OSError:
            continue
        if title:
            cams.append({"unloadable": None, "verdict": None, "uri": _png_uri(path.read_bytes()), "title": title})
    return cams


def _validation_examples(run_dir: Path, preds: ValidPredictions, meta: ModelMeta) -> list[dict[str, Any]]:
    decided = meta.decide(preds.probs)
    p_true = preds.probs[np.arange(len(preds.labels)), preds.labels]
    right = np.flatnonzero(decided == preds.labels)
    wrong = np.flatnonzero(decided != preds.labels)
    chosen = []
    if len(right):
        chosen.append(("right", int(right[np.argmax(p_true[right])]), "the most confident correct reading"))
    if len(wrong):
        chosen.append(("wrong", int(wrong[np.argmin(p_true[wrong])]), "the most confident mistake"))
    if not chosen:
        return []
    try:
        from pneumo.infer.explain import explain_image
        from pneumo.infer.model_folder import load_model

        model = load_model(RunFolder(run_dir).model_dir)
    except PneumoError as exc:
        reason = str(exc).replace(f"{run_dir}/", "").replace(str(run_dir), "the run folder")
        return [{"unloadable": reason}]
    cams = []
    for verdict, i, why in chosen:
        path = next((c for c in (Path(preds.paths[i]), run_dir / preds.paths[i]) if c.is_file()), None)
        if path is None:
            continue
        try:
            shown = explain_image(model, path)
        except PneumoError:
            continue
        buf = io.BytesIO()
        shown.image.save(buf, format="PNG")
        cams.append(
            {
                "unloadable": None,
                "verdict": verdict,
                "why": why,
                "uri": _png_uri(buf.getvalue()),
                "label": shown["label"],
                "actual": preds.classes[preds.labels[i]],
                "reading": shown["reading"],
                "target": shown["target_class"],
            }
        )
    return cams


# ---------------------------------------------------------------- the page


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for a training run folder and return its path.

    The result comes first (the headline metrics with intervals, warnings, the confusion matrix named
    by split and threshold, any stored test evaluation, examples read right and wrong), the training
    curves and LR plot next, the configuration last. No file path or file name appears on the page.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PneumoError(f"run folder {run_dir} does not exist: pass the folder that training wrote")
    out = Path(out) if out is not None else run_dir / "report.html"
    unread: list[dict[str, Any]] = []
    run = RunFolder(run_dir)
    config = _load(run.config_file, run.read_config, unread)
    model = _load(run.model_dir / "model.json", run.read_model_meta, unread)
    history = _load(run.metrics_file, run.read_metrics, unread)
    ev = _load(run.evaluation_file, run.read_evaluation, unread)
    preds = _load(run.predictions_file, lambda: run.read_predictions(model.classes if model else None), unread)
    card = run.model_dir / "MODEL_CARD.md"  # as infer.model_card wrote it: shown verbatim
    n_valid = (ev or {}).get("n_valid") or ((ev or {}).get("metrics") or {}).get("n")
    lr_find = next((n for n in ("lr_find.png", "lr_find/lr_find.png") if (run_dir / n).is_file()), None)
    page = _template().render(
        title=f"pneumo run report: {run_dir.resolve().name}",
        about=training_summary(run.model_dir, model)["sentence"] if model is not None else None,
        lead=_lead(ev),
        small_valid=n_valid if isinstance(n_valid, int) and n_valid < SMALL_VALID else None,
        small_valid_limit=SMALL_VALID,
        threshold_warning=((ev or {}).get("threshold_choice") or {}).get("warning"),
        random_split=config is not None and config.split == "random",
        unread=unread,
        validation=_evaluation(ev) if ev is not None else None,
        threshold=(ev or {}).get("threshold"),
        stored_evaluations=_stored_evaluations(run_dir),
        cams=_gradcam_examples(run_dir, preds, model),
        show_roc=ev is None or ev.get("task") != "multiclass",
        calibration=_calibration(ev),
        subtypes=[
            {"name": name, "n": v.get("n"), "sensitivity": v.get("sensitivity")}
            for name, v in ((ev or {}).get("subtypes") or {}).items()
        ],
        n_worst=N_WORST,
        mistakes=_mistakes(preds, run_dir, model),
        history=history,
        figures={
            "confusion": _figure(run_dir, "confusion_matrix.png"),
            "roc": _figure(run_dir, "roc.png"),
            "reliability": _figure(run_dir, "reliability.png"),
            "curves": _figure(run_dir, "curves.png"),
            "lr_find": _figure(run_dir, lr_find) if lr_find else None,
        },
        config=_config_rows(config),
        model=_model_rows(model),
        card_name=card.name,
        model_card=card.read_text(encoding="utf-8") if card.is_file() else None,
    )
    return atomic_write_text(out, page)
