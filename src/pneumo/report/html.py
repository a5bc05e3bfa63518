"""One self-contained HTML page that summarises a training run folder.

Images are embedded as base64 data URIs and the CSS is inline, so the page can be mailed or
archived and read offline, with no external request. Every piece is optional: a missing or
unreadable file becomes a note on the page, never a crash.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

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

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{margin-top:1.8em;color:#0072B2}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.fig{max-width:100%;border:1px solid #ddd;margin:.4em 0}
.note{color:#6b4e00;background:#fff6dc;border-left:4px solid #E69F00;padding:.3em .7em;margin:.5em 0}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:172px;font-size:.8em;overflow-wrap:break-word}
.card img{width:160px;height:auto;display:block;border:1px solid #ddd}.muted{color:#666}
pre.model-card{white-space:pre-wrap;background:#f7f7f7;border:1px solid #ddd;padding:.8em;font-size:.85em}
.lead{font-size:1.1em}.side{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.cam{width:300px;margin:0;font-size:.9em}.cam img{max-width:100%;border:1px solid #ddd}
.right{color:#009E73;font-weight:bold}.wrong{color:#D55E00;font-weight:bold}
"""
SMALL_VALID = 100  # fewer validation images: the threshold and metrics are warned about


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _e(v)
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Cells must already be escaped HTML; headers are escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _td(text: str, num: bool = False) -> str:
    return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(run_dir: Path, name: str, alt: str) -> str:
    path = run_dir / name
    if not path.is_file():
        return _note(f"{name} not found in the run folder: figure skipped.")
    return f'<img class="fig" alt="{_e(alt)}" src="{_png_uri(path.read_bytes())}">'


def _load(path: Path, read: Callable[[], Any], notes: list[str]) -> Any:
    """Read an optional run file through ``RunFolder``; on absence or damage, note why and return None."""
    if not path.is_file():
        notes.append(f"{path.name} not found: its section is skipped.")
        return None
    try:
        return read()
    except PneumoError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        notes.append(f"{path.name} could not be read ({reason}): its section is skipped.")
        return None


# ---------------------------------------------------------------- sections


def _config_section(config: TrainConfig | None, model: ModelMeta | None) -> str:
    parts = ["<h2>Configuration</h2>"]
    if config is not None:
        values = config.to_dict()
        for key in ("data", "out", "weights"):  # folder names only: no absolute paths on the page
            if values.get(key):
                values[key] = Path(str(values[key])).name
        rows = [[_td(_e(k)), _td(_e(json.dumps(v) if isinstance(v, (dict, list)) else v))] for k, v in values.items()]
        parts.append(_table(["setting", "value"], rows))
    else:
        parts.append(_note("No training configuration (config.json) available."))
    if model is not None:
        values = asdict(model)
        keys = [k for k in ("arch", "classes", "image_size", "threshold", "temperature") if k in values]
        keys += [k for k in values if k not in keys and not isinstance(values[k], (dict, list))]
        rows = [
            [_td(_e(k)), _td(_e(", ".join(map(str, values[k])) if isinstance(values[k], list) else values[k]))]
            for k in keys
        ]
        parts.append("<h3>Saved model</h3>" + _table(["field", "value"], rows))
    return "".join(parts)


def _reweighted(ev: dict) -> tuple[dict, float | None]:
    """Metrics re-weighted to the population's class balance (``evaluate_predictions(reweight_to=...)``)."""
    block = ev.get("reweighted")
    if isinstance(block, dict) and isinstance(block.get("metrics"), dict):
        return block["metrics"], block.get("target_pos_fraction")
    return {}, None


def _metrics_section(ev: dict, title: str = "Validation metrics") -> str:
    parts = [f"<h2>{_e(title)}</h2>"]
    metrics = ev.get("metrics") or {}
    if ev.get("task") == "multiclass" or "per_class" in metrics:
        parts.append(
            f"<p>Accuracy {_num(metrics.get('accuracy'), True)}; macro one-vs-rest AUC "
            f"{_num(metrics.get('macro_auc_ovr'))}; n = {_num(ev.get('n'))}.</p>"
        )
        rows = [
            [
                _td(_e(c)),
                _td(_num(v.get("recall"), True), True),
                _td(_num(v.get("precision"), True), True),
                _td(_num(v.get("n")), True),
            ]
            for c, v in (metrics.get("per_class") or {}).items()
        ]
        parts.append(_table(["class", "recall", "precision", "images"], rows))
        return "".join(parts)
    ci = ev.get("ci") or {}
    at_half = ev.get("metrics_at_0.5") or {}
    reweighted, target = _reweighted(ev)
    parts.append(
        f"<p>Positive class <b>{_e(ev.get('positive_class', '?'))}</b>, operating threshold "
        f"<b>{_num(ev.get('threshold'))}</b>, n = {_num(metrics.get('n', ev.get('n')))} "
        f"({_num(metrics.get('n_pos'))} positive, {_num(metrics.get('n_neg'))} negative). "
        f"Intervals: 95% percentile bootstrap over {_e(ev.get('ci_unit', 'image'))}s.</p>"
    )
    header = ["metric", "value", "95% interval", "at threshold 0.5"]
    if reweighted:
        header.append(f"re-weighted to {_num(target, True)} positive")
    rows = []
    for key in RATIO_METRICS + ["roc_auc"]:
        if key not in metrics:
            continue
        pct = key != "roc_auc"
        interval = ci.get(key)
        ci_text = f"{_num(interval[0], pct)} – {_num(interval[1], pct)}" if interval else "—"
        row = [
            _td(_e(METRIC_LABELS.get(key, key))),
            _td(_num(metrics[key], pct), True),
            _td(ci_text, True),
            _td(_num(at_half.get(key), pct), True),
        ]
        if reweighted:
            row.append(_td(_num(reweighted.get(key), pct), True))
        rows.append(row)
    parts.append(_table(header, rows))
    if all(k in metrics for k in ("tp", "fp", "tn", "fn")):
        parts.append(
            f'<p class="muted">TP {_num(metrics["tp"])}, FP {_num(metrics["fp"])}, '
            f"TN {_num(metrics['tn'])}, FN {_num(metrics['fn'])}.</p>"
        )
    return "".join(parts)


def _calibration_section(ev: dict | None, run_dir: Path) -> str:
    parts = ["<h2>Calibration</h2>"]
    if ev is not None:
        parts.append(f"<p>Expected calibration error (top label, 15 bins): <b>{_num(ev.get('ece'))}</b>.</p>")
        cal = ev.get("calibration") or {}
        if cal:
            parts.append(
                f"<p>Temperature scaling ({_e(cal.get('temperature_source', ''))}): "
                f"T = {_num(cal.get('temperature'))}; ECE before {_num(cal.get('ece_before'))}, "
                f"after {_num(cal.get('ece_after'))}.</p>"
            )
    parts.append(_figure(run_dir, "reliability.png", "reliability diagram"))
    return "".join(parts)


def _subtype_section(ev: dict | None) -> str:
    subtypes = (ev or {}).get("subtypes") or {}
    if not subtypes:
        return "<h2>Sensitivity by subtype</h2>" + _note("No subtype information in this evaluation.")
    rows = [
        [_td(_e(name)), _td(_num(v.get("n")), True), _td(_num(v.get("sensitivity"), True), True)]
        for name, v in subtypes.items()
    ]
    return "<h2>Sensitivity by subtype</h2>" + _table(["subtype", "positive images", "sensitivity"], rows)


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


def _mistakes_section(preds: ValidPredictions | None, run_dir: Path, meta: ModelMeta | None) -> str:
    parts = [f"<h2>Worst validation predictions (top {N_WORST} by loss)</h2>"]
    if preds is None:
        return "".join(parts) + _note("valid_predictions.csv not available: no per-image review.")
    worst = worst_mistakes(preds, meta)
    if not worst:
        return "".join(parts) + _note("No usable rows in valid_predictions.csv.")
    pos = meta.positive_index if meta is not None and meta.classes == preds.classes else None
    threshold = meta.operating_threshold if pos is not None else None
    parts.append(
        '<p class="muted">Loss is -log p(actual class); p is p(positive class), the probability the '
        "decision compares with the threshold. File names are not shown (they may identify a patient).</p>"
    )
    cards, missing = [], 0
    for rank, r in enumerate(worst, 1):
        uri = _thumbnail(r["path"], run_dir)
        missing += uri is None
        img = f'<img alt="validation image {rank}" src="{uri}">' if uri else '<p class="muted">[image not found]</p>'
        verdict = '<span class="wrong">wrong</span>' if r["pred"] != r["label"] else '<span class="right">right</span>'
        p_text = (
            f"p({_e(preds.classes[pos])}) {r['p_positive']:.3f} vs threshold {threshold:.3f}"
            if pos is not None
            else f"p(actual) {r['p_true']:.3f}"
        )
        cards.append(
            f'<div class="card">{img}{verdict}: read <b>{_e(r["pred"])}</b>, actually {_e(r["label"])}<br>'
            f"{p_text}<br>loss {r['loss']:.2f}</div>"
        )
    if missing:
        parts.append(
            _note(f"{missing} of {len(worst)} image files were not found or unreadable: shown without thumbnail.")
        )
    parts.append(f'<div class="grid">{"".join(cards)}</div>')
    return "".join(parts)


def _history_table(rows: list[dict[str, Any]]) -> str:
    header = ["epoch", "phase", "train_loss", "valid_loss", "error_rate", "time"]

    def cell(key: str, value: Any) -> str:
        if value is None:
            return _td("")
        if key in ("train_loss", "valid_loss", "error_rate"):
            return _td(f"{value:.4f}", True)
        if key == "time":
            return _td(f"{value:.1f} s", True)
        return _td(_e(value), key == "epoch")

    return _table(header, [[cell(h, r.get(h)) for h in header] for r in rows])


def _model_card_section(card: Path) -> str:
    """MODEL_CARD.md as written (infer.model_card), verbatim: the page and the card cannot disagree."""
    if not card.is_file():
        return "<h2>Model card</h2>" + _note(f"No {card.name} in the model folder: `pneumo card RUN` writes one.")
    return f"<h2>Model card</h2><pre class='model-card'>{_e(card.read_text(encoding='utf-8'))}</pre>"


# ---------------------------------------------------------------- results first


def _headline(ev: dict | None, about: str | None) -> str:
    """The result in a sentence or two: what was trained on, and how it did on validation."""
    parts = []
    if about:
        parts.append(f"<p>{_e(about)}</p>")
    m = (ev or {}).get("metrics") or {}
    if "sensitivity" in m:
        ci = (ev or {}).get("ci") or {}

        def with_ci(key: str) -> str:
            interval = ci.get(key)
            extra = f" ({_num(interval[0], True)}–{_num(interval[1], True)})" if interval else ""
            return f"{_num(m.get(key), True)}{extra}"

        pos = _e(ev.get("positive_class", "?"))
        choice = ev.get("threshold_choice") or {}
        how = ""
        if choice.get("method"):
            interval = choice.get("interval")
            how = f" (by {_e(choice['method'])}" + (
                f"; 95% interval {_num(interval[0])}–{_num(interval[1])})" if interval else ")"
            )
        parts.append(
            f'<p class="lead">On {_num(m.get("n"))} validation images, calling {pos} when p({pos}) ≥ '
            f"{_num(ev.get('threshold'))}{how}: accuracy <b>{with_ci('accuracy')}</b>, sensitivity "
            f"<b>{with_ci('sensitivity')}</b>, specificity <b>{with_ci('specificity')}</b>, ROC AUC "
            f"<b>{_num(m.get('roc_auc'))}</b> (95% intervals).</p>"
        )
    return "".join(parts)


def _warnings(ev: dict | None, config: TrainConfig | None) -> list[str]:
    out = []
    n_valid = (ev or {}).get("n_valid") or ((ev or {}).get("metrics") or {}).get("n")
    if isinstance(n_valid, int) and n_valid < SMALL_VALID:
        out.append(
            f"Small validation set: {n_valid} images (fewer than {SMALL_VALID}). The threshold was chosen and the "
            "metrics measured on them, so both are uncertain: see the width of the intervals."
        )
    warning = ((ev or {}).get("threshold_choice") or {}).get("warning")
    if warning:
        out.append(f"Threshold: {warning}.")
    if config is not None and config.split == "random":
        out.append(
            "Random image split: images of one patient may sit in both training and validation, "
            "so these validation metrics are likely optimistic."
        )
    return out


def _stored_evaluations(run_dir: Path) -> str:
    """Evaluations that ``pneumo evaluate --out RUN/NAME`` stored inside the run folder (a test split)."""
    parts = []
    for path in sorted(run_dir.glob("*/evaluation.json")):
        try:
            ev = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parts.append(_note(f"{path.parent.name}/evaluation.json could not be read ({type(exc).__name__})."))
            continue
        if not isinstance(ev, dict):
            continue
        where = ev.get("evaluated_on") or ev.get("split") or path.parent.name
        title = f"Evaluation on {where} (stored in {path.parent.name}/)"
        parts.append(_metrics_section(ev, title))
        parts.append(_figure(path.parent, "confusion_matrix.png", f"confusion matrix, {where}"))
    return "".join(parts)


def _gradcam_examples(run_dir: Path, preds: ValidPredictions | None, meta: ModelMeta | None) -> str:
    """A validation film read right and one read wrong, with Grad-CAM drawn now, plus overlays that
    ``pneumo explain --out RUN/...`` stored in the run folder (captioned by their own titles)."""
    parts = ["<h2>Examples, with Grad-CAM</h2>"]
    cards = []
    if preds is not None and meta is not None and len(preds.labels) and meta.classes == preds.classes:
        cards += _validation_examples(run_dir, preds, meta)
    for path in sorted(run_dir.glob("**/*.png")):
        if len(path.relative_to(run_dir).parts) > 3:
            continue
        try:
            with Image.open(path) as img:
                title = getattr(img, "text", {}).get("pneumo:title")
        except OSError:
            continue
        if title:
            cards.append(
                f'<figure class="cam"><img alt="Grad-CAM" src="{_png_uri(path.read_bytes())}">'
                f"<figcaption>stored with the run: {_e(title)}</figcaption></figure>"
            )
    if not cards:
        return ""
    return "".join(parts) + f'<div class="side">{"".join(cards)}</div>'


def _validation_examples(run_dir: Path, preds: ValidPredictions, meta: ModelMeta) -> list[str]:
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
        return [_note(f"Grad-CAM examples skipped: the model could not be loaded ({reason}).")]
    cards = []
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
        cards.append(
            f'<figure class="cam"><img alt="Grad-CAM, {verdict} reading" src="{_png_uri(buf.getvalue())}">'
            f'<figcaption><span class="{verdict}">{verdict}</span> ({why}): read {_e(shown["label"])}, '
            f"actually {_e(preds.classes[preds.labels[i]])}; {_e(shown['reading'])}. Bright regions raised "
            f"the score of {_e(shown['target_class'])} most.</figcaption></figure>"
        )
    return cards


def _lr_plot(run_dir: Path) -> str:
    for name in ("lr_find.png", "lr_find/lr_find.png"):
        if (run_dir / name).is_file():
            return "<h3>Learning-rate finder</h3>" + _figure(run_dir, name, "learning-rate finder")
    return ""


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
    notes: list[str] = []
    run = RunFolder(run_dir)
    config = _load(run.config_file, run.read_config, notes)
    model = _load(run.model_dir / "model.json", run.read_model_meta, notes)
    history = _load(run.metrics_file, run.read_metrics, notes)
    ev = _load(run.evaluation_file, run.read_evaluation, notes)
    preds = _load(run.predictions_file, lambda: run.read_predictions(model.classes if model else None), notes)
    about = training_summary(run.model_dir, model)["sentence"] if model is not None else None

    title = f"pneumo run report: {run_dir.resolve().name}"
    body = [f"<h1>{_e(title)}</h1>", _headline(ev, about)]
    body += [_note(n) for n in _warnings(ev, config) + notes]
    body.append(
        _metrics_section(ev) if ev is not None else "<h2>Validation metrics</h2>" + _note("No validation evaluation.")
    )
    threshold = _num((ev or {}).get("threshold"))
    body.append(
        f"<h3>Confusion matrix: validation, threshold {threshold}</h3>"
        + _figure(run_dir, "confusion_matrix.png", "confusion matrix, validation")
    )
    body.append(_stored_evaluations(run_dir))
    body.append(_gradcam_examples(run_dir, preds, model))
    if ev is None or ev.get("task") != "multiclass":
        body.append("<h2>ROC curve</h2>" + _figure(run_dir, "roc.png", "ROC curve"))
    body.append(_calibration_section(ev, run_dir))
    body.append(_subtype_section(ev))
    body.append(_mistakes_section(preds, run_dir, model))
    body.append("<h2>Training</h2>" + _figure(run_dir, "curves.png", "training curves"))
    if history:
        body.append(_history_table(history))
    body.append(_lr_plot(run_dir))
    body.append(_config_section(config, model))
    body.append(_model_card_section(run.model_dir / "MODEL_CARD.md"))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return atomic_write_text(out, page)
