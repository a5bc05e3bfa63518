"""pneumo against fastai on the tutorial's recipe: lr_find, then fit_one_cycle(epochs, 3e-3), same split.

Each library runs in its own process (so its peak memory is its own), lr_find first as in the
tutorial, then training. pneumo runs exactly as a user gets it (``pneumo.lr_find`` and
``pneumo.train``: features mode, the default on every device) on one cache that starts empty, so its
times include JPEG decoding as fastai's include its loading; lr-find computes the features and train
reuses them, as they do for a user who runs one after the other. fastai then trains on
the very files of pneumo's ``split.json``. Prints one JSON object::

    .venv/bin/python bench/speed.py --limit 1000 --epochs 2            # CPU
    .venv/bin/python bench/speed.py --device cuda --epochs 8            # GPU, all 5,216 images

``pneumo.fit_s`` is the whole ``train()`` call (decoding, BatchNorm adaptation, features, epochs,
evaluation, figures, model export); ``fastai.fit_s`` is ``fit_one_cycle`` alone, not counting its
DataLoaders and learner setup (``fastai.setup_s``): both choices favour fastai.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import BENCH, DEFAULT_DATA, cpu_seconds, stratified_subset


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_pneumo(
    data: Path,
    workdir: Path,
    *,
    epochs: int,
    image_size: int,
    split: str,
    device: str,
    seed: int,
    lr_find_iters: int,
    skip_lr_find: bool,
) -> dict:
    """pneumo.lr_find then pneumo.train, as a user runs them: one cache, empty at the start (so lr-find
    pays for decoding and features and train reuses them); run folder in ``workdir/run``."""
    import torch

    from pneumo.config import TrainConfig
    from pneumo.training.events import Callback
    from pneumo.training.loop import train
    from pneumo.training.lr_finder import lr_find
    from pneumo.training.setup import resolve_mode

    class StageTimes(Callback):
        """The seconds train() records per stage (decode_s, create_model_s, bn_adapt_s, features_s, finish_s)."""

        def __init__(self) -> None:
            self.seconds: dict[str, float] = {}

        def on_run_end(self, run, result) -> None:
            self.seconds = dict(run.timings)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    options = dict(image_size=image_size, split=split, valid_pct=0.2, seed=seed, device=device, batch_size=64, lr=3e-3)
    result: dict[str, Any] = {"library": "pneumo", "torch_threads": torch.get_num_threads()}
    shutil.rmtree(workdir / "cache", ignore_errors=True)  # start empty, even in a reused --workdir
    os.environ["PNEUMO_CACHE"] = str(workdir / "cache")
    if not skip_lr_find:
        t0, c0 = time.perf_counter(), cpu_seconds()
        found = lr_find(data, out=workdir / "lr_find", num_it=lr_find_iters, progress=False, **options)
        result["lr_find_s"] = round(time.perf_counter() - t0, 2)
        result["lr_find_cpu_s"] = round(cpu_seconds() - c0, 2)
        result["lr_find_iters"] = len(found.lrs)
        result["lr_find_valley"] = found.suggestion
        result["lr_find_parts"] = {k: round(v, 2) for k, v in found.timings.items()}
    stages = StageTimes()
    t0, c0 = time.perf_counter(), cpu_seconds()
    run = train(data, out=workdir / "run", epochs=epochs, progress=False, callbacks=[stages], **options)
    fit_s, fit_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    n_train = len(json.loads((run.run_dir / "split.json").read_text())["train"])
    parts = {
        k: round(stages.seconds.get(k, 0.0), 3 if k == "decode_s" else 2)
        for k in ("decode_s", "create_model_s", "bn_adapt_s", "features_s", "finish_s")
    }
    result.update(
        {
            "fit_s": round(fit_s, 2),
            "fit_cpu_s": round(fit_cpu_s, 2),
            "img_per_s": round(n_train * epochs / fit_s, 2),
            **parts,
            "epochs_s": round(sum(row["time"] for row in run.history), 2),
            "valid_error": run.history[-1]["error_rate"],
            "valid_loss": run.history[-1]["valid_loss"],
            "mode": resolve_mode(TrainConfig.from_dict(json.loads((run.run_dir / "config.json").read_text()))),
            "peak_mem_mb": peak_memory_mb(device),
            "run_dir": str(run.run_dir),
        }
    )
    return result


def run_json(cmd: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run one side in its own process; its stdout is one JSON object, its stderr passes through."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict:
    import platform

    import torch

    info = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import fastai

        info["fastai"] = fastai.__version__
    except ImportError:
        info["fastai"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def compare(p: dict, f: dict | None) -> dict:
    if not f:
        return {}
    p_recipe = p.get("lr_find_s", 0) + p["fit_s"]
    f_recipe = f.get("lr_find_s", 0) + f["fit_s"] + f["setup_s"]
    return {
        "fit_speedup": ratio(f["fit_s"], p["fit_s"]),
        "lr_find_speedup": ratio(f.get("lr_find_s"), p.get("lr_find_s")),
        "recipe_speedup": ratio(f_recipe, p_recipe),
        "error_diff": round(p["valid_error"] - f["valid_error"], 6),
        "fit_cpu_ratio": ratio(f["fit_cpu_s"], p["fit_cpu_s"]),
        "lr_find_cpu_ratio": ratio(f.get("lr_find_cpu_s"), p.get("lr_find_cpu_s")),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class folders (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use N images, stratified by class, seeded")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--split",
        choices=["random", "patient"],
        default="random",
        help="random image split (the tutorial's, default) or by patient",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="fastai DataLoader workers (default: fastai's)")
    p.add_argument("--lr-find-iters", type=int, default=100, help="LR range test iterations, both sides")
    p.add_argument("--skip-lr-find", action="store_true")
    p.add_argument("--skip-fastai", action="store_true")
    p.add_argument("--fastai-fp16", action="store_true", help="fastai with learn.to_fp16() (tutorial: fp32)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", type=Path, default=None, help="keep subset, caches and runs here (default: temp)")
    p.add_argument("--side", choices=["both", "pneumo"], default="both", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side == "pneumo":  # the child process: one side only
        with contextlib.redirect_stdout(sys.stderr):  # pneumo's epoch table goes to stderr; stdout is JSON
            result = run_pneumo(
                args.data,
                args.workdir,
                epochs=args.epochs,
                image_size=args.image_size,
                split=args.split,
                device=args.device,
                seed=args.seed,
                lr_find_iters=args.lr_find_iters,
                skip_lr_find=args.skip_lr_find,
            )
        print(json.dumps(result))
        return 0

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pneumo_speed_")))
        workdir.mkdir(parents=True, exist_ok=True)
        data = stratified_subset(args.data, args.limit, args.seed, workdir / "subset") if args.limit else args.data
        load_before = os.getloadavg()
        common = [
            "--epochs",
            str(args.epochs),
            "--image-size",
            str(args.image_size),
            "--device",
            args.device,
            "--seed",
            str(args.seed),
            "--lr-find-iters",
            str(args.lr_find_iters),
        ]
        common += ["--skip-lr-find"] if args.skip_lr_find else []
        print("pneumo: lr_find + train ...", file=sys.stderr)
        pneumo_side = run_json(
            [
                sys.executable,
                __file__,
                "--side",
                "pneumo",
                "--data",
                str(data),
                "--workdir",
                str(workdir),
                "--split",
                args.split,
                *common,
            ]
        )
        fastai_side = None
        if not args.skip_fastai:
            print("fastai: lr_find + fit_one_cycle ...", file=sys.stderr)
            extra = ["--workers", str(args.workers)] if args.workers is not None else []
            extra += ["--fp16"] if args.fastai_fp16 else []
            fastai_side = run_json(
                [
                    sys.executable,
                    str(BENCH / "fastai_peer.py"),
                    "--split-json",
                    str(Path(pneumo_side["run_dir"]) / "split.json"),
                    "--workdir",
                    str(workdir / "fastai"),
                    *common,
                    *extra,
                ]
            )
        split = json.loads((Path(pneumo_side["run_dir"]) / "split.json").read_text())
        report = {
            "config": {
                "data": str(args.data),
                "limit": args.limit,
                "n_train": len(split["train"]),
                "n_valid": len(split["valid"]),
                "epochs": args.epochs,
                "image_size": args.image_size,
                "split": args.split,
                "device": args.device,
                "lr": 3e-3,
                "batch_size": 64,
                "lr_find_iters": None if args.skip_lr_find else args.lr_find_iters,
                "seed": args.seed,
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                **environment(args.device),
            },
            "pneumo": pneumo_side,
            "fastai": fastai_side,
            "ratios": compare(pneumo_side, fastai_side),
        }
        if args.workdir is None:
            report["pneumo"].pop("run_dir")
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
