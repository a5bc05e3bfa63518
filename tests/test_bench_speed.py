"""bench/speed.py: a tiny end-to-end run of pneumo's side printing JSON (its subset: tests/test_bench_common.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEED = REPO / "bench" / "speed.py"
SAMPLE_ROOT = REPO / "src" / "pneumo" / "sample_data" / "chest_xray"


@pytest.mark.timeout(60)
def test_speed_smoke_prints_pneumo_json():
    cmd = [
        sys.executable,
        str(SPEED),
        "--data",
        str(SAMPLE_ROOT),
        "--limit",
        "40",
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--skip-fastai",
        "--lr-find-iters",
        "20",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core machine: no spinning on busy cores
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=58)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    cfg, pneumo = report["config"], report["pneumo"]
    assert cfg["n_train"] + cfg["n_valid"] == 40 and cfg["n_valid"] == 8  # 20% random split of the subset
    assert (cfg["epochs"], cfg["image_size"], cfg["split"], cfg["device"]) == (1, 64, "random", "cpu")
    for key in ("fit_s", "img_per_s", "lr_find_s", "peak_mem_mb", "decode_s"):
        assert pneumo[key] > 0, key
    assert 0.0 <= pneumo["valid_error"] <= 1.0
    assert pneumo["mode"] == "features" and 3 <= pneumo["lr_find_iters"] <= 20
    assert pneumo["fit_s"] >= pneumo["decode_s"] + pneumo["features_s"]  # the parts lie inside the whole
    assert report["fastai"] is None and report["ratios"] == {}
