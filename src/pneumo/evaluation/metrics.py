"""Metrics a clinician asks for, as pure functions over numpy arrays (no model code here).

Binary tasks report sensitivity, specificity, PPV and NPV at an explicit operating threshold,
with bootstrap intervals (resampling patients, not images, when patient ids are known), because a
single accuracy hides the trade-off that matters: missed pneumonia versus false alarms.
Every ratio whose denominator is zero is ``None`` (JSON null), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _softmax
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from pneumo import plots
from pneumo.decision import THRESHOLD_METHODS, decide, parse_threshold_method  # noqa: F401 (re-exported)
from pneumo.errors import PneumoError

MAX_ROC_POINTS = 200


# ---------------------------------------------------------------- small helpers


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _jsonable(obj: Any) -> Any:
    """Plain Python types all the way down; NaN and inf become None so json.dumps never fails."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _as_binary(p_pos: np.ndarray, labels: np.ndarray, pos: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p_pos, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise PneumoError(f"{p.size} probabilities but {y.size} labels: they must match one to one")
    return p, y == pos


def positive_index(classes: Sequence[str]) -> int:
    """Index of the class treated as positive: PNEUMONIA when present, else the second of two."""
    lowered = [c.lower() for c in classes]
    if "pneumonia" in lowered:
        return lowered.index("pneumonia")
    if len(classes) == 2:
        return 1
    raise PneumoError(
        f"no positive class among {list(classes)}: binary metrics need a class named PNEUMONIA or exactly two classes"
    )


# ---------------------------------------------------------------- point metrics


def binary_metrics(
    p_pos: np.ndarray, labels: np.ndarray, threshold: float, pos: int = 1, weights: np.ndarray | None = None
) -> dict:
    """Counts and ratios at one threshold (positive iff ``p_pos >= threshold``).

    With ``weights`` the counts are weighted sums (floats), so the ratios describe a population
    with another class balance; ``n``, ``n_pos`` and ``n_neg`` stay raw image counts.
    """
    p, is_pos = _as_binary(p_pos, labels, pos)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != p.shape:
        raise PneumoError(f"{w.size} weights for {p.size} predictions")
    pred = p >= threshold
    tp, fp = w[pred & is_pos].sum(), w[pred & ~is_pos].sum()
    fn, tn = w[~pred & is_pos].sum(), w[~pred & ~is_pos].sum()
    total = tp + fp + fn + tn
    auc = None
    if is_pos.any() and (~is_pos).any():
        auc = float(roc_auc_score(is_pos, p, sample_weight=None if weights is None else w))
    accuracy = _ratio(tp + tn, total)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    count = (lambda v: int(round(v))) if weights is None else (lambda v: round(float(v), 6))
    return {
        "accuracy": accuracy,
        "error_rate": None if accuracy is None else 1.0 - accuracy,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": None if sensitivity is None or specificity is None else (sensitivity + specificity) / 2,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "roc_auc": auc,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": count(tp),
        "fp": count(fp),
        "tn": count(tn),
        "fn": count(fn),
        "n": int(p.size),
        "n_pos": int(is_pos.sum()),
        "n_neg": int((~is_pos).sum()),
    }


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, per-class recall and precision, macro one-vs-rest AUC and the confusion matrix."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).ravel()
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    per_class = {
        name: {
            "recall": _ratio(cm[i, i], cm[i, :].sum()),
            "precision": _ratio(cm[i, i], cm[:, i].sum()),
            "n": int(cm[i, :].sum()),
        }
        for i, name in enumerate(classes)
    }
    auc = None
    if len(np.unique(y)) == k:  # one-vs-rest AUC needs every class present
        auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    accuracy = _ratio(np.trace(cm), cm.sum())
    return {
        "accuracy": accuracy,
        "error_rate": None if accuracy is None else 1.0 - accuracy,
        "per_class": per_class,
        "macro_auc_ovr": auc,
        "confusion_matrix": cm.tolist(),
        "n": int(y.size),
    }


# ---------------------------------------------------------------- thresholds and prevalence


def choose_threshold(p_pos: np.ndarray, labels: np.ndarray, method: str, pos: int = 1) -> float:
    """Operating threshold by rule: ``youden``, ``sensitivity:0.95``, ``specificity:0.95`` or ``fixed:0.5``.

    A target is met on these predictions by the most lenient threshold that reaches it: for
    sensitivity the highest threshold, for specificity the lowest.
    """
    kind, value = parse_threshold_method(method)
    if kind == "fixed":
        return float(value)
    p, is_pos = _as_binary(p_pos, labels, pos)
    if not is_pos.any() or is_pos.all():
        raise PneumoError(f"threshold method {method!r} needs both classes among the labels")
    if kind == "youden":
        fpr, tpr, thr = roc_curve(is_pos, p)
        return float(np.clip(thr[int(np.argmax(tpr - fpr))], 0.0, 1.0))
    fpr, tpr, thr = roc_curve(is_pos, p, drop_intermediate=False)
    if kind == "specificity":
        # Thresholds fall and false positives rise along the curve: the last point within the target.
        within = np.flatnonzero(1.0 - fpr >= value - 1e-12)
        return float(np.clip(thr[int(within[-1])], 0.0, 1.0))
    # Thresholds fall and sensitivity rises along the curve: the first hit is the highest threshold.
    return float(np.clip(thr[int(np.argmax(tpr >= value - 1e-12))], 0.0, 1.0))


def prevalence_weights(labels: np.ndarray, pos: int, target_pos_fraction: float) -> np.ndarray:
    """Per-image weights (mean 1) under which the positive fraction equals ``target_pos_fraction``.

    Lets validation metrics speak for a population with another balance, e.g. the Kaggle test
    split (390 pneumonia / 234 normal = 0.625) when the training split holds 0.74.
    """
    if not 0.0 < target_pos_fraction < 1.0:
        raise PneumoError(f"target positive fraction {target_pos_fraction} must lie strictly between 0 and 1")
    is_pos = np.asarray(labels).ravel() == pos
    frac = is_pos.mean() if is_pos.size else 0.0
    if not 0.0 < frac < 1.0:
        raise PneumoError("prevalence weights need both positive and negative images")
    return np.where(is_pos, target_pos_fraction / frac, (1.0 - target_pos_fraction) / (1.0 - frac))


# ---------------------------------------------------------------- bootstrap


def _resample_weights(
    rng: np.random.Generator, n_boot: int, n: int, cluster_of: np.ndarray | None, n_clusters: int
) -> np.ndarray:
    """(n_boot, n) multiplicities of each image: drawn per image, or per patient for clusters."""
    units = n if cluster_of is None else n_clusters
    draws = rng.integers(0, units, size=(n_boot, units))
    offsets = (np.arange(n_boot) * units)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * units).reshape(n_boot, units)
    return counts if cluster_of is None else counts[:, cluster_of]


def _weighted_auc(p_sorted: np.ndarray, pos_sorted: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC for each row of weights ``w`` over fixed, sorted scores (ties count half)."""
    first = np.searchsorted(p_sorted, p_sorted, side="left")
    last = np.searchsorted(p_sorted, p_sorted, side="right")
    w_neg = w * ~pos_sorted
    cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w_neg, axis=1)], axis=1)
    below, tied = cum[:, first], cum[:, last] - cum[:, first]
    w_pos = w * pos_sorted
    num = (w_pos * (below + 0.5 * tied)).sum(axis=1)
    den = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_ci(
    p_pos: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    pos: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals for accuracy, sensitivity, specificity and ROC AUC.

    With ``groups`` (patient ids) whole patients are resampled: images of one patient are not
    independent, and treating them as such gives intervals that are too narrow.
    A metric undefined in every resample (e.g. no positives at all) gets ``None``.
    """
    p, is_pos = _as_binary(p_pos, labels, pos)
    if p.size == 0 or n_boot < 1:
        raise PneumoError("bootstrap needs at least one prediction and one resample")
    order = np.argsort(p, kind="stable")
    p, is_pos = p[order], is_pos[order]
    cluster_of, n_clusters = None, 0
    if groups is not None:
        g = np.asarray(groups).ravel()
        if g.size != p.size:
            raise PneumoError(f"{g.size} patient ids for {p.size} predictions")
        _, cluster_of = np.unique(g[order], return_inverse=True)
        n_clusters = int(cluster_of.max()) + 1
    pred = p >= threshold
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // p.size)  # bound memory at a few (chunk, n) float arrays
    stats: dict[str, list[np.ndarray]] = {k: [] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")}
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, n_boot, chunk):
            w = _resample_weights(rng, min(chunk, n_boot - start), p.size, cluster_of, n_clusters).astype(np.float64)
            tp, fn = w @ (pred & is_pos), w @ (~pred & is_pos)
            tn, fp = w @ (~pred & ~is_pos), w @ (pred & ~is_pos)
            stats["accuracy"].append((tp + tn) / w.sum(axis=1))
            stats["sensitivity"].append(tp / (tp + fn))
            stats["specificity"].append(tn / (tn + fp))
            stats["roc_auc"].append(_weighted_auc(p, is_pos, w))
    tail = 100.0 * (1.0 - level) / 2.0
    out: dict[str, tuple[float, float] | None] = {}
    for name, parts in stats.items():
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]
        if values.size == 0:
            out[name] = None
        else:
            lo, hi = np.percentile(values, [tail, 100.0 - tail])
            out[name] = (float(lo), float(hi))
    return out


# ---------------------------------------------------------------- the operating threshold

# Thresholds worth having at hand besides the one in use: a reader can switch without retraining.
OPERATING_RULES = ("youden", "sensitivity:0.95", "sensitivity:0.99", "specificity:0.95", "specificity:0.975")
# Fewer validation films than this in either class and a rule's threshold rests on a handful of
# films (one film moves a 97.5%-specificity cut by a whole step): the threshold falls back to
# FALLBACK_THRESHOLD_RULE, the calibrated decision, and the run says so.
MIN_THRESHOLD_FILMS_PER_CLASS = 40
FALLBACK_THRESHOLD_RULE = "fixed:0.5"


def threshold_interval(
    p_pos: np.ndarray,
    labels: np.ndarray,
    method: str,
    pos: int = 1,
    groups: np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of the threshold ``method`` would choose on resampled validation films.

    Whole patients are resampled when ``groups`` is given. How wide it is says how much the
    threshold is worth: a second validation set like this one would move it that far.
    """
    kind, _ = parse_threshold_method(method)
    if kind == "fixed":
        return None
    p, is_pos = _as_binary(p_pos, labels, pos)
    g = np.arange(p.size) if groups is None else np.unique(np.asarray(groups).ravel(), return_inverse=True)[1]
    order = np.argsort(g, kind="stable")  # each patient's films, in file order: one pass, not one per patient
    members = np.split(order, np.cumsum(np.bincount(g))[:-1]) if p.size else []
    rng = np.random.default_rng(seed)
    chosen: list[float] = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if is_pos[idx].all() or not is_pos[idx].any():
            continue
        chosen.append(choose_threshold(p[idx], is_pos[idx].astype(int), method, 1))
    if not chosen:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(chosen, [tail, 100.0 - tail])
    return float(lo), float(hi)


def operating_threshold(
    p_pos: np.ndarray, labels: np.ndarray, method: str, pos: int = 1, groups: np.ndarray | None = None
) -> dict[str, Any]:
    """The threshold to use by ``method``, its bootstrap interval, and the other operating points.

    Returns ``threshold``, ``method`` (the rule actually used: ``FALLBACK_THRESHOLD_RULE`` when a
    class has fewer than ``MIN_THRESHOLD_FILMS_PER_CLASS`` validation films), ``asked``, ``interval``,
    ``warning`` (text or None) and ``operating_points``: for each of ``OPERATING_RULES`` (and
    ``method``), its threshold, interval, and the validation sensitivity and specificity there.
    """
    p, is_pos = _as_binary(p_pos, labels, pos)
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    used, warning = method, None
    if parse_threshold_method(method)[0] != "fixed" and min(n_pos, n_neg) < MIN_THRESHOLD_FILMS_PER_CLASS:
        used = FALLBACK_THRESHOLD_RULE
        warning = (
            f"validation holds {n_pos} positive and {n_neg} negative films, under the {MIN_THRESHOLD_FILMS_PER_CLASS} "
            f"per class a threshold rule needs: the threshold is {FALLBACK_THRESHOLD_RULE} on calibrated "
            f"probabilities instead of {method} (validate on more films to choose by rule)"
        )
    points: dict[str, dict[str, Any]] = {}
    if n_pos and n_neg:
        for rule in dict.fromkeys([*OPERATING_RULES, method]):
            t = choose_threshold(p, is_pos.astype(int), rule, 1)
            m = binary_metrics(p, is_pos.astype(int), t, 1)
            points[rule] = {
                "threshold": t,
                "interval": threshold_interval(p, is_pos.astype(int), rule, 1, groups),
                "sensitivity": m["sensitivity"],
                "specificity": m["specificity"],
            }
    if used in points:
        threshold, interval = points[used]["threshold"], points[used]["interval"]
    else:
        threshold, interval = choose_threshold(p, is_pos.astype(int), used, 1), None
    if warning is None and interval is not None and interval[1] - interval[0] > 0.25:
        warning = (
            f"the threshold {threshold:.3f} ({used}) is uncertain: a validation set like this one could "
            f"have given anything from {interval[0]:.3f} to {interval[1]:.3f} (95% bootstrap interval)"
        )
    return {
        "threshold": float(threshold),
        "method": used,
        "asked": method,
        "interval": interval,
        "warning": warning,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "operating_points": points,
    }


def threshold_record(choice: dict[str, Any]) -> dict[str, Any]:
    """What model.json (``operating_points``) and valid_eval.json keep of an ``operating_threshold`` choice."""
    return {k: v for k, v in choice.items() if k != "threshold"}


# ---------------------------------------------------------------- calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    if not temperature > 0:
        raise PneumoError(f"temperature must be positive, got {temperature}")
    return _softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al., 2017).

    Searched over log T so the optimiser can never step to T <= 0.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).ravel().astype(int)
    if z.ndim != 2 or z.shape[0] != y.size or z.shape[0] == 0:
        raise PneumoError(f"logits of shape {z.shape} do not match {y.size} labels")
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Top-label confidence against accuracy in equal-width bins ``(lo, hi]`` (empty bins: None)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).ravel()
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        bins.append(
            {
                "bin_lo": b / n_bins,
                "bin_hi": (b + 1) / n_bins,
                "confidence": float(conf[mask].mean()) if count else None,
                "accuracy": float(correct[mask].mean()) if count else None,
                "count": count,
            }
        )
    return bins


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the count-weighted mean gap between confidence and accuracy per bin."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        raise PneumoError("expected calibration error needs at least one prediction")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total)


# ---------------------------------------------------------------- subgroups


def subtype_sensitivity(
    p_pos: np.ndarray, labels: np.ndarray, subtypes: Sequence[str | None], threshold: float, pos: int = 1
) -> dict[str, dict]:
    """Sensitivity per pneumonia subtype (e.g. bacteria vs virus) over the positive images."""
    p, is_pos = _as_binary(p_pos, labels, pos)
    if len(subtypes) != p.size:
        raise PneumoError(f"{len(subtypes)} subtypes for {p.size} predictions")
    st = np.array([s if s is not None else "" for s in subtypes], dtype=object)
    out: dict[str, dict] = {}
    for name in sorted({s for s in subtypes if s is not None}):
        mask = is_pos & (st == name)
        n = int(mask.sum())
        if n:
            out[name] = {"n": n, "sensitivity": float((p[mask] >= threshold).mean())}
    return out


# ---------------------------------------------------------------- the report


def _downsample_roc(fpr: np.ndarray, tpr: np.ndarray, limit: int = MAX_ROC_POINTS) -> dict:
    if fpr.size > limit:
        keep = np.unique(np.linspace(0, fpr.size - 1, limit).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}


def evaluate_predictions(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    threshold: float | None = None,
    logits: np.ndarray | None = None,
    subtypes: Sequence[str | None] | None = None,
    groups: np.ndarray | None = None,
    temperature: float | None = None,
    n_boot: int = 1000,
    n_bins: int = 15,
    reweight_to: float | None = None,
    seed: int = 0,
) -> dict:
    """One JSON-serialisable evaluation report.

    ``probs`` are used as given. ``threshold=None`` means 0.5. With ``logits``, the report's
    "calibration" section gives the ECE after temperature scaling: with ``temperature`` as given
    (e.g. fitted on validation, applied to test) or, when it is None, fitted on these logits.
    ``reweight_to`` adds metrics re-weighted to that positive fraction; ``n_boot=0`` skips the CIs.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).ravel().astype(int)
    classes = list(classes)
    if probs.ndim != 2 or probs.shape != (y.size, len(classes)):
        raise PneumoError(
            f"probabilities of shape {probs.shape} do not match {y.size} labels and {len(classes)} classes {classes}"
        )
    if y.size == 0:
        raise PneumoError("nothing to evaluate: no predictions")
    if y.min() < 0 or y.max() >= len(classes):
        raise PneumoError(f"labels must be class indices in [0, {len(classes) - 1}]")

    if logits is not None and np.shape(logits) != probs.shape:
        raise PneumoError(f"logits of shape {np.shape(logits)} do not match probabilities of shape {probs.shape}")

    report: dict[str, Any] = {
        "classes": classes,
        "n": int(y.size),
        "ece": expected_calibration_error(probs, y, n_bins),
        "reliability": reliability_bins(probs, y, n_bins),
    }
    if logits is not None:
        source = "given" if temperature is not None else "fitted"
        t = float(temperature) if temperature is not None else fit_temperature(logits, y)
        report["calibration"] = {
            "temperature": t,
            "temperature_source": source,
            "ece_before": expected_calibration_error(softmax(logits), y, n_bins),
            "ece_after": expected_calibration_error(softmax(logits, t), y, n_bins),
        }
    elif temperature is not None:
        report["calibration"] = {"temperature": float(temperature), "temperature_source": "given"}

    if len(classes) != 2:
        mc = multiclass_metrics(probs, y, classes)
        report.update(task="multiclass", threshold=None, metrics=mc, confusion_matrix=mc["confusion_matrix"])
        return _jsonable(report)

    pos = positive_index(classes)
    thr = 0.5 if threshold is None else float(threshold)
    p_pos = probs[:, pos]
    metrics = binary_metrics(p_pos, y, thr, pos)
    pred = decide(probs, pos, thr)
    report.update(
        task="binary",
        positive_class=classes[pos],
        threshold=thr,
        metrics=metrics,
        confusion_matrix=confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        ci=None,
        ci_level=0.95,
        ci_unit="patient" if groups is not None else "image",
        subtypes=subtype_sensitivity(p_pos, y, subtypes, thr, pos) if subtypes is not None else {},
        roc=None,
        operating_point={
            "fpr": None if metrics["specificity"] is None else 1.0 - metrics["specificity"],
            "tpr": metrics["sensitivity"],
        },
    )
    report["metrics_at_0.5"] = binary_metrics(p_pos, y, 0.5, pos)
    if n_boot > 0:
        report["ci"] = bootstrap_ci(p_pos, y, thr, pos, n_boot=n_boot, seed=seed, groups=groups)
    if metrics["roc_auc"] is not None:
        fpr, tpr, _ = roc_curve(y == pos, p_pos)
        report["roc"] = _downsample_roc(fpr, tpr)
    if reweight_to is not None:
        w = prevalence_weights(y, pos, reweight_to)
        report["reweighted"] = {
            "target_pos_fraction": float(reweight_to),
            "metrics": binary_metrics(p_pos, y, thr, pos, weights=w),
        }
    return _jsonable(report)


def matrix_title(report: dict) -> str:
    """Which images and which decision rule a confusion matrix counts: "validation" unless the
    report says what it evaluated (``evaluated_on``, set by ``infer.predict``)."""
    subset = report.get("evaluated_on") or "validation"
    threshold, positive = report.get("threshold"), report.get("positive_class")
    rule = f"\n{positive} when p({positive}) \u2265 {threshold:.3f}" if threshold is not None and positive else ""
    return f"Confusion matrix: {subset}{rule}"


def write_evaluation_figures(report: dict, probs: np.ndarray, labels: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """confusion_matrix.png, roc.png (binary, operating point marked) and reliability.png."""
    out_dir = Path(out_dir)
    written = {
        "confusion_matrix": plots.plot_confusion_matrix(
            report["confusion_matrix"], report["classes"], out_dir / "confusion_matrix.png", title=matrix_title(report)
        )
    }
    if report.get("roc"):
        op = report.get("operating_point") or {}
        point = (op["fpr"], op["tpr"]) if op.get("fpr") is not None and op.get("tpr") is not None else None
        written["roc"] = plots.plot_roc(
            report["roc"]["fpr"],
            report["roc"]["tpr"],
            report["metrics"]["roc_auc"],
            out_dir / "roc.png",
            operating_point=point,
        )
    bins = report.get("reliability") or reliability_bins(probs, labels)
    ece = report.get("ece")
    if ece is None:
        ece = expected_calibration_error(probs, labels)
    written["reliability"] = plots.plot_reliability(bins, ece, out_dir / "reliability.png")
    return written
