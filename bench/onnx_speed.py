"""onnxruntime against PyTorch on the CPU, same model, same pixels, same run; and what each install weighs.

    nice -n 15 .venv/bin/python bench/onnx_speed.py RUN/model [--films FOLDER] [--install-sizes]

Exports MODEL to ONNX first when it has no ``model.onnx`` (``pneumo export``). Latency: one film at a
time, the two runtimes interleaved call by call so that a busy machine slows both alike; throughput:
a batch of 64 films. Both runtimes get the same number of intra-op threads (``--threads``, default
all cores). ``--install-sizes`` builds two throwaway virtualenvs from this machine's pip (the full
install: ``torch==2.14.1 torchvision==0.29.1`` then ``pip install .``; the torch-free one:
``pip install --no-deps .`` then ``requirements-serve-onnx.txt``), measures them with ``du`` and
deletes them. Prints JSON and writes ``bench/results/onnx_speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, RESULTS, write_report

TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # as the Makefile installs


def films(folder: Path, size: int, n: int) -> np.ndarray:
    from pneumo.data.cache import decode_images
    from pneumo.data.folders import is_image_file

    paths = sorted(p for p in folder.rglob("*") if is_image_file(p))[:n]
    decoded = decode_images(paths, size, progress=False, use_cache=False)
    pixels = np.asarray(decoded.pixels)[decoded.ok]
    reps = -(-n // len(pixels))  # fewer films than asked: repeat them
    return np.concatenate([pixels] * reps)[:n]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def latency_and_throughput(torch_model, onnx_model, pixels: np.ndarray, repeats: int, batch_repeats: int) -> dict:
    one = {"torch": [], "onnx": []}
    models = {"torch": torch_model, "onnx": onnx_model}
    for m in models.values():  # warm-up: first calls allocate
        for _ in range(3):
            m.probabilities(pixels[:1])
        m.probabilities(pixels[:64], batch_size=64)
    for i in range(repeats):
        film = pixels[i % len(pixels)][None]
        for name in ("torch", "onnx") if i % 2 == 0 else ("onnx", "torch"):
            one[name].append(timed(models[name].probabilities, film))
    batch = {"torch": [], "onnx": []}
    for i in range(batch_repeats):
        for name in ("torch", "onnx") if i % 2 == 0 else ("onnx", "torch"):
            batch[name].append(timed(lambda m=models[name]: m.probabilities(pixels[:64], batch_size=64)))
    out: dict = {}
    for name in ("torch", "onnx"):
        ms = sorted(1000 * t for t in one[name])
        out[name] = {
            "latency_ms_median": statistics.median(ms),
            "latency_ms_p90": ms[int(0.9 * (len(ms) - 1))],
            "batch64_s_median": statistics.median(batch[name]),
            "throughput_images_per_s": 64 / statistics.median(batch[name]),
        }
    out["onnx_speedup_latency"] = out["torch"]["latency_ms_median"] / out["onnx"]["latency_ms_median"]
    out["onnx_speedup_throughput"] = out["onnx"]["throughput_images_per_s"] / out["torch"]["throughput_images_per_s"]
    out["latency_calls_each"], out["batch64_runs_each"] = repeats, batch_repeats
    return out


def venv_size(kind: str) -> dict:
    """Build a throwaway virtualenv of one kind, measure it, delete it."""
    root = Path(tempfile.mkdtemp(prefix=f"pneumo-venv-{kind}-"))
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if kind == "full":
            subprocess.run(pip + TORCH_PINS, check=True)
            subprocess.run(pip + [str(REPO)], check=True)
        else:
            subprocess.run(pip + ["--no-deps", str(REPO)], check=True)
            subprocess.run(pip + ["-r", str(REPO / "requirements-serve-onnx.txt")], check=True)
        du = subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True, check=True)
        freeze = subprocess.run(
            [str(root / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
        ).stdout.split()
        has_torch = any(line.lower().startswith("torch==") for line in freeze)
        return {
            "megabytes": int(du.stdout.split()[0]),
            "packages": len(freeze),
            "has_torch": has_torch,
            "install_s": round(time.perf_counter() - start, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder (RUN/model), run folder or ensemble")
    parser.add_argument("--films", default=None, help="folder of films to time on (default: the bundled sample)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=60, help="single-film calls per runtime")
    parser.add_argument("--batch-repeats", type=int, default=7, help="batches of 64 per runtime")
    parser.add_argument("--install-sizes", action="store_true", help="also build and measure both installs")
    parser.add_argument("--out", default=str(RESULTS / "onnx_speed.json"))
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    from pneumo.infer.model_folder import load_model, model_folder
    from pneumo.infer.onnx import SAMPLE_DATA, check_parity, export_onnx, load_onnx_model, parity_path

    torch.set_num_threads(args.threads)
    folder = model_folder(args.model)
    export_s = None
    if not (folder / "model.onnx").is_file():
        export_s = timed(lambda: export_onnx(folder, progress=False))
    torch_model = load_model(folder)
    onnx_model = load_onnx_model(folder, threads=args.threads)
    size = torch_model.meta.image_size
    pixels = films(Path(args.films) if args.films else SAMPLE_DATA, size, 64)
    result = {
        "model": {
            "arch": torch_model.meta.arch,
            "image_size": size,
            "onnx_bytes": (folder / "model.onnx").stat().st_size,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "threads_each": args.threads,
            "loadavg_before": os.getloadavg()[0],
        },
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0],
        },
        "export_s": export_s,
        "timing": latency_and_throughput(torch_model, onnx_model, pixels, args.repeats, args.batch_repeats),
        "parity_timed_films": check_parity(torch_model, onnx_model.session, pixels),
        "parity_at_export": json.loads(parity_path(folder / "model.onnx").read_text()),
    }
    result["machine"]["loadavg_after"] = os.getloadavg()[0]
    if args.install_sizes:
        result["install_megabytes"] = {"full": venv_size("full"), "serve_onnx": venv_size("serve-onnx")}
    write_report(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
