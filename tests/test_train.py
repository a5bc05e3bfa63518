"""Training end to end on the bundled sample: run folder, model folder, resume, failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pneumo
from pneumo.errors import PneumoError, TrainingError
from pneumo.extras import available
from pneumo.infer.model_folder import load_model
from pneumo.run_folder import RunFolder
from pneumo.training.loop import StopRequested, train

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
FAST = dict(image_size=64, progress=False, seed=3)


def strip_time(history):
    return [{k: v for k, v in row.items() if k not in ("time", "valid_time", "elapsed")} for row in history]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(SAMPLE, out=str(tmp_path_factory.mktemp("run") / "run"), epochs=3, **FAST)


def test_a_run_writes_everything_a_user_needs(run):
    names = {p.name for p in run.run_dir.iterdir()}
    assert {
        "config.json",
        "metrics.csv",
        "curves.png",
        "split.json",
        "valid_eval.json",
        "valid_predictions.csv",
        "confusion_matrix.png",
        "roc.png",
        "model",
        "checkpoints",
    } <= names
    assert [r["epoch"] for r in run.history] == [1, 2, 3]
    assert run.history[-1]["valid_loss"] < run.history[0]["valid_loss"] * 1.5
    meta = json.loads((run.model_dir / "model.json").read_text())
    assert meta["classes"] == ["NORMAL", "PNEUMONIA"] and meta["image_size"] == 64
    assert 0 < meta["threshold"] < 1 and meta["positive_class"] == "PNEUMONIA"
    split = json.loads((run.run_dir / "split.json").read_text())
    from pneumo.data.folders import kermany_patient_id

    train_patients = {kermany_patient_id(Path(p).name) for p in split["train"]}
    assert not train_patients & {kermany_patient_id(Path(p).name) for p in split["valid"]}
    assert not any("/test/" in p for p in split["train"] + split["valid"])  # test split never touched


def test_saved_model_predicts_in_a_fresh_cpu_only_process_as_in_training(run, tmp_path):
    """No user code, no pickle, no GPU: the folder alone gives the validation predictions again."""
    rows = [line.split(",") for line in (run.run_dir / "valid_predictions.csv").read_text().splitlines()[1:6]]
    script = (
        "import json, sys; from pneumo.infer.predict import predict_files; "
        f"rows = predict_files({str(run.model_dir)!r}, {[r[0] for r in rows]!r}, progress=False); "
        "print(json.dumps(rows))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PNEUMO_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    fresh = json.loads(out.stdout)
    for row, pred in zip(rows, fresh):
        assert pred["p_PNEUMONIA"] == pytest.approx(float(row[4]), abs=1e-4)


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(run, tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(StopRequested):
        train(SAMPLE, out=str(out), epochs=3, stop_after_epoch=1, **FAST)
    assert not (out / "model").exists()
    resumed = train(resume=True, out=str(out), progress=False)
    assert strip_time(resumed.history) == strip_time(run.history)
    assert resumed.evaluation["metrics"] == run.evaluation["metrics"]


def test_full_mode_resumes_exactly_after_a_real_kill(tmp_path):
    """SIGKILL the CLI as soon as epoch 1's checkpoint lands; --resume must end where a clean run ends."""
    args = [
        str(SAMPLE),
        "--image-size",
        "48",
        "--epochs",
        "2",
        "--mode",
        "full",
        "--unfreeze",
        "--unfreeze-epochs",
        "1",
        "--seed",
        "5",
        "--json",
    ]
    env = {**os.environ, "PNEUMO_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "pneumo.cli", "train"]
    clean = subprocess.run(
        cli + args + ["--out", str(tmp_path / "clean")], capture_output=True, text=True, env=env, check=True
    )
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        cli + args + ["--out", str(killed_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    metrics = killed_dir / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not metrics.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert metrics.exists(), "the run ended before its first checkpoint"
    assert len(metrics.read_text().splitlines()) < 4  # killed before the end (header + <3 epochs)
    resumed = subprocess.run(
        cli + ["--resume", "--out", str(killed_dir), "--json"], capture_output=True, text=True, env=env, check=True
    )
    a, b = json.loads(clean.stdout), json.loads(resumed.stdout)
    assert [r["phase"] for r in b["history"]] == ["frozen", "frozen", "unfrozen"]
    assert strip_time(a["history"]) == strip_time(b["history"])
    assert a["valid"] == b["valid"]


def test_trainable_stages_learn_on_cached_maps_and_resume_exactly(tmp_path):
    """The last body stage trains on cached maps; a killed run resumes with its trained stage, and the
    saved model (the whole network, no cache) gives the validation predictions the run reported."""
    options = dict(epochs=2, trainable_stages=1, **FAST)
    whole = train(SAMPLE, out=str(tmp_path / "whole"), **options)
    start = pneumo.create_model("efficientnet_lite0").body.conv_head.weight
    trained = load_model(whole.model_dir).net.body
    assert not torch.allclose(trained.conv_head.weight, start)  # the 1x1 head convolution learnt
    assert torch.equal(
        trained.blocks[0][0].conv_dw.weight,  # the frozen part did not
        pneumo.create_model("efficientnet_lite0").body.blocks[0][0].conv_dw.weight,
    )
    with pytest.raises(StopRequested):
        train(SAMPLE, out=str(tmp_path / "killed"), stop_after_epoch=1, **options)
    resumed = train(resume=True, out=str(tmp_path / "killed"), progress=False)
    assert strip_time(resumed.history) == strip_time(whole.history)
    rows = [line.split(",") for line in (whole.run_dir / "valid_predictions.csv").read_text().splitlines()[1:]]
    from pneumo.infer.predict import predict_files

    fresh = predict_files(whole.model_dir, [r[0] for r in rows], progress=False)
    assert [f["p_PNEUMONIA"] for f in fresh] == pytest.approx([float(r[4]) for r in rows], abs=1e-4)


def test_fp16_run_resumes_with_its_loss_scale(tmp_path):
    """The loss scale is training state: restarted at its initial value, the resumed run would skip
    steps the uninterrupted one took."""
    options = dict(epochs=2, mode="full", precision="fp16", image_size=32, progress=False, seed=3)
    whole = train(SAMPLE, out=str(tmp_path / "whole"), **options)
    with pytest.raises(StopRequested):
        train(SAMPLE, out=str(tmp_path / "killed"), stop_after_epoch=1, **options)
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < saved["scaler"]["scale"] < 2.0**16  # overflowing steps halved it from its start
    resumed = train(resume=True, out=str(tmp_path / "killed"), progress=False)
    assert strip_time(resumed.history) == strip_time(whole.history)


def test_a_second_run_into_the_same_folder_is_refused(run):
    with pytest.raises(PneumoError, match="--resume"):
        train(SAMPLE, out=str(run.run_dir), epochs=1, **FAST)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"bn_adapt_batch_size": 1}, "--bn-adapt-batch-size"),
        ({"trainable_stages": -1}, "--trainable-stages"),
        ({"lr": 0.0}, "--lr"),
        ({"mode": "fast"}, "mode"),
        ({"epochs": 0}, "at least one epoch"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, option, message):
    with pytest.raises(PneumoError, match=message):
        train(SAMPLE, out=str(tmp_path / "bad"), **{**FAST, **option})
    assert not (tmp_path / "bad").exists()


def test_a_diverging_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingError, match="lower --lr"):
        train(SAMPLE, out=str(tmp_path / "nan"), epochs=2, lr=1e12, **FAST)


def test_training_from_scratch_trains_the_whole_network(tmp_path):
    result = train(SAMPLE, out=str(tmp_path / "scratch"), epochs=1, pretrained="none", image_size=32, progress=False)
    assert result.history[0]["phase"] == "scratch"
    assert load_model(result.model_dir).meta.trained_with["pretrained"] == "none"


def test_seeded_runs_repeat(run, tmp_path):
    again = train(SAMPLE, out=str(tmp_path / "again"), epochs=3, **FAST)
    assert strip_time(again.history) == strip_time(run.history)
    probs = [
        np.loadtxt(r.run_dir / "valid_predictions.csv", delimiter=",", skiprows=1, usecols=(3, 4)) for r in (run, again)
    ]
    assert np.array_equal(probs[0], probs[1])


def test_the_top_level_api_stays_callable_after_submodule_imports():
    """`pneumo.lr_find(...)` then `pneumo.train(...)`: the tutorial's order must keep working."""
    import pneumo.training.loop
    import pneumo.training.lr_finder

    assert pneumo.train is pneumo.training.loop.train and pneumo.lr_find is pneumo.training.lr_finder.lr_find
    assert callable(pneumo.evaluate_model) and callable(pneumo.load_model) and callable(pneumo.create_model)


@pytest.mark.parametrize(
    "option, flag",
    [
        ({"threshold": "sensitivty:0.95"}, "--threshold"),
        ({"precision": "bf61"}, "--precision"),
        ({"device": "tpu"}, "--device"),
        ({"patient_rule": "regex:person"}, "--patient-rule"),
        ({"batch_size": "64"}, "--batch-size"),
        ({"trainable_stages": 5}, "--trainable-stages"),
    ],
)
def test_options_that_used_to_fail_late_are_refused_before_the_run_folder_exists(tmp_path, option, flag):
    with pytest.raises(PneumoError, match=flag):
        train(SAMPLE, out=str(tmp_path / "bad"), epochs=1, **{**FAST, **option})
    assert not (tmp_path / "bad").exists()


def test_lr_find_refuses_a_bad_option_before_making_its_folder(tmp_path):
    from pneumo.training.lr_finder import lr_find

    with pytest.raises(PneumoError, match="--bn-adapt-batch-size"):
        lr_find(SAMPLE, out=tmp_path / "lr", bn_adapt_batch_size=1, image_size=32, progress=False)
    assert not (tmp_path / "lr").exists()


def test_a_run_started_by_an_older_version_with_mode_auto_resumes(tmp_path):
    """Configs saved before features mode became the default say "auto"; they still load and resume."""
    out = tmp_path / "old"
    with pytest.raises(StopRequested):
        train(SAMPLE, out=out, epochs=2, stop_after_epoch=1, image_size=32, progress=False, seed=3)
    config = json.loads((out / "config.json").read_text())
    assert config["out"] == str(out)  # a Path given for --out is stored as text
    (out / "config.json").write_text(json.dumps({**config, "mode": "auto"}))
    resumed = train(resume=True, out=str(out), progress=False)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert json.loads((out / "config.json").read_text())["mode"] == "auto"


def test_the_features_pass_records_its_runtime_and_parity(run):
    """onnxruntime ran the frozen prefix (when the extra is installed), after agreeing with PyTorch."""
    record = RunFolder(run.run_dir).read_features_runtime()
    assert record["runtime"] == ("onnxruntime" if available("onnx", "onnxruntime") else "torch") and record["reason"]
    if record["runtime"] == "onnxruntime":
        assert 0 <= record["max_abs_diff"] <= record["tolerance"]
