"""How many validation films the out-of-scope distance check (infer/scope.py) needs to be trusted.

The check calls a film out of scope when its feature distance exceeds the 99.5th percentile of the
model's held-out validation distances. Fitted on few films, that percentile is about the largest of
a handful of distances, and films like the validation films fall above it: the demo model (the
bundled sample, 40 validation films) called a NORMAL test film of the sample out of scope.

One model's features are computed once: the demo model (trained as ``tools/demo.sh`` trains it, on
the bundled sample at pneumo's defaults) unless ``--model`` names another, over a pool of
in-distribution films (a stratified subset of chest_xray_224/train, the sample's patients left out)
and the sample's 60 test films. For each N of ``--sizes``, ``--draws`` times: N pool films drawn
(stratified, seeded) play the validation films, the scope is fitted on them as ``training.finish``
fits it (``fit_feature_scope``), and the other pool films (patients of the N left out) and the
sample's test films are checked. Every one of them is in distribution, so the fraction called out
of scope is the false out-of-scope rate; nominal 0.5 %.

``summary.trusted_from`` is the smallest N measured from which on (that N and every larger one) the
mean false rate over draws is at most ``MAX_MEAN_FALSE`` (twice nominal) and the 90th percentile
over draws at most ``MAX_P90_FALSE``: what ``infer.scope.MIN_DISTANCE_FILMS`` is set from.

    nice -n 10 python bench/scope_valid_films.py [--model MODEL] [--pool-films 1200] [--draws 40]
        [--sizes 8,16,...] [--out bench/results/scope_valid_films.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import DEFAULT_DATA, RESULTS, SAMPLE, cpu_seconds, rounded, run_report, stratified_indices
from pneumo.data.cache import decode_images
from pneumo.data.folders import discover
from pneumo.infer.model_folder import LoadedModel, load_model
from pneumo.infer.scope import fit_feature_scope, read_feature_scope, scope_features

DEFAULT_SIZES = "8,16,24,32,40,60,80,100,120,160,200,240,320,480,640"
MAX_MEAN_FALSE = 0.01
MAX_P90_FALSE = 0.02


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: train the demo model on the sample)")
    p.add_argument("--pool", type=Path, default=DEFAULT_DATA, help="in-distribution films (class folders)")
    p.add_argument("--pool-films", type=int, default=1200)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="numbers of validation films, comma-separated")
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "scope_valid_films.json")
    return p.parse_args(argv)


def demo_model(folder: Path) -> Path:
    """The model ``tools/demo.sh`` trains: the bundled sample, pneumo's defaults."""
    from pneumo.training.loop import train

    train(SAMPLE, out=folder / "run", progress=False, quiet=True)
    return folder / "run" / "model"


def features_of(model: LoadedModel, paths: list[Path]) -> np.ndarray:
    decoded = decode_images(paths, model.meta.image_size, progress=False, use_cache=False)
    if not decoded.ok.all():
        raise SystemExit(f"unreadable films: {sorted(decoded.errors)[:3]}")
    return scope_features(model, np.asarray(decoded.pixels))


def false_rates(
    pool: np.ndarray, labels: np.ndarray, patients: np.ndarray, test: np.ndarray, n: int, draws: int, seed: int
) -> dict[str, Any]:
    """The false out-of-scope rates of scopes fitted on ``n`` pool films, over ``draws`` draws."""
    rng = np.random.default_rng([seed, n])
    on_pool, on_test = [], []
    for draw in range(draws):
        valid = stratified_indices(labels, n, rng)
        others = ~np.isin(patients, patients[valid])
        scope = fit_feature_scope(pool[valid], seed=draw)
        on_pool.append(float(np.mean(scope.distances(pool[others]) > scope.threshold)))
        on_test.append(float(np.mean(scope.distances(test) > scope.threshold)))
    pool_rates, test_rates = np.array(on_pool), np.array(on_test)
    return {
        "valid_films": n,
        "pool_false_rate_mean": rounded(pool_rates.mean()),
        "pool_false_rate_median": rounded(np.median(pool_rates)),
        "pool_false_rate_p90": rounded(np.percentile(pool_rates, 90)),
        "pool_false_rate_max": rounded(pool_rates.max()),
        "sample_test_false_rate_mean": rounded(test_rates.mean()),
        "sample_test_draws_flagging_any": rounded(np.mean(test_rates > 0), 3),
    }


def trusted_from(rows: list[dict[str, Any]]) -> int | None:
    """The smallest N from which on every measured N meets both limits (None: none does)."""
    good = [r["pool_false_rate_mean"] <= MAX_MEAN_FALSE and r["pool_false_rate_p90"] <= MAX_P90_FALSE for r in rows]
    for i, row in enumerate(rows):
        if all(good[i:]):
            return row["valid_films"]
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="pneumo_scope_n_") as tmp:
        folder = args.model or demo_model(Path(tmp))
        model = load_model(folder)
        trained_s = round(time.perf_counter() - start_wall, 1)
        stored = read_feature_scope(model.folder)
        sample_patients = {s.patient for s in discover(SAMPLE).samples}
        pool_data = discover(args.pool)
        candidates = [s for s in pool_data.samples if s.patient not in sample_patients]
        labels_all = np.array([s.label for s in candidates])
        chosen = stratified_indices(labels_all, args.pool_films, np.random.default_rng(args.seed))
        pool_samples = [candidates[i] for i in chosen]
        test_paths = sorted(p for p in (SAMPLE / "test").rglob("*.jpeg"))
        pool = features_of(model, [s.path for s in pool_samples])
        test = features_of(model, test_paths)
        features_s = round(time.perf_counter() - start_wall - trained_s, 1)
        # the case: the model's own stored scope (fitted by training on its validation films)
        own = None
        if stored is not None:
            ratios = stored.distances(test) / stored.threshold
            own = {
                "valid_films": len(stored.valid_distances),
                "sample_test_flagged": int((ratios > 1).sum()),
                "sample_test_films": len(test_paths),
                "largest_ratio": rounded(ratios.max(), 3),
            }
    labels = np.array([s.label for s in pool_samples])
    patients = np.array([s.patient for s in pool_samples])
    sizes = [int(n) for n in args.sizes.split(",") if int(n) <= len(pool_samples) // 2]
    rows = [false_rates(pool, labels, patients, test, n, args.draws, args.seed) for n in sizes]
    return {
        "model": "demo (bundled sample, pneumo defaults)" if args.model is None else str(args.model),
        "arch": model.meta.arch,
        "image_size": model.meta.image_size,
        "pool": {
            "data": args.pool.name,
            "films": len(pool_samples),
            "per_class": {pool_data.classes[c]: int((labels == c).sum()) for c in np.unique(labels)},
            "sample_patients_left_out": True,
        },
        "sample_test_films": len(test_paths),
        "draws": args.draws,
        "nominal_false_rate": 0.005,
        "limits": {"mean": MAX_MEAN_FALSE, "p90": MAX_P90_FALSE},
        "model_own_scope": own,
        "by_valid_films": rows,
        "summary": {"trusted_from": trusted_from(rows)},
        "timing": {
            "train_s": trained_s if args.model is None else 0.0,
            "features_s": features_s,
            "total_wall_s": round(time.perf_counter() - start_wall, 1),
            "cpu_s": round(cpu_seconds() - start_cpu, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_report(lambda: run(args), args.out, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
