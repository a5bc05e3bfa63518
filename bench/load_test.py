"""Load test for ``pneumo serve``: a bounded mix of good and bad uploads against a loopback server.

Starts the real CLI server (``python -m pneumo serve``) on 127.0.0.1 at a free port, optionally
under a file-descriptor limit (``--descriptors``, the issue's 256), sends ``--requests`` uploads
``--concurrency`` at a time (full-resolution JPEGs and PNGs, with and without heatmaps, plus text
files, truncated JPEGs, decompression bombs, a real 8,900 x 8,900 PNG of ~250 KB and oversize
uploads) while ``--slow-clients`` sockets hang on it (idle, headers a byte at a time, a body that
never ends) and /health is probed every 0.5 s. Then it stops the server and prints JSON: errors
(server errors, transport errors, unexpected statuses: all must be 0), latency p50/p95/p99 per kind
and overall, /health latency under load, slow clients closed by the server, the server's RSS
before and after the load and its peak, tracebacks and bytes in the server log, wall time.

    python bench/load_test.py [--model RUN/model] [--requests 200] [--concurrency 8] \
        [--slow-clients 300 --descriptors 256] [--json-out bench/results/load_test.json]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import SAMPLE, free_port, wait_for_health, write_report

FULLRES = Path("/work/shared/data/chest_xray_fullres_sample")
# kind -> (share of requests, expected status)
MIX = {
    "jpeg": (0.35, 200),
    "png": (0.15, 200),
    "jpeg_no_heatmap": (0.20, 200),
    "text_as_jpeg": (0.08, 415),
    "truncated_jpeg": (0.08, 422),
    "bomb_png": (0.05, 413),
    "png_8900_square": (0.03, 413),
    "oversize": (0.06, 413),
}


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


def png_8900_square(side: int = 8900) -> bytes:
    """A valid grey PNG of side x side (79 MP), mostly black, ~250 KB: the issue's 670 MB upload."""
    noisy = np.random.default_rng(0).integers(0, 256, (20, side), dtype=np.uint8)
    compress = zlib.compressobj(9)
    rows = (noisy[y].tobytes() if y < len(noisy) else bytes(side) for y in range(side))
    body = b"".join(compress.compress(b"\x00" + row) for row in rows) + compress.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


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
        "png_8900_square": [("square.png", png_8900_square(), "image/png")],
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
    for option, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if value is not None:  # left out, the command's default (and an older server still starts)
            cmd += [option, str(value)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def limit_descriptors() -> None:
        if args.descriptors:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.descriptors, args.descriptors))

    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, preexec_fn=limit_descriptors)
    wait_for_health(proc, f"http://127.0.0.1:{port}", log, 120, "load_test")
    return proc


def rss_mb(pid: int) -> dict[str, float]:
    """The server's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kb = line.split()[:2]
                fields[name.rstrip(":")] = round(int(kb) / 1024, 1)
    return {"rss_mb": fields.get("VmRSS", 0.0), "peak_rss_mb": fields.get("VmHWM", 0.0)}


class SlowClients:
    """Sockets that hang on the server: idle, headers a byte every 0.2 s, a body that stops after 4 bytes."""

    def __init__(self, port: int, count: int):
        self.port, self.count, self.sockets = port, count, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.opened = self.closed_by_server = 0

    def _connect(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            return None
        s.setblocking(False)
        self.sockets.append(s)
        self.opened += 1
        return s

    def _run(self) -> None:
        kinds = ["idle", "trickle", "stalled_body"]
        trickle = b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n"
        body = b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        body += b"Content-Length: 100000\r\n\r\n--b\r\n"
        tricklers: list[tuple[socket.socket, int]] = []
        while not self.stop.is_set():  # keep `count` sockets open: replace those the server closed
            self._reap()
            while len(self.sockets) < self.count and not self.stop.is_set():
                kind = kinds[self.opened % 3]
                s = self._connect()
                if s is None:
                    break
                if kind == "stalled_body":
                    try:
                        s.send(body)
                    except OSError:
                        pass
                elif kind == "trickle":
                    tricklers.append((s, 0))
            tricklers = [(s, i + 1) for s, i in tricklers if s in self.sockets and i < len(trickle)]
            for s, i in tricklers:
                try:
                    s.send(trickle[i - 1 : i])
                except OSError:
                    pass
            time.sleep(0.2)

    def _reap(self) -> None:
        alive = []
        for s in self.sockets:
            try:
                data = s.recv(4096)
                if data == b"":
                    self.closed_by_server += 1
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                self.closed_by_server += 1
                s.close()
                continue
            alive.append(s)
        self.sockets = alive

    def __enter__(self) -> SlowClients:
        if self.count:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        for s in self.sockets:
            s.close()


def watch_descriptors(pid: int, stop: threading.Event, peak: dict) -> None:
    """The most descriptors the server held at once (sampled every 20 ms), and of which kinds."""
    while not stop.is_set():
        try:
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # one closed while listed
            continue
        if len(targets) > peak.get("count", 0):
            kinds = Counter(t.split(":")[0] if ":" in t else "file" for t in targets)
            peak.update(count=len(targets), kinds=dict(kinds))
        stop.wait(0.02)


def probe_health(url: str, stop: threading.Event, out: list) -> None:
    """GET /health every 0.5 s: (latency ms or None, status) while the load runs."""
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status: int | str = client.get(url).status_code
            except httpx.HTTPError as exc:
                status = f"transport:{type(exc).__name__}"
            out.append((status, 1000 * (time.perf_counter() - start)))
            stop.wait(0.5)


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
            "p95_ms": percentile([ms for _, ms in rows], 95),
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
        "latency_ms": {
            "p50": percentile([ms for _, _, ms in results], 50),
            "p95": percentile([ms for _, _, ms in results], 95),
            "p99": percentile([ms for _, _, ms in results], 99),
        },
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
    p.add_argument("--slow-clients", type=int, default=0, help="sockets kept hanging on the server during the load")
    p.add_argument("--descriptors", type=int, default=0, help="run the server under this RLIMIT_NOFILE (0: as is)")
    p.add_argument("--header-timeout", type=float, default=None, help="the server's --header-timeout")
    p.add_argument("--body-timeout", type=float, default=None, help="the server's --body-timeout")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
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
        health: list = []
        stop_probe = threading.Event()
        try:
            memory_before = rss_mb(server.pid)
            probe = threading.Thread(
                target=probe_health, args=(f"http://127.0.0.1:{port}/health", stop_probe, health), daemon=True
            )
            descriptors: dict = {}
            watcher = threading.Thread(
                target=watch_descriptors, args=(server.pid, stop_probe, descriptors), daemon=True
            )
            with SlowClients(port, args.slow_clients) as slow:
                probe.start()
                watcher.start()
                results, wall = run_load(
                    f"http://127.0.0.1:{port}/api/predict", plan, items, args.concurrency, args.max_seconds, args.seed
                )
                stop_probe.set()
                probe.join(timeout=10)
                watcher.join(timeout=10)
                slow_report = {
                    "kept_open": args.slow_clients,
                    "opened": slow.opened,
                    "closed_by_server": slow.closed_by_server,
                }
            memory_after = rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        report = summarise(results, len(plan), wall, args, model)
        report["images"] = str(folder)
        report["descriptors"] = {
            "limit": args.descriptors or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "peak_in_use": descriptors.get("count"),
            "peak_kinds": descriptors.get("kinds"),
        }
        report["slow_clients"] = slow_report
        ok_health = [ms for status, ms in health if status == 200]
        report["health_under_load"] = {
            "probes": len(health),
            "ok": len(ok_health),
            "statuses": dict(Counter(str(status) for status, _ in health)),
            "p50_ms": percentile(ok_health, 50),
            "p95_ms": percentile(ok_health, 95),
            "max_ms": round(max(ok_health, default=0.0), 1),
        }
        report["server_memory"] = {
            "rss_before_mb": memory_before["rss_mb"],
            "rss_after_mb": memory_after["rss_mb"],
            "peak_rss_mb": memory_after["peak_rss_mb"],
        }
        text = log.read_text(errors="replace")
        report["server_log"] = {
            "bytes": len(text.encode()),
            "tracebacks": text.count("Traceback"),
            "too_many_open_files": text.count("Too many open files"),
            "lines_other_than_access": dict(
                Counter(line[:90] for line in text.splitlines() if '" 200' not in line and "HTTP/1.1" not in line)
            ),
        }
        report["server_tracebacks"] = text.count("Traceback")
    write_report(report, args.json_out)
    failed = report["server_errors"] or report["transport_errors"] or report["server_tracebacks"]
    return 1 if failed or report["unexpected_status"] or len(ok_health) < len(health) else 0


if __name__ == "__main__":
    sys.exit(main())
