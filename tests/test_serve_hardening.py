"""The server under hostile clients: `pneumo serve` itself, run under a 256-descriptor limit.

Idle sockets, a client sending its headers a byte at a time, a body that never finishes: each is
closed after its deadline while /health keeps answering, and the log stays a few lines long. Then
schemathesis, generating requests from the server's own /openapi.json, finds every answer declared.
The server runs in its own process (the descriptor limit must bind it alone), so the module pays
one torch import at start-up: ~10 s on a quiet 2-core machine, the tests themselves ~20 s more.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from conftest import free_port
from pneumo.cli import build_parser
from pneumo.serve.limits import PIXEL_BUDGET, SERVE_MAX_PIXELS, PixelBudget
from pneumo.serve.server import ConnectionLimits, RepeatedRecordFilter

DESCRIPTORS = 256  # the limit: 300 idle sockets used to exhaust it
HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 2.0
SLACK = 4.0  # seconds a busy 2-core machine may add; before the fix /health never answered at all


def limit_descriptors() -> None:  # runs in the server's process, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`pneumo serve` on a free loopback port with short deadlines; stopped when the module ends."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "pneumo", "serve", str(trained_run / "model"), "--port", str(port)]
    cmd += ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT), "--workers", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_descriptors)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"pneumo serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pneumo serve did not answer /health within 120 s")
        time.sleep(0.2)
    yield {"url": url, "port": port, "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def closed_by_server(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """Read until the server closes the socket (True) or ``within`` seconds pass (False)."""
    s.settimeout(0.1)
    got, end = b"", time.monotonic() + within
    while time.monotonic() < end:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except OSError:  # reset
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def health_seconds(url: str) -> float:
    start = time.monotonic()
    r = httpx.get(f"{url}/health", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return time.monotonic() - start


def test_idle_and_slow_clients_are_cut_off_while_health_answers(server: dict) -> None:
    port, url = server["port"], server["url"]
    idle = [connect(port) for _ in range(300)]  # more than the descriptor limit allows at once

    slowloris = connect(port)
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:  # one byte every 0.1 s: the headers would take 4 s to arrive
        for byte in b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n":
            if stop.is_set():
                return
            try:
                slowloris.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.1)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    slow_body = connect(port)
    slow_body.sendall(
        b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n"
    )
    body_started = time.monotonic()
    try:
        assert max(health_seconds(url) for _ in range(3)) < SLACK  # answered while all of them hang

        closed, got = closed_by_server(slowloris, HEADER_TIMEOUT + SLACK)
        assert closed and got.startswith(b"HTTP/1.1 408"), got
        assert HEADER_TIMEOUT - 0.2 < time.monotonic() - started < HEADER_TIMEOUT + SLACK

        closed, got = closed_by_server(slow_body, BODY_TIMEOUT + SLACK)
        assert closed and b" 408 " in got.split(b"\r\n")[0] and b"not received within 2 s" in got, got
        assert BODY_TIMEOUT - 0.2 < time.monotonic() - body_started < BODY_TIMEOUT + SLACK

        # every idle socket was closed: the old ones to make room, the rest at the header deadline
        assert all(closed_by_server(s, SLACK)[0] for s in idle)
        assert health_seconds(url) < SLACK
    finally:
        stop.set()
        for s in [*idle, slowloris, slow_body]:
            s.close()
    log = server["log"].read_text(errors="replace")
    assert "Traceback" not in log and log.count("Too many open files") <= 1
    assert len(log) < 20_000, f"{len(log)} bytes of log"


def test_a_keep_alive_connection_gets_a_fresh_header_deadline(server: dict) -> None:
    s = connect(server["port"])
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"pixel_budget"' not in first:  # the whole first answer, headers and body
            first += s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request starts, then stalls
        started = time.monotonic()
        closed, got = closed_by_server(s, HEADER_TIMEOUT + SLACK)
        assert closed and got.startswith(b"HTTP/1.1 408"), got
        assert time.monotonic() - started < HEADER_TIMEOUT + SLACK
    finally:
        s.close()


def test_api_answers_only_what_its_openapi_schema_declares(server: dict, tmp_path: Path) -> None:
    """schemathesis over the live server's own /openapi.json: every phase, every check, 0 failures.

    Generated bytes are rarely an X-ray, so a schema-valid upload may be refused for its content
    (413 for its pixels, 415, 422), and generated feedback names no real reading (404); those are
    declared, and positive-data acceptance is told so (beside its own defaults).
    """
    config = tmp_path / "schemathesis.toml"
    statuses = ", ".join(f'"{s}"' for s in ["2xx", "401", "403", "404", "409", "413", "415", "422", "429", "503"])
    config.write_text(f"[checks.positive_data_acceptance]\nexpected-statuses = [{statuses}]\n")
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip(f"schemathesis CLI missing next to {sys.executable}: install the test extra")
    cmd = [str(st), "--config-file", str(config), "run", f"{server['url']}/openapi.json", "--checks", "all"]
    cmd += ["--max-examples", "10", "--seed", "1", "--workers", "1", "--generation-database", "none", "--no-color"]
    cmd += ["--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    summary = done.stdout[-3000:]
    assert done.returncode == 0, summary
    generated = [line for line in done.stdout.splitlines() if "generated" in line]
    assert generated and "passed" in generated[-1] and "fail" not in generated[-1], summary
    assert int(generated[-1].split()[0]) >= 30, summary  # it really exercised the API
    assert "Traceback" not in server["log"].read_text(errors="replace")


def test_cli_defaults_are_the_library_defaults() -> None:
    args = build_parser().parse_args(["serve", "model"])
    limits = ConnectionLimits()
    assert (args.header_timeout, args.body_timeout, args.max_connections) == (
        limits.header_timeout_s,
        limits.body_timeout_s,
        limits.max_connections,
    )
    assert (
        int(args.max_megapixels * 1e6) == SERVE_MAX_PIXELS and int(args.pixel_budget_megapixels * 1e6) == PIXEL_BUDGET
    )


def test_a_repeated_error_is_logged_once_with_a_count() -> None:
    now = [0.0]
    flt = RepeatedRecordFilter(window_s=60, clock=lambda: now[0])
    logger = logging.getLogger("pneumo.test.flood")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addFilter(flt)
    logger.addHandler(Keep())
    logger.propagate = False
    try:
        emfile = OSError(24, "Too many open files")
        for i in range(20_000):
            now[0] = i * 5e-4  # 10 s of accept() failures
            logger.error("socket.accept() out of system resource\nsocket: fd=6", exc_info=(OSError, emfile, None))
        logger.error("something else")  # a different message is not held back
        assert [r.getMessage().split("\n")[0] for r in records] == [
            "socket.accept() out of system resource",
            "something else",
        ]
        now[0] = 61.0
        logger.error("socket.accept() out of system resource\nsocket: fd=6", exc_info=(OSError, emfile, None))
        assert len(records) == 3 and "the same 19999 more times" in records[-1].getMessage()
    finally:
        logger.removeFilter(flt)
        logger.handlers.clear()


def test_pixel_budget_refuses_with_503_and_gives_back_on_error() -> None:
    budget = PixelBudget(100, max_image_pixels=60)
    with budget.reserve(60):
        with pytest.raises(HTTPException) as full:
            budget.spend(50, lambda: None)
        assert full.value.status_code == 503 and full.value.headers["retry-after"] == "1"
        assert "50 pixels to decode, 40 of 100 free" in full.value.detail
        assert budget.spend(40, lambda x: x * 2, 21) == 42
    with pytest.raises(ZeroDivisionError):
        budget.spend(100, lambda: 1 / 0)
    assert budget.in_use == 0
    with pytest.raises(Exception, match="must hold at least one image"):
        PixelBudget(10, max_image_pixels=60)


def big_png(width: int = 8900, height: int = 8900) -> bytes:
    """A valid grey PNG of ``width`` x ``height``: mostly black, so it is ~250 KB (made row by row)."""
    noisy = np.random.default_rng(0).integers(0, 256, (20, width), dtype=np.uint8)
    compress = zlib.compressobj(9)
    rows = (noisy[y].tobytes() if y < len(noisy) else bytes(width) for y in range(height))
    body = b"".join(compress.compress(b"\x00" + row) for row in rows)
    body += compress.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_an_8900_square_png_is_refused_before_decoding_and_a_full_budget_says_retry(trained_run: Path) -> None:
    from pneumo.serve.app import create_app

    png = big_png()
    assert 200_000 < len(png) < 300_000
    app = create_app(trained_run / "model")
    with TestClient(app, raise_server_exceptions=False) as client:
        start = time.monotonic()
        r = client.post("/api/predict", files={"file": ("big.png", png, "image/png")})
        assert r.status_code == 413 and "8900x8900" in r.json()["detail"] and "36,000,000" in r.json()["detail"]
        assert time.monotonic() - start < 1.0  # the header was read, not the 79 million pixels
        assert client.get("/health").json()["pixels_in_use"] == 0

        small = io.BytesIO()
        Image.new("L", (300, 200), 128).save(small, format="PNG")
        with app.state.budget.reserve(PIXEL_BUDGET - 300 * 200 + 1):  # all but one pixel too few
            r = client.post("/api/predict", files={"file": ("x.png", small.getvalue(), "image/png")})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"detail": r.json()["detail"]} and "60,000 pixels to decode" in r.json()["detail"]
        assert client.post("/api/predict", files={"file": ("x.png", small.getvalue(), "image/png")}).status_code == 200


@pytest.mark.parametrize(
    "option,words",
    [
        (["--header-timeout", "0"], "--header-timeout must be in (0, 3600]"),
        (["--body-timeout", "-1"], "--body-timeout must be in (0, 3600]"),
        (["--max-connections", "0"], "--max-connections must be at least 1"),
        (["--pixel-budget-megapixels", "10"], "must hold at least one image of the largest size allowed"),
    ],
)
def test_bad_server_options_fail_at_once_naming_the_option(
    trained_run: Path, capsys: pytest.CaptureFixture, option: list[str], words: str
) -> None:
    from pneumo.cli import main

    assert main(["serve", str(trained_run / "model"), *option]) == 2
    assert words in capsys.readouterr().err
