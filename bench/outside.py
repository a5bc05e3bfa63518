"""Issue 26: a model on films from outside its training split (outside-dev), plain, adapted and re-encoded.

    python bench/outside.py MODEL [--films ../shared/data/chest_xray_224/outside_dev] [--out bench/results/NAME]

``outside_dev`` is a patient-level half of Kaggle's official test split (317 films); the other half is
withheld and the project is judged there. Its figures are "outside-dev", never "test". It is never
trained on, nor used to validate a run: here it is only read.

For MODEL (a model folder) this measures, with 95% intervals by patient:
- plain: the model as saved, at its own threshold (and with ``--tta``, mirrored too);
- adapted: ``pneumo adapt`` on the same films, labels unused (the method the model folder's pneumo
  uses by default), then read at the threshold the adaptation leaves;
- specificity per family of normal films (``IM-`` and ``NORMAL2-``), sensitivity per subtype;
- the best threshold chosen on these films themselves: an upper bound, never a figure to quote;
- consistency: every film re-encoded (JPEG 95, 90, 50; PNG) or upsampled to 1024 px (PNG), read from
  disk as a user's file would be: the share of decisions that flip, median and 95th percentile |dp|.
Prints JSON and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import OUTSIDE_DEV, rounded, run_report
from pneumo.data.cache import decode_images
from pneumo.data.folders import discover, subtype_of
from pneumo.evaluation.metrics import binary_metrics, evaluate_predictions
from pneumo.infer.adapt import DEFAULT_METHOD, METHODS, evaluation_adapter
from pneumo.infer.predict import probabilities_of, readable_pixels
from pneumo.infer.runtime import open_model

VARIANTS = ("jpeg95", "jpeg90", "jpeg50", "png", "up1024")


def family_of(name: str) -> str:
    """The family of an outside film: normal films are ``NORMAL2-IM-...`` or ``IM-...``; pneumonia by subtype."""
    upper = Path(name).name.upper()
    if upper.startswith("NORMAL2-"):
        return "NORMAL2-"
    if upper.startswith("IM-"):
        return "IM-"
    return subtype_of(name) or "other"


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """A 95% Wilson interval for k successes in n: per-family counts are small (35 and 83 films)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [rounded(centre - half), rounded(centre + half)]


def read_set(model: Any, pixels: np.ndarray, ok: np.ndarray, tta: bool) -> np.ndarray:
    return probabilities_of(model, ok, pixels, tta)[ok]


def figures(model: Any, probs: np.ndarray, labels: np.ndarray, names: list[str], patients: np.ndarray) -> dict:
    """Metrics with patient-bootstrap intervals, per family, and the outside-chosen threshold's bound."""
    report = evaluate_predictions(probs, labels, model.classes, model.threshold, groups=patients)
    pos = model.positive
    p_pos, y = probs[:, pos], labels
    decided = model.decide(probs)
    families: dict[str, dict] = {}
    for fam in sorted({family_of(n) for n in names}):
        idx = np.array([family_of(n) == fam for n in names])
        right = int((decided[idx] == y[idx]).sum())
        key = "specificity" if (y[idx] != pos).all() else "sensitivity" if (y[idx] == pos).all() else "accuracy"
        families[fam] = {"n": int(idx.sum()), key: rounded(right / idx.sum()), "ci": wilson(right, int(idx.sum()))}
    grid = np.unique(p_pos)
    accs = [binary_metrics(p_pos, y, float(t), pos)["accuracy"] for t in grid]
    best = int(np.argmax(accs))
    m, ci = dict(report["metrics"]), report.get("ci") or {}
    keep = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "roc_auc", "f1")
    return {
        "n": report["n"],
        "threshold": rounded(report["threshold"]),
        "metrics": {k: rounded(m.get(k)) for k in keep},
        "ci": {k: [rounded(v) for v in ci[k]] for k in keep if isinstance(ci.get(k), list | tuple)},
        "confusion_matrix": report["confusion_matrix"],
        "families": families,
        "outside_chosen_threshold_bound": {"threshold": rounded(grid[best]), "accuracy": rounded(accs[best])},
    }


def write_variant(src: Path, dest: Path, variant: str) -> None:
    """``src`` as a user might hand it over: re-encoded, or upsampled before pneumo's own resize."""
    img = Image.open(src)
    img.load()
    img = img.convert("L") if img.mode not in ("L", "RGB") else img
    buf = io.BytesIO()
    if variant.startswith("jpeg"):
        img.save(buf, format="JPEG", quality=int(variant[4:]))
    elif variant == "png":
        img.save(buf, format="PNG")
    elif variant == "up1024":
        img.resize((1024, 1024), Image.Resampling.BICUBIC).save(buf, format="PNG")
    else:
        raise ValueError(variant)
    dest.write_bytes(buf.getvalue())


def consistency(model: Any, paths: list[Path], clean: np.ndarray, labels: np.ndarray, tta: bool):
    rows: dict[str, dict] = {}
    pos = model.positive
    with tempfile.TemporaryDirectory(prefix="pneumo-outside-") as tmp:
        for variant in VARIANTS:
            folder = Path(tmp) / variant
            folder.mkdir()
            files = []
            for i, p in enumerate(paths):
                dest = folder / f"{i:05d}{'.jpeg' if variant.startswith('jpeg') else '.png'}"
                write_variant(p, dest, variant)
                files.append(dest)
            dec = decode_images(files, model.meta.image_size, progress=False, use_cache=False)
            probs = probabilities_of(model, dec.ok, readable_pixels(dec), tta)  # a row per film, as written
            dp = probs[:, pos] - clean[:, pos]
            flips = model.decide(probs) != model.decide(clean)
            rows[variant] = {
                "flip_rate": rounded(flips.mean()),
                "flips": int(flips.sum()),
                "median_abs_dp": rounded(np.median(np.abs(dp))),
                "p95_abs_dp": rounded(np.percentile(np.abs(dp), 95)),
                "accuracy": rounded((model.decide(probs) == labels).mean()),
            }
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    model = open_model(args.model, runtime="torch")
    data = discover(args.films)
    samples = data.split(data.splits[0])
    paths = [s.path for s in samples]
    decoded = decode_images(paths, model.meta.image_size, progress=False, use_cache=False)
    ok, pixels = decoded.ok, readable_pixels(decoded)
    kept = [s for s, good in zip(samples, ok) if good]
    labels = np.array([model.classes.index(data.classes[s.label]) for s in kept])
    names = [s.path.name for s in kept]
    patients = np.array([s.patient for s in kept])
    probs = read_set(model, pixels, ok, args.tta)
    result: dict[str, Any] = {
        "model": str(Path(args.model).resolve()),
        "films": str(Path(args.films).resolve()),
        "what": "outside-dev: a patient-level half of Kaggle's official test split, never trained or validated on",
        "tta": args.tta,
        "n_films": len(kept),
        "unreadable": int((~ok).sum()),
        "plain": figures(model, probs, labels, names, patients),
    }
    if not args.no_adapt:
        for method in args.adapt_methods.split(","):
            adapted, record = evaluation_adapter(args.model, progress=False, method=method)(model, pixels)
            a_probs = read_set(adapted, pixels, ok, args.tta)
            key = "adapted" if method == args.adapt_methods.split(",")[0] else f"adapted_{method}"
            result[key] = figures(adapted, a_probs, labels, names, patients)
            result[key]["method"] = record.get("method")
            result[key]["threshold_rule"] = (record.get("threshold") or {}).get("rule")
    if not args.no_consistency:
        result["consistency"] = consistency(model, [s.path for s in kept], probs, labels, args.tta)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _ci(section: dict, key: str) -> str:
    ci = section["ci"].get(key)
    return "" if not ci else f" ({_pct(ci[0])}-{_pct(ci[1])})"


def _auc_ci(section: dict) -> str:
    ci = section["ci"].get("roc_auc")
    return "" if not ci else f" ({ci[0]:.3f}-{ci[1]:.3f})"


def markdown(result: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}: outside-dev",
        "",
        f"{result['n_films']} outside-dev films ({result['what']}); TTA {'on' if result['tta'] else 'off'}. "
        "Percentages, 95% intervals by patient bootstrap (families: Wilson).",
        "",
        "| reading | threshold | accuracy | sensitivity | specificity | AUC | IM- spec. | NORMAL2- spec. "
        "| best threshold on these films (bound) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in ["plain"] + [k for k in result if k.startswith("adapted")]:
        s, m, fam = result[key], result[key]["metrics"], result[key]["families"]
        bound = s["outside_chosen_threshold_bound"]
        lines.append(
            f"| {key.replace('_', ' ')} | {s['threshold']:.3f} | {_pct(m['accuracy'])}{_ci(s, 'accuracy')} "
            f"| {_pct(m['sensitivity'])}{_ci(s, 'sensitivity')} | {_pct(m['specificity'])}{_ci(s, 'specificity')} "
            f"| {m['roc_auc']:.3f}{_auc_ci(s)} "
            f"| {_pct(fam.get('IM-', {}).get('specificity'))} | {_pct(fam.get('NORMAL2-', {}).get('specificity'))} "
            f"| {_pct(bound['accuracy'])} at {bound['threshold']:.3f} |"
        )
    if "consistency" in result:
        lines += [
            "",
            "Consistency of the plain reading: the same films re-encoded or upsampled before pneumo reads them:",
            "",
            "| variant | decisions flipped | median abs(dp) | 95th pct abs(dp) | accuracy |",
            "| --- | --- | --- | --- | --- |",
        ]
        for v, row in result["consistency"].items():
            lines.append(
                f"| {v} | {_pct(row['flip_rate'])} % ({row['flips']}) | {row['median_abs_dp']:.4f} "
                f"| {row['p95_abs_dp']:.4f} | {_pct(row['accuracy'])} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model folder (RUN/model or an ensemble's)")
    p.add_argument("--films", default=str(OUTSIDE_DEV), help="class folders of outside films (default: outside_dev)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print only)")
    p.add_argument("--title", default=None, help="the name of the model in the markdown (default: its folder)")
    p.add_argument("--tta", action="store_true", help="average each film with its mirror")
    p.add_argument("--no-adapt", action="store_true", help="skip the adapted reading")
    p.add_argument(
        "--adapt-methods",
        default=DEFAULT_METHOD,
        help=f"pneumo adapt --method values to measure, comma-separated, the first reported as 'adapted' "
        f"(default {DEFAULT_METHOD}; all: {','.join(METHODS)})",
    )
    p.add_argument("--no-consistency", action="store_true", help="skip the re-encoding table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    code = run_report(lambda: run(args), out.with_suffix(".json") if out else None)
    if out and code == 0:
        title = args.title or Path(args.model).resolve().parent.name
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text()), title))
    return code


if __name__ == "__main__":
    sys.exit(main())
