"""Issue 5: choose a training recipe by measurement, never on the split it is reported on.

The 224 px training split is cut by patient into a *selection* part and a *report* part (20%,
seed 7). Every candidate recipe trains on the selection part with an inner patient-level validation
split (seed 11) and is ranked there; only the winner (and the default, for reference) is then
evaluated once on the untouched report patients, with the best single model when an ensemble wins.
Prints JSON and writes OUT/recipe.json + recipe.md.
    python bench/recipe_experiments.py --out bench/experiments [--candidates base,balanced,...]

Since issue 15 every candidate is also measured under shift (``bench/shift.py`` on its inner
validation films) and ranked by the robust rule (``robust_key``), written before those runs: in-distribution
validation alone chose a model that was worse outside than its own member.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, write_report
from outside import OUTSIDE_DEV  # bench/outside.py, beside this script
from outside import parse_args as outside_args
from outside import run as run_outside
from pneumo import train
from pneumo.data.folders import KERMANY_TEST_PREVALENCE as TEST_SPLIT_POSITIVE_FRACTION
from pneumo.data.folders import discover, split_by_patient
from pneumo.infer.ensemble import make_ensemble
from pneumo.infer.predict import evaluate_model_on_folder
from shift import parse_args as shift_args  # bench/shift.py, beside this script
from shift import run as run_shift

# Every candidate states the options that define it, so a record keeps its meaning when pneumo's
# defaults change (they did: "balanced_stages2_views2" won and became the default).
TUTORIAL = {"class_balance": "none", "trainable_stages": 0, "feature_views": 1}  # body frozen, plain loss
BALANCED = {**TUTORIAL, "class_balance": "weights"}  # loss weights vs 3:1
# pneumo train's defaults today (the winner "stages2_views2_bnbs8"), spelt out
DEFAULT = {**BALANCED, "trainable_stages": 2, "feature_views": 2, "bn_adapt_batch_size": 8}

CANDIDATES: dict[str, dict] = {
    "base": TUTORIAL,
    "no_bn_adapt": {**TUTORIAL, "bn_adapt_images": 0},  # keep ImageNet BatchNorm statistics
    "balanced": BALANCED,
    "views4": {**TUTORIAL, "feature_views": 4},  # 3 augmented copies of every train image
    "balanced_views4": {**BALANCED, "feature_views": 4},
    "lite1": {**TUTORIAL, "arch": "efficientnet_lite1"},
    "lite2": {**TUTORIAL, "arch": "efficientnet_lite2"},
    "lite2_balanced": {**BALANCED, "arch": "efficientnet_lite2"},
    "finetune2": {**BALANCED, "unfreeze_epochs": 2},  # whole network, 2 more epochs (GPU-sized)
    # the body's last stages train with the head on cached maps (1: the 1x1 head convolution,
    # 2: and the last MBConv stage)
    "balanced_stages1": {**BALANCED, "trainable_stages": 1},
    "balanced_stages2": {**BALANCED, "trainable_stages": 2},
    "balanced_stages2_views2": {**BALANCED, "trainable_stages": 2, "feature_views": 2},
    "lite2_balanced_stages2": {**BALANCED, "arch": "efficientnet_lite2", "trainable_stages": 2},
    # speed (issue 4): the BatchNorm pass in batches of 8 (32 above) runs 1.7x faster on this CPU;
    # kept only if accuracy holds
    "stages2_views2_bnbs8": {**BALANCED, "trainable_stages": 2, "feature_views": 2, "bn_adapt_batch_size": 8},
    "stages2_views2_bnbs8_512": {
        **BALANCED,
        "trainable_stages": 2,
        "feature_views": 2,
        "bn_adapt_batch_size": 8,
        "bn_adapt_images": 512,
    },
    # issue 14: fine-tuning with discriminative LR groups cut between body stages (stem + 4 MBConv
    # stages | 3 stages + head conv | head), 2 unfrozen epochs after the default recipe
    "default_unfreeze2": {
        **BALANCED,
        "trainable_stages": 2,
        "feature_views": 2,
        "bn_adapt_batch_size": 8,
        "unfreeze_epochs": 2,
    },
    "lite2_stages2_bnbs8": {**BALANCED, "arch": "efficientnet_lite2", "trainable_stages": 2, "bn_adapt_batch_size": 8},
    # "generalise to films pneumo has never seen" (deliverable 2): the default recipe with the
    # "radiograph" augmentation policy (random resized crops, gamma, contrast, blur or sharpening,
    # noise, JPEG quality) on its augmented cached views; then with three augmented views, not one
    "radiograph_views2": {**DEFAULT, "augment_policy": "radiograph"},
    "radiograph_views4": {**DEFAULT, "augment_policy": "radiograph", "feature_views": 4},
    # and the reference ensemble's second member with the same augmentation (its ensemble below)
    "lite2_radiograph": {**DEFAULT, "arch": "efficientnet_lite2", "augment_policy": "radiograph"},
    # issue 26, ranked by the outside rule below: deeper into the body on cached maps (the last four
    # stages: blocks 5, 6 of lite0's MBConv stages and the head convolution train with the head)
    "radiograph_stages4": {**DEFAULT, "augment_policy": "radiograph", "trainable_stages": 4},
    "lite1_radiograph": {**DEFAULT, "arch": "efficientnet_lite1", "augment_policy": "radiograph"},
}


HEADER = """# Recipe experiments (issue 5)

Written by `bench/recipe_experiments.py`. Selection part: patient-level 80% of
`chest_xray_224/train` (seed 7), itself split by patient into train / inner validation (seed 11);
report part: the other 20% of patients, read only at the end, by the winner, the best single
recipe and the tutorial's. Rule, fixed before running: max balanced accuracy (the mean of
sensitivity and specificity at the stored threshold, which no class balance changes), then AUC;
"reweighted acc" is the accuracy those give at the official test split's 390:234 balance. Wall
seconds on the 2-core CPU ("base" ran on a loaded machine).
Candidates whose options do not name `bn_adapt_batch_size` ran with 32, the default until
2026-11-28 (8 since). Report-split rows of earlier winners stay on record, so the split has been
read by each winner in turn; the rule picked every one of them on the selection split alone.
`stages2_views2_bnbs8` ran twice (same seed; 0.9803 balanced accuracy the first time): its
record and report row are from the second run, a member of the bnbs8 ensemble.

`default_unfreeze2` (2026-11-29) is the default recipe followed by 2 epochs of fine-tuning the whole
network, after `--unfreeze`'s discriminative LR groups were fixed to cut the body between stages
(lr/100 for the stem and first four MBConv stages, lr/10 for the last three and the head convolution,
lr for the head; before, the lr/100 group held almost the whole body): balanced accuracy 0.9758 against
0.9787 without fine-tuning, AUC 0.9946 against 0.9967, at 4.5x the wall time (1,511 s on a loaded
CPU). Fine-tuning does not pay on this split, so `pneumo train` keeps `--unfreeze-epochs 0`.

**Issue 15 (2026-11-29): the robust rule.** The outside test split showed that this rule, fed by
validation films like the training films, picked a model that was worse outside than its own member.
From issue 15 on, each candidate also meets 300 of its inner validation films under 13 shifts
(`bench/shift.py`: gamma, contrast, brightness, blur, sharpening, noise, JPEG quality), and the rule,
written before these runs, is: **0.5 x clean balanced accuracy + 0.5 x mean balanced accuracy over the
shifted conditions, then clean AUC**. The radiograph augmentation draws from the same families at
other strengths, so the winner is also checked on the report split under shift and on the 16
full-resolution originals (a shift no candidate trains on). Candidates measured before issue 15 have
no shift figures and are not ranked by this rule.

"""

# The robust rule (issue 15), fixed before its runs. Each candidate's model meets SHIFT_FILMS of its
# inner validation films (stratified by class, seed 0) under every shift below, at its stored threshold.
# Score: half the clean balanced accuracy on all inner validation films plus half the mean balanced
# accuracy over these shifted conditions; ties by clean AUC. The shifts are those of bench/shift.py
# that change a 224 px Kaggle copy at all (PNG, JPEG 75 and resampling at 224 px leave it as it is).
# The radiograph augmentation draws from the same families, at other strengths: a candidate trained on
# them is measured on its own medicine, so the report split and the full-resolution originals (a shift
# no candidate trains on) are checked after the choice.
SELECTION_SHIFTS = (
    "gamma_0.6,gamma_1.6,contrast_0.7,contrast_1.3,brightness_-0.1,brightness_+0.1,"
    "blur_1,blur_2,sharpen,noise_0.02,noise_0.05,jpeg_50,jpeg_90"
)
SHIFT_FILMS = 300
ROBUST_RULE = (
    f"max 0.5 x clean balanced accuracy + 0.5 x mean balanced accuracy over {len(SELECTION_SHIFTS.split(','))} "
    f"shifts ({SELECTION_SHIFTS}) on {SHIFT_FILMS} inner validation films, each at the stored threshold; then clean AUC"
)


# Issue 26's rule, written 2026-12-07 before any of its runs. The robust rule above predicted outside
# specificity badly (0.935 under synthetic shift, 0.662 on the official test split), so candidates are
# now measured on outside_dev (bench/outside.py: 317 films, a patient-level half of the official test
# split; the other half is withheld) and ranked by it. Every candidate's outside-dev row stays on record.
# Rank: (1) no more than OUTSIDE_MAX_FLIPS of decisions flipped by a JPEG quality-90 re-encode (a
# candidate over it ranks below every one within it); (2) the plain reading's outside-dev AUC, rounded
# to 0.005 (its patient-bootstrap 95% interval is about +-0.02 wide: closer AUCs are a tie); (3) the
# plain reading's outside-dev balanced accuracy at the model's own validation-chosen threshold; (4) the
# adapted reading's balanced accuracy. Outside-dev figures are never called "test".
OUTSIDE_MAX_FLIPS = 0.03
OUTSIDE_RULE = (
    f"JPEG-90 flip rate <= {OUTSIDE_MAX_FLIPS:.0%} first; then max outside-dev AUC (plain, rounded to 0.005); "
    "then outside-dev balanced accuracy at the stored threshold (plain); then the adapted reading's"
)


def outside_key(outside: dict) -> tuple:
    """The issue-26 rule over a bench/outside.py result (see OUTSIDE_RULE)."""
    plain, adapted = outside["plain"]["metrics"], outside.get("adapted", {}).get("metrics", {})
    flips = outside.get("consistency", {}).get("jpeg90", {}).get("flip_rate")
    within = flips is None or flips <= OUTSIDE_MAX_FLIPS
    return (
        within,
        round(round(plain["roc_auc"] / 0.005) * 0.005, 3),
        plain["balanced_accuracy"],
        adapted.get("balanced_accuracy") or 0.0,
    )


def measure_outside(model_dir: str | Path, films: Path) -> dict:
    """bench/outside.py on outside_dev: plain, adapted and the consistency table."""
    return run_outside(outside_args([str(model_dir), "--films", str(films)]))


def measure_shift(model_dir: str | Path, out: Path, films: Path | None = None) -> dict:
    """bench/shift.py on the model's held-out films (or ``films``): per shift figures and their summary."""
    argv = [str(model_dir), "--out", str(out), "--limit", str(SHIFT_FILMS), "--shifts", SELECTION_SHIFTS]
    argv += ["--no-progress"] + (["--films", str(films), "--fullres", "auto"] if films else ["--fullres", "none"])
    args = shift_args(argv)
    done = out / "shift.json"  # a rerun with --workdir reuses a measurement of the same model and films
    same = done.exists() and json.loads(done.read_text()).get("model") == str(model_dir)
    report = json.loads(done.read_text()) if same and not films else run_shift(args)
    rows = report["shifts"]
    bal = [r["metrics"]["balanced_accuracy"] for r in rows.values()]
    spec = [r["metrics"]["specificity"] for r in rows.values()]
    return {
        "films": report["films"]["n"],
        "clean": report["clean"]["metrics"],
        "mean_balanced_accuracy": round(sum(bal) / len(bal), 4),
        "mean_specificity": round(sum(spec) / len(spec), 4),
        "worst_specificity": min(spec),
        "mean_sensitivity": round(sum(r["metrics"]["sensitivity"] for r in rows.values()) / len(rows), 4),
        "median_p95_abs_dp": sorted(r["consistency"]["p95_abs_dp"] for r in rows.values())[len(rows) // 2],
        "mean_flip_rate": round(sum(r["consistency"]["flip_rate"] for r in rows.values()) / len(rows), 4),
        "per_shift": {
            n: {k: r["metrics"][k] for k in ("sensitivity", "specificity", "balanced_accuracy", "auc")}
            | {"p95_abs_dp": r["consistency"]["p95_abs_dp"], "flip_rate": r["consistency"]["flip_rate"]}
            for n, r in rows.items()
        },
        "fullres": report.get("fullres"),
        "shift_dir": str(out),
    }


def robust_key(record: dict) -> tuple:
    """The issue-15 rule: clean and shifted balanced accuracy weighed alike, then clean AUC."""
    clean_bal, auc = record["rank_key"]
    return (round(0.5 * clean_bal + 0.5 * record["shift"]["mean_balanced_accuracy"], 6), auc)


# members' probabilities averaged (pneumo ensemble); the members must have run
ENSEMBLES: dict[str, list[str]] = {
    "ensemble_lite0_lite2": ["balanced_stages2_views2", "lite2_balanced_stages2"],
    "ensemble_lite0_lite2_bnbs8": ["stages2_views2_bnbs8", "lite2_stages2_bnbs8"],
    "ensemble_radiograph_lite0_lite2": ["radiograph_views2", "lite2_radiograph"],
}


def link_tree(root: Path, parts: dict[str, list], classes: list[str]) -> Path:
    for split, samples in parts.items():
        for s in samples:
            dest = root / split / classes[s.label] / s.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                os.symlink(s.path.resolve(), dest)
    return root


def rank_key(evaluation: dict) -> tuple:
    """Balanced accuracy at the stored threshold, then AUC: neither depends on the class balance."""
    m = evaluation["metrics"]
    return ((m["sensitivity"] + m["specificity"]) / 2, m["roc_auc"])


def summary(evaluation: dict) -> dict:
    m, r = evaluation["metrics"], evaluation.get("reweighted_to_test_balance") or {}
    keys = ("accuracy", "sensitivity", "specificity", "roc_auc")
    # accuracy at the test split's balance follows from sensitivity and specificity alone
    reweighted = r.get("accuracy") or (
        TEST_SPLIT_POSITIVE_FRACTION * m["sensitivity"] + (1 - TEST_SPLIT_POSITIVE_FRACTION) * m["specificity"]
    )
    return {
        "threshold": evaluation.get("threshold"),
        **{k: m.get(k) for k in keys},
        "reweighted_accuracy": reweighted,
        "ci": evaluation.get("ci"),
    }


def write_markdown(result: dict, path: Path) -> None:
    """recipe.md: the candidates on the selection split, then the report split, from recipe.json."""
    lines = [
        "| candidate | options | wall s | err (argmax) | AUC | sens | spec | rank: balanced acc | reweighted acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["candidates"].items():
        v = r["selection_valid"]
        lines.append(
            f"| {name}{' (winner)' if name == result['winner'] else ''} | `{json.dumps(r['options'])}` | "
            f"{r['wall_s']} | {r['valid_error_argmax']:.4f} | {v['roc_auc']:.4f} | {v['sensitivity']:.4f} | "
            f"{v['specificity']:.4f} | {r['rank_key'][0]:.4f} | {v['reweighted_accuracy']:.4f} |"
        )
    lines += [
        "",
        f"Report split ({result['n_report']} images of untouched patients), each model at its stored threshold, "
        "95% patient-bootstrap intervals:",
        "",
        "| model | threshold | accuracy | sensitivity | specificity | AUC | acc re-weighted 390:234 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["report_split"].items():
        cells = [
            f"{r[k]:.4f} ({r['ci'][k][0]:.3f}-{r['ci'][k][1]:.3f})"
            for k in ("accuracy", "sensitivity", "specificity", "roc_auc")
        ]
        lines.append(f"| {name} | {r['threshold']:.3f} | " + " | ".join(cells) + f" | {r['reweighted_accuracy']:.4f} |")
    robust = {n: r for n, r in result["candidates"].items() if "robust_key" in r}
    if robust:
        lines += ["", f"Issue 15, the robust rule ({result.get('robust_rule', '')}):", ""]
        lines += shift_table(robust, rank=True)
    if result.get("report_shift"):
        lines += ["", "The same shifts on the report split's films (untouched patients), after the choice:", ""]
        lines += shift_table(result["report_shift"], rank=False)
        fullres = {n: r["fullres"] for n, r in result["report_shift"].items() if r.get("fullres")}
        if fullres:
            lines += ["", "Full-resolution originals through pneumo's resize against their 224 px copies:", ""]
            lines += ["| model | flips vs copy | median abs dp vs copy |", "| --- | --- | --- |"]
            for name, f in fullres.items():
                vs_copy = f["summary"]["original"]["vs_copy_224"]
                if vs_copy:
                    lines.append(f"| {name} | {vs_copy['flip_rate']:.1%} | {vs_copy['median_abs_dp']:.3f} |")
    path.write_text(HEADER + "\n".join(lines) + "\n")


def shift_table(records: dict, rank: bool) -> list[str]:
    """One row per model: clean figures, the mean and worst under shift, consistency; and the score."""
    head = "| model | clean sens | clean spec | clean AUC | shifted: mean sens | mean spec | worst spec "
    head += "| mean bal acc | median p95 abs dp | mean flips |" + (" robust score |" if rank else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in records.items():
        s = r["shift"] if rank else r
        c = s["clean"]
        row = (
            f"| {name} | {c['sensitivity']:.3f} | {c['specificity']:.3f} | {c['auc']:.4f} | "
            f"{s['mean_sensitivity']:.3f} | {s['mean_specificity']:.3f} | {s['worst_specificity']:.3f} | "
            f"{s['mean_balanced_accuracy']:.4f} | {s['median_p95_abs_dp']:.3f} | {s['mean_flip_rate']:.1%} |"
        )
        lines.append(row + (f" {r['robust_key'][0]:.4f} |" if rank else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="bench/experiments")
    parser.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="the candidates to (re)run; those in OUT/recipe.json already are kept",
    )
    parser.add_argument("--workdir", default=None, help="run folders (default: a temp folder)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite OUT/recipe.md from OUT/recipe.json")
    parser.add_argument(
        "--no-shift", dest="shift", action="store_false", help="skip the shift benchmark (and so the robust rule)"
    )
    parser.add_argument(
        "--outside",
        nargs="?",
        const=str(OUTSIDE_DEV),
        default=None,
        help="also measure each candidate on these outside films (default outside_dev) and rank by OUTSIDE_RULE",
    )
    parser.add_argument(
        "--report-also",
        default="",
        type=lambda v: [n for n in v.split(",") if n],
        help="more records to check on the report split besides the winner, the best single recipe and base",
    )
    args = parser.parse_args()
    if args.markdown_only:
        write_markdown(json.loads((Path(args.out) / "recipe.json").read_text()), Path(args.out) / "recipe.md")
        return
    out, work = Path(args.out), Path(args.workdir or tempfile.mkdtemp(prefix="recipe-"))
    out.mkdir(parents=True, exist_ok=True)
    data = discover(args.data)
    pool = data.split("train")
    select, report = split_by_patient(pool, 0.2, seed=7)
    inner_train, inner_valid = split_by_patient(select, 0.2, seed=11)
    select_root = link_tree(work / "select", {"train": inner_train, "val": inner_valid}, data.classes)
    report_root = link_tree(work / "report", {"test": report}, data.classes)

    previous = out / "recipe.json"  # candidates measured before (same splits, same rule) are kept
    before = json.loads(previous.read_text()) if previous.exists() else {}
    records = before.get("candidates", {})
    for name in args.candidates.split(","):
        options = CANDIDATES[name]
        t0 = time.perf_counter()
        run_dir = work / "runs" / name
        done = run_dir / "record.json"  # a finished candidate in --workdir is not trained again
        if done.exists() and json.loads(done.read_text())["options"] == options:
            records[name] = json.loads(done.read_text())
            print(json.dumps({name: "reused " + str(done)}), flush=True)
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run = train(select_root, out=str(run_dir), progress=False, **options)
        records[name] = {
            "options": options,
            "wall_s": round(time.perf_counter() - t0, 1),
            "valid_error_argmax": run.history[-1]["error_rate"],
            "selection_valid": summary(run.evaluation),
            "model_dir": str(run.model_dir),
        }
        records[name]["rank_key"] = rank_key(run.evaluation)
        if args.shift:
            records[name]["shift"] = measure_shift(run.model_dir, work / "shift" / name)
            records[name]["robust_key"] = robust_key(records[name])
        if args.outside:
            records[name]["outside"] = measure_outside(run.model_dir, Path(args.outside))
            records[name]["outside_key"] = outside_key(records[name]["outside"])
        done.write_text(json.dumps(records[name]))
        print(json.dumps({name: records[name]}), flush=True)
    for name, members in ENSEMBLES.items():  # no training: the members' runs, averaged
        runs = [Path(records[m]["model_dir"]).parent for m in members if m in records]
        if len(runs) < len(members) or not all(r.exists() for r in runs):
            continue
        shutil.rmtree(work / "ensembles" / name, ignore_errors=True)
        ev = make_ensemble(runs, work / "ensembles" / name)
        records[name] = {
            "options": {"ensemble_of": members},
            "wall_s": sum(records[m]["wall_s"] for m in members),
            "valid_error_argmax": ev["metrics_at_0.5"]["error_rate"],
            "selection_valid": summary(ev),
            "model_dir": str(work / "ensembles" / name / "model"),
            "rank_key": rank_key(ev),
        }
        if args.shift:
            records[name]["shift"] = measure_shift(records[name]["model_dir"], work / "shift" / name)
            records[name]["robust_key"] = robust_key(records[name])
        if args.outside:
            records[name]["outside"] = measure_outside(records[name]["model_dir"], Path(args.outside))
            records[name]["outside_key"] = outside_key(records[name]["outside"])
        print(json.dumps({name: records[name]}), flush=True)
    # Since issue 15 the robust rule ranks the candidates measured under shift; the earlier rule
    # stays the key for the records made before it.
    robust = [n for n in records if "robust_key" in records[n]]
    key, pool = ("robust_key", robust) if args.shift and robust else ("rank_key", list(records))
    outside = [n for n in records if "outside_key" in records[n]]
    if args.outside and outside:  # issue 26: outside-dev decides among the candidates measured there
        key, pool = "outside_key", outside
    winner = max(pool, key=lambda n: tuple(records[n][key]))
    # the winner, the best single model (what `pneumo train` does by default) and the tutorial's recipe
    single = max((n for n in pool if n in CANDIDATES), key=lambda n: tuple(records[n][key]))
    reported = before.get("report_split", {})  # earlier checks stay on record
    report_shift = before.get("report_shift", {})
    for name in dict.fromkeys([winner, single, "base", *args.report_also]):
        if name in records and Path(records[name]["model_dir"]).exists():
            ev = evaluate_model_on_folder(records[name]["model_dir"], report_root, progress=False)
            reported[name] = summary(ev)
            if args.shift:
                report_shift[name] = measure_shift(
                    records[name]["model_dir"], work / "report_shift" / name, films=report_root / "test"
                )
    result = {
        "data": args.data,
        "n_select_train": len(inner_train),
        "n_select_valid": len(inner_valid),
        "n_report": len(report),
        "rule": "max balanced accuracy (mean of sensitivity and specificity), then AUC",
        "robust_rule": ROBUST_RULE,
        "outside_rule": OUTSIDE_RULE,
        "ranked_by": key,
        "candidates": records,
        "winner": winner,
        "report_split": reported,
        "report_shift": report_shift,
    }
    write_markdown(result, out / "recipe.md")
    write_report(result, out / "recipe.json")


if __name__ == "__main__":
    main()
