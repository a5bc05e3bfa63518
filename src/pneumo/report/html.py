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
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:172px;font-size:.8em;word-break:break-all}
.card img{width:160px;height:auto;display:block;border:1px solid #ddd}.muted{color:#666}
pre.model-card{white-space:pre-wrap;background:#f7f7f7;border:1px solid #ddd;padding:.8em;font-size:.85em}
"""


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
        rows = [
            [_td(_e(k)), _td(_e(json.dumps(v) if isinstance(v, (dict, list)) else v))]
            for k, v in config.to_dict().items()
        ]
        parts.append(_table(["setting", "value"], rows))
        if config.split == "random":
            parts.append(
                _note(
                    "Random image split: images of one patient may sit in both training and validation, "
                    "so these validation metrics are likely optimistic."
                )
            )
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


def _metrics_section(ev: dict) -> str:
    parts = ["<h2>Validation metrics</h2>"]
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
    cards, missing = [], 0
    for r in worst:
        uri = _thumbnail(r["path"], run_dir)
        missing += uri is None
        img = f'<img alt="{_e(Path(r["path"]).name)}" src="{uri}">' if uri else '<p class="muted">[image not found]</p>'
        cards.append(
            f'<div class="card">{img}<b>pred {_e(r["pred"])}</b> / actual {_e(r["label"])}<br>'
            f"loss {r['loss']:.2f}, p(actual) {r['p_true']:.3f}<br>"
            f'<span class="muted">{_e(r["path"])}</span></div>'
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


# ---------------------------------------------------------------- the page


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for a training run folder and return its path."""
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

    title = f"pneumo run report: {run_dir.resolve().name}"
    body = [f"<h1>{_e(title)}</h1>"]
    body += [_note(n) for n in notes]
    body.append(_config_section(config, model))
    body.append("<h2>Training</h2>" + _figure(run_dir, "curves.png", "training curves"))
    if history:
        body.append(_history_table(history))
    if (run_dir / "lr_find.png").is_file():
        body.append("<h3>Learning-rate finder</h3>" + _figure(run_dir, "lr_find.png", "learning-rate finder"))
    body.append(
        _metrics_section(ev) if ev is not None else "<h2>Validation metrics</h2>" + _note("No validation evaluation.")
    )
    body.append("<h2>Confusion matrix</h2>" + _figure(run_dir, "confusion_matrix.png", "confusion matrix"))
    if ev is None or ev.get("task") != "multiclass":
        body.append("<h2>ROC curve</h2>" + _figure(run_dir, "roc.png", "ROC curve"))
    body.append(_calibration_section(ev, run_dir))
    body.append(_subtype_section(ev))
    body.append(_mistakes_section(preds, run_dir, model))
    body.append(_model_card_section(run.model_dir / "MODEL_CARD.md"))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return atomic_write_text(out, page)
