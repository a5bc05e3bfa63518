"""Which threshold rule survives shift? Chosen on clean validation films, judged on shifted ones.

Issue 15: validation chooses a threshold on films like the training films; outside, the same threshold
gave 0.99 sensitivity and 0.54-0.63 specificity (every shifted film drifts towards "pneumonia").
This script takes the per-film probabilities ``bench/shift.py`` wrote (``shift_films.csv``: p(positive)
of every film, clean and under every shift) for one or more models and, for each rule, cross-fits:
``--repeats`` times, the films are halved at random (stratified by class); the rule picks its
threshold on one half's *clean* probabilities and is judged on the other half, clean and under every
shift. No film that chose a threshold judges it.

Rule of choice, fixed before the runs: the highest mean balanced accuracy over the shifted conditions
(models and repeats averaged), among the rules whose clean sensitivity on the judging halves stays at
0.95 or more (a missed pneumonia costs more than a second look); ties by clean balanced accuracy.

    python bench/threshold_policy.py SHIFT_DIR [SHIFT_DIR ...] --out bench/results/threshold_policy.json
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from common import write_report
from pneumo.data.folders import KERMANY_TEST_PREVALENCE
from pneumo.evaluation.metrics import choose_threshold

RULES = ("youden", "fixed:0.5", "sensitivity:0.95", "specificity:0.95", "specificity:0.975", "specificity:0.99")
MIN_CLEAN_SENSITIVITY = 0.95
POSITIVE = "PNEUMONIA"


def read_films(folder: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(is_positive, {condition: p(positive)}) from a bench/shift.py output folder."""
    with open(folder / "shift_films.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    is_pos = np.array([r["label"] == POSITIVE for r in rows])
    conditions = [k for k in rows[0] if k.startswith("p_")]
    return is_pos, {k[2:]: np.array([float(r[k]) for r in rows]) for k in conditions}


def rates(p: np.ndarray, is_pos: np.ndarray, t: float) -> tuple[float, float]:
    call = p >= t
    return float(call[is_pos].mean()), float((~call[~is_pos]).mean())


def halves(is_pos: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(is_pos.size, dtype=bool)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(is_pos == cls))
        a[idx[: idx.size // 2]] = True
    return a, ~a


def cross_fit(is_pos: np.ndarray, probs: dict[str, np.ndarray], rule: str, repeats: int, seed: int) -> dict:
    """Mean sensitivity/specificity per condition over ``repeats`` x 2 choose-on-one-half, judge-on-the-other."""
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {c: np.zeros(2) for c in probs}
    thresholds = []
    for _ in range(repeats):
        for choose, judge in (lambda h: (h, h[::-1]))(halves(is_pos, rng)):
            t = choose_threshold(probs["clean"][choose], is_pos[choose].astype(int), rule, 1)
            thresholds.append(t)
            for c, p in probs.items():
                sums[c] += rates(p[judge], is_pos[judge], t)
    n = 2 * repeats
    out = {c: {"sensitivity": s[0] / n, "specificity": s[1] / n} for c, s in sums.items()}
    return {"conditions": out, "threshold_median": float(np.median(thresholds))}


def summarise(per_model: list[dict]) -> dict:
    """Averages over the models: clean figures, and the mean over shifted conditions."""
    conditions = per_model[0]["conditions"]
    shifted = [c for c in conditions if c != "clean"]

    def mean(key: str, names: list[str]) -> float:
        return float(np.mean([m["conditions"][c][key] for m in per_model for c in names]))

    sens, spec = mean("sensitivity", ["clean"]), mean("specificity", ["clean"])
    s_sens, s_spec = mean("sensitivity", shifted), mean("specificity", shifted)
    pi = KERMANY_TEST_PREVALENCE
    return {
        "clean": {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2},
        "shifted_mean": {
            "sensitivity": s_sens,
            "specificity": s_spec,
            "balanced_accuracy": (s_sens + s_spec) / 2,
            "accuracy_at_outside_prevalence": pi * s_sens + (1 - pi) * s_spec,
        },
        "worst_shift_specificity": min(
            float(np.mean([m["conditions"][c]["specificity"] for m in per_model])) for c in shifted
        ),
        "threshold_median": float(np.median([m["threshold_median"] for m in per_model])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shift_dirs", type=Path, nargs="+", help="bench/shift.py --out folders (shift_films.csv)")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    models = {str(d): read_films(d) for d in args.shift_dirs}
    rule = __doc__.split("Rule of choice, fixed before the runs: ")[1].split("\n\n")[0]
    result: dict = {"rule": " ".join(rule.split()), "rules": {}}
    for rule in RULES:
        per_model = [cross_fit(is_pos, probs, rule, args.repeats, args.seed) for is_pos, probs in models.values()]
        result["rules"][rule] = summarise(per_model) | {"per_model": dict(zip(models, per_model))}
    eligible = [r for r, v in result["rules"].items() if v["clean"]["sensitivity"] >= MIN_CLEAN_SENSITIVITY]
    result["eligible"] = eligible
    result["chosen"] = max(
        eligible or list(RULES),
        key=lambda r: (
            result["rules"][r]["shifted_mean"]["balanced_accuracy"],
            result["rules"][r]["clean"]["balanced_accuracy"],
        ),
    )
    result["models"] = list(models)
    result["films"] = {m: int(v[0].size) for m, v in models.items()}
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
