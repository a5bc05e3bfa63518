"""The comparison's numbers and its answer in words: time to a target error, error within a budget.

Pure functions over the run records ``compare.experiment`` writes; the figures (``compare.plots``)
and the experiment both read from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ARMS = {"pretrained": "imagenet", "scratch": "none"}  # arm -> pneumo.train's ``pretrained``


# ---------------------------------------------------------------------------------------------
def time_to(record: dict, target: float) -> tuple[float | None, int | None]:
    """Wall time (s) and epoch at the first epoch end whose validation error is <= target."""
    for row in record["history"]:
        if row["error_rate"] <= target + 1e-9:
            return row["wall_s"], row["epoch"]
    return None, None


def error_within(record: dict, budget_s: float) -> float | None:
    """Validation error of the last epoch finished within ``budget_s`` seconds (None: none finished)."""
    done = [row["error_rate"] for row in record["history"] if row["wall_s"] <= budget_s + 1e-9]
    return done[-1] if done else None


def by_method(records: Sequence[dict]) -> dict[tuple[str, str], dict[float, list[dict]]]:
    """Records by (arch, arm), then fraction; pretrained before scratch, seeds in order."""
    out: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in sorted(records, key=lambda r: (r["arch"], list(ARMS).index(r["arm"]), r["fraction"], r["seed"])):
        out.setdefault((r["arch"], r["arm"]), {}).setdefault(r["fraction"], []).append(r)
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


TARGET_MARGIN = 0.02  # the automatic target sits 2 points above the worse method's final error


def automatic_target(finals: dict[str, float], chance: float) -> tuple[float, str]:
    """A fraction's target error and the reason, from each method's mean final error.

    The worse method's final error plus ``TARGET_MARGIN``: a level both reach, so the times compare
    like with like. When that is no better than ``chance`` (always answering the majority class) the
    time to it means nothing, so the better method's final error plus the margin is used instead,
    and the worse method is reported as not reaching it."""
    worst, best = max(finals, key=finals.get), min(finals, key=finals.get)
    target = math.ceil((finals[worst] + TARGET_MARGIN) * 1000 - 1e-6) / 1000
    if target < chance - 0.005:
        return target, f"{fmt_pct(target)}: the worse final error ({fmt_pct(finals[worst])}, {worst}) plus 2 points"
    target = math.ceil((finals[best] + TARGET_MARGIN) * 1000 - 1e-6) / 1000
    return target, (
        f"{fmt_pct(target)}: {worst} ends no better than chance ({fmt_pct(chance)}), so the better final error "
        f"({fmt_pct(finals[best])}, {best}) plus 2 points"
    )


def summarise(records: Sequence[dict], target_error: float | None = None) -> dict:
    """One table row per (fraction, arch, arm), the target error per fraction, and the answer.

    With no ``target_error``, a fraction's target comes from ``automatic_target`` (said in the answer,
    ``target_rules``). The budget is the mean training time of the cheapest method at that fraction.
    """
    methods = by_method(records)
    fractions = sorted({r["fraction"] for r in records})
    counts = records[0].get("n_valid_per_class") or {}
    majority = 1 - max(counts.values()) / sum(counts.values()) if counts else None
    chance = majority if majority is not None else 0.5
    targets, budgets, rules = {}, {}, {}
    for f in fractions:
        cells = {f"{arch} {arm}": runs[f] for (arch, arm), runs in methods.items() if f in runs}
        if target_error is not None:
            targets[f], rules[f] = target_error, f"{fmt_pct(target_error)}: given with --target-error"
        else:
            finals = {name: float(np.mean([r["final_error"] for r in rs])) for name, rs in cells.items()}
            targets[f], rules[f] = automatic_target(finals, chance)
        budgets[f] = min(np.mean([r["train_s"] for r in rs]) for rs in cells.values())
    table = []
    for f in fractions:
        for (arch, arm), runs in methods.items():
            rs = runs.get(f)
            if not rs:
                continue
            reached = [time_to(r, targets[f]) for r in rs]
            hit = [(t, e) for t, e in reached if t is not None]
            finals = [r["final_error"] for r in rs]
            table.append(
                {
                    "fraction": f,
                    "n_train": round(float(np.mean([r["n_train"] for r in rs]))),
                    "arch": arch,
                    "arm": arm,
                    "seeds": len(rs),
                    "final_error": float(np.mean(finals)),
                    "final_error_sd": float(np.std(finals, ddof=1)) if len(rs) > 1 else 0.0,
                    "best_error": float(np.mean([r["best_error"] for r in rs])),
                    "roc_auc": _mean([r.get("roc_auc") for r in rs]),
                    "train_s": float(np.mean([r["train_s"] for r in rs])),
                    "target_error": targets[f],
                    "reached": f"{len(hit)}/{len(rs)}",
                    "time_to_target_s": float(np.median([t for t, _ in hit])) if hit else None,
                    "epochs_to_target": float(np.median([e for _, e in hit])) if hit else None,
                    "budget_s": budgets[f],
                    "error_at_budget": _mean([error_within(r, budgets[f]) for r in rs]),
                }
            )
    return {
        "table": table,
        "targets": targets,
        "target_rules": rules,
        "majority_error": majority,
        "answer": answer(table, majority, rules),
    }


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_secs(x: float | None) -> str:
    return "not reached" if x is None else (f"{x:.0f} s" if x >= 10 else f"{x:.1f} s")


def answer(
    table: Sequence[dict], majority_error: float | None = None, target_rules: dict[float, str] | None = None
) -> str:
    """The comparison in words: the verdict, then one line per architecture and fraction, how each
    target error was chosen, what the data efficiency is, and how much the seeds disagree.

    A target no better than always answering the majority class says nothing, so no time to it is quoted.
    """
    pct, secs = fmt_pct, fmt_secs
    trivial = lambda e: majority_error is not None and e >= majority_error - 0.005  # noqa: E731
    sentences, gaps, ratios = [], [], []
    for arch in dict.fromkeys(row["arch"] for row in table):
        rows = {(r["fraction"], r["arm"]): r for r in table if r["arch"] == arch}
        for f in sorted({f for f, _ in rows}):
            p, s = rows.get((f, "pretrained")), rows.get((f, "scratch"))
            if not (p and s):
                continue
            gaps.append((p["n_train"], s["final_error"] - p["final_error"]))
            text = (
                f"With {100 * f:g}% of the training patients (n={p['n_train']} images) pretrained {arch} ends "
                f"at {pct(p['final_error'])} validation error after {secs(p['train_s'])}; from scratch it ends "
                f"at {pct(s['final_error'])} after {secs(s['train_s'])}"
            )
            tp, ts, target = p["time_to_target_s"], s["time_to_target_s"], p["target_error"]
            if trivial(s["best_error"]):
                text += f" and never beats always answering the majority class ({pct(majority_error)} error)"
            elif ts is None and tp is not None:
                text += f", never reaching {pct(target)}, which pretrained reaches in {secs(tp)}"
            elif tp is not None and ts is not None and not trivial(target):
                ratios.append(ts / tp)
                text += f"; to reach {pct(target)} pretrained needs {secs(tp)}, scratch {secs(ts)} ({ts / tp:.1f}x)"
            if s["budget_s"] < s["train_s"]:
                within = s["error_at_budget"]
                text += f"; within pretrained's {secs(s['budget_s'])} scratch has " + (
                    "not finished one epoch" if within is None else f"reached {pct(within)}"
                )
            sentences.append(text + ".")
        sentences += data_efficiency(arch, rows)
    if not gaps:
        return "No pretrained/scratch pair has finished yet: nothing to compare."
    pays = [g for g in gaps if g[1] > 0.005]
    loses = [g for g in gaps if g[1] < -0.005]
    verdict = (
        f"Pretraining gives a lower final error at {len(pays)} of {len(gaps)} training-set sizes"
        + (f" (by {100 * min(g[1] for g in pays):.1f} to {100 * max(g[1] for g in pays):.1f} points)" if pays else "")
        + (f"; scratch is lower at n={', '.join(str(g[0]) for g in loses)} images" if loses else "")
        + (
            f"; scratch needs {min(ratios):.1f}x to {max(ratios):.1f}x pretrained's wall time to reach the same error"
            if ratios
            else ""
        )
        + "."
    )
    lines = [verdict, *(f"- {t}" for t in sentences)]
    if target_rules:
        lines.append(
            "Target errors for the time to target: "
            + "; ".join(f"with {100 * f:g}% of the data, {rule}" for f, rule in sorted(target_rules.items()))
            + "."
        )
    spread = [r["final_error_sd"] for r in table if r["seeds"] > 1]
    if spread:
        lines.append(
            f"Seeds: {min(r['seeds'] for r in table)} to {max(r['seeds'] for r in table)} per cell; the final "
            f"error's standard deviation between seeds is at most {100 * max(spread):.1f} points, so smaller "
            "gaps are noise."
        )
    else:
        lines.append("One seed per cell: no spread is measured, so small gaps may be noise (use --seeds 3).")
    if majority_error is not None:
        lines.append(f"Chance level: always answering the majority class gives {pct(majority_error)} error.")
    return "\n".join(lines)


def data_efficiency(arch: str, rows: dict[tuple[float, str], dict]) -> list[str]:
    """How few images pretrained needs to match scratch at its largest training set, if it does."""
    scratch = sorted((f, r) for (f, arm), r in rows.items() if arm == "scratch")
    if not scratch:
        return []
    s = scratch[-1][1]
    matching = sorted(
        (f, r) for (f, arm), r in rows.items() if arm == "pretrained" and r["final_error"] <= s["final_error"]
    )
    if not matching or matching[0][1]["n_train"] >= s["n_train"]:
        return []
    p = matching[0][1]
    return [
        f"Data efficiency: pretrained {arch} with n={p['n_train']} images ({fmt_pct(p['final_error'])}) already "
        f"matches scratch with n={s['n_train']} ({fmt_pct(s['final_error'])}), "
        f"{s['n_train'] / p['n_train']:.0f}x fewer images."
    ]
