"""Adaptation benchmark: what ``pneumo adapt`` buys under simulated site shifts, and how many films it needs.

The outside test split is withheld, so the sites are simulated: a trained run's patient-held-out
films (``split.json``'s valid films, labelled by their class folder names) pass through named
shifts of ``pneumo.data.shifts`` (``a+b`` composes them) before ``imaging.prepare``. For every
shift and prevalence condition it reports accuracy, sensitivity, specificity, balanced accuracy
and AUC of

- ``plain``: the model as trained;
- ``adapted``: the model after ``infer.adapt`` on N films (``--sizes``, e.g. 8 ... 128 and ``all``)
  drawn from the shifted films, their labels unused, repeated ``--repeats`` times for N < all;

each under every threshold rule of ``infer.adapt`` (``keep``, ``prior``: EM prevalence and the
prior-shift formula, computed by the library's own functions), plus ``oracle``, the Youden threshold
chosen with the evaluated films' labels: a ceiling for any rule, never a rule. Two settings:

- ``transductive``: the adaptation films are drawn from the evaluated films, which are all
  evaluated (``pneumo evaluate --adapt`` is N = all);
- ``disjoint``: the films' patients are cut in two halves (seeded); adaptation films come from
  one, evaluation is on the other.

Prevalence conditions: ``native`` (the films as they are) and each fraction given (default the
outside split's 0.625): the films subsampled, seeded, to that positive fraction, where the ``prior``
rule can differ from ``keep``. ``summary`` gives, per setting, the smallest N whose accuracy
(mean over draws) comes within 0.01 of all films' on every shift and condition (to re-check
``MIN_ADAPT_FILMS``), and the rules side by side at ``MIN_ADAPT_FILMS`` and at all films.

    python bench/adapt.py RUN [--name NAME] [--out FILE] [--shifts clean,gamma_1.6,...]
                          [--sizes 8,16,32,64,128,all] [--repeats 3] [--prevalence native,0.625]
                          [--limit N] [--seed 0] [--device cpu|cuda] [--threads N]

RUN is a finished ``pneumo train`` run folder (or its ``model/``). Prints JSON and writes
``bench/results/adapt_<NAME>.json`` (NAME defaults to the run folder's name) or ``--out``.

Cost: every (shift, condition, setting, N, draw) adapts a copy and reads the evaluated films again,
about 6 x 2 x 16 passes over 1.5 x the validation films with the defaults (~300,000 film reads for
a 1,043-film validation split): minutes on a GPU (``--device cuda``), hours on a 2-core CPU, where
``--limit 400 --repeats 2`` cuts it about fivefold.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import RESULTS, rounded, run_report, stratified_indices
from pneumo.data.folders import reference_prevalence
from pneumo.data.imaging import open_image, prepare
from pneumo.data.shifts import grey, make_shifts
from pneumo.errors import DataError, ImageError, PneumoError
from pneumo.evaluation.metrics import binary_metrics, choose_threshold
from pneumo.infer.adapt import (
    MIN_ADAPT_FILMS,
    adapt_loaded,
    estimate_prevalence,
    prior_shift_threshold,
    training_prevalence,
)
from pneumo.infer.model_folder import LoadedModel, load_model
from pneumo.run_folder import RunFolder

CLEAN = "clean"
DEFAULT_SHIFTS = f"{CLEAN},gamma_1.6,contrast_0.7,blur_2,jpeg_50,gamma_1.6+contrast_0.7+jpeg_50"
DEFAULT_SIZES = "8,16,32,64,128,all"
METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc", "threshold", "estimated_prevalence")
TOLERANCE = 0.01  # accuracy within this of all films' counts as "enough films"


# ---------------------------------------------------------------- films


def held_out_films(run: RunFolder, classes: list[str]) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """(paths, labels, patients, notes) of the run's validation films whose folder names a class."""
    split = run.read_split()
    notes = []
    if split.method == "random":
        notes.append("the run's split is random by image: validation shares patients with training (optimistic)")
    patients: dict[str, str] = {}
    if run.predictions_file.is_file():
        preds = run.read_predictions(classes)
        patients = {p: q for p, q in zip(preds.paths, preds.patients) if q}
    paths, labels, groups = [], [], []
    for p in split.valid:
        name = Path(p).parent.name
        if name not in classes:
            continue
        paths.append(p)
        labels.append(classes.index(name))
        groups.append(patients.get(p, p))  # unknown patient: the film is its own
    if not paths:
        raise DataError(f"{run.split_file}: no validation films in class folders named {classes}")
    if len(paths) < len(split.valid):
        notes.append(f"{len(split.valid) - len(paths)} validation films skipped: their folder names no class")
    return paths, np.asarray(labels, dtype=int), groups, notes


def at_prevalence(idx: np.ndarray, is_pos: np.ndarray, fraction: float | None, rng: np.random.Generator) -> np.ndarray:
    """``idx`` subsampled (seeded) so that the positive fraction is ``fraction`` (None: as they are)."""
    if fraction is None:
        return idx
    pos, neg = idx[is_pos[idx]], idx[~is_pos[idx]]
    if not len(pos) or not len(neg):
        return idx
    if fraction >= len(pos) / len(idx):
        neg = rng.permutation(neg)[: max(1, round(len(pos) * (1 - fraction) / fraction))]
    else:
        pos = rng.permutation(pos)[: max(1, round(len(neg) * fraction / (1 - fraction)))]
    return np.sort(np.concatenate([pos, neg]))


def patient_halves(idx: np.ndarray, groups: list[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of films, no patient in both, the first about half of ``idx``."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        by_patient[groups[i]].append(int(i))
    order = [list(by_patient)[k] for k in rng.permutation(len(by_patient))]
    first: list[int] = []
    for patient in order:
        if len(first) >= len(idx) / 2:
            break
        first += by_patient[patient]
    a = np.array(sorted(first), dtype=int)
    return a, np.setdiff1d(idx, a)


# ---------------------------------------------------------------- shifts


def compose(spec: str, size: int):
    """A function on PIL images: the identity for ``clean``, else the named shifts applied in order."""
    if spec == CLEAN:
        return lambda img: img
    registry = make_shifts(size)
    parts = [s.strip() for s in spec.split("+")]
    unknown = [s for s in parts if s not in registry]
    if unknown:
        raise PneumoError(f"unknown shift {', '.join(unknown)} in {spec!r}: use names from {', '.join(registry)}")

    def apply(img: Image.Image) -> Image.Image:
        for name in parts:
            img = registry[name](img)
        return img

    return apply


# ---------------------------------------------------------------- figures


def figures(p_pos: np.ndarray, labels: np.ndarray, pos: int, threshold: float) -> dict[str, Any]:
    m = binary_metrics(p_pos, labels, threshold, pos)
    return {
        **{k: m[k] for k in ("accuracy", "sensitivity", "specificity", "balanced_accuracy")},
        "auc": m["roc_auc"],
        "threshold": float(threshold),
    }


def rule_rows(
    p_eval: np.ndarray,
    y_eval: np.ndarray,
    p_adapt: np.ndarray,
    model: LoadedModel,
    prior: float | None,
) -> dict[str, dict[str, Any]]:
    """Metrics on the evaluated films under every rule; ``p_adapt``: p(positive) of the adaptation films."""
    pos, t0 = model.positive, float(model.meta.threshold)
    rows = {"keep": figures(p_eval, y_eval, pos, t0)}
    if prior is not None:
        new = estimate_prevalence(p_adapt, prior)
        rows["prior"] = {
            **figures(p_eval, y_eval, pos, prior_shift_threshold(t0, prior, new)),
            "estimated_prevalence": new,
        }
        rows["keep"]["estimated_prevalence"] = new
    if len(np.unique(y_eval)) == 2:
        rows["oracle"] = figures(p_eval, y_eval, pos, choose_threshold(p_eval, y_eval, "youden", pos))
    return rows


def aggregate(draws: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"draws": len(draws)}
    for key in METRICS:
        values = [d[key] for d in draws if d.get(key) is not None]
        if values:
            out[key] = rounded(np.mean(values))
            if len(values) > 1:
                out[f"{key}_min"], out[f"{key}_max"] = rounded(min(values)), rounded(max(values))
    return out


# ---------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run folder (or its model/)")
    p.add_argument("--name", default=None, help="results name: bench/results/adapt_NAME.json (default: the run's)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here instead")
    p.add_argument("--shifts", default=DEFAULT_SHIFTS, help=f"comma-separated; a+b composes (default {DEFAULT_SHIFTS})")
    p.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"adaptation film counts, 'all' too (default {DEFAULT_SIZES})"
    )
    p.add_argument("--repeats", type=int, default=3, help="draws of the adaptation films for each N < all")
    p.add_argument(
        "--prevalence",
        default="native,reference",
        help="positive fractions of the evaluated films: native (as they are), reference (the outside "
        "split's 390/624) or a number in (0, 1); comma-separated",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N validation films (stratified, seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the weights contiguous (slower on CPU)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.sizes = [s if s == "all" else int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes {args.sizes}: whole numbers or 'all'")
    if any(s != "all" and s < 2 for s in args.sizes):
        p.error("--sizes: at least 2 films")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def prevalence_conditions(spec: str, classes: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if part == "native":
            out[part] = None
        elif part == "reference":
            ref = reference_prevalence(classes)
            if ref is not None:
                out[f"{ref:.3f}"] = ref
        else:
            value = float(part)
            if not 0 < value < 1:
                raise PneumoError(f"--prevalence {part}: a fraction in (0, 1)")
            out[f"{value:.3f}"] = value
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = RunFolder.holding(args.run)
    model = load_model(folder.path, args.device)
    if not args.no_channels_last:  # ~2x CPU throughput (bench/shift.py); every adapted copy inherits it
        model.net.to(memory_format=torch.channels_last)
    if model.positive is None or len(model.classes) != 2:
        raise PneumoError(f"{args.run}: the adaptation benchmark needs a two-class model with a threshold")
    classes, pos, size = list(model.classes), model.positive, model.meta.image_size
    prior_info = training_prevalence(folder.path)
    prior = None if prior_info is None else prior_info["value"]
    paths, labels, groups, notes = held_out_films(folder, classes)
    rng = np.random.default_rng(args.seed)
    keep = stratified_indices(labels, args.limit, rng)
    films, ok = [], []
    for i in tqdm(keep, desc="decoding films", unit="film", leave=False, disable=args.no_progress):
        try:
            films.append(grey(open_image(paths[i])))
            ok.append(i)
        except ImageError as exc:
            notes.append(f"skipped: {exc}")
    if not films:
        raise DataError(f"{folder.split_file}: no readable validation films")
    labels, groups = labels[ok], [groups[i] for i in ok]
    is_pos = labels == pos
    conditions = prevalence_conditions(args.prevalence, classes)
    if prior is None:
        notes.append("no training prevalence at hand (valid_predictions.csv): the prior rule is not measured")

    results: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    for spec in [s.strip() for s in args.shifts.split(",") if s.strip()]:
        t0 = time.perf_counter()
        shift = compose(spec, size)
        pixels = np.stack([prepare(shift(img), size) for img in films])
        plain = model.probabilities(pixels, batch_size=args.batch_size)[:, pos]
        for cname, fraction in conditions.items():
            crng = np.random.default_rng([args.seed, len(results)])
            evaluated = at_prevalence(np.arange(len(films)), is_pos, fraction, crng)
            half_a, half_b = patient_halves(evaluated, groups, crng)
            sets = {"transductive": (evaluated, evaluated), "disjoint": (half_a, half_b)}
            for setting, (pool, target) in sets.items():
                base = {"shift": spec, "prevalence": cname, "setting": setting}
                true_prev = float(is_pos[target].mean())
                for rule, row in rule_rows(plain[target], labels[target], plain[pool], model, prior).items():
                    results.append(
                        {**base, "films": "none", "rule": rule, "n_eval": len(target), "true_prevalence": true_prev}
                        | aggregate([row])
                    )
                for n in args.sizes:
                    if n != "all" and n > len(pool):
                        notes.append(f"{spec} {cname} {setting}: {n} films asked, {len(pool)} in the pool; skipped")
                        continue
                    draws: dict[str, list[dict[str, Any]]] = defaultdict(list)
                    for r in range(1 if n == "all" else args.repeats):
                        drng = np.random.default_rng([args.seed, r, 0 if n == "all" else n, len(results)])
                        chosen = pool if n == "all" else np.sort(drng.choice(pool, n, replace=False))
                        adapted = adapt_loaded(
                            model, pixels[chosen], threshold_rule="keep", allow_few=True, progress=False
                        ).model
                        p_target = adapted.probabilities(pixels[target], batch_size=args.batch_size)[:, pos]
                        if setting == "transductive":  # the adaptation films are among the evaluated ones
                            where = np.searchsorted(target, chosen)
                            p_adapt = p_target[where]
                        else:
                            p_adapt = adapted.probabilities(pixels[chosen], batch_size=args.batch_size)[:, pos]
                        for rule, row in rule_rows(p_target, labels[target], p_adapt, model, prior).items():
                            draws[rule].append(row)
                    for rule, rows in draws.items():
                        results.append(
                            {
                                **base,
                                "films": n if n == "all" else int(n),
                                "n_adapt": len(pool) if n == "all" else int(n),
                                "rule": rule,
                                "n_eval": len(target),
                                "true_prevalence": true_prev,
                            }
                            | aggregate(rows)
                        )
        timing[spec] = round(time.perf_counter() - t0, 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    return {
        "run": str(folder.path),
        "arch": model.meta.arch,
        "image_size": size,
        "classes": classes,
        "positive_class": classes[pos],
        "threshold": float(model.meta.threshold),
        "threshold_method": model.meta.threshold_method,
        "training_prevalence": prior_info,
        "min_adapt_films": MIN_ADAPT_FILMS,
        "films": {"n": len(films), "n_pos": int(is_pos.sum()), "source": f"{folder.split_file} (valid)"},
        "settings": {
            "shifts": args.shifts,
            "sizes": args.sizes,
            "repeats": args.repeats,
            "prevalence": conditions,
            "seed": args.seed,
            "limit": args.limit,
            "device": args.device,
        },
        "summary": summarise(results, args.sizes),
        "results": results,
        "notes": notes,
        "timing": timing,
    }


def summarise(results: list[dict[str, Any]], sizes: list) -> dict[str, Any]:
    """How many films are enough (rule keep), and the rules side by side, per setting."""
    out: dict[str, Any] = {}
    index = {(r["shift"], r["prevalence"], r["setting"], r["films"], r["rule"]): r for r in results}
    for setting in ("transductive", "disjoint"):
        cells = {(r["shift"], r["prevalence"]) for r in results if r["setting"] == setting}
        counts = [n for n in sizes if n != "all"]
        shortfall: dict[str, Any] = {}
        for n in counts:
            gaps, worst_draw = [], []
            for shift, prev in cells:
                full, part = (
                    index.get((shift, prev, setting, "all", "keep")),
                    index.get((shift, prev, setting, n, "keep")),
                )
                if full and part and full.get("accuracy") is not None and part.get("accuracy") is not None:
                    gaps.append(full["accuracy"] - part["accuracy"])
                    worst_draw.append(full["accuracy"] - part.get("accuracy_min", part["accuracy"]))
            if gaps:
                shortfall[str(n)] = {"worst_mean_gap": rounded(max(gaps)), "worst_draw_gap": rounded(max(worst_draw))}
        enough = [int(n) for n, g in shortfall.items() if g["worst_mean_gap"] <= TOLERANCE]
        smallest = min(enough) if enough else None
        rules: dict[str, Any] = {}
        for films in ("none", MIN_ADAPT_FILMS, "all"):
            for rule in ("keep", "prior", "oracle"):
                rows = [index.get((s, p, setting, films, rule)) for s, p in cells]
                rows = [r for r in rows if r]
                if rows:
                    rules[f"{films}/{rule}"] = {
                        k: rounded(np.mean([r[k] for r in rows if r.get(k) is not None]))
                        for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity")
                        if any(r.get(k) is not None for r in rows)
                    }
        out[setting] = {
            "accuracy_gap_to_all_films": shortfall,
            "smallest_films_within_tolerance": smallest,
            "tolerance": TOLERANCE,
            "min_adapt_films_holds": None if smallest is None else smallest <= MIN_ADAPT_FILMS,
            "rules_mean_over_shifts": rules,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def out(_: dict) -> Path:  # named after the run once run() has read it (a bad RUN is its error)
        return args.out or RESULTS / f"adapt_{args.name or RunFolder.holding(args.run).path.resolve().name}.json"

    return run_report(lambda: run(args), out)


if __name__ == "__main__":
    sys.exit(main())
