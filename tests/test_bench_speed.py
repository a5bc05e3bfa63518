"""bench/speed.py: the subset it builds, and a tiny end-to-end run of pneumo's side printing JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEED = REPO / "bench" / "speed.py"
SAMPLE_ROOT = REPO / "src" / "pneumo" / "sample_data" / "chest_xray"


def load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subset_keeps_class_proportions_and_is_seeded(tmp_path, write_image):
    for i in range(30):
        write_image(tmp_path / "data" / "NORMAL" / f"IM-{i:04d}-0001.jpeg")
    for i in range(90):
        write_image(tmp_path / "data" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg")
    speed = load_speed()
    root = speed.stratified_subset(tmp_path / "data", 40, 1, tmp_path / "a")
    normal, pneumonia = sorted((root / "NORMAL").iterdir()), sorted((root / "PNEUMONIA").iterdir())
    assert (len(normal), len(pneumonia)) == (10, 30)
    assert all(p.is_symlink() and p.resolve().parent.parent == tmp_path / "data" for p in normal + pneumonia)
    again = speed.stratified_subset(tmp_path / "data", 40, 1, tmp_path / "b")
    other = speed.stratified_subset(tmp_path / "data", 40, 2, tmp_path / "c")
    names = lambda r: sorted(p.name for p in r.rglob("*.jpeg"))  # noqa: E731
    assert names(again) == names(root) and names(other) != names(root)
    assert speed.stratified_subset(tmp_path / "data", 500, 1, tmp_path / "d") == tmp_path / "data"


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
