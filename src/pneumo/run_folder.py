"""A training run's folder, owned here: every file in it has one writer and one reader.

::

    RUN/config.json              the resolved TrainConfig (data path absolute, so --resume works anywhere)
    RUN/split.json               how the split was made, the classes, notes, train and valid image paths
    RUN/metrics.csv              one row per epoch (seconds as numbers)
    RUN/valid_predictions.csv    path, label, patient, p(class)... at full precision: a reader that
                                 re-applies the stored threshold gets the trainer's decisions exactly
    RUN/valid_eval.json          the validation evaluation (evaluation.metrics.evaluate_predictions)
    RUN/*.png                    figures (plots.py)
    RUN/checkpoints/last.pt      resumable state, written atomically each epoch
    RUN/checkpoints/previous.pt  the epoch before: named when last.pt is damaged on disk
    RUN/checkpoints/features.pt  cached body features (features mode)
    RUN/features_runtime.json    what ran the frozen prefix for them, its parity with PyTorch, why
    RUN/model/                   the model folder: model.json (model_meta.py) + model.safetensors

Trainer, ensemble, report, interpret, compare and the test fixtures all go through ``RunFolder``;
readers accept the layouts older pneumo versions wrote.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.config import TrainConfig
from pneumo.data.folders import printable
from pneumo.errors import PneumoError, TrainingError
from pneumo.io_utils import atomic_write, atomic_write_json, atomic_write_text
from pneumo.model_meta import ModelMeta, read_model_meta

METRIC_FIELDS = ["epoch", "phase", "train_loss", "valid_loss", "error_rate", "time", "valid_time", "elapsed"]
LEGACY_REWEIGHTED_FRACTION = 390 / 624  # what runs before 0.2 re-weighted "reweighted_to_test_balance" to


@dataclass
class SplitRecord:
    """Which images trained and which validated, and how that was decided."""

    method: str
    classes: list[str]
    train: list[str]
    valid: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class ValidPredictions:
    """Calibrated validation probabilities, one row per image."""

    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # class indices (N,)
    patients: list[str]
    probs: np.ndarray  # (N, K) float64
    skipped: int = 0  # rows a reader could not use (unknown label, unparsable number)


class RunFolder:
    """The paths of a run folder, and a writer and a reader for each file in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        checkpoints = self.path / "checkpoints"
        self.config_file, self.split_file = self.path / "config.json", self.path / "split.json"
        self.metrics_file, self.predictions_file = self.path / "metrics.csv", self.path / "valid_predictions.csv"
        self.evaluation_file, self.model_dir = self.path / "valid_eval.json", self.path / "model"
        self.checkpoint_file, self.features_file = checkpoints / "last.pt", checkpoints / "features.pt"
        self.previous_checkpoint_file = checkpoints / "previous.pt"  # the epoch before last.pt's
        self.distributed_file = self.path / "distributed.json"
        self.features_runtime_file = self.path / "features_runtime.json"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def holding(cls, path: str | Path) -> RunFolder:
        """The run folder of ``path``: a model folder's parent (RUN/model), else ``path`` itself."""
        path = Path(path)
        return cls(path.parent if (path / "model.json").is_file() else path)

    def figure(self, name: str) -> Path:
        return self.path / name

    def has_started(self) -> bool:
        """A run was started here (it has a checkpoint): a new run must not overwrite it."""
        return self.checkpoint_file.exists() or self.previous_checkpoint_file.exists()

    def make(self) -> list[Path]:
        """Create the folder (and missing parents); return the folders this call created, outermost first."""
        created = [p for p in [*reversed(self.path.parents), self.path] if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        return created

    def discard_unstarted(self, created: list[Path]) -> None:
        """Undo a run refused before its first epoch: its config.json, then the folders it created if
        empty. What the folder held before the run is never touched."""
        if self.has_started():
            return
        self.config_file.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                return

    # ------------------------------------------------------------------ config.json
    def write_config(self, cfg: TrainConfig) -> None:
        """The config with every path absolute (data, weights, the run folder): ``--resume`` works from anywhere."""
        values = cfg.to_dict()
        for key in ("data", "weights", "out"):
            if values.get(key):
                values[key] = str(Path(values[key]).expanduser().resolve())
        atomic_write_json(self.config_file, values)

    def read_config(self) -> TrainConfig:
        values = self._json(self.config_file, "a `pneumo train` run folder")
        if not isinstance(values, dict):
            raise PneumoError(f"{self.config_file}: not a training config (a JSON object is expected)")
        try:
            return TrainConfig.from_dict(values)
        except PneumoError as exc:  # an edited or damaged config: name the file, not only the option
            raise PneumoError(f"{self.config_file}: {exc}") from None

    # ------------------------------------------------------------------ split.json
    def write_split(self, split: SplitRecord) -> None:
        atomic_write_json(
            self.split_file,
            {
                "method": split.method,
                "classes": split.classes,
                "notes": split.notes,
                "train": [printable(p) for p in split.train],  # a name that is not UTF-8 as \xe9: valid JSON
                "valid": [printable(p) for p in split.valid],
            },
        )

    def read_split(self) -> SplitRecord:
        raw = self._json(self.split_file, "a `pneumo train` run folder")
        try:
            return SplitRecord(
                str(raw["method"]),
                list(raw["classes"]),
                [str(p) for p in raw["train"]],
                [str(p) for p in raw["valid"]],
                list(raw.get("notes", [])),
            )
        except (KeyError, TypeError) as exc:
            raise PneumoError(f"{self.split_file}: not a pneumo split ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ metrics.csv
    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.metrics_file, out.getvalue())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Rows with numbers as numbers (``epoch`` int, ``phase`` text, the rest float or None)."""
        rows = []
        for raw in self._csv(self.metrics_file):
            row: dict[str, Any] = {"epoch": _int(raw.get("epoch")), "phase": raw.get("phase") or ""}
            for key in METRIC_FIELDS[2:]:
                row[key] = _float(raw.get(key))
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ valid_predictions.csv
    def write_predictions(self, preds: ValidPredictions) -> None:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["path", "label", "patient"] + [f"prob_{c}" for c in preds.classes])
        for path, label, patient, p in zip(preds.paths, preds.labels, preds.patients, preds.probs):
            writer.writerow(
                [printable(path), preds.classes[int(label)], printable(patient)] + [repr(float(v)) for v in p]
            )
        atomic_write_text(self.predictions_file, out.getvalue())

    def read_predictions(self, classes: list[str] | None = None) -> ValidPredictions:
        """The rows whose label and probabilities parse; ``classes`` (default: the file's) orders columns."""
        rows, columns = self._csv(self.predictions_file, with_columns=True)
        file_classes = [c[len("prob_") :] for c in columns if c.startswith("prob_")]
        classes = list(classes) if classes is not None else file_classes
        missing = [c for c in ["path", "label"] + [f"prob_{c}" for c in classes] if c not in columns]
        if missing or len(classes) < 2:
            raise PneumoError(f"{self.predictions_file}: missing columns {missing or ['prob_<class>']}")
        paths, labels, patients, probs, skipped = [], [], [], [], 0
        for row in rows:
            try:
                p = [float(row[f"prob_{c}"]) for c in classes]
                y = classes.index(row["label"])
            except (ValueError, TypeError):
                skipped += 1
                continue
            if not all(math.isfinite(v) for v in p):
                skipped += 1
                continue
            paths.append(row["path"]), labels.append(y), patients.append(row.get("patient") or ""), probs.append(p)
        return ValidPredictions(
            classes,
            paths,
            np.asarray(labels, dtype=int),
            patients,
            np.asarray(probs, dtype=np.float64).reshape(-1, len(classes)),
            skipped,
        )

    # ------------------------------------------------------------------ valid_eval.json
    def write_evaluation(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.evaluation_file, report)

    def read_evaluation(self) -> dict[str, Any]:
        report = self._json(self.evaluation_file, "a finished run")
        if not isinstance(report, dict):
            raise PneumoError(f"{self.evaluation_file}: does not hold an evaluation object")
        legacy = report.pop("reweighted_to_test_balance", None)
        if isinstance(legacy, dict) and "reweighted" not in report:
            report["reweighted"] = {"target_pos_fraction": LEGACY_REWEIGHTED_FRACTION, "metrics": legacy}
        return report

    # ------------------------------------------------------------------ distributed.json
    def write_distributed(self, record: dict[str, Any]) -> None:
        """How a torchrun run was shared: world size, backend, per-rank split and weight digests, timings."""
        atomic_write_json(self.distributed_file, record)

    def read_distributed(self) -> dict[str, Any]:
        return self._json(self.distributed_file, "a run trained with torchrun / --nproc")

    # ------------------------------------------------------------------ features_runtime.json
    def write_features_runtime(self, record: dict[str, Any]) -> None:
        """Which runtime computed the cached features (``training.prefix_runtime``): runtime,
        max_abs_diff against PyTorch on the first batch, tolerance, reason."""
        atomic_write_json(self.features_runtime_file, record)

    def read_features_runtime(self) -> dict[str, Any]:
        return self._json(self.features_runtime_file, "a features-mode run")

    # ------------------------------------------------------------------ model/model.json
    def read_model_meta(self) -> ModelMeta:
        return read_model_meta(self.model_dir / "model.json")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Path | None = None, **state: Any) -> None:
        """``torch.save`` of a plain dict, written atomically (torch loads only here).

        The run's own checkpoint keeps its predecessor as ``previous.pt``: a ``last.pt`` damaged on
        disk later costs one epoch, not the run. The new file is complete before the old one moves.
        """
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = path or self.checkpoint_file

        def write(tmp: Path) -> None:
            tmp.write_bytes(buffer.getvalue())
            if path == self.checkpoint_file and path.exists():
                os.replace(path, self.previous_checkpoint_file)

        atomic_write(path, write)

    def load_checkpoint(self, path: Path | None = None) -> dict[str, Any]:
        """A checkpoint read with ``weights_only=True`` (nothing unpickled); a damaged one is named.

        The run's own: ``last.pt``, or ``previous.pt`` when a kill fell between their two renames."""
        if path is None and not self.checkpoint_file.exists() and self.previous_checkpoint_file.exists():
            return self._load(self.previous_checkpoint_file)
        try:
            return self._load(path or self.checkpoint_file)
        except TrainingError as exc:
            if path is not None or not self.previous_checkpoint_file.exists():
                raise
            try:
                earlier = self._load(self.previous_checkpoint_file)
            except TrainingError:
                raise exc from None
            epoch = earlier.get("epoch")
            after = f" (epoch {epoch} of phase {earlier.get('phase', 0) + 1})" if isinstance(epoch, int) else ""
            raise TrainingError(
                f"{exc}; an earlier good checkpoint exists: {self.previous_checkpoint_file}{after}: "
                f"delete {self.checkpoint_file} to resume from it"
            ) from None

    def _load(self, path: Path) -> dict[str, Any]:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated zip, wrong format: the file is unusable
            raise TrainingError(
                f"{path}: damaged checkpoint ({type(exc).__name__}: {str(exc)[:120]}); delete it to start the "
                f"phase again, or restart the run in a new --out"
            ) from None
        if not isinstance(state, dict):
            raise TrainingError(f"{path}: not a pneumo checkpoint (a dict of tensors and states is expected)")
        return state

    # ------------------------------------------------------------------ readers
    def _json(self, path: Path, what: str) -> Any:
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise PneumoError(f"{path}: missing; give {what}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PneumoError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None

    def _csv(self, path: Path, with_columns: bool = False) -> Any:
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                columns = list(reader.fieldnames or [])
        except FileNotFoundError:
            raise PneumoError(f"{path}: missing; give a finished `pneumo train` run folder") from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise PneumoError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
        return (rows, columns) if with_columns else rows


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    value = _float(text)
    return int(value) if value is not None else None
