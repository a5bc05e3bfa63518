"""Load test for ``pneumo serve``: a bounded mix of good and bad uploads against a loopback server.

Starts the real CLI server (``python -m pneumo.cli serve``) on 127.0.0.1 at a free port, sends
``--requests`` uploads ``--concurrency`` at a time (full-resolution JPEGs and PNGs, with and
without heatmaps, plus text files, truncated JPEGs, decompression bombs and oversize uploads),
then stops the server and prints JSON: latency percentiles per kind, counts by status, server
errors (must be 0) and wall time. Bounded in count and in time (``--max-seconds``).

    python bench/load_test.py [--model RUN/model] [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "pneumo" / "sample_data" / "chest_xray"
FULLRES = Path("/work/shared/data/chest_xray_fullres_sample")
# kind -> (share of requests, expected status)
MIX = {
    "jpeg": (0.35, 200),
    "png": (0.15, 200),
    "jpeg_no_heatmap": (0.20, 200),
    "text_as_jpeg": (0.08, 415),
    "truncated_jpeg": (0.08, 422),
    "bomb_png": (0.07, 413),
    "oversize": (0.07, 413),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A ~1 kB PNG whose header claims a huge grey image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(width + 1), 9))
        + chunk(b"IEND", b"")
    )


def payloads(images: list[Path], max_upload_mb: float) -> dict[str, list[tuple[str, bytes, str]]]:
    """(filename, bytes, content type) choices for every kind of request."""
    jpegs = [(p.name, p.read_bytes(), "image/jpeg") for p in images]
    pngs = []
    for p in images[:4]:
        buf = io.BytesIO()
        Image.open(p).convert("L").save(buf, format="PNG")
        pngs.append((p.with_suffix(".png").name, buf.getvalue(), "image/png"))
    oversize = b"\xff\xd8\xff" + np.random.default_rng(0).bytes(int((max_upload_mb + 1) * 2**20))
    return {
        "jpeg": jpegs,
        "png": pngs,
        "jpeg_no_heatmap": jpegs,
        "text_as_jpeg": [("notes.jpeg", b"Patient notes, not an image.\n" * 40, "image/jpeg")],
        "truncated_jpeg": [(f"cut-{n}", data[: len(data) // 2], t) for n, data, t in jpegs[:4]],
        "bomb_png": [("bomb.png", bomb_png(), "image/png")],
        "oversize": [("huge.jpeg", oversize, "image/jpeg")],
    }


def train_model(out: Path, image_size: int, epochs: int) -> Path:
    from pneumo.training.loop import train

    print(f"load_test: no --model given; training one on the bundled sample at {image_size} px", file=sys.stderr)
    return train(SAMPLE, out=out, epochs=epochs, image_size=image_size, progress=False).model_dir


def start_server(model: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "pneumo.cli",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--queue",
        str(args.queue),
        "--max-upload-mb",
        str(args.max_upload_mb),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"load_test: server exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"load_test: server did not answer /health within 120 s; see {log}")


def one_request(
    client: httpx.Client, url: str, kind: str, item: tuple[str, bytes, str]
) -> tuple[str, int | str, float]:
    name, data, ctype = item
    params = {"heatmap": "false" if kind == "jpeg_no_heatmap" else "true"}
    start = time.perf_counter()
    try:
        status: int | str = client.post(url, params=params, files={"file": (name, data, ctype)}).status_code
    except httpx.HTTPError as exc:
        status = f"transport:{type(exc).__name__}"
    return kind, status, 1000 * (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_load(
    url: str, plan: list[str], items: dict, concurrency: int, max_seconds: float, seed: int
) -> tuple[list, float]:
    rng = np.random.default_rng(seed)
    results, start = [], time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0)) as client, ThreadPoolExecutor(concurrency) as pool:
        pending, queue = set(), list(plan)
        while queue or pending:
            while queue and len(pending) < concurrency and time.monotonic() - start < max_seconds:
                kind = queue.pop(0)
                choice = items[kind][int(rng.integers(len(items[kind])))]
                pending.add(pool.submit(one_request, client, url, kind, choice))
            if not pending:
                break  # out of time: the rest of the plan is never sent
            done, pending = wait(
                pending, timeout=max(1.0, max_seconds - (time.monotonic() - start)), return_when=FIRST_COMPLETED
            )
            results += [f.result() for f in done]
            if time.monotonic() - start > max_seconds + 130:  # requests time out at 120 s; this is a backstop
                break
    return results, time.monotonic() - start


def summarise(results: list, planned: int, wall: float, args: argparse.Namespace, model: Path) -> dict:
    kinds = {}
    for kind, (_, expected) in MIX.items():
        rows = [(s, ms) for k, s, ms in results if k == kind]
        kinds[kind] = {
            "n": len(rows),
            "expected": expected,
            "statuses": dict(Counter(str(s) for s, _ in rows)),
            "p50_ms": percentile([ms for _, ms in rows], 50),
            "p99_ms": percentile([ms for _, ms in rows], 99),
            "max_ms": round(max((ms for _, ms in rows), default=0.0), 1),
        }
    statuses = Counter(str(s) for _, s, _ in results)
    server_errors = sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s != "503")
    unexpected = sum(1 for k, s, _ in results if s != MIX[k][1] and s != 503)
    return {
        "model": str(model),
        "requests_planned": planned,
        "requests_done": len(results),
        "concurrency": args.concurrency,
        "workers": args.workers,
        "queue_limit": args.queue,
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 2) if wall else None,
        "status_counts": dict(sorted(statuses.items())),
        "server_errors": server_errors,
        "busy_503": statuses.get("503", 0),
        "transport_errors": sum(n for s, n in statuses.items() if s.startswith("transport")),
        "unexpected_status": unexpected,
        "kinds": kinds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder; default: train one on the sample")
    p.add_argument("--images", type=Path, default=None, help="folder of good JPEGs (default: full-res sample)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop sending new requests after this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue", type=int, default=32)
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    p.add_argument("--image-size", type=int, default=224, help="only when training a model")
    p.add_argument("--epochs", type=int, default=2, help="only when training a model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 64:
        p.error("--requests must be 1..10000 and --concurrency 1..64")

    with tempfile.TemporaryDirectory(prefix="pneumo-load-") as tmp:
        tmp_dir = Path(tmp)
        model = args.model or train_model(tmp_dir / "run", args.image_size, args.epochs)
        folder = args.images or (FULLRES if FULLRES.is_dir() else SAMPLE / "test")
        images = sorted(q for q in folder.rglob("*") if q.suffix.lower() in (".jpeg", ".jpg"))[:16]
        if not images:
            p.error(f"no JPEGs under {folder}")
        items = payloads(images, args.max_upload_mb)
        rng = np.random.default_rng(args.seed)
        shares = np.array([share for share, _ in MIX.values()])
        plan = list(rng.choice(list(MIX), size=args.requests, p=shares / shares.sum()))
        port = free_port()
        log = tmp_dir / "server.log"
        server = start_server(model, port, args, log)
        try:
            results, wall = run_load(
                f"http://127.0.0.1:{port}/api/predict", plan, items, args.concurrency, args.max_seconds, args.seed
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        report = summarise(results, len(plan), wall, args, model)
        report["images"] = str(folder)
        tail = log.read_text(errors="replace")
        report["server_tracebacks"] = tail.count("Traceback")
    print(json.dumps(report, indent=2))
    return (
        0
        if report["server_errors"] == 0 and report["transport_errors"] == 0 and report["server_tracebacks"] == 0
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
