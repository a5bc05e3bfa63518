"""A killed server loses no answered reading: ``pneumo serve`` in a subprocess, SIGKILL under load, count.

Every reading is committed before its answer is sent, so each answer the clients received has its row;
a request the server committed but could not answer before it died may add a row (at most one per
client in flight). The database opens cleanly afterwards (SQLite recovers its write-ahead log).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, one_torch_thread
from test_audit_record import jpeg_bytes, make_model_folder

CLIENTS = 4
KILL_AFTER = 24  # answered readings


@pytest.mark.timeout(300)
def test_sigkill_under_load_loses_no_answered_reading(tmp_path: Path) -> None:
    with one_torch_thread():
        model = make_model_folder(tmp_path / "run")
    db, port = tmp_path / "audit.sqlite", free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumo", "serve", str(model), "--port", str(port), "--db", str(db), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "pneumo serve did not answer /health within 120 s"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)

        answered: list[str] = []
        lock, stop = threading.Lock(), threading.Event()

        def client(k: int) -> None:
            with httpx.Client(timeout=30) as http:
                i = 0
                while not stop.is_set():
                    data = jpeg_bytes(value=(k * 50 + i) % 256)
                    i += 1
                    try:
                        r = http.post(
                            f"{base}/api/predict", params={"heatmap": "false"}, files={"file": ("x.jpeg", data)}
                        )
                    except httpx.TransportError:
                        return  # the server is gone
                    if r.status_code == 200:
                        with lock:
                            answered.append(r.json()["reading_id"])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        while len(answered) < KILL_AFTER and server.poll() is None:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # mid-load: requests are in flight
        server.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    with sqlite3.connect(db) as c:
        assert c.execute("pragma integrity_check").fetchone() == ("ok",)
        recorded = {row[0] for row in c.execute("select id from readings")}
    assert len(answered) >= KILL_AFTER
    assert set(answered) <= recorded, "an answered reading is missing from the audit trail"
    assert len(answered) <= len(recorded) <= len(answered) + CLIENTS
