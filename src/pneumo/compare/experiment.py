"""Does transfer learning pay? The same network pretrained and from scratch, on identical data.

One patient-level validation split is fixed. For each seed the training patients of every class
are shuffled once and the first fraction f of them is taken, so subsets are stratified, nested
(2% inside 5% inside 10%...) and the same for every arm. Each subset becomes a folder of symlinks
(``train/`` and ``val/``) that ``pneumo.train`` reads as any user's folder, with the validation
folder used as it is: every run is judged on the same images. Each finished run is saved as one
JSON record, so a killed comparison resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pneumo.compare.plots import write_outputs
from pneumo.compare.summary import ARMS, summarise
from pneumo.config import checked
from pneumo.data.folders import Sample, discover, make_split
from pneumo.errors import DataError, PneumoError
from pneumo.io_utils import atomic_write_json

SPLIT_SEED = 42  # the one validation split every run shares
MIN_STEPS_PER_EPOCH = 8  # small subsets get smaller batches, so 8 epochs never mean 8 steps


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
        chosen.update(order[: max(1, math.ceil(fraction * len(order) - 1e-9))])
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


def run_one(
    spec: RunSpec,
    subset_dir: Path,
    run_dir: Path,
    *,
    epochs: int,
    image_size: int,
    weights: str | None,
    device: str,
    batch_size: int,
) -> dict:
    """Train one arm on one subset; wall time split into setup, epochs and end-of-run evaluation."""
    from pneumo.training.loop import train

    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway restarts: its clock would be wrong
    pretrained = ARMS[spec.arm]
    wall0, t0 = time.time(), time.perf_counter()
    result = train(
        subset_dir,
        out=str(run_dir),
        arch=spec.arch,
        pretrained=pretrained,
        weights=weights if pretrained == "imagenet" else None,
        epochs=epochs,
        image_size=image_size,
        keep_val=True,
        seed=spec.seed,
        device=device,
        batch_size=batch_size,
        progress=False,
        quiet=True,
    )  # no epoch table: --json owns stdout
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
        "name": spec.name,
        "arch": spec.arch,
        "arm": spec.arm,
        "pretrained": pretrained,
        "fraction": spec.fraction,
        "seed": spec.seed,
        "image_size": image_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "phase": history[-1]["phase"],
        "device": device,
        "n_train": len(split["train"]),
        "n_valid": len(split["valid"]),
        "n_train_per_class": dict(Counter(Path(p).parent.name for p in split["train"])),
        "n_valid_per_class": dict(Counter(Path(p).parent.name for p in split["valid"])),
        "train_fingerprint": digest(split["train"]),
        "valid_fingerprint": digest(split["valid"]),
        "history": history,
        "setup_s": round(setup, 2),
        "finish_s": round(total - last_epoch_end, 2),
        "total_s": round(total, 2),
        "train_s": round(last_epoch_end, 2),
        "final_error": errors[-1],
        "best_error": min(errors),
        "roc_auc": result.evaluation.get("metrics", {}).get("roc_auc"),
        "run_dir": str(run_dir),
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


def run_compare(
    data: str | Path,
    archs: Sequence[str] = ("efficientnet_lite0",),
    fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    seeds: int = 3,
    epochs: int = 8,
    out: str | Path = "runs/compare",
    target_error: float | None = None,
    weights: str | None = None,
    image_size: int = 224,
    device: str = "auto",
    progress: bool = True,
    keep_models: bool = False,
    max_batch_size: int = 64,
) -> dict:
    """Train every (arch, pretrained|scratch, fraction, seed); return the answer, table and records.

    Runs whose record is in ``OUT/runs/<name>.json`` are not trained again.
    """
    from pneumo.nets.models import get_backbone
    from pneumo.training.setup import resolve_device

    archs, fractions = list(dict.fromkeys(archs)), sorted({float(f) for f in fractions})
    for arch in archs:
        get_backbone(arch)  # an unknown name fails now, not after an hour of training
    if not archs or not fractions or seeds < 1 or epochs < 1:
        raise PneumoError("compare needs at least one arch, one fraction, one seed and one epoch")
    if any(not 0 < f <= 1 for f in fractions):
        raise PneumoError(f"--fractions must lie in (0, 1], got {fractions}")
    if target_error is not None and not 0 < target_error < 1:
        raise PneumoError(f"--target-error is a rate in (0, 1) such as 0.08, not {target_error}")
    image_size, device = checked("image_size", image_size), checked("device", device)  # as `pneumo train` checks them
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
        folder = materialise(out / "subsets" / f"f{spec.fraction:g}-s{spec.seed}", dataset.classes, subset, split.valid)
        decode_s = warm_decode_cache(folder, image_size) if folder not in warmed else 0.0
        warmed.add(folder)
        record = run_one(
            spec,
            folder,
            out / "train" / spec.name,
            epochs=epochs,
            image_size=image_size,
            weights=weights,
            device=device_name,
            batch_size=batch_size_for(len(subset), max_batch_size),
        )
        record.update(
            n_train_patients=len({s.patient for s in subset}),
            decode_s=round(decode_s, 2),
            torch_threads=_torch_threads(),
            load_avg=round(os.getloadavg()[0], 2),
        )
        atomic_write_json(record_file, record)
        if not keep_models:
            prune_run(Path(record["run_dir"]))
        records.append(record)
    bar.close()
    check_identical_validation(records)

    summary = summarise(records, target_error)
    design = {
        "data": str(data),
        "archs": archs,
        "fractions": fractions,
        "seeds": seeds,
        "epochs": epochs,
        "image_size": image_size,
        "device": device_name,
        "split_seed": SPLIT_SEED,
        "n_train_pool": len(split.train),
        "n_valid": len(split.valid),
        "n_valid_per_class": dict(Counter(dataset.classes[s.label] for s in split.valid)),
        "min_steps_per_epoch": MIN_STEPS_PER_EPOCH,
        "max_batch_size": max_batch_size,
        "skipped_existing": skipped,
    }
    paths = write_outputs(out, records, summary, design)
    return {
        "answer": summary["answer"],
        "report": str(paths["report"]),
        "csv": str(paths["csv"]),
        "table": summary["table"],
        "target_error": summary["targets"],
        "plots": {k: str(v) for k, v in paths.items() if k not in ("report", "csv")},
        "design": design,
        "runs": records,
    }


def load_record(path: Path, **expected: int) -> dict:
    """A finished run's record, refused when it was made with other settings than this comparison's."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PneumoError(f"{path}: unreadable run record ({exc}); delete it to train that run again") from None
    differ = {k: record.get(k) for k, v in expected.items() if record.get(k) != v}
    if differ:
        raise PneumoError(
            f"{path} was made with {differ}, not {expected}: choose another --out for "
            f"these settings, or delete OUT/runs to start afresh"
        )
    return record


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def check_identical_validation(records: Sequence[dict]) -> None:
    """Every run must have been judged on the same images, or the comparison means nothing."""
    prints = {r["valid_fingerprint"] for r in records}
    if len(prints) > 1:
        raise PneumoError(
            f"these runs were validated on {len(prints)} different image sets; remove the "
            f"records in OUT/runs made from other data or another split and run compare again"
        )
