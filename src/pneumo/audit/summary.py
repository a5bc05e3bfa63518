"""``pneumo audit DB``: what the trail says about each model, its readers and its drift.

Per model: readings, decision rates, latency, agreement with readers, and sensitivity/specificity
against the readers' labels with bootstrap intervals (``evaluation.metrics``, clustered by image so a
film read twice counts once). Drift is a weekly control chart: each ISO week's positive-call rate
and mean probability against the model's validation figures, with 95% limits for a week of that many
readings (binomial for the rate, normal for the mean); a week outside its limits is flagged.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binom
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pneumo.audit.db import DEFAULT_NAME, database_url, is_url, open_database, sqlite_file
from pneumo.audit.record import model_identity
from pneumo.audit.schema import AuditedModel, Feedback, Reading
from pneumo.errors import PneumoError
from pneumo.evaluation.metrics import binary_metrics, bootstrap_ci
from pneumo.model_meta import read_model_meta
from pneumo.run_folder import RunFolder

LIMIT_Z = 1.959964  # 95% two-sided


def open_existing(db: str | Path) -> Engine:
    """The audit database at ``db`` (a model folder means its audit.sqlite); a missing file is an error here."""
    if not is_url(db) and (Path(db) / DEFAULT_NAME).is_file():
        db = Path(db) / DEFAULT_NAME
    url = database_url(db)
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise PneumoError(f"{db}: no audit database there (serve and predict write MODEL/audit.sqlite by default)")
    return open_database(db)


def utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite returns naive UTC


def iso_week(moment: datetime) -> str:
    year, week, _ = utc(moment).isocalendar()
    return f"{year}-W{week:02d}"


def latest_feedback(session: Session, reading_ids: list[str]) -> dict[str, Feedback]:
    """Each reading's most recent verdict (feedback is appended, never edited)."""
    latest: dict[str, Feedback] = {}
    for fb in session.scalars(select(Feedback).where(Feedback.reading_id.in_(reading_ids)).order_by(Feedback.id)):
        latest[fb.reading_id] = fb
    return latest


def validation_reference(model: AuditedModel, folder: Path | None) -> tuple[dict | None, str | None]:
    """The validation positive-call rate and probability of ``model``, or why they are unknown."""
    if folder is None:
        return None, "model folder unknown: give --model FOLDER for the validation figures"
    if not (folder / "model.json").is_file():
        return None, f"model folder {folder} not found: give --model FOLDER for the validation figures"
    if model_identity(folder) != model.id:
        return None, f"{folder} now holds another model (its content hash differs): give --model FOLDER"
    meta = read_model_meta(folder / "model.json")
    threshold, positive = meta.operating_threshold, meta.positive_index
    if threshold is None or positive is None:
        return None, "drift is reported for two-class models that decide by threshold"
    run = RunFolder.holding(folder)
    if run.predictions_file.is_file():
        preds = run.read_predictions(meta.classes)
        p = preds.probs[:, positive]
        if p.size >= 2:
            return {
                "source": str(run.predictions_file),
                "n": int(p.size),
                "positive_rate": float(np.mean(p >= threshold)),
                "mean_probability": float(p.mean()),
                "sd_probability": float(p.std(ddof=1)),
            }, None
    if run.evaluation_file.is_file():
        cm = np.asarray(run.read_evaluation().get("confusion_matrix") or [], dtype=float)
        if cm.shape == (2, 2) and cm.sum() > 0:
            return {
                "source": str(run.evaluation_file),
                "n": int(cm.sum()),
                "positive_rate": float(cm[:, positive].sum() / cm.sum()),
                "mean_probability": None,
                "sd_probability": None,
            }, None
    return None, f"no validation figures beside {folder} (valid_predictions.csv or valid_eval.json of its run)"


def weekly_drift(readings: list[Reading], reference: dict | None) -> list[dict[str, Any]]:
    """One row per ISO week: rate of positive calls and mean probability, flagged outside the 95% limits."""
    weeks: dict[str, list[Reading]] = {}
    for r in readings:
        weeks.setdefault(iso_week(r.created_at), []).append(r)
    rows = []
    for week in sorted(weeks):
        items = weeks[week]
        n = len(items)
        p = np.array([r.probability for r in items])
        positive = np.array([r.threshold is not None and r.probability >= r.threshold for r in items])
        row: dict[str, Any] = {
            "week": week,
            "n": n,
            "positive_rate": float(positive.mean()),
            "mean_probability": float(p.mean()),
            "positive_rate_limits": None,
            "mean_probability_limits": None,
            "flagged": [],
        }
        if reference is not None:
            lo, hi = binom.interval(0.95, n, reference["positive_rate"])
            row["positive_rate_limits"] = [float(lo / n), float(hi / n)]
            if not lo / n <= row["positive_rate"] <= hi / n:
                row["flagged"].append("positive_rate")
            if reference["mean_probability"] is not None:
                half = LIMIT_Z * reference["sd_probability"] / np.sqrt(n)
                limits = [reference["mean_probability"] - half, reference["mean_probability"] + half]
                row["mean_probability_limits"] = [float(v) for v in limits]
                if not limits[0] <= row["mean_probability"] <= limits[1]:
                    row["flagged"].append("mean_probability")
        rows.append(row)
    return rows


def against_readers(readings: list[Reading], latest: dict[str, Feedback], classes: list[str], positive: str | None):
    """Agreement, and sensitivity/specificity taking the readers' labels as the truth."""
    judged = [(r, latest[r.id]) for r in readings if r.id in latest]
    out: dict[str, Any] = {
        "readings_with_feedback": len(judged),
        "agreed": sum(fb.agreed for _, fb in judged),
        "disagreed": sum(not fb.agreed for _, fb in judged),
        "agreement": None,
        "metrics": None,
        "ci": None,
        "note": None,
    }
    if judged:
        out["agreement"] = out["agreed"] / len(judged)
    labelled = [(r, fb) for r, fb in judged if fb.true_label in classes and r.threshold is not None]
    if positive is None:
        out["note"] = "sensitivity and specificity need a two-class model that decides by threshold"
    elif not labelled:
        out["note"] = "no reader has given a true label yet"
    else:
        pos = classes.index(positive)
        p = np.array([r.probability for r, _ in labelled])
        y = np.array([classes.index(fb.true_label) for _, fb in labelled])
        threshold = labelled[0][0].threshold
        m = binary_metrics(p, y, threshold, pos)
        out["metrics"] = {k: m[k] for k in ("sensitivity", "specificity", "accuracy", "tp", "fp", "tn", "fn", "n")}
        groups = np.array([r.image_sha256 for r, _ in labelled])
        ci = bootstrap_ci(p, y, threshold, pos, n_boot=1000, groups=groups)
        out["ci"] = {k: ci[k] for k in ("sensitivity", "specificity", "accuracy")}
        out["ci_unit"] = "image (a film read twice counts once)"
    return out


def summarise_model(session: Session, model: AuditedModel, model_dir: Path | None) -> dict[str, Any]:
    readings = list(session.scalars(select(Reading).where(Reading.model_id == model.id).order_by(Reading.created_at)))
    classes = json.loads(model.classes)
    latest = latest_feedback(session, [r.id for r in readings])
    decisions = Counter(r.decision for r in readings)
    latency = np.array([r.latency_ms for r in readings]) if readings else np.zeros(0)
    folder = Path(model_dir) if model_dir else (Path(model.folder) if model.folder else None)
    reference, why = validation_reference(model, folder)
    return {
        "model_id": model.id,
        "arch": model.arch,
        "classes": classes,
        "positive_class": model.positive_class,
        "folder": model.folder,
        "readings": len(readings),
        "first": utc(readings[0].created_at).isoformat() if readings else None,
        "last": utc(readings[-1].created_at).isoformat() if readings else None,
        "by_source": dict(Counter(r.source for r in readings)),
        "by_runtime": dict(Counter(r.runtime for r in readings)),
        "by_calling_ae": dict(Counter(r.calling_ae for r in readings if r.calling_ae)),  # DICOM node readings
        "pneumo_versions": sorted({r.pneumo_version for r in readings}),
        "decisions": {
            c: {"n": decisions[c], "rate": decisions[c] / len(readings) if readings else None} for c in classes
        },
        "in_scope": {
            "yes": sum(r.in_scope is True for r in readings),
            "no": sum(r.in_scope is False for r in readings),
            "unknown": sum(r.in_scope is None for r in readings),
        },
        "latency_ms": {
            "p50": float(np.percentile(latency, 50)) if latency.size else None,
            "p95": float(np.percentile(latency, 95)) if latency.size else None,
        },
        "readers": against_readers(readings, latest, classes, model.positive_class),
        "drift": {"reference": reference, "note": why, "weeks": weekly_drift(readings, reference)},
    }


def summarise(db: str | Path, model_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole audit summary as one JSON-ready dict (``pneumo audit DB --json``)."""
    engine = open_existing(db)
    try:
        with Session(engine) as session:
            models = list(session.scalars(select(AuditedModel).order_by(AuditedModel.first_seen)))
            if model_dir is not None and len(models) > 1:
                wanted = model_identity(model_dir)
                models = [m for m in models if m.id == wanted] or models
            per_model = [summarise_model(session, m, Path(model_dir) if model_dir else None) for m in models]
    finally:
        engine.dispose()
    return {
        "database": engine.url.render_as_string(),
        "readings": sum(m["readings"] for m in per_model),
        "models": per_model,
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _interval(ci: list | tuple | None) -> str:
    return "" if not ci else f" (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)"


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"audit trail {report['database']}: {report['readings']} readings, {len(report['models'])} model(s)"]
    for m in report["models"]:
        lines.append(f"\nmodel {m['model_id'][:12]} ({m['arch']}) from {m['folder'] or 'an unknown folder'}")
        lines.append(f"  readings   {m['readings']} ({m['first']} .. {m['last']}); {m['by_source']}, {m['by_runtime']}")
        if m.get("by_calling_ae"):
            lines.append(f"  sent by    {m['by_calling_ae']} (DICOM calling AE titles)")
        lines.append(
            "  decisions  " + ", ".join(f"{c} {d['n']} ({_pct(d['rate'])})" for c, d in m["decisions"].items())
        )
        if m["latency_ms"]["p50"] is not None:
            lines.append(f"  latency    p50 {m['latency_ms']['p50']:.0f} ms, p95 {m['latency_ms']['p95']:.0f} ms")
        r = m["readers"]
        agreement_ci = _interval(r["ci"]["accuracy"]) if r["ci"] else ""
        lines.append(
            f"  readers    {r['readings_with_feedback']} readings judged: {r['agreed']} agreed, "
            f"{r['disagreed']} disagreed; agreement {_pct(r['agreement'])}{agreement_ci}"
        )
        if r["metrics"]:
            for key in ("sensitivity", "specificity"):
                lines.append(f"  {key:<12} {_pct(r['metrics'][key])}{_interval(r['ci'][key])} against readers' labels")
        elif r["note"]:
            lines.append(f"             {r['note']}")
        d = m["drift"]
        ref = d["reference"]
        if ref is None:
            lines.append(f"  drift      {d['note']}")
        else:
            mean = "" if ref["mean_probability"] is None else f", mean probability {ref['mean_probability']:.3f}"
            lines.append(f"  drift      validation: positive calls {_pct(ref['positive_rate'])}{mean} (n={ref['n']})")
        for w in d["weeks"]:
            limits = w["positive_rate_limits"]
            within = f" [limits {_pct(limits[0])}-{_pct(limits[1])}]" if limits else ""
            flag = "  FLAGGED: " + ", ".join(w["flagged"]) if w["flagged"] else ""
            lines.append(
                f"    {w['week']}  n={w['n']:<5} positive {_pct(w['positive_rate'])}{within}  "
                f"mean p {w['mean_probability']:.3f}{flag}"
            )
    return "\n".join(lines)
