"""What the benchmark scripts share: where things lie, seeded stratified subsets, and the way a
script ends (its JSON on stdout, written to a file too, pneumo's own prints on stderr).

A script in bench/ imports it as ``common`` (Python puts the script's folder first on ``sys.path``);
the tests load bench scripts with ``conftest.load_bench``, which does the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SAMPLE = REPO / "src" / "pneumo" / "sample_data" / "chest_xray"
SHARED_DATA = REPO.parent / "shared" / "data"  # beside the checkout
if not SHARED_DATA.is_dir():  # a clone elsewhere on the development machine
    SHARED_DATA = Path("/work/shared/data")
DEFAULT_DATA = SHARED_DATA / "chest_xray_224" / "train"
OUTSIDE_DEV = SHARED_DATA / "chest_xray_224" / "outside_dev"  # issue 26: measure and choose here, never train


# ---------------------------------------------------------------- subsets


def stratified_indices(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``limit`` films, class proportions kept (largest remainders, so they add up
    to ``limit``), drawn with ``rng``; in the original order. ``None`` or more than there are: all."""
    labels = np.asarray(labels)
    if limit is None or limit >= labels.size:
        return np.arange(labels.size)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / labels.size * limit).astype(int)
    for i in np.argsort(-(counts / labels.size * limit - quota), kind="stable")[: limit - quota.sum()]:
        quota[i] += 1
    keep = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep))


def stratified_subset(root: Path, limit: int, seed: int, dest: Path) -> Path:
    """A folder of class folders under ``dest`` holding symlinks to ``limit`` images of ``root`` (its
    test split left out), class proportions kept, seeded; ``root`` itself when it holds no more."""
    from pneumo.data.folders import discover

    samples = [s for s in discover(root).samples if s.split != "test"]
    if limit >= len(samples):
        return root
    by_class: dict[str, list[Path]] = {}
    for s in samples:
        by_class.setdefault(s.path.parent.name, []).append(s.path)
    rng = random.Random(seed)
    left, total = limit, len(samples)
    for i, (name, paths) in enumerate(sorted(by_class.items())):
        paths = sorted(paths)
        rng.shuffle(paths)
        take = left if i == len(by_class) - 1 else round(limit * len(paths) / total)
        left -= take
        (dest / name).mkdir(parents=True, exist_ok=True)
        for p in paths[:take]:
            (dest / name / p.name).symlink_to(p.resolve())
    return dest


# ---------------------------------------------------------------- measuring


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: less load-sensitive than wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def free_port() -> int:
    """A loopback port nobody listens on now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, base: str, log: Path, seconds: float, who: str) -> None:
    """Return once the server ``proc`` started answers ``base``/health with 200; end the benchmark
    (naming ``who`` and the server's ``log``) if it exits or stays silent for ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{who}: server exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{who}: server did not answer /health within {seconds:g} s; see {log}")


def rounded(value: Any, digits: int = 4) -> float | None:
    """A figure for a JSON report: rounded, and None for None, NaN or infinity (JSON has no NaN)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), digits)


# ---------------------------------------------------------------- ending a script


def write_report(report: dict, out: Path | None = None, indent: int = 2) -> None:
    """The report as JSON on stdout and, with ``out``, in that file too (written whole or not at all;
    the printed copy then says where: ``written_to``)."""
    if out is not None:
        from pneumo.io_utils import atomic_write_text

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), json.dumps(report, indent=indent) + "\n")
        report = {**report, "written_to": str(out)}
    print(json.dumps(report, indent=indent))


def run_report(run: Callable[[], dict], out: Path | Callable[[dict], Path] | None = None, indent: int = 2) -> int:
    """A script's ``main`` body: ``run()`` with anything pneumo prints sent to stderr (stdout is the
    JSON), a ``PneumoError`` said in one line with exit status 2, else the report written
    (``write_report``; ``out`` may be a function of the report) and 0."""
    from pneumo.errors import PneumoError

    try:
        with contextlib.redirect_stdout(sys.stderr):
            report = run()
    except PneumoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, out(report) if callable(out) else out, indent)
    return 0
