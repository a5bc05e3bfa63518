"""What the audit trail costs ``pneumo serve``: requests/s and p50/p95 latency with and without it.

Starts three real CLI servers on loopback with the same model: ``--no-audit``, the default audit trail
(SQLite, WAL, synchronous=NORMAL) and ``PNEUMO_AUDIT_SYNC=FULL`` (an fsync per reading). Rounds
alternate between them (so load from other processes on the machine hits all three alike); each round
sends ``--requests`` uploads ``--concurrency`` at a time. Afterwards the audited databases must hold
exactly one row per answered request. Prints JSON and writes it to ``--out``.

    python bench/audit_overhead.py [--model RUN/model] [--rounds 6] [--requests 40] [--concurrency 4]

Without ``--model`` an untrained efficientnet_lite0 at 224 px is used: the same computation per image
as the default trained model (the trail records whatever the model says).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from common import RESULTS, SAMPLE, free_port, wait_for_health, write_report

VARIANTS = {"no_audit": None, "audit_normal": "NORMAL", "audit_full": "FULL"}


def untrained_model(folder: Path) -> Path:
    from pneumo.infer.model_folder import ModelMeta, save_model
    from pneumo.nets.models import create_model

    meta = ModelMeta(
        arch="efficientnet_lite0", classes=["NORMAL", "PNEUMONIA"], image_size=224, positive_class="PNEUMONIA"
    )
    return save_model(create_model("efficientnet_lite0", pretrained="imagenet"), meta, folder / "model")


def start_server(model: Path, sync: str | None, db: Path, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pneumo", "serve", str(model), "--port", str(port), "--workers", str(workers)]
    cmd += ["--no-audit"] if sync is None else ["--db", str(db)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PNEUMO_AUDIT_SYNC": sync or "NORMAL"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_for_health(proc, base, log, 180, "audit_overhead")
    return proc, base


def write_cost(model: Path, work: Path, sync: str, n: int = 200) -> dict:
    """Milliseconds per ``AuditTrail.record_reading`` alone (hash, header, insert, commit), ``n`` in a row."""
    os.environ["PNEUMO_AUDIT_SYNC"] = sync
    from pneumo.audit.record import AuditTrail

    trail = AuditTrail.open(work / f"writes_{sync}.sqlite", model)
    data = next(SAMPLE.glob("test/*/*.jpeg")).read_bytes()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        trail.record_reading(data, [0.3, 0.7], 10.0, size=(224, 224))
        times.append(1000 * (time.perf_counter() - start))
    trail.close()
    return {"n": n, "p50_ms": round(float(np.median(times)), 2), "p95_ms": round(float(np.percentile(times, 95)), 2)}


def one_round(base: str, images: list[bytes], requests: int, concurrency: int) -> tuple[list[float], float, int]:
    """Latencies (ms) of the answered requests, the round's wall seconds, and the failures."""

    def one(i: int) -> float | None:
        start = time.perf_counter()
        r = client.post(
            f"{base}/api/predict", params={"heatmap": "false"}, files={"file": ("x.jpeg", images[i % len(images)])}
        )
        return 1000 * (time.perf_counter() - start) if r.status_code == 200 else None

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r is not None]
    return ok, wall, len(results) - len(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=40, help="per round and variant")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "audit_overhead.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pneumo-audit-bench-"))
    model = args.model or untrained_model(work)
    images = [p.read_bytes() for p in sorted(SAMPLE.glob("test/*/*.jpeg"))]
    servers = {}
    try:
        for name, sync in VARIANTS.items():
            servers[name] = start_server(model, sync, work / f"{name}.sqlite", args.workers, work / f"{name}.log")
        for _, base in servers.values():  # warm-up: first requests pay for lazy initialisation
            one_round(base, images, 2 * args.concurrency, args.concurrency)
        latencies: dict[str, list[float]] = {n: [] for n in VARIANTS}
        walls: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
        per_round: dict[str, list[float]] = {n: [] for n in VARIANTS}
        failures: dict[str, int] = dict.fromkeys(VARIANTS, 0)
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                ok, wall, failed = one_round(servers[name][1], images, args.requests, args.concurrency)
                latencies[name] += ok
                walls[name] += wall
                per_round[name].append(round(len(ok) / wall, 2))
                failures[name] += failed
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=60)

    warmup = 2 * args.concurrency
    report: dict = {
        "model": str(args.model) if args.model else "untrained efficientnet_lite0, 224 px",
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "heatmap": False,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "note": "shared machine; rounds alternate between the variants so outside load falls on all alike",
        "variants": {},
    }
    for name, sync in VARIANTS.items():
        lat = np.array(latencies[name])
        entry = {
            "answered": int(lat.size),
            "failed": failures[name],
            "requests_per_s": round(lat.size / walls[name], 3),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "requests_per_s_by_round": per_round[name],
        }
        if sync is not None:
            with sqlite3.connect(work / f"{name}.sqlite") as c:
                entry["rows"] = c.execute("select count(*) from readings").fetchone()[0]
            entry["rows_match_answered"] = entry["rows"] == lat.size + warmup
        report["variants"][name] = entry
    base = report["variants"]["no_audit"]
    for name in ("audit_normal", "audit_full"):
        v = report["variants"][name]
        v["throughput_change_pct"] = round(100 * (v["requests_per_s"] / base["requests_per_s"] - 1), 1)
        v["p50_change_ms"] = round(v["p50_ms"] - base["p50_ms"], 1)
        v["p95_change_ms"] = round(v["p95_ms"] - base["p95_ms"], 1)
    report["write_cost_alone"] = {sync: write_cost(model, work, sync) for sync in ("NORMAL", "FULL")}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
