"""Does transfer learning pay? The same network pretrained and from scratch, on identical data.

One patient-level validation split is fixed. For each seed the training patients of every class
are shuffled once and the first fraction f of them is taken, so subsets are stratified, nested
(2% inside 5% inside 10%...) and the same for every arm. Each subset becomes a folder of symlinks
(``train/`` and ``val/``) that ``pneumo.train`` reads as any user's folder, with the validation
folder used as it is: every run is judged on the same images. Each finished run is saved as one
JSON record, so a killed comparison resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from pneumo.data.folders import Sample, discover, make_split
from pneumo.errors import DataError, PneumoError
from pneumo.io_utils import atomic_write_json

SPLIT_SEED = 42            # the one validation split every run shares
MIN_STEPS_PER_EPOCH = 8    # small subsets get smaller batches, so 8 epochs never mean 8 steps
ARMS = {"pretrained": "imagenet", "scratch": "none"}  # arm -> pneumo.train's ``pretrained``


@dataclass(frozen=True)
class RunSpec:
    arch: str
    arm: str  # "pretrained" or "scratch"
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.arm}-f{self.fraction:g}-s{self.seed}"


# ---------------------------------------------------------------------------------------------
# data: one split, nested stratified patient subsets, folders of symlinks
# ---------------------------------------------------------------------------------------------
def patients_by_class(samples: Sequence[Sample]) -> dict[int, list[str]]:
    """Sorted patient ids per class, a patient's class being that of most of their images."""
    labels: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        labels[s.patient].append(s.label)
    out: dict[int, list[str]] = defaultdict(list)
    for pid in sorted(labels):
        out[Counter(labels[pid]).most_common(1)[0][0]].append(pid)
    return dict(out)


def patient_subset(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """Every image of a seeded fraction of each class's patients (at least one patient per class).

    One shuffle per (seed, class) and a prefix of it, so a larger fraction contains a smaller one.
    """
    if not 0 < fraction <= 1:
        raise PneumoError(f"fractions must lie in (0, 1], got {fraction}")
    chosen: set[str] = set()
    for label, pids in sorted(patients_by_class(samples).items()):
        order = list(pids)
        random.Random(f"{seed}-{label}").shuffle(order)
        chosen.update(order[:max(1, math.ceil(fraction * len(order) - 1e-9))])
    return [s for s in samples if s.patient in chosen]


def digest(paths: Sequence[str | Path]) -> str:
    """Order-free digest of the source images (symlinks resolved): equal digests, same images."""
    names = sorted(str(Path(p).resolve()) for p in paths)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def materialise(folder: Path, classes: Sequence[str], train: Sequence[Sample], valid: Sequence[Sample]) -> Path:
    """``folder/{train,val}/<CLASS>/<file>`` as symlinks; built aside and renamed, reused if unchanged."""
    manifest = {"train": digest([s.path for s in train]), "valid": digest([s.path for s in valid])}
    if (folder / "manifest.json").exists() and json.loads((folder / "manifest.json").read_text()) == manifest:
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, samples in (("train", train), ("val", valid)):
        for i, s in enumerate(samples):
            target = tmp / split / classes[s.label]
            target.mkdir(parents=True, exist_ok=True)
            link = target / Path(s.path).name
            if link.is_symlink():  # the same name from two source folders
                link = target / f"{i}-{Path(s.path).name}"
            link.symlink_to(Path(s.path).resolve())
    atomic_write_json(tmp / "manifest.json", manifest)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def warm_decode_cache(folder: Path, image_size: int) -> float:
    """Decode a subset once before any arm is timed, so no arm pays (or skips) JPEG decoding alone."""
    from pneumo.data.cache import decode_images

    t0 = time.perf_counter()
    ds = discover(folder)
    decode_images([s.path for s in ds.split("train") + ds.split("valid")], image_size, progress=False)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
def batch_size_for(n_train: int, largest: int = 64) -> int:
    return max(2, min(largest, n_train // MIN_STEPS_PER_EPOCH))


def run_one(spec: RunSpec, subset_dir: Path, run_dir: Path, *, epochs: int, image_size: int,
            weights: str | None, device: str, batch_size: int) -> dict:
    """Train one arm on one subset; wall time split into setup, epochs and end-of-run evaluation."""
    from pneumo.train.loop import train

    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway restarts: its clock would be wrong
    pretrained = ARMS[spec.arm]
    wall0, t0 = time.time(), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # train's epoch table must not corrupt --json output
        result = train(subset_dir, out=str(run_dir), arch=spec.arch, pretrained=pretrained,
                       weights=weights if pretrained == "imagenet" else None, epochs=epochs,
                       image_size=image_size, keep_val=True, seed=spec.seed, device=device,
                       batch_size=batch_size, progress=False)
    total = time.perf_counter() - t0
    epoch_sum = sum(row["time"] for row in result.history)
    if all("elapsed" in row for row in result.history):  # seconds since train() began, if train records it
        last_epoch_end = result.history[-1]["elapsed"]
    else:  # metrics.csv is rewritten at each epoch end, so its time stamp says when the last epoch ended
        last_epoch_end = min(max((run_dir / "metrics.csv").stat().st_mtime - wall0, epoch_sum), total)
    setup = last_epoch_end - epoch_sum
    history, clock = [], setup
    for row in result.history:
        clock += row["time"]
        history.append({**row, "wall_s": round(clock, 2)})
    split = json.loads((run_dir / "split.json").read_text())
    errors = [row["error_rate"] for row in history]
    return {
        "name": spec.name, "arch": spec.arch, "arm": spec.arm, "pretrained": pretrained,
        "fraction": spec.fraction, "seed": spec.seed, "image_size": image_size, "epochs": epochs,
        "batch_size": batch_size, "phase": history[-1]["phase"], "device": device,
        "n_train": len(split["train"]), "n_valid": len(split["valid"]),
        "n_train_per_class": dict(Counter(Path(p).parent.name for p in split["train"])),
        "n_valid_per_class": dict(Counter(Path(p).parent.name for p in split["valid"])),
        "train_fingerprint": digest(split["train"]), "valid_fingerprint": digest(split["valid"]),
        "history": history, "setup_s": round(setup, 2), "finish_s": round(total - last_epoch_end, 2),
        "total_s": round(total, 2), "train_s": round(last_epoch_end, 2),
        "final_error": errors[-1], "best_error": min(errors),
        "roc_auc": result.evaluation.get("metrics", {}).get("roc_auc"), "run_dir": str(run_dir),
    }


def prune_run(run_dir: Path) -> None:
    """Drop checkpoints and the exported model (tens of MB per run); figures and CSVs stay."""
    for name in ("checkpoints", "model"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def plan_runs(archs: Sequence[str], fractions: Sequence[float], seeds: int) -> list[RunSpec]:
    """Seed by seed, so a comparison stopped early still holds complete seeds."""
    return [RunSpec(a, arm, f, s) for s in range(seeds) for f in sorted(fractions) for a in archs for arm in ARMS]


def run_compare(data: str | Path, archs: Sequence[str] = ("efficientnet_lite0",),
                fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0), seeds: int = 3,
                epochs: int = 8, out: str | Path = "runs/compare", target_error: float | None = None,
                weights: str | None = None, image_size: int = 224, device: str = "auto",
                progress: bool = True, keep_models: bool = False, max_batch_size: int = 64) -> dict:
    """Train every (arch, pretrained|scratch, fraction, seed); return the answer, table and records.

    Runs whose record is in ``OUT/runs/<name>.json`` are not trained again.
    """
    from pneumo.nets.models import get_backbone
    from pneumo.train.loop import resolve_device

    archs, fractions = list(dict.fromkeys(archs)), sorted({float(f) for f in fractions})
    for arch in archs:
        get_backbone(arch)  # an unknown name fails now, not after an hour of training
    if not archs or not fractions or seeds < 1 or epochs < 1:
        raise PneumoError("compare needs at least one arch, one fraction, one seed and one epoch")
    if any(not 0 < f <= 1 for f in fractions):
        raise PneumoError(f"--fractions must lie in (0, 1], got {fractions}")
    if target_error is not None and not 0 < target_error < 1:
        raise PneumoError(f"--target-error is a rate in (0, 1) such as 0.08, not {target_error}")
    device_name = str(resolve_device(device))
    out = Path(out)
    dataset = discover(data)
    if len(dataset.classes) < 2:
        raise DataError(f"{data}: compare needs at least two classes, found {dataset.classes}")
    split = make_split(dataset, None, "patient", SPLIT_SEED)

    records: list[dict] = []
    specs = plan_runs(archs, fractions, seeds)
    skipped = 0
    warmed: set[Path] = set()
    bar = tqdm(specs, desc="compare", unit="run", disable=not progress)
    for spec in bar:
        record_file = out / "runs" / f"{spec.name}.json"
        if record_file.exists():
            records.append(load_record(record_file, image_size=image_size, epochs=epochs))
            skipped += 1
            continue
        bar.set_postfix_str(spec.name)
        subset = patient_subset(split.train, spec.fraction, spec.seed)
        folder = materialise(out / "subsets" / f"f{spec.fraction:g}-s{spec.seed}", dataset.classes,
                             subset, split.valid)
        decode_s = warm_decode_cache(folder, image_size) if folder not in warmed else 0.0
        warmed.add(folder)
        record = run_one(spec, folder, out / "train" / spec.name, epochs=epochs, image_size=image_size,
                         weights=weights, device=device_name, batch_size=batch_size_for(len(subset), max_batch_size))
        record.update(n_train_patients=len({s.patient for s in subset}), decode_s=round(decode_s, 2),
                      torch_threads=_torch_threads(), load_avg=round(os.getloadavg()[0], 2))
        atomic_write_json(record_file, record)
        if not keep_models:
            prune_run(Path(record["run_dir"]))
        records.append(record)
    bar.close()
    check_identical_validation(records)

    summary = summarise(records, target_error)
    design = {"data": str(data), "archs": archs, "fractions": fractions, "seeds": seeds, "epochs": epochs,
              "image_size": image_size, "device": device_name, "split_seed": SPLIT_SEED,
              "n_train_pool": len(split.train), "n_valid": len(split.valid),
              "n_valid_per_class": dict(Counter(dataset.classes[s.label] for s in split.valid)),
              "min_steps_per_epoch": MIN_STEPS_PER_EPOCH, "max_batch_size": max_batch_size,
              "skipped_existing": skipped}
    from pneumo.compare.plots import write_outputs  # matplotlib loads only once there is something to draw
    paths = write_outputs(out, records, summary, design)
    return {"answer": summary["answer"], "report": str(paths["report"]), "csv": str(paths["csv"]),
            "table": summary["table"], "target_error": summary["targets"],
            "plots": {k: str(v) for k, v in paths.items() if k not in ("report", "csv")},
            "design": design, "runs": records}


def load_record(path: Path, **expected: int) -> dict:
    """A finished run's record, refused when it was made with other settings than this comparison's."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PneumoError(f"{path}: unreadable run record ({exc}); delete it to train that run again") from None
    differ = {k: record.get(k) for k, v in expected.items() if record.get(k) != v}
    if differ:
        raise PneumoError(f"{path} was made with {differ}, not {expected}: choose another --out for "
                          f"these settings, or delete OUT/runs to start afresh")
    return record


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def check_identical_validation(records: Sequence[dict]) -> None:
    """Every run must have been judged on the same images, or the comparison means nothing."""
    prints = {r["valid_fingerprint"] for r in records}
    if len(prints) > 1:
        raise PneumoError(f"these runs were validated on {len(prints)} different image sets; remove the "
                          f"records in OUT/runs made from other data or another split and run compare again")


# ---------------------------------------------------------------------------------------------
# summary: time to a target error, error within a budget, the answer in words
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


def summarise(records: Sequence[dict], target_error: float | None = None) -> dict:
    """One table row per (fraction, arch, arm), the target error per fraction, and the answer.

    With no ``target_error``, a fraction's target is the highest best error of any of its runs
    (rounded up to 0.1 point): a level every run reaches, so the times compare like with like.
    The budget is the mean training time of the cheapest method at that fraction.
    """
    methods = by_method(records)
    fractions = sorted({r["fraction"] for r in records})
    targets, budgets = {}, {}
    for f in fractions:
        cells = [runs[f] for runs in methods.values() if f in runs]
        worst_best = max(r["best_error"] for rs in cells for r in rs)
        targets[f] = target_error if target_error is not None else math.ceil(worst_best * 1000 - 1e-6) / 1000
        budgets[f] = min(np.mean([r["train_s"] for r in rs]) for rs in cells)
    table = []
    for f in fractions:
        for (arch, arm), runs in methods.items():
            rs = runs.get(f)
            if not rs:
                continue
            reached = [time_to(r, targets[f]) for r in rs]
            hit = [(t, e) for t, e in reached if t is not None]
            finals = [r["final_error"] for r in rs]
            table.append({
                "fraction": f, "n_train": round(float(np.mean([r["n_train"] for r in rs]))), "arch": arch,
                "arm": arm, "seeds": len(rs), "final_error": float(np.mean(finals)),
                "final_error_sd": float(np.std(finals, ddof=1)) if len(rs) > 1 else 0.0,
                "best_error": float(np.mean([r["best_error"] for r in rs])),
                "roc_auc": _mean([r.get("roc_auc") for r in rs]),
                "train_s": float(np.mean([r["train_s"] for r in rs])), "target_error": targets[f],
                "reached": f"{len(hit)}/{len(rs)}",
                "time_to_target_s": float(np.median([t for t, _ in hit])) if hit else None,
                "epochs_to_target": float(np.median([e for _, e in hit])) if hit else None,
                "budget_s": budgets[f], "error_at_budget": _mean([error_within(r, budgets[f]) for r in rs]),
            })
    counts = records[0].get("n_valid_per_class") or {}
    majority = 1 - max(counts.values()) / sum(counts.values()) if counts else None
    return {"table": table, "targets": targets, "majority_error": majority, "answer": answer(table, majority)}


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_secs(x: float | None) -> str:
    return "not reached" if x is None else (f"{x:.0f} s" if x >= 10 else f"{x:.1f} s")


def answer(table: Sequence[dict], majority_error: float | None = None) -> str:
    """The comparison in words, pretrained against scratch for each architecture and fraction.

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
            text = (f"With {100 * f:g}% of the training patients (n={p['n_train']} images) pretrained {arch} ends "
                    f"at {pct(p['final_error'])} validation error after {secs(p['train_s'])}; from scratch it ends "
                    f"at {pct(s['final_error'])} after {secs(s['train_s'])}")
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
                text += (f"; within pretrained's {secs(s['budget_s'])} scratch has "
                         + ("not finished one epoch" if within is None else f"reached {pct(within)}"))
            sentences.append(text + ".")
        sentences += data_efficiency(arch, rows)
    if not gaps:
        return "No pretrained/scratch pair has finished yet: nothing to compare."
    pays = [g for g in gaps if g[1] > 0.005]
    loses = [g for g in gaps if g[1] < -0.005]
    verdict = (f"Pretraining gives a lower final error at {len(pays)} of {len(gaps)} training-set sizes"
               + (f" (by {100 * min(g[1] for g in pays):.1f} to {100 * max(g[1] for g in pays):.1f} points)"
                  if pays else "")
               + (f"; scratch is lower at n={', '.join(str(g[0]) for g in loses)} images" if loses else "")
               + (f"; scratch needs {min(ratios):.1f}x to {max(ratios):.1f}x pretrained's wall time to reach "
                  f"the same error" if ratios else "") + ".")
    return verdict + " " + " ".join(sentences)


def data_efficiency(arch: str, rows: dict[tuple[float, str], dict]) -> list[str]:
    """How few images pretrained needs to match scratch at its largest training set, if it does."""
    scratch = sorted((f, r) for (f, arm), r in rows.items() if arm == "scratch")
    if not scratch:
        return []
    s = scratch[-1][1]
    matching = sorted((f, r) for (f, arm), r in rows.items()
                      if arm == "pretrained" and r["final_error"] <= s["final_error"])
    if not matching or matching[0][1]["n_train"] >= s["n_train"]:
        return []
    p = matching[0][1]
    return [f"Data efficiency: pretrained {arch} with n={p['n_train']} images ({fmt_pct(p['final_error'])}) already "
            f"matches scratch with n={s['n_train']} ({fmt_pct(s['final_error'])}), "
            f"{s['n_train'] / p['n_train']:.0f}x fewer images."]
