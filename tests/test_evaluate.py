"""Metrics against answers worked out by hand on small arrays."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import pneumo.evaluation.metrics as ev
from pneumo.errors import PneumoError

# Ten images: five pneumonia (label 1), five normal (label 0).
P10 = np.array([0.95, 0.85, 0.70, 0.45, 0.30, 0.60, 0.40, 0.20, 0.15, 0.05])
Y10 = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "classes, expected",
    [
        (["NORMAL", "PNEUMONIA"], 1),
        (["pneumonia", "normal"], 0),
        (["NORMAL", "BACTERIA", "Pneumonia"], 2),
        (["cat", "dog"], 1),
    ],
)
def test_positive_index(classes, expected):
    assert ev.positive_index(classes) == expected


def test_positive_index_needs_a_positive_class():
    with pytest.raises(PneumoError, match="PNEUMONIA"):
        ev.positive_index(["a", "b", "c"])


def test_binary_metrics_by_hand():
    # At 0.5: TP = 3 (0.95, 0.85, 0.70), FN = 2, FP = 1 (0.60), TN = 4.
    # AUC: positive-over-negative pairs 5 + 5 + 5 + 4 + 3 = 22 of 25.
    m = ev.binary_metrics(P10, Y10, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 4, 2)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (10, 5, 5)
    expected = {
        "accuracy": 0.7,
        "error_rate": 0.3,
        "sensitivity": 0.6,
        "specificity": 0.8,
        "balanced_accuracy": 0.7,
        "ppv": 0.75,
        "npv": 4 / 6,
        "f1": 6 / 9,
        "roc_auc": 0.88,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key


def test_threshold_is_inclusive():
    m = ev.binary_metrics(P10, Y10, 0.70)
    assert m["tp"] == 3 and m["fn"] == 2  # 0.70 itself counts as positive


def test_positive_class_index_zero_swaps_roles():
    m = ev.binary_metrics(P10, 1 - Y10, 0.5, pos=0)  # p_pos is still P(positive class)
    assert m["sensitivity"] == pytest.approx(0.6) and m["specificity"] == pytest.approx(0.8)


def test_undefined_ratios_are_none_and_json_safe():
    # No positive images, and nothing predicted positive.
    m = ev.binary_metrics(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]), 0.5)
    assert m["sensitivity"] is None and m["ppv"] is None and m["roc_auc"] is None and m["f1"] is None
    assert m["balanced_accuracy"] is None
    assert m["specificity"] == 1.0 and m["npv"] == 1.0
    assert "NaN" not in json.dumps(m)


def test_weights_change_predictive_values_not_sensitivity():
    # Re-weighting 50% positive to 25%: positives weigh 0.5, negatives 1.5.
    # TP = 1.5, FP = 1.5 -> PPV 0.5; TN = 6, FN = 1 -> NPV 6/7.
    w = ev.prevalence_weights(Y10, 1, 0.25)
    assert np.allclose(w, np.where(Y10 == 1, 0.5, 1.5))
    m = ev.binary_metrics(P10, Y10, 0.5, weights=w)
    assert m["sensitivity"] == pytest.approx(0.6) and m["specificity"] == pytest.approx(0.8)
    assert m["ppv"] == pytest.approx(0.5) and m["npv"] == pytest.approx(6 / 7)
    assert m["accuracy"] == pytest.approx((1.5 + 6) / 10)
    assert m["n"] == 10


@pytest.mark.parametrize(
    "labels, target",
    [
        ([1, 1, 1, 0], 0.625),
        ([1, 0, 0, 0, 0], 0.5),
        ([1] * 74 + [0] * 26, 0.625),
    ],
)
def test_prevalence_weights_hit_the_target(labels, target):
    y = np.array(labels)
    w = ev.prevalence_weights(y, 1, target)
    assert w[y == 1].sum() / w.sum() == pytest.approx(target)
    assert w.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("labels, target", [([1, 1], 0.5), ([0, 1], 1.0), ([0, 1], 0.0)])
def test_prevalence_weights_reject_impossible_requests(labels, target):
    with pytest.raises(PneumoError):
        ev.prevalence_weights(np.array(labels), 1, target)


def test_multiclass_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = ev.multiclass_metrics(probs, y, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["error_rate"] == pytest.approx(2 / 6)
    assert [m["per_class"][c]["recall"] for c in "abc"] == pytest.approx([0.5, 1.0, 0.5])
    assert [m["per_class"][c]["precision"] for c in "abc"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert 0.0 <= m["macro_auc_ovr"] <= 1.0


def test_youden_separates_a_separable_set():
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    t = ev.choose_threshold(p, y, "youden")
    assert 0.35 < t <= 0.7
    m = ev.binary_metrics(p, y, t)
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0


@pytest.mark.parametrize("target, expected", [(0.6, 0.70), (0.8, 0.45), (1.0, 0.30), (0.2, 0.95)])
def test_sensitivity_target_gives_highest_threshold(target, expected):
    # Positive scores 0.95 0.85 0.70 0.45 0.30: k of 5 needed -> the k-th highest score.
    t = ev.choose_threshold(P10, Y10, f"sensitivity:{target}")
    assert t == pytest.approx(expected)
    assert ev.binary_metrics(P10, Y10, t)["sensitivity"] >= target


def test_sensitivity_target_is_met_on_random_scores():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t = ev.choose_threshold(p, y, "sensitivity:0.95")
    assert ev.binary_metrics(p, y, t)["sensitivity"] >= 0.95
    higher = p[p > t].min()  # the next threshold up already misses the target
    assert ev.binary_metrics(p, y, higher)["sensitivity"] < 0.95


def test_specificity_target_is_met_by_the_lowest_such_threshold():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t = ev.choose_threshold(p, y, "specificity:0.95")
    assert ev.binary_metrics(p, y, t)["specificity"] >= 0.95
    lower = p[p < t].max()  # the next threshold down already misses the target
    assert ev.binary_metrics(p, y, lower)["specificity"] < 0.95
    # a stricter target can only raise the threshold, and costs sensitivity
    strict = ev.choose_threshold(p, y, "specificity:0.99")
    assert strict >= t
    assert ev.binary_metrics(p, y, strict)["sensitivity"] <= ev.binary_metrics(p, y, t)["sensitivity"]


@pytest.mark.parametrize(
    "method, expected",
    [
        ("youden", ("youden", None)),
        ("specificity:0.975", ("specificity", 0.975)),
        (" Sensitivity:0.9 ", ("sensitivity", 0.9)),
        ("fixed:0", ("fixed", 0.0)),
    ],
)
def test_parse_threshold_method(method, expected):
    assert ev.parse_threshold_method(method) == expected


def test_fixed_threshold():
    assert ev.choose_threshold(P10, Y10, "fixed:0.3") == 0.3


@pytest.mark.parametrize("method", ["youdn", "sensitivity", "Youden:1", "f1", ""])
def test_unknown_threshold_method_lists_valid_forms(method):
    with pytest.raises(PneumoError, match="youden.*sensitivity:0.95.*fixed:0.5"):
        ev.choose_threshold(P10, Y10, method)


@pytest.mark.parametrize("method", ["fixed:1.5", "fixed:x", "sensitivity:0", "sensitivity:abc", "specificity:1.2"])
def test_out_of_range_threshold_arguments(method):
    with pytest.raises(PneumoError):
        ev.choose_threshold(P10, Y10, method)


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), y


def test_bootstrap_contains_point_estimate_and_shrinks_with_more_data():
    widths = []
    for n in (200, 2000):
        p, y = _scores(n, seed=n)
        point = ev.binary_metrics(p, y, 0.5)
        ci = ev.bootstrap_ci(p, y, 0.5, n_boot=500, seed=1)
        for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            lo, hi = ci[key]
            assert lo <= point[key] <= hi, key
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(10) in theory


def test_bootstrap_is_seeded_and_fast():
    p, y = _scores(1000, seed=0)
    start = time.perf_counter()
    a = ev.bootstrap_ci(p, y, 0.5, n_boot=1000, seed=7)
    assert time.perf_counter() - start < 2.0
    assert a == ev.bootstrap_ci(p, y, 0.5, n_boot=1000, seed=7)


def test_patient_bootstrap_is_wider_when_patients_repeat_images():
    # 40 patients with 10 identical images each: only 40 independent units, not 400.
    p_pat, y_pat = _scores(40, seed=5)
    p, y = np.repeat(p_pat, 10), np.repeat(y_pat, 10)
    groups = np.repeat(np.arange(40), 10)
    by_image = ev.bootstrap_ci(p, y, 0.5, n_boot=500, seed=2)
    by_patient = ev.bootstrap_ci(p, y, 0.5, n_boot=500, seed=2, groups=groups)
    for key in ("accuracy", "roc_auc"):
        w_img = by_image[key][1] - by_image[key][0]
        w_pat = by_patient[key][1] - by_patient[key][0]
        assert w_pat > 2 * w_img, key  # ~sqrt(10) in theory


def test_bootstrap_auc_of_a_separable_set_is_one_and_undefined_metrics_are_none():
    p = np.array([0.1, 0.2, 0.8, 0.9])
    assert ev.bootstrap_ci(p, np.array([0, 0, 1, 1]), 0.5, n_boot=200)["roc_auc"] == (1.0, 1.0)
    ci = ev.bootstrap_ci(p, np.array([0, 0, 0, 0]), 0.5, n_boot=50)
    assert ci["sensitivity"] is None and ci["roc_auc"] is None and ci["specificity"] is not None


def test_resampled_auc_formula_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(4)
    p = rng.integers(0, 6, 80) / 5.0  # many ties
    y = rng.integers(0, 2, 80)
    w = rng.integers(0, 4, 80).astype(float)
    order = np.argsort(p, kind="stable")
    got = ev._weighted_auc(p[order], (y == 1)[order], w[order][None, :])[0]
    assert got == pytest.approx(roc_auc_score(y, p, sample_weight=w))


def _calibrated(n: int, seed: int, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class probability, and labels drawn from it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, classes))
    probs = ev.softmax(z)
    labels = (rng.random(n)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
    return z, labels


@pytest.mark.parametrize("scale, classes", [(2.0, 2), (2.0, 3), (1.0, 2)])
def test_fit_temperature_recovers_the_scale(scale, classes):
    z, y = _calibrated(5000, seed=11, classes=classes)
    assert ev.fit_temperature(scale * z, y) == pytest.approx(scale, rel=0.08)


def test_softmax_with_temperature():
    out = ev.softmax(np.array([[0.0, np.log(3.0)], [2.0, 2.0]]), temperature=1.0)
    assert out == pytest.approx(np.array([[0.25, 0.75], [0.5, 0.5]]))
    assert ev.softmax(np.array([[0.0, 2 * np.log(3.0)]]), temperature=2.0) == pytest.approx(np.array([[0.25, 0.75]]))
    with pytest.raises(PneumoError):
        ev.softmax(np.zeros((1, 2)), temperature=0)


def test_ece_by_hand():
    # Two images at confidence 0.7, both right (gap 0.3); two at 0.6, one right (gap 0.1).
    probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 0])
    assert ev.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
    bins = ev.reliability_bins(probs, y, n_bins=10)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 4
    assert bins[6] == pytest.approx({"bin_lo": 0.6, "bin_hi": 0.7, "confidence": 0.7, "accuracy": 1.0, "count": 2})
    assert bins[5]["accuracy"] == 0.5 and bins[0]["accuracy"] is None


def test_ece_small_when_calibrated_and_large_when_overconfident():
    z, y = _calibrated(20000, seed=12)
    assert ev.expected_calibration_error(ev.softmax(z), y) < 0.02
    assert ev.expected_calibration_error(ev.softmax(3 * z), y) > 0.08


def test_subtype_sensitivity_by_hand():
    p = np.array([0.9, 0.8, 0.2, 0.3, 0.1, 0.9, 0.7])
    y = np.array([1, 1, 1, 1, 1, 1, 0])
    sub = ["bacteria", "bacteria", "bacteria", "virus", "virus", None, None]
    out = ev.subtype_sensitivity(p, y, sub, 0.5)
    assert out == {"bacteria": {"n": 3, "sensitivity": pytest.approx(2 / 3)}, "virus": {"n": 2, "sensitivity": 0.0}}


def _probs2(p_pos: np.ndarray) -> np.ndarray:
    return np.stack([1 - p_pos, p_pos], axis=1)


def test_evaluate_predictions_binary_report():
    sub = ["bacteria", "virus", "bacteria", "virus", "bacteria", None, None, None, None, None]
    logits = np.log(_probs2(P10))
    r = ev.evaluate_predictions(
        _probs2(P10),
        Y10,
        ["NORMAL", "PNEUMONIA"],
        threshold=0.5,
        logits=logits,
        subtypes=sub,
        groups=np.arange(10) // 2,
        n_boot=200,
    )
    json.dumps(r, allow_nan=False)
    assert r["task"] == "binary" and r["positive_class"] == "PNEUMONIA" and r["n"] == 10
    assert r["confusion_matrix"] == [[4, 1], [2, 3]]  # [[tn, fp], [fn, tp]]
    assert r["metrics"]["sensitivity"] == pytest.approx(0.6)
    assert r["metrics_at_0.5"] == r["metrics"]
    assert r["ci_unit"] == "patient" and len(r["ci"]["accuracy"]) == 2
    assert r["subtypes"]["virus"] == {"n": 2, "sensitivity": 0.5}
    assert r["operating_point"] == pytest.approx({"fpr": 0.2, "tpr": 0.6})
    assert r["calibration"]["temperature_source"] == "fitted"
    assert r["calibration"]["ece_before"] == pytest.approx(r["ece"])


def test_evaluate_predictions_class_order_and_threshold():
    # PNEUMONIA first: rows/columns follow the class order, so tp sits top-left.
    r = ev.evaluate_predictions(_probs2(1 - P10), 1 - Y10, ["PNEUMONIA", "NORMAL"], threshold=0.65, n_boot=0)
    # At 0.65 on P10: TP = 3 (0.95, 0.85, 0.70), FN = 2, FP = 0, TN = 5.
    assert r["confusion_matrix"] == [[3, 2], [0, 5]]
    assert r["threshold"] == 0.65 and r["ci"] is None
    assert r["metrics_at_0.5"]["fp"] == 1


def test_evaluate_predictions_downsamples_roc_and_reweights():
    p, y = _scores(3000, seed=9)
    r = ev.evaluate_predictions(_probs2(p), y, ["NORMAL", "PNEUMONIA"], n_boot=0, reweight_to=0.625)
    assert 2 < len(r["roc"]["fpr"]) <= 200 and len(r["roc"]["fpr"]) == len(r["roc"]["tpr"])
    assert (r["roc"]["fpr"][0], r["roc"]["tpr"][-1]) == (0.0, 1.0)
    rw = r["reweighted"]["metrics"]
    assert (rw["tp"] + rw["fn"]) / (rw["tp"] + rw["fn"] + rw["tn"] + rw["fp"]) == pytest.approx(0.625)


def test_evaluate_predictions_multiclass():
    z, y = _calibrated(300, seed=2, classes=3)
    r = ev.evaluate_predictions(ev.softmax(z), y, ["NORMAL", "BACTERIA", "VIRUS"], n_boot=0)
    json.dumps(r, allow_nan=False)
    assert r["task"] == "multiclass" and r["threshold"] is None
    assert np.array(r["confusion_matrix"]).sum() == 300


@pytest.mark.parametrize(
    "probs, labels",
    [
        (np.zeros((3, 2)), np.array([0, 1])),  # row count mismatch
        (np.zeros((2, 3)), np.array([0, 1])),  # class count mismatch
        (np.full((2, 2), 0.5), np.array([0, 2])),  # label out of range
    ],
)
def test_evaluate_predictions_rejects_bad_shapes(probs, labels):
    with pytest.raises(PneumoError):
        ev.evaluate_predictions(probs, labels, ["NORMAL", "PNEUMONIA"], n_boot=0)


def test_write_evaluation_figures(tmp_path):
    r = ev.evaluate_predictions(_probs2(P10), Y10, ["NORMAL", "PNEUMONIA"], n_boot=0)
    written = ev.write_evaluation_figures(r, _probs2(P10), Y10, tmp_path)
    assert set(written) == {"confusion_matrix", "roc", "reliability"}
    for path in written.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _two_classes(n_per_class: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    return np.clip(rng.normal(0.3 + 0.4 * y, 0.18), 0, 1), y


def test_operating_threshold_falls_back_and_says_so_on_few_films():
    p, y = _two_classes(ev.MIN_THRESHOLD_FILMS_PER_CLASS - 1)
    choice = ev.operating_threshold(p, y, "youden")
    assert choice["method"] == ev.FALLBACK_THRESHOLD_RULE and choice["asked"] == "youden"
    assert choice["threshold"] == 0.5
    assert f"{ev.MIN_THRESHOLD_FILMS_PER_CLASS - 1} positive" in choice["warning"]
    # a fixed threshold needs no films, so nothing falls back
    assert ev.operating_threshold(p, y, "fixed:0.3")["method"] == "fixed:0.3"


def test_operating_points_list_every_rule_with_its_interval():
    p, y = _two_classes(300)
    choice = ev.operating_threshold(p, y, "specificity:0.95", groups=np.arange(y.size) // 2)
    assert choice["method"] == "specificity:0.95" and choice["warning"] is None
    points = choice["operating_points"]
    assert set(ev.OPERATING_RULES) <= set(points)
    assert choice["threshold"] == points["specificity:0.95"]["threshold"]
    assert points["specificity:0.95"]["specificity"] >= 0.95
    assert points["sensitivity:0.95"]["sensitivity"] >= 0.95
    for point in points.values():
        lo, hi = point["interval"]
        assert 0.0 <= lo <= hi <= 1.0


def test_the_threshold_interval_narrows_with_more_films():
    few, many = _two_classes(50), _two_classes(2000)
    lo1, hi1 = ev.threshold_interval(*few, "youden")
    lo2, hi2 = ev.threshold_interval(*many, "youden")
    assert hi2 - lo2 < hi1 - lo1
    assert ev.threshold_interval(*many, "fixed:0.5") is None
