"""Beyond one process, measured on this machine: batch predict (local vs Ray) and DDP epochs (1 vs 2).

Predict: a tiny model folder (efficientnet_lite0 trained one epoch on the bundled sample at
``--image-size``, 32 px by default, so that 20,000 files stay feasible on 2 shared cores) reads
archives of 1,000 and 20,000 files: symlinks to the 224 px Kaggle training images, cycled (5,216
distinct images, so 20,000 repeats each about four times; the JPEGs are decoded every time). Each
``pneumo predict ... --out`` runs as its own process; a sampler polls the process and all its
children (Ray's raylet, GCS and workers) every 0.5 s for the peak of their summed RSS and PSS (PSS
shares Ray's shared-memory object store fairly between the processes that map it; RSS counts it in
each). Throughput is the command's own figure, images over seconds from the file list to the last
row written, Ray's cluster start included (a fresh local cluster, ``--engine ray`` without
``--address``).

DDP: ``pneumo train`` on the bundled sample (or ``--ddp-data``, ``--ddp-per-class`` images of each
class) with 1 process and with ``--nproc 2`` (gloo), features mode and full mode: seconds per epoch
from ``metrics.csv``, the features pass from ``distributed.json``, and the peak summed RSS and PSS of
all the processes (the ranks map rank 0's decode cache: PSS counts those pixels once per node).
On a machine with 2 cores shared with other work, expect no speed-up: this
measures the overhead, not the scaling (README: the estimate for GPUs).

No file names are written: counts, seconds and bytes only.

    nice -n 15 .venv/bin/python bench/scale.py                   # writes bench/results/scale.json
    nice -n 15 .venv/bin/python bench/scale.py --sizes 1000 --skip-ddp
    .venv/bin/python bench/scale.py --skip-predict --ddp-modes features --ddp-image-size 224 \
        --ddp-data ../shared/data/chest_xray_224/train --ddp-per-class 1000 --ddp-epochs 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from common import DEFAULT_DATA, REPO, RESULTS, SAMPLE, write_report


def child_env(cache: Path | None = None) -> dict[str, str]:
    """Environment of a measured command: this checkout, one thread, no Ray usage statistics; the decode
    cache off, or in ``cache`` (training: the ranks of a node share rank 0's memory-mapped cache)."""
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    # one intra-op thread per process (what torchrun gives each rank): on a shared 2-core machine more
    # threads spin-wait for each other and burn the CPU share the measured work needs
    env = {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.update({"PNEUMO_CACHE": str(cache)} if cache else {"PNEUMO_NO_CACHE": "1"})
    return {**{k: v for k, v in os.environ.items() if k != "PNEUMO_NO_CACHE"}, **env}


class PeakMemory:
    """Peak summed RSS and PSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.5):
        self.root, self.every = psutil.Process(pid), every
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.pss_samples: list[int] = []  # summed PSS at every sample: a trend shows growth, a peak only spikes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for p in procs:
                try:
                    full = p.memory_full_info()
                    rss, pss = rss + full.rss, pss + getattr(full, "pss", full.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.pss_samples.append(pss)
            self.peak_processes = max(self.peak_processes, len(procs))
            self._stop.wait(self.every)

    def halves_mb(self) -> list[int]:
        """Median summed PSS over the first and the second half of the run (after start-up: from the
        first sample at half the peak): equal halves, memory that does not grow as the files go by."""
        start = next((i for i, v in enumerate(self.pss_samples) if v >= self.peak_pss / 2), 0)
        steady = self.pss_samples[start:]
        mid = len(steady) // 2
        return [round(float(np.median(half)) / 2**20) for half in (steady[:mid], steady[mid:]) if half]

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(
    cmd: list[str], cwd: Path, cache: Path | None = None
) -> tuple[subprocess.CompletedProcess, PeakMemory, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=child_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with PeakMemory(proc.pid) as memory:
        out, err = proc.communicate()
    wall = time.perf_counter() - started
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return done, memory, wall


def make_archive(data: Path, n: int, folder: Path) -> Path:
    """``n`` symlinks to the images under ``data``, cycled, named by number only."""
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not images:
        raise SystemExit(f"{data}: no images")
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i:06d}.jpeg").symlink_to(images[i % len(images)])
    return folder


def train_cmd(out: Path, extra: list[str], data: Path = SAMPLE) -> list[str]:
    return [sys.executable, "-m", "pneumo", "train", str(data), "--out", str(out), "--json", *extra]


def make_subset(data: Path, per_class: int, folder: Path) -> Path:
    """The first ``per_class`` images of each class folder of ``data``, as symlinks under their own names
    (the patient split reads patients from the names)."""
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        (folder / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:per_class]:
            (folder / cls.name / image.name).symlink_to(image)
    return folder


def bench_ddp(work: Path, data: Path, image_size: int, epochs: int, modes: list[str], views: int) -> dict:
    results = {}
    for mode in modes:
        for nproc in (1, 2):
            out = work / f"ddp-{mode}-{nproc}"
            extra = ["--epochs", str(epochs), "--image-size", str(image_size), "--mode", mode, "--seed", "3"]
            extra += ["--feature-views", str(views), *(["--nproc", "2"] if nproc == 2 else [])]
            cache = work / f"cache-{mode}-{nproc}"  # each run decodes afresh into its own cache
            _, memory, wall = run_measured(train_cmd(out, extra, data), work, cache)
            with (out / "metrics.csv").open() as fh:
                rows = list(csv.DictReader(fh))
            record = json.loads((out / "distributed.json").read_text()) if nproc == 2 else {}
            results[f"{mode}_{nproc}proc"] = {
                "epoch_seconds": [float(r["time"]) for r in rows],
                "valid_loss": [float(r["valid_loss"]) for r in rows],
                "error_rate": [float(r["error_rate"]) for r in rows],
                "timings": record.get("timings"),
                "weights_identical_across_ranks": len(set(record["weights_sha256"])) == 1 if record else None,
                "command_wall_s": round(wall, 1),
                "peak_rss_mb": round(memory.peak_rss / 2**20),
                "peak_pss_mb": round(memory.peak_pss / 2**20),
            }
    return results


def bench_predict(work: Path, data: Path, model: Path, sizes: list[int], engines: list[str], chunk: int) -> dict:
    results: dict = {}
    for n in sizes:
        archive = make_archive(data, n, work / f"archive-{n}")
        for engine in engines:
            out = work / f"pred-{engine}-{n}.csv"
            cmd = [sys.executable, "-m", "pneumo", "predict", str(model), str(archive), "--out", str(out)]
            cmd += ["--engine", engine, "--chunk-size", str(chunk), "--json"]
            done, memory, wall = run_measured(cmd, work)
            summary = json.loads(done.stdout)
            with out.open() as fh:
                rows = sum(1 for _ in fh) - 1
            results[f"{engine}_{n}"] = {
                "engine": engine,
                "files": n,
                "rows_written": rows,
                "errors": summary["errors"],
                "seconds": summary["seconds"],
                "images_per_s": summary["files_per_second"],
                "command_wall_s": round(wall, 1),
                "peak_rss_mb": round(memory.peak_rss / 2**20),
                "peak_pss_mb": round(memory.peak_pss / 2**20),
                "median_pss_mb_first_and_second_half": memory.halves_mb(),
                "peak_processes": memory.peak_processes,
            }
            print(json.dumps({f"{engine}_{n}": results[f"{engine}_{n}"]}), file=sys.stderr, flush=True)
        shutil.rmtree(archive)
    for engine in engines:  # memory must not grow with the archive
        small, large = results.get(f"{engine}_{min(sizes)}"), results.get(f"{engine}_{max(sizes)}")
        if small and large and small is not large:
            results[f"{engine}_pss_growth_mb"] = large["peak_pss_mb"] - small["peak_pss_mb"]
            results[f"{engine}_peak_pss_mb_by_files"] = {n: results[f"{engine}_{n}"]["peak_pss_mb"] for n in sizes}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", default="1000,20000")
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--ddp-epochs", type=int, default=2)
    ap.add_argument("--ddp-modes", default="features,full", help="training modes to time with 1 and 2 processes")
    ap.add_argument("--ddp-data", type=Path, default=SAMPLE, help="class folders to train on (default: the sample)")
    ap.add_argument("--ddp-per-class", type=int, default=0, help="only the first N images of each class (0: all)")
    ap.add_argument("--ddp-image-size", type=int, default=None, help="default: --image-size")
    ap.add_argument("--ddp-views", type=int, default=1, help="--feature-views of the DDP runs")
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    ap.add_argument(
        "--model", type=Path, default=None, help="a model folder to predict with (default: train the tiny one)"
    )
    args = ap.parse_args()

    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "2 cores shared with other jobs while measured; figures are for this machine only",
        },
        "image_size": args.image_size,
        "chunk_size": args.chunk_size,
    }
    with tempfile.TemporaryDirectory(prefix="pneumo-scale-") as tmp:
        work = Path(tmp)
        if not args.skip_ddp:
            data = args.ddp_data
            if args.ddp_per_class:
                data = make_subset(data, args.ddp_per_class, work / "ddp-data")
            size = args.ddp_image_size or args.image_size
            result["ddp"] = {
                "data": "the bundled sample"
                if args.ddp_data == SAMPLE
                else f"{args.ddp_data.name}, first {args.ddp_per_class or 'all'} images per class",
                "images": sum(1 for p in data.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"}),
                "image_size": size,
                "feature_views": args.ddp_views,
                "runs": bench_ddp(work, data, size, args.ddp_epochs, args.ddp_modes.split(","), args.ddp_views),
            }
        if not args.skip_predict:
            model_run = work / "predict-model"
            if args.model is None:
                extra = ["--epochs", "1", "--image-size", str(args.image_size), "--seed", "3"]
                run_measured(train_cmd(model_run, extra), work)
            model = args.model or model_run / "model"
            sizes = [int(s) for s in args.sizes.split(",")]
            engines = args.engines.split(",")
            result["predict"] = bench_predict(work, args.data, model, sizes, engines, args.chunk_size)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
