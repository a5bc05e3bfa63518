"""``pneumo dicom listen`` under load: films per second from ``storescu`` to results stored in Orthanc,
the time from a film's arrival to its results in the PACS (median, 95th percentile), and the node's
memory over the run (sampled every half second: flat is the goal).

The five shared films are copied ``--count`` times in turn, each copy with fresh UIDs, and sent by
DCMTK's ``storescu`` on one association to a ``pneumo dicom listen`` subprocess whose ``--send-to`` is
an Orthanc of its own (loopback ports, a temporary folder). Throughput is counted from storescu's
start to the last result in Orthanc (Orthanc's /statistics); latency is the audit trail's
``latency_ms`` (arrival to results stored, recorded by the node).

    python bench/dicom_node.py --model RUN/model [--runtime onnx] [--count 100] [--no-gradcam]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pydicom

from common import REPO, SHARED_DATA, free_port, rounded, run_report

FILMS = sorted((SHARED_DATA / "dicom").glob("*.dcm"))
# storescu (DCMTK 3.6.7) proposes a compressed transfer syntax only when told which
PROPOSE = {"1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.70": "-xs",
           "1.2.840.10008.1.2.4.50": "-xy"}  # fmt: skip


def storescu(port: int, films: list[Path]) -> list[subprocess.Popen]:
    """One storescu per transfer syntax, all at once (five modalities sending), each on one association."""
    groups: dict[str, list[str]] = {}
    for path in films:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(syntax, []).append(str(path))
    return [
        subprocess.Popen(
            ["storescu", "-aet", "MODALITY1", "-aec", "PNEUMO", *([PROPOSE[s]] if s in PROPOSE else [])]
            + ["127.0.0.1", str(port), *paths],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for s, paths in groups.items()
    ]


def copies(folder: Path, count: int) -> list[Path]:
    """``count`` copies of the five films, each with fresh SOP Instance, series and study UIDs."""
    out = []
    for i in range(count):
        ds = pydicom.dcmread(FILMS[i % len(FILMS)], force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.SOPInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = folder / f"film{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def start_orthanc(home: Path) -> tuple[subprocess.Popen, int, int]:
    http, dicom = free_port(), free_port()
    config = {
        "Name": "pneumo-bench", "StorageDirectory": str(home / "db"), "IndexDirectory": str(home / "db"),
        "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
    }  # fmt: skip
    (home / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(home / "orthanc.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, http, dicom


def orthanc_instances(http: int) -> int:
    import httpx

    try:
        return int(httpx.get(f"http://127.0.0.1:{http}/statistics", timeout=5).json()["CountInstances"])
    except Exception:  # noqa: BLE001 - not up yet
        return -1


def measure(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="pneumo-bench-dicom-"))
    try:
        films = copies(work, args.count)
        orthanc, http, dicom = start_orthanc(work)
        while orthanc_instances(http) < 0:
            time.sleep(0.2)
        port, db = free_port(), work / "audit.sqlite"
        command = [sys.executable, "-m", "pneumo", "dicom", "listen", str(args.model), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--send-to", f"ORTHANC@127.0.0.1:{dicom}", "--runtime", args.runtime]
        command += ["--spool", str(work / "spool"), "--db", str(db), "--queue", str(args.count + 10)]
        command += ["--workers", str(args.workers)] + (["--no-gradcam"] if args.no_gradcam else [])
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        node = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "w"))
        process = psutil.Process(node.pid)
        while subprocess.run(["echoscu", "-aec", "PNEUMO", "127.0.0.1", str(port)], capture_output=True).returncode:
            time.sleep(0.5)
        memory: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                memory.append((time.monotonic(), process.memory_info().rss / 2**20))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.monotonic()
        senders = storescu(port, films)
        sent_ok = all(p.wait() == 0 for p in senders)
        sent_s = time.monotonic() - start
        while orthanc_instances(http) < 2 * args.count and node.poll() is None:
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        stop.set()
        sampler.join()
        node.terminate()
        node.wait(timeout=60)
        orthanc.terminate()
        orthanc.wait(timeout=60)
        with sqlite3.connect(db) as con:
            latencies = np.array([r[0] for r in con.execute("SELECT latency_ms FROM readings")]) / 1000
        rss = np.array([m for _, m in memory])
        tenth = max(1, len(rss) // 10)
        return {
            "what": "pneumo dicom listen: storescu -> node -> Orthanc, the five shared films in turn, fresh UIDs",
            "runtime": args.runtime,
            "gradcam": not args.no_gradcam,
            "workers": args.workers,
            "films": args.count,
            "storescu_ok": sent_ok,
            "storescu_seconds": rounded(sent_s, 2),
            "seconds_to_last_result": rounded(elapsed, 2),
            "films_per_second": rounded(args.count / elapsed, 3),
            "results_in_orthanc": orthanc_instances(http) if orthanc.poll() is None else 2 * args.count,
            "latency_s_read_films": {
                "n": int(latencies.size),
                "median": rounded(float(np.median(latencies)), 3) if latencies.size else None,
                "p95": rounded(float(np.percentile(latencies, 95)), 3) if latencies.size else None,
                "note": "arrival to results stored; films refused by their tags are not readings (not here)",
            },
            "rss_mib": {
                "first_tenth_median": rounded(float(np.median(rss[:tenth])), 1),
                "last_tenth_median": rounded(float(np.median(rss[-tenth:])), 1),
                "peak": rounded(float(rss.max()), 1),
                "samples": int(rss.size),
            },
            "cpus": os.cpu_count(),
            "load_average_at_end": rounded(os.getloadavg()[0], 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (an ONNX export beside it for --runtime onnx)")
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--count", type=int, default=100, help="films sent")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-gradcam", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    return run_report(lambda: measure(args), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
