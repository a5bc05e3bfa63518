"""Shift benchmark: how a model's decisions move when held-out films are exposed, stored or resized otherwise.

The official test split is withheld, and validation flatters (0.98 there against 0.825 outside, and
p(pneumonia) of one film moving from 0.46 to 0.95 with JPEG quality alone). This benchmark needs no
outside split: it takes the model's own patient-held-out films, applies every named shift of
``pneumo.data.shifts`` to each decoded film *before* ``imaging.prepare`` (the one preprocessing path),
and reports, per shift, sensitivity, specificity, accuracy, balanced accuracy and AUC at the model's
stored threshold, the same metrics re-weighted to the outside prevalence (62.5% pneumonia), and how
far each film's p(pneumonia) moves from its clean value (median and 95th percentile of |delta p|,
the fraction of films whose decision flips). With ``--fullres`` it also compares full-resolution
originals with their 224 px copies, resized by each filter and JPEG-encoded at each quality.

    python bench/shift.py MODEL_DIR --out DIR [--films FOLDER] [--limit N] [--shifts a,b|family]
                          [--prevalence 0.625] [--fullres /work/shared/data/chest_xray_fullres_sample]

MODEL_DIR is a model folder (RUN/model) or the run folder holding it. Without ``--films`` the films
are the run's validation films (``split.json``; an ensemble folder's ``valid_predictions.csv``),
labelled by their class folder names. Writes DIR/shift.json (also printed), DIR/shift.md and
DIR/shift_films.csv (every film's p(positive) under every condition).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import SHARED_DATA, rounded, run_report, stratified_indices
from pneumo.data.folders import discover, is_image_file, reference_prevalence
from pneumo.data.imaging import open_image, prepare
from pneumo.data.shifts import (
    ACQUISITION,
    FAMILIES,
    PHOTOMETRIC,
    RESAMPLE_FILTERS,
    Shift,
    grey,
    jpeg,
    kaggle_copy,
    png,
    resample,
    select_shifts,
)
from pneumo.errors import DataError, ImageError, PneumoError
from pneumo.evaluation.metrics import binary_metrics, prevalence_weights
from pneumo.infer.model_folder import LoadedModel, load_model
from pneumo.io_utils import atomic_write_json, atomic_write_text
from pneumo.run_folder import RunFolder

DEFAULT_FULLRES_COPIES = "chest_xray_224/train"  # beside the full-res sample in shared/data
SHARED_FULLRES = SHARED_DATA / "chest_xray_fullres_sample"
CLEAN = "clean"


# ---------------------------------------------------------------- which films


def label_of(path: str | Path, classes: list[str]) -> int | None:
    """The class index named by the film's folder, or None for a folder that names no class."""
    name = Path(path).parent.name
    return classes.index(name) if name in classes else None


def films_from_run(model_dir: Path, classes: list[str]) -> tuple[list[str], str, str, np.ndarray | None]:
    """(paths, source, split method, the run's stored clean probabilities or None) for the held-out films."""
    run = RunFolder.holding(model_dir)
    stored = None
    if run.predictions_file.is_file():
        preds = run.read_predictions(classes)
        stored = dict(zip(preds.paths, preds.probs))
    if run.split_file.is_file():
        split = run.read_split()
        return split.valid, f"{run.split_file} (valid)", split.method, stored
    if stored is not None:
        return list(stored), f"{run.predictions_file}", "ensemble: its members' validation films", stored
    raise DataError(
        f"{run.path}: neither split.json nor valid_predictions.csv; pass --films FOLDER "
        f"(a folder of class folders the model never trained on)"
    )


def films_from_folder(folder: Path) -> list[str]:
    """Every image of a folder of class folders (or one split folder of the Kaggle layout)."""
    data = discover(folder)
    if data.layout == "kaggle":
        raise DataError(
            f"{folder}: holds split folders {data.splits}; point --films at one of them (a folder of class folders)"
        )
    return [str(s.path) for s in data.samples]


# ---------------------------------------------------------------- inference and figures


def use_channels_last(model: LoadedModel) -> None:
    """Channels-last weights: twice the CPU throughput of lite0 here, the same probabilities to ~1e-6."""
    for member in getattr(model, "members", None) or [model]:
        member.net.to(memory_format=torch.channels_last)


def predict(model: LoadedModel, pixels: list[np.ndarray], batch_size: int, tta: bool) -> np.ndarray:
    """Calibrated probabilities (N, K) for prepared uint8 arrays, in batches."""
    if not pixels:
        return np.zeros((0, len(model.classes)), np.float64)
    out = [
        model.probabilities(np.stack(pixels[i : i + batch_size]), batch_size=batch_size, tta=tta)
        for i in range(0, len(pixels), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)


def shifted_probabilities(
    model: LoadedModel,
    films: list[Image.Image],
    clean_pixels: list[np.ndarray],
    clean_probs: np.ndarray,
    shift: Shift,
    size: int,
    batch_size: int,
    tta: bool,
) -> tuple[np.ndarray, int]:
    """Probabilities of every film under ``shift``; a film whose prepared pixels equal its clean pixels
    (PNG, a resample of a film already at the model size) reuses the clean answer, which it would give."""
    probs = clean_probs.copy()
    identical = 0
    for start in range(0, len(films), batch_size):
        idx, batch = [], []
        for i in range(start, min(start + batch_size, len(films))):
            arr = prepare(shift(films[i]), size)
            if np.array_equal(arr, clean_pixels[i]):
                identical += 1
            else:
                idx.append(i)
                batch.append(arr)
        if batch:
            probs[idx] = predict(model, batch, batch_size, tta)
    return probs, identical


def figures(model: LoadedModel, probs: np.ndarray, labels: np.ndarray, prevalence: float | None) -> dict[str, Any]:
    """Metrics at the stored threshold, and re-weighted to the outside prevalence."""
    pos, thr = model.positive, float(model.threshold)
    p = probs[:, pos]
    m = binary_metrics(p, labels, thr, pos)
    bal = None if m["sensitivity"] is None or m["specificity"] is None else (m["sensitivity"] + m["specificity"]) / 2
    out: dict[str, Any] = {
        "sensitivity": rounded(m["sensitivity"]),
        "specificity": rounded(m["specificity"]),
        "accuracy": rounded(m["accuracy"]),
        "balanced_accuracy": rounded(bal),
        "auc": rounded(m["roc_auc"]),
        "ppv": rounded(m["ppv"]),
        "npv": rounded(m["npv"]),
        "reweighted": None,
    }
    if prevalence is not None:
        try:
            w = prevalence_weights(labels, pos, prevalence)
        except PneumoError:  # one class only among the films: there is no balance to change
            return out
        rw = binary_metrics(p, labels, thr, pos, weights=w)
        out["reweighted"] = {
            "prevalence": prevalence,
            "accuracy": rounded(rw["accuracy"]),
            "ppv": rounded(rw["ppv"]),
            "npv": rounded(rw["npv"]),
            "f1": rounded(rw["f1"]),
        }
    return out


def consistency(model: LoadedModel, probs: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    """How far each film's p(positive) moved from its clean value, and how many decisions flipped."""
    pos = model.positive
    dp = probs[:, pos] - clean[:, pos]
    flips = model.decide(probs) != model.decide(clean)
    to_pos = flips & (model.decide(probs) == pos)
    if dp.size == 0:
        return {
            "median_abs_dp": None,
            "p95_abs_dp": None,
            "max_abs_dp": None,
            "mean_dp": None,
            "flip_rate": None,
            "flips_to_positive": 0,
            "flips_to_negative": 0,
        }
    return {
        "median_abs_dp": rounded(np.median(np.abs(dp))),
        "p95_abs_dp": rounded(np.percentile(np.abs(dp), 95)),
        "max_abs_dp": rounded(np.abs(dp).max()),
        "mean_dp": rounded(dp.mean()),
        "flip_rate": rounded(flips.mean()),
        "flips_to_positive": int(to_pos.sum()),
        "flips_to_negative": int((flips & ~to_pos).sum()),
    }


def worst_by_family(rows: dict[str, dict[str, Any]], clean: dict[str, Any]) -> dict[str, Any]:
    """Per family: the shift with the lowest specificity, the largest p95 |delta p| and the most flips."""
    out: dict[str, Any] = {}
    for family in (PHOTOMETRIC, ACQUISITION):
        members = {k: v for k, v in rows.items() if v["family"] == family}
        if not members:
            continue

        def pick(key: str, section: str, lowest: bool, members: dict[str, dict[str, Any]] = members) -> Any:
            have = {k: v[section][key] for k, v in members.items() if v[section][key] is not None}
            if not have:
                return None
            name = (min if lowest else max)(have, key=have.get)
            return {"shift": name, "value": have[name]}

        spec, p95 = pick("specificity", "metrics", True), pick("p95_abs_dp", "consistency", False)
        flips = pick("flip_rate", "consistency", False)
        clean_spec = clean["specificity"]
        line = f"{family}: "
        line += (
            "lowest specificity -"
            if spec is None
            else f"lowest specificity {spec['shift']} {spec['value']:.3f} (clean {_fmt(clean_spec)})"
        )
        line += "; largest p95 |dp| -" if p95 is None else f"; largest p95 |dp| {p95['shift']} {p95['value']:.3f}"
        line += "; most flips -" if flips is None else f"; most flips {flips['shift']} {flips['value']:.1%}"
        out[family] = {"lowest_specificity": spec, "largest_p95_abs_dp": p95, "most_flips": flips, "line": line}
    return out


# ---------------------------------------------------------------- full-resolution originals


def fullres_comparison(
    model: LoadedModel, folder: Path, copies: Path | None, film_paths: list[str], tta: bool
) -> dict[str, Any]:
    """Each original against its 224 px copy, and against itself resized by each filter or JPEG-encoded.

    The JPEG conditions encode the original after pneumo's resize, at the model's size: a user who
    downsizes then saves a JPEG (the issue's 0.46 -> 0.58 at quality 95 -> 0.95 at 75).

    The originals are training images of any model trained on chest_xray_224: only p and its
    movement mean anything here, never accuracy (``in_films`` says which are among the held-out films).
    """
    size = model.meta.image_size
    originals = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not originals:
        raise DataError(f"{folder}: no images for --fullres")
    copies_by_name: dict[str, Path] = {Path(p).name: Path(p) for p in film_paths}
    if copies is not None and copies.is_dir():
        for p in copies.rglob("*"):
            if is_image_file(p):
                copies_by_name.setdefault(p.name, p)
    held_out = {Path(p).name for p in film_paths}

    conditions: dict[str, Any] = {"original": None, "copy_224": None, "kaggle_copy_simulated": None}
    conditions.update({f"resample_{m}": resample(m, size) for m in RESAMPLE_FILTERS})
    conditions.update({f"pneumo_resize+jpeg_{q}": jpeg(q) for q in (100, 95, 90, 75, 50)})
    conditions["pneumo_resize+png"] = png()
    films, table = [], {c: [] for c in conditions}
    for path in originals:
        try:
            img = grey(open_image(path))
        except ImageError as exc:
            films.append({"film": len(films), "error": exc.reason})
            continue
        base = prepare(img, size)
        copy = copies_by_name.get(path.name)
        pixels = {
            "original": base,
            "copy_224": prepare(copy, size) if copy else None,
            "kaggle_copy_simulated": prepare(kaggle_copy(img), size),
        }
        for name, fn in conditions.items():
            if name.startswith("resample_"):
                pixels[name] = prepare(fn(img), size)
            elif name.startswith("pneumo_resize+"):
                pixels[name] = prepare(fn(Image.fromarray(base, mode="L")), size)
        names = [n for n in conditions if pixels[n] is not None]
        probs = predict(model, [pixels[n] for n in names], 64, tta)
        p = {n: float(probs[i, model.positive]) for i, n in enumerate(names)}
        label = label_of(path, model.classes)
        films.append(
            {
                "film": len(films),  # an index, not the file name: Kermany names carry patient ids
                "label": None if label is None else model.classes[label],
                "has_copy": copy is not None,
                "in_films": path.name in held_out,
                "p": {n: rounded(p.get(n)) for n in conditions},
            }
        )
        for n in conditions:
            table[n].append(p.get(n, math.nan))
    p = {n: np.asarray(v, dtype=np.float64) for n, v in table.items()}
    thr = float(model.threshold)
    summary = {}
    for n, v in p.items():
        row: dict[str, Any] = {"n": int(np.isfinite(v).sum())}
        for ref in ("original", "copy_224"):
            both = np.isfinite(v) & np.isfinite(p[ref])
            d = v[both] - p[ref][both]
            row[f"vs_{ref}"] = (
                None
                if not both.any()
                else {
                    "median_abs_dp": rounded(np.median(np.abs(d))),
                    "max_abs_dp": rounded(np.abs(d).max()),
                    "mean_dp": rounded(d.mean()),
                    "flip_rate": rounded(np.mean((v[both] >= thr) != (p[ref][both] >= thr))),
                }
            )
        row["median_p"] = rounded(np.nanmedian(v)) if np.isfinite(v).any() else None
        summary[n] = row
    return {
        "folder": str(folder),
        "copies": None if copies is None else str(copies),
        "n": len(originals),
        "summary": summary,
        "films": films,
    }


# ---------------------------------------------------------------- markdown


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def markdown(report: dict[str, Any]) -> str:
    prev = report["prevalence"]
    at = f"@{prev:.1%}" if prev is not None else "@-"
    lines = [
        f"# Shift benchmark: {report['model']}",
        "",
        f"{report['films']['n']} films ({report['films']['n_pos']} {report['positive_class']}, "
        f"{report['films']['n_neg']} other) from {report['films']['source']}; split: "
        f"{report['films']['split_method']}; threshold {report['threshold']:.4f} (stored); "
        f"{report['timing']['total_s']:.0f} s.",
        "",
    ]
    lines += [
        f"| shift | family | sens | spec | acc | bal acc | AUC | acc {at} | PPV {at} | "
        f"median abs dp | p95 abs dp | flips |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in [(CLEAN, {"family": "-", **report["clean"], "consistency": {}})] + list(report["shifts"].items()):
        m, c = row["metrics"], row["consistency"]
        rw = m.get("reweighted") or {}
        lines.append(
            f"| {name} | {row['family']} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | "
            f"{_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['auc'])} | "
            f"{_fmt(rw.get('accuracy'))} | {_fmt(rw.get('ppv'))} | {_fmt(c.get('median_abs_dp'))} | "
            f"{_fmt(c.get('p95_abs_dp'))} | {_fmt(c.get('flip_rate'), pct=True)} |"
        )
    if report["worst"]:
        lines += ["", "Worst per family:", ""] + [f"- {w['line']}" for w in report["worst"].values()]
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    full = report.get("fullres")
    if full:
        lines += [
            "",
            f"## Full-resolution originals ({full['n']} in {full['folder']})",
            "",
            "p(positive) of each original through pneumo's resize, against its 224 px copy and against the "
            "original resized by another filter or JPEG-encoded after pneumo's resize. Training images of a "
            "model trained on chest_xray_224: read the movement, not accuracy.",
            "",
            "| condition | median p | median abs dp vs original | flips vs original | "
            "median abs dp vs copy | flips vs copy |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in full["summary"].items():
            o, c = row["vs_original"] or {}, row["vs_copy_224"] or {}
            lines.append(
                f"| {name} | {_fmt(row['median_p'])} | {_fmt(o.get('median_abs_dp'))} | "
                f"{_fmt(o.get('flip_rate'), pct=True)} | {_fmt(c.get('median_abs_dp'))} | "
                f"{_fmt(c.get('flip_rate'), pct=True)} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, nargs="?", help="a model folder (RUN/model) or the run folder holding it")
    p.add_argument("--out", type=Path, help="write shift.json, shift.md and shift_films.csv here")
    p.add_argument(
        "--films",
        type=Path,
        default=None,
        help="a folder of class folders the model never saw (default: the run's validation films)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N films (stratified, seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed for --limit's subset")
    p.add_argument(
        "--shifts",
        default=None,
        help=f"comma-separated shift or family names (default: all; families: {', '.join(FAMILIES)})",
    )
    p.add_argument(
        "--prevalence",
        type=float,
        default=None,
        help="positive fraction to re-weight to (default: the outside split's 0.625 for NORMAL/PNEUMONIA)",
    )
    p.add_argument(
        "--fullres",
        default="auto",
        help="a folder of full-resolution originals whose 224 px copies share their file names; "
        f"'auto' (default): {SHARED_FULLRES} where it exists; 'none': skip",
    )
    p.add_argument(
        "--fullres-copies",
        type=Path,
        default=None,
        help=f"where the 224 px copies lie (default: the films, then FULLRES/../{DEFAULT_FULLRES_COPIES})",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--tta",
        choices=["model", "on", "off"],
        default="model",
        help="flip TTA as the model was evaluated (default), or forced on/off",
    )
    p.add_argument("--no-channels-last", action="store_true", help="keep the weights contiguous (slower on CPU)")
    p.add_argument("--list", action="store_true", help="print the shifts and exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.list and (args.model_dir is None or args.out is None):
        p.error("MODEL_DIR and --out are required (or --list)")
    if args.limit is not None and args.limit < 2:
        p.error("--limit must be at least 2")
    if args.prevalence is not None and not 0 < args.prevalence < 1:
        p.error("--prevalence must lie strictly between 0 and 1")
    if args.fullres == "auto":
        args.fullres = SHARED_FULLRES if SHARED_FULLRES.is_dir() else None
    elif args.fullres == "none":
        args.fullres = None
    else:
        args.fullres = Path(args.fullres)
        if not args.fullres.is_dir():
            p.error(f"--fullres {args.fullres}: no such folder")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    model = load_model(args.model_dir, args.device)
    if model.positive is None or model.threshold is None or len(model.classes) != 2:
        raise PneumoError(f"{args.model_dir}: the shift benchmark needs a two-class model with a stored threshold")
    if not args.no_channels_last:
        use_channels_last(model)
    size, classes, pos = model.meta.image_size, list(model.classes), model.positive
    trained = getattr(model.meta, "trained_with", None) or {}
    tta = bool(trained.get("tta", False)) if args.tta == "model" else args.tta == "on"
    shifts = select_shifts(args.shifts, size)
    notes: list[str] = []

    stored = None
    if args.films is None:
        paths, source, method, stored = films_from_run(args.model_dir, classes)
        if method == "random":
            notes.append(
                "the run's split is random by image: its validation films share patients with its "
                "training films, so these figures are optimistic"
            )
    else:
        paths, source, method = films_from_folder(args.films), str(args.films), "given folder (--films)"
    labelled = [(p, label_of(p, classes)) for p in paths]
    unknown = [p for p, y in labelled if y is None]
    if unknown:
        notes.append(f"{len(unknown)} films skipped: their folder names no class of {classes} (e.g. {unknown[0]})")
    labelled = [(p, y) for p, y in labelled if y is not None]
    if not labelled:
        raise DataError(f"{source}: no films in class folders named {classes}")
    labels_all = np.array([y for _, y in labelled], dtype=int)
    keep = stratified_indices(labels_all, args.limit, np.random.default_rng(args.seed))
    paths = [labelled[i][0] for i in keep]
    labels = labels_all[keep]

    t0 = time.perf_counter()
    films: list[Image.Image] = []
    ok_paths: list[str] = []
    ok_labels: list[int] = []
    for p, y in tqdm(
        list(zip(paths, labels)), desc="decoding films", unit="film", leave=False, disable=args.no_progress
    ):
        try:
            films.append(grey(open_image(p)))
        except ImageError as exc:
            notes.append(f"skipped: {exc}")
            continue
        ok_paths.append(p)
        ok_labels.append(int(y))
    labels = np.asarray(ok_labels, dtype=int)
    if not films:
        raise DataError(f"{source}: no readable films")
    clean_pixels = [prepare(img, size) for img in films]
    decode_s = time.perf_counter() - t0

    prevalence = args.prevalence if args.prevalence is not None else reference_prevalence(classes)
    if prevalence is None:
        notes.append(f"no outside prevalence is known for classes {classes}: pass --prevalence to re-weight")
    t0 = time.perf_counter()
    clean = predict(model, clean_pixels, args.batch_size, tta)
    clean_s = time.perf_counter() - t0
    report: dict[str, Any] = {
        "model": str(args.model_dir),
        "arch": model.meta.arch,
        "image_size": size,
        "classes": classes,
        "positive_class": classes[pos],
        "threshold": float(model.threshold),
        "tta": tta,
        "prevalence": prevalence,
        "films": {
            "source": source,
            "split_method": method,
            "n": len(films),
            "n_pos": int((labels == pos).sum()),
            "n_neg": int((labels != pos).sum()),
            "limit": args.limit,
            "seed": args.seed,
        },
        "clean": {"metrics": figures(model, clean, labels, prevalence)},
        "shifts": {},
        "worst": {},
        "fullres": None,
        "notes": notes,
    }
    if stored is not None:
        have = [i for i, p in enumerate(ok_paths) if p in stored]
        if have:
            diff = np.abs(clean[have] - np.stack([stored[ok_paths[i]] for i in have])).max()
            report["clean"]["max_abs_diff_vs_run_predictions"] = rounded(float(diff), 6)

    columns = {CLEAN: clean[:, pos]}
    timing = {"decode_s": round(decode_s, 2), "clean_s": round(clean_s, 2)}
    bar = tqdm(shifts.values(), desc="shifts", unit="shift", disable=args.no_progress)
    for shift in bar:
        bar.set_postfix_str(shift.name)
        t0 = time.perf_counter()
        probs, identical = shifted_probabilities(model, films, clean_pixels, clean, shift, size, args.batch_size, tta)
        timing[shift.name] = round(time.perf_counter() - t0, 2)
        cons = consistency(model, probs, clean)
        cons["identical_films"] = identical
        report["shifts"][shift.name] = {
            "family": shift.family,
            "description": shift.description,
            "metrics": figures(model, probs, labels, prevalence),
            "consistency": cons,
        }
        columns[shift.name] = probs[:, pos]
    bar.close()
    report["worst"] = worst_by_family(report["shifts"], report["clean"]["metrics"])
    same = [n for n, r in report["shifts"].items() if r["consistency"]["identical_films"] == len(films)]
    if same:
        notes.append(f"identical to the clean films for every film (so the same answers): {', '.join(same)}")

    if args.fullres is not None:
        t0 = time.perf_counter()
        copies = args.fullres_copies or (args.fullres.parent / DEFAULT_FULLRES_COPIES)
        report["fullres"] = fullres_comparison(model, args.fullres, copies if copies.is_dir() else None, ok_paths, tta)
        timing["fullres_s"] = round(time.perf_counter() - t0, 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    shifted = sum(len(films) - r["consistency"]["identical_films"] for r in report["shifts"].values())
    spent = timing["clean_s"] + sum(timing[name] for name in shifts)
    timing["films_inferred"] = len(films) + shifted  # identical films reuse the clean answer
    timing["films_per_s"] = round((len(films) + shifted) / max(spent, 1e-9), 1)  # perturb + prepare + model
    report["timing"] = timing

    args.out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", *[f"p_{n}" for n in columns]])
    for i, p in enumerate(ok_paths):
        writer.writerow([p, classes[labels[i]], *[repr(float(v[i])) for v in columns.values()]])
    atomic_write_text(args.out / "shift_films.csv", buffer.getvalue())
    atomic_write_json(args.out / "shift.json", report)
    atomic_write_text(args.out / "shift.md", markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, shift in select_shifts(args.shifts).items():
            print(f"{name:20s} {shift.family:12s} {shift.description}")
        return 0
    return run_report(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
