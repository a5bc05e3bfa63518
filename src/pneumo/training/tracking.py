"""Experiment trackers as training callbacks: TensorBoard and MLflow, both optional, both off by default.

``train(..., track=["tensorboard", "mlflow"])`` (``pneumo train --track tensorboard,mlflow``) adds them;
each needs its extra (``pip install 'pneumo[tensorboard]'``, ``'pneumo[mlflow]'``), checked before any
training work. What leaves the run folder is the config, the per-epoch metrics, the validation
metrics, the training figures and the model folder: never split.json, predictions or image paths.

- TensorBoard writes ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``): the epoch
  metrics as scalars at step = epoch, the config as text, the validation metrics at the end.
- MLflow logs one MLflow run per ``train`` call to experiment ``pneumo`` (``$MLFLOW_EXPERIMENT_NAME``)
  at ``$MLFLOW_TRACKING_URI``, else MLflow's own default ``sqlite:///mlflow.db`` in the current
  directory (what ``mlflow ui`` opens there; artifacts under ``./mlruns``): the config as params,
  epoch metrics with step = epoch, and at the end the validation metrics, figures and ``model/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from pneumo import extras
from pneumo.errors import PneumoError
from pneumo.training.events import Callback, Run
from pneumo.version import __version__

TRACKERS = ("tensorboard", "mlflow")
EPOCH_METRICS = ("train_loss", "valid_loss", "error_rate", "time", "valid_time")  # per-epoch row values
FIGURES = ("curves.png", "confusion_matrix.png", "roc.png", "reliability.png", "lr_find.png")  # no image tiles
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"


def tracker_names(values: Iterable[str] | str | None) -> list[str]:
    """``["tensorboard,mlflow"]``, ``["mlflow", "mlflow"]``, ``"mlflow"`` -> unique known names, in order."""
    values = [values] if isinstance(values, str) else list(values or [])
    names = list(dict.fromkeys(n.strip().lower() for v in values for n in str(v).split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise PneumoError(f"--track {','.join(unknown)}: unknown tracker; choose from {', '.join(TRACKERS)}")
    return names


def make_trackers(names: Iterable[str] | str | None, run_dir: str | Path) -> list[Callback]:
    """The tracker callbacks ``names`` asks for (see ``tracker_names``); a missing extra raises here."""
    trackers: list[Callback] = []
    for name in tracker_names(names):
        trackers.append(TensorBoard(Path(run_dir) / "tensorboard") if name == "tensorboard" else MLflow())
    return trackers


def require(extra: str, *modules: str) -> ModuleType:
    """Import ``modules`` (the last is returned) or say which extra installs them."""
    return extras.require(extra, *modules, what=f"--track {extra}")


def valid_metrics(result: Any) -> dict[str, float]:
    """The numeric validation metrics of a finished run (accuracy, sensitivity, roc_auc, ...)."""
    metrics = dict(result.evaluation.get("metrics") or {})
    if isinstance(result.evaluation.get("threshold"), (int, float)):
        metrics["threshold"] = result.evaluation["threshold"]
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def config_table(run: Run) -> str:
    """The config as a Markdown table (TensorBoard renders text as Markdown)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in run.cfg.to_dict().items())
    return f"| option | value |\n| --- | --- |\n{rows}"


class TensorBoard(Callback):
    """Scalars per epoch (step = epoch) and the config as text, in ``log_dir`` (default RUN/tensorboard)."""

    def __init__(self, log_dir: str | Path | None = None):
        self.summary_writer = require("tensorboard", "tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.log_dir = log_dir
        self.writer: Any = None

    def on_run_start(self, run: Run) -> None:
        log_dir = Path(self.log_dir) if self.log_dir else run.folder.path / "tensorboard"
        # a resumed run hides what a killed one logged after its last checkpoint
        purge = len(run.history) + 1 if run.resumed else None
        self.writer = self.summary_writer(str(log_dir), purge_step=purge)
        self.writer.add_text("config", config_table(run), global_step=0)

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        for key in EPOCH_METRICS:
            self.writer.add_scalar(key, row[key], global_step=row["epoch"])
        self.writer.flush()  # a killed run keeps its epochs

    def on_run_end(self, run: Run, result: Any) -> None:
        step = run.history[-1]["epoch"] if run.history else 0
        for key, value in valid_metrics(result).items():
            self.writer.add_scalar(f"valid/{key}", value, global_step=step)
        self.writer.close()


class MLflow(Callback):
    """One MLflow run per ``train`` call: params, epoch metrics, then validation metrics and artifacts.

    Uses ``MlflowClient`` (no global active run), so a failed training leaves nothing half-open in
    the calling process; its MLflow run stays RUNNING in the store.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None):
        self.mlflow = require("mlflow", "mlflow")
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pneumo"
        self.client: Any = None
        self.run_id: str | None = None

    def on_run_start(self, run: Run) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        created = self.client.create_run(
            experiment_id,
            run_name=run.folder.path.name,
            tags={"pneumo.version": __version__, "pneumo.resumed": str(run.resumed)},
        )
        self.run_id = created.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in run.cfg.to_dict().items()])
        for row in run.history:  # a resumed run: the MLflow run holds the whole curve
            self.on_epoch_end(run, row)

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(row[k]), now, int(row["epoch"])) for k in EPOCH_METRICS if row.get(k) is not None],
        )

    def on_run_end(self, run: Run, result: Any) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), run.history[-1]["epoch"] if run.history else 0
        self.client.log_batch(
            self.run_id, metrics=[Metric(f"valid_{k}", v, now, step) for k, v in valid_metrics(result).items()]
        )
        for name in FIGURES:
            figure = run.folder.figure(name)
            if figure.is_file():
                self.client.log_artifact(self.run_id, str(figure))
        self.client.log_artifacts(self.run_id, str(result.model_dir), "model")
        self.client.set_terminated(self.run_id, "FINISHED")
