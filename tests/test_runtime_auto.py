"""``--runtime auto``: onnxruntime where the model folder's export is this very model's, PyTorch otherwise,
with the reason said; the same decisions either way; train and adapt leave the export behind.

Shares the session's one export (``conftest.exported``); the copies made here are edited, never it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_ROOT, one_torch_thread
from pneumo.cli import main
from pneumo.errors import PneumoError
from pneumo.extras import available

pytestmark = pytest.mark.skipif(not available("onnx", "onnxruntime", "onnxscript"), reason="needs pneumo[onnx]")

TEST_FILMS = SAMPLE_ROOT / "test"


def copy_of(folder: Path, where: Path) -> Path:
    shutil.copytree(folder, where)
    return where


def test_auto_reads_a_fresh_export_through_onnxruntime_and_decides_as_pytorch(exported, capsys):
    from pneumo.infer.predict import predict_files
    from pneumo.infer.runtime import open_chosen, resolve_runtime

    folder, _ = exported
    runtime, reason = resolve_runtime(folder)
    assert runtime == "onnx" and "parity-checked" in reason
    model, runtime, _ = open_chosen(folder)
    assert runtime == "onnx" and type(model).__name__ == "OnnxModel"

    auto = predict_files(folder, [TEST_FILMS], progress=False)
    torch_rows = predict_files(folder, [TEST_FILMS], progress=False, runtime="torch")
    assert len(auto) == len(torch_rows) == 60
    for a, b in zip(auto, torch_rows):
        assert (a["path"], a["label"], a["in_scope"], a["reading"]) == (
            b["path"],
            b["label"],
            b["in_scope"],
            b["reading"],
        )
        assert abs(a["p_positive"] - b["p_positive"]) <= 1e-4

    assert main(["predict", str(folder), str(TEST_FILMS / "NORMAL"), "--json", "--no-audit"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert {r["runtime"] for r in rows} == {"onnx"} and "parity-checked" in rows[0]["runtime_reason"]
    assert captured.err.startswith("runtime: onnx (")


def test_auto_falls_back_to_pytorch_and_says_why(exported, tmp_path, monkeypatch):
    from pneumo.infer.runtime import open_chosen, resolve_runtime

    folder, _ = exported
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("model.onnx"))
    assert resolve_runtime(bare) == ("torch", f"no ONNX export in {bare} (`pneumo export` writes one)")

    stale = copy_of(folder, tmp_path / "stale")  # adapted or retrained after the export: its rule changed
    meta = json.loads((stale / "model.json").read_text())
    meta["threshold"] = 0.25
    (stale / "model.json").write_text(json.dumps(meta))
    runtime, reason = resolve_runtime(stale)
    assert runtime == "torch" and "stale" in reason

    failed = copy_of(folder, tmp_path / "failed")
    record = json.loads((failed / "model.parity.json").read_text())
    (failed / "model.parity.json").write_text(json.dumps({**record, "passed": False}))
    assert resolve_runtime(failed) == ("torch", "model.parity.json does not record a passed parity check")

    older = copy_of(folder, tmp_path / "older")  # exported before the graph gave the scope features
    sidecar = json.loads((older / "model.meta.json").read_text())
    del sidecar["scope"]
    (older / "model.meta.json").write_text(json.dumps(sidecar))
    runtime, reason = resolve_runtime(older)
    assert runtime == "torch" and "predates the scope check's features" in reason

    changed = copy_of(folder, tmp_path / "changed")  # the graph's bytes changed after its export
    with (changed / "model.onnx").open("ab") as f:
        f.write(b"\0")
    model, runtime, reason = open_chosen(changed)
    assert runtime == "torch" and hasattr(model, "net") and "changed since it was exported" in reason

    assert resolve_runtime(folder, tta=True)[0] == "torch"
    assert resolve_runtime(folder, device="cuda") == (
        "torch",
        "the model runs on cuda; onnxruntime runs here on the CPU",
    )
    assert resolve_runtime(folder, "torch") == ("torch", "--runtime torch asked for")
    assert resolve_runtime(folder, needs_network="--adapt") == ("torch", "--adapt needs the network")
    with pytest.raises(PneumoError, match="--adapt needs the network: use --runtime torch or auto"):
        resolve_runtime(folder, "onnx", needs_network="--adapt")
    assert resolve_runtime(folder / "model.onnx", tta=True) == ("onnx", "an .onnx file was given")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if pneumo[onnx] were not installed
    assert resolve_runtime(folder) == ("torch", "onnxruntime is not installed (pip install 'pneumo[onnx]')")


def test_evaluate_and_the_archive_engine_read_through_the_export(exported, tmp_path, capsys):
    from pneumo.infer.batch import predict_archive
    from pneumo.infer.predict import evaluate_model_on_folder

    folder, _ = exported
    assert main(["evaluate", str(folder), str(TEST_FILMS), "--json"]) == 0
    captured = capsys.readouterr()
    auto = json.loads(captured.out)
    assert auto["runtime"] == "onnx" and "runtime: onnx" in captured.err
    torch_report = evaluate_model_on_folder(folder, TEST_FILMS, progress=False, runtime="torch")
    assert torch_report["runtime_reason"] == "--runtime torch asked for"
    assert auto["confusion_matrix"] == torch_report["confusion_matrix"]
    assert abs(auto["metrics"]["roc_auc"] - torch_report["metrics"]["roc_auc"]) <= 1e-3

    summary = predict_archive(folder, [TEST_FILMS], tmp_path / "auto.csv", chunk_size=25, progress=False)
    assert summary.runtime == "onnx" and summary.predicted == 60
    again = predict_archive(folder, [TEST_FILMS], tmp_path / "torch.csv", progress=False, runtime="torch")
    assert again.runtime == "torch"
    import pandas as pd

    a, b = pd.read_csv(tmp_path / "auto.csv"), pd.read_csv(tmp_path / "torch.csv")
    assert list(a["label"]) == list(b["label"]) and list(a["in_scope"]) == list(b["in_scope"])
    np.testing.assert_allclose(a["p_positive"], b["p_positive"], atol=1e-4)


def test_serve_auto_reads_through_onnx_and_draws_grad_cam_with_pytorch(exported):
    from fastapi.testclient import TestClient

    from pneumo.serve.app import create_app

    folder, _ = exported
    film = sorted((TEST_FILMS / "PNEUMONIA").iterdir())[0]
    with TestClient(create_app(folder)) as client:
        assert client.get("/api/model").json()["runtime"] == "onnx"
        data = film.read_bytes()
        with_map = client.post("/api/predict", files={"file": ("x.jpeg", data, "image/jpeg")}).json()
        without = client.post("/api/predict?heatmap=false", files={"file": ("x.jpeg", data, "image/jpeg")}).json()
    assert with_map["heatmap_png_base64"] and with_map["heatmap_class"] == with_map["label"]
    assert without["heatmap_png_base64"] is None and "heatmap_unavailable" not in without
    assert with_map["p_positive"] == without["p_positive"]


def test_train_says_why_it_left_no_export_when_parity_fails(tmp_path, monkeypatch, capsys):
    """A graph that disagrees with PyTorch is never written, and the run still succeeds."""
    import pneumo.infer.onnx as onnx_module

    monkeypatch.setattr(onnx_module, "PARITY_TOLERANCE", -1.0)  # no graph can pass
    tiny = ["--image-size", "32", "--bn-adapt-images", "8", "--batch-size", "8", "--feature-views", "1"]
    with one_torch_thread():
        assert main(["train", str(SAMPLE_ROOT), "--out", str(tmp_path / "run"), "--epochs", "1", "--json", *tiny]) == 0
    said = json.loads(capsys.readouterr().out)["onnx_export"]
    assert said.startswith("no ONNX export:") and "disagrees with PyTorch" in said and "nothing written" in said
    model = tmp_path / "run" / "model"
    assert (model / "model.safetensors").is_file() and not list(model.glob("model.*.json")) + list(model.glob("*.onnx"))


def test_without_the_onnx_extra_the_export_is_skipped_with_a_reason(exported, tmp_path, monkeypatch):
    from pneumo.infer.onnx import export_after

    folder = tmp_path / "model"
    shutil.copytree(exported[0], folder, ignore=shutil.ignore_patterns("model.onnx", "model.*.json"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    said = export_after(folder)
    assert said.startswith("no ONNX export:") and "pip install 'pneumo[onnx]'" in said
    assert not (folder / "model.onnx").exists()
