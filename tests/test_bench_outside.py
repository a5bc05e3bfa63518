"""bench/outside.py, bench/calibrate.py and the outside rule, run on the bundled sample's test films."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLE_ROOT, load_bench, one_torch_thread

SITE = SAMPLE_ROOT / "test"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def test_outside_reads_plain_adapted_and_re_encoded_films(trained_run, tmp_path):
    outside = load_bench("outside")
    out = tmp_path / "o"
    assert outside.main([str(trained_run / "model"), "--films", str(SITE), "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["n_films"] == 60 and {"plain", "adapted", "consistency"} <= set(r)
    plain = r["plain"]
    assert plain["families"]["IM-"]["n"] == 15 == plain["families"]["NORMAL2-"]["n"]
    assert "specificity" in plain["families"]["IM-"] and "sensitivity" in plain["families"]["bacteria"]
    m = plain["metrics"]
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2, abs=1e-4)
    lo, hi = plain["ci"]["roc_auc"]
    assert lo <= m["roc_auc"] <= hi
    assert plain["outside_chosen_threshold_bound"]["accuracy"] >= m["accuracy"]  # the bound is an upper bound
    assert r["adapted"]["method"] == "batchnorm"
    c = r["consistency"]
    assert set(c) == {"jpeg95", "jpeg90", "jpeg50", "png", "up1024"}
    assert c["png"]["flips"] == 0 and c["png"]["p95_abs_dp"] == 0  # lossless: the very pixels again
    assert c["jpeg50"]["p95_abs_dp"] > 0
    md = out.with_suffix(".md").read_text()
    assert "outside-dev" in md and "test split" in md and "| jpeg90 |" in md


def test_the_outside_rule_puts_consistency_first_then_auc_in_steps_of_0_005():
    rule = load_bench("recipe_experiments")

    def record(auc: float, sens: float, spec: float, flips: float) -> dict:
        m = {"roc_auc": auc, "balanced_accuracy": (sens + spec) / 2}
        return {"plain": {"metrics": m}, "consistency": {"jpeg90": {"flip_rate": flips}}}

    steady = record(0.950, 0.98, 0.60, 0.02)
    shaky = record(0.990, 0.98, 0.90, 0.05)  # better everywhere but flips more than 3% under JPEG 90
    close = record(0.951, 0.95, 0.70, 0.01)  # AUC within 0.005: balanced accuracy decides
    ranked = sorted([shaky, steady, close], key=rule.outside_key, reverse=True)
    assert ranked == [close, steady, shaky]


def test_calibrate_bench_cuts_the_films_by_patient_and_measures_each_size(trained_run, tmp_path):
    bench = load_bench("calibrate")
    out = tmp_path / "c"
    argv = [str(trained_run / "model"), "--films", str(SITE), "--sizes", "10,all", "--draws", "2"]
    argv += ["--adapt-sizes", "8", "--adapt-methods", "batchnorm", "--fits", "threshold", "--out", str(out)]
    assert bench.main(argv) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert sum(r["calibration_films"].values()) + sum(r["evaluation_films"].values()) == 60
    sizes = r["calibrated_threshold"]
    assert sizes["10"]["summary"]["draws"] == 2 and sizes["all"]["summary"]["draws"] == 1
    assert r["adapted_batchnorm_by_films"]["8"]["summary"]["draws"] == 2
    assert "Labelled site calibration" in out.with_suffix(".md").read_text()
