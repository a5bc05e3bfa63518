"""The run folder: one writer and one reader per file, exact round trips, older layouts still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumo.config import TrainConfig
from pneumo.errors import PneumoError, TrainingError
from pneumo.run_folder import RunFolder, SplitRecord, ValidPredictions

CLASSES = ["NORMAL", "PNEUMONIA"]


def test_config_round_trips_with_an_absolute_data_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = RunFolder(tmp_path / "run")
    run.write_config(TrainConfig(data="relative/data", epochs=3, lr=0.01))
    cfg = run.read_config()
    assert cfg.data == str(tmp_path / "relative" / "data") and cfg.epochs == 3 and cfg.lr == 0.01


def test_every_path_in_the_config_is_stored_absolute(tmp_path: Path, monkeypatch) -> None:
    """--resume from another working directory finds the data, the weights file and the run itself."""
    monkeypatch.chdir(tmp_path)
    run = RunFolder("run")
    run.write_config(TrainConfig(data="data", weights="w/lite0.safetensors", out="run"))
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data"] == str(tmp_path / "data")
    assert stored["weights"] == str(tmp_path / "w" / "lite0.safetensors")
    assert stored["out"] == str(tmp_path / "run")


def test_an_edited_config_is_refused_naming_the_file_and_the_option(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.write_config(TrainConfig(data="data"))
    values = json.loads(run.config_file.read_text())
    run.config_file.write_text(json.dumps({**values, "threshold": "bogus"}))
    with pytest.raises(PneumoError, match=r"config.json: --threshold must be"):
        run.read_config()
    run.config_file.write_bytes(b"\xff\xfe")
    with pytest.raises(PneumoError, match="config.json: cannot be read"):
        run.read_config()
    run.config_file.write_text("[]")
    with pytest.raises(PneumoError, match="config.json: not a training config"):
        run.read_config()


def test_split_and_metrics_round_trip(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    split = SplitRecord("patient", CLASSES, ["a.jpeg", "b.jpeg"], ["c.jpeg"], ["a note"])
    run.write_split(split)
    assert run.read_split() == split
    history = [
        {
            "epoch": 1,
            "phase": "frozen",
            "train_loss": 0.5,
            "valid_loss": 0.4,
            "error_rate": 0.1,
            "time": 12.5,
            "valid_time": 1.0,
            "elapsed": 14.0,
            "ignored": "x",
        }
    ]
    run.write_metrics(history)
    (row,) = run.read_metrics()
    assert row == {k: v for k, v in history[0].items() if k != "ignored"}


def test_predictions_keep_full_precision(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    probs = np.array([[1 / 3, 2 / 3], [0.1 + 0.2, 1 - (0.1 + 0.2)]])
    run.write_predictions(ValidPredictions(CLASSES, ["x.jpeg", "y.jpeg"], np.array([1, 0]), ["p1", "p2"], probs))
    back = run.read_predictions()
    assert np.array_equal(back.probs, probs)  # bit for bit: a reader re-deciding gets the trainer's answer
    assert back.labels.tolist() == [1, 0] and back.patients == ["p1", "p2"] and back.skipped == 0


def test_unusable_prediction_rows_are_counted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "valid_predictions.csv").write_text(
        "path,label,patient,prob_NORMAL,prob_PNEUMONIA\na,NORMAL,p,0.9,0.1\nb,CAT,p,0.5,0.5\nc,NORMAL,p,abc,0.5\n"
        "d,PNEUMONIA,p,nan,nan\n"
    )
    back = RunFolder(tmp_path).read_predictions()
    assert back.paths == ["a"] and back.skipped == 3
    (tmp_path / "valid_predictions.csv").write_text("path,label\n")
    with pytest.raises(PneumoError, match="missing columns"):
        RunFolder(tmp_path).read_predictions(CLASSES)


def test_older_evaluation_layout_is_upgraded_on_read(tmp_path: Path) -> None:
    (tmp_path / "valid_eval.json").write_text(
        json.dumps({"threshold": 0.5, "reweighted_to_test_balance": {"accuracy": 0.9}})
    )
    report = RunFolder(tmp_path).read_evaluation()
    assert report["reweighted"] == {"target_pos_fraction": pytest.approx(0.625), "metrics": {"accuracy": 0.9}}


def test_damaged_files_are_named(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PneumoError, match="config.json: cannot be read"):
        run.read_config()
    with pytest.raises(PneumoError, match="split.json: missing"):
        run.read_split()
    run.checkpoint_file.parent.mkdir()
    run.checkpoint_file.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TrainingError, match="last.pt: damaged checkpoint"):
        run.load_checkpoint()


def test_checkpoints_round_trip_without_unpickling(tmp_path: Path) -> None:
    import torch

    run = RunFolder(tmp_path)
    run.save_checkpoint(epoch=2, weights={"w": torch.arange(3.0)}, history="[]")
    state = run.load_checkpoint()
    assert state["epoch"] == 2 and torch.equal(state["weights"]["w"], torch.arange(3.0)) and run.has_started()


def test_the_checkpoint_before_last_is_kept_and_named_when_last_is_damaged(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.save_checkpoint(phase=0, epoch=1, history="[]")
    assert not run.previous_checkpoint_file.exists()
    run.save_checkpoint(phase=0, epoch=2, history="[]")
    assert run.load_checkpoint()["epoch"] == 2 and run.load_checkpoint(run.previous_checkpoint_file)["epoch"] == 1
    run.checkpoint_file.write_bytes(run.checkpoint_file.read_bytes()[:40])  # damaged on disk later
    with pytest.raises(TrainingError, match=r"last.pt: damaged checkpoint.*previous.pt \(epoch 1 of phase 1\)"):
        run.load_checkpoint()
    run.checkpoint_file.unlink()  # as the message says; also where a kill between the two renames leaves it
    assert run.has_started() and run.load_checkpoint()["epoch"] == 1


def test_both_checkpoints_damaged_names_the_last_only(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.save_checkpoint(phase=0, epoch=1, history="[]")
    run.save_checkpoint(phase=0, epoch=2, history="[]")
    for f in (run.checkpoint_file, run.previous_checkpoint_file):
        f.write_bytes(b"")
    with pytest.raises(TrainingError, match="last.pt: damaged checkpoint") as caught:
        run.load_checkpoint()
    assert "previous.pt" not in str(caught.value)


def test_every_file_is_written_with_the_umask_s_mode(tmp_path: Path) -> None:
    """model.safetensors was 0600 (mkstemp's mode, kept by safetensors' own replace) beside 0644 files."""
    import os
    import stat

    import torch

    from pneumo.infer.model_folder import save_model
    from pneumo.model_meta import ModelMeta
    from pneumo.nets.models import XrayNet, get_backbone

    before = os.umask(0o022)
    try:
        net = XrayNet(get_backbone("resnet18"), 2, 8, 0.5)
        save_model(net, ModelMeta("resnet18", CLASSES, 64, hidden=8), tmp_path / "model")
        run = RunFolder(tmp_path)
        run.save_checkpoint(epoch=1, weights={"w": torch.zeros(1)})
        run.write_config(TrainConfig(data="data"))
        os.umask(0o077)  # read at each write, not once at import
        run.write_metrics([])
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert modes.pop("metrics.csv") == 0o600
    assert set(modes) == {"model.safetensors", "model.json", "last.pt", "config.json"}
    assert set(modes.values()) == {0o644}, modes
