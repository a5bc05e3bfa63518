"""--track tensorboard|mlflow: what each tracker logs, read back with its own reader; a missing extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pneumo
from pneumo.errors import PneumoError
from pneumo.training.loop import train
from pneumo.training.tracking import make_trackers, tracker_names

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
TINY = dict(epochs=2, image_size=32, seed=3, progress=False, quiet=True)
TRAINING_FIGURES = {"curves.png", "confusion_matrix.png", "roc.png", "reliability.png"}


def test_tensorboard_holds_one_scalar_per_epoch_and_the_config(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(SAMPLE, out=str(tmp_path / "run"), track=["tensorboard"], **TINY)
    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "valid_loss", "error_rate"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in run.history])
    assert events.Scalars("valid/roc_auc")[0].value == pytest.approx(run.evaluation["metrics"]["roc_auc"])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_run_holds_params_epoch_metrics_figures_and_the_model(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    run = train(SAMPLE, out=str(tmp_path / "run"), track=["mlflow"], lr=2e-3, **TINY)

    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("pneumo").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    params = found.data.params
    assert params["lr"] == "0.002" and params["arch"] == "efficientnet_lite0" and params["epochs"] == "2"
    history = client.get_metric_history(found.info.run_id, "valid_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (row["epoch"], pytest.approx(row["valid_loss"])) for row in run.history
    ]
    assert found.data.metrics["valid_roc_auc"] == pytest.approx(run.evaluation["metrics"]["roc_auc"])
    top = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert top == TRAINING_FIGURES | {"model"}  # no split.json, no predictions: no image paths leave the run
    model = {a.path for a in client.list_artifacts(found.info.run_id, "model")}
    assert {"model/model.json", "model/model.safetensors"} <= model


@pytest.mark.parametrize(
    "name, modules", [("mlflow", ["mlflow"]), ("tensorboard", ["tensorboard", "torch.utils.tensorboard"])]
)
def test_a_missing_extra_is_named_before_any_work(tmp_path, monkeypatch, name, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    message = rf"--track {name} needs the optional extra '{name}': pip install 'pneumo\[{name}\]'"
    with pytest.raises(PneumoError, match=message):
        make_trackers([name], tmp_path / "run")
    with pytest.raises(PneumoError, match=message):
        train(SAMPLE, out=str(tmp_path / "run"), track=[name], **TINY)
    assert not (tmp_path / "run").exists()


def test_tracker_names_are_repeatable_or_comma_separated_and_checked():
    assert tracker_names(["tensorboard,mlflow", "mlflow"]) == ["tensorboard", "mlflow"]
    assert tracker_names("MLflow") == ["mlflow"] and tracker_names(None) == [] and tracker_names([]) == []
    with pytest.raises(PneumoError, match="--track wandb: unknown tracker; choose from tensorboard, mlflow"):
        tracker_names(["wandb"])
