"""The training loop's events: order and counts, metrics.csv as a callback, a failing callback, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import pneumo
from pneumo.errors import PneumoError, TrainingError
from pneumo.run_folder import RunFolder
from pneumo.training.events import Callback, EpochTable, emit
from pneumo.training.loop import train

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
# two phases (frozen on cached features, then unfrozen), three epochs in all, tiny images
TINY = dict(epochs=2, unfreeze_epochs=1, image_size=32, seed=3, progress=False)


def strip_time(history):
    return [{k: v for k, v in row.items() if k not in ("time", "valid_time", "elapsed")} for row in history]


class Recorder(Callback):
    """Every event as a tuple, plus what the run folder held when each epoch ended."""

    def __init__(self):
        self.events: list[tuple] = []
        self.rows: list[dict] = []
        self.checkpoint_epochs: list[int] = []
        self.timings: dict[str, float] = {}

    def on_run_start(self, run):
        self.events.append(("run_start", run.resumed, len(run.history)))

    def on_phase_start(self, run, phase_name, epochs):
        self.events.append(("phase_start", phase_name, epochs))

    def on_epoch_start(self, run, phase_name, epoch):
        self.events.append(("epoch_start", phase_name, epoch))

    def on_epoch_end(self, run, row):
        self.events.append(("epoch_end", row["phase"], row["epoch"]))
        self.rows.append(dict(row))
        saved = run.folder.load_checkpoint()  # the checkpoint is written before callbacks hear of the epoch
        self.checkpoint_epochs.append(len(json.loads(saved["history"])))

    def on_run_end(self, run, result):
        self.events.append(("run_end", len(result.history)))
        self.timings = dict(run.timings)


class Boom(Callback):
    def __init__(self, at_epoch: int):
        self.at_epoch = at_epoch

    def on_epoch_end(self, run, row):
        if row["epoch"] == self.at_epoch:
            raise ValueError("boom")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One uninterrupted run, with its features computed (a fresh shared cache), heard by a Recorder."""
    tmp = tmp_path_factory.mktemp("events")
    recorder, table = Recorder(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMO_CACHE", str(tmp / "cache"))
        result = train(SAMPLE, out=str(tmp / "run"), quiet=True, callbacks=[recorder, EpochTable(table)], **TINY)
    return result, recorder, table.getvalue()


def test_events_come_in_order_once_each(recorded):
    result, recorder, _ = recorded
    assert recorder.events == [
        ("run_start", False, 0),
        ("phase_start", "frozen", 2),
        ("epoch_start", "frozen", 1),
        ("epoch_end", "frozen", 1),
        ("epoch_start", "frozen", 2),
        ("epoch_end", "frozen", 2),
        ("phase_start", "unfrozen", 1),
        ("epoch_start", "unfrozen", 3),
        ("epoch_end", "unfrozen", 3),
        ("run_end", 3),
    ]
    assert recorder.checkpoint_epochs == [1, 2, 3]
    assert recorder.rows == result.history


def test_metrics_csv_holds_the_rows_callbacks_heard(recorded):
    result, recorder, _ = recorded
    assert RunFolder(result.run_dir).read_metrics() == recorder.rows
    assert list(recorder.rows[0]) == [
        "epoch",
        "phase",
        "train_loss",
        "valid_loss",
        "error_rate",
        "time",
        "valid_time",
        "elapsed",
    ]


def test_the_run_records_its_stage_timings(recorded):
    _, recorder, _ = recorded
    assert set(recorder.timings) == {"decode_s", "create_model_s", "bn_adapt_s", "features_s", "finish_s"}
    assert all(seconds > 0 for seconds in recorder.timings.values())


def test_the_epoch_table_is_a_callback(recorded):
    _, _, table = recorded
    lines = table.splitlines()
    assert lines[0].split() == ["epoch", "phase", "train_loss", "valid_loss", "error_rate", "time"]
    assert [line.split()[:2] for line in lines[1:]] == [["1", "frozen"], ["2", "frozen"], ["3", "unfrozen"]]


def test_a_failing_callback_is_named_and_the_run_resumes(recorded, tmp_path, capsys):
    """The failure names the callback and the event; the epoch's checkpoint and metrics.csv stay, and
    --resume ends where the uninterrupted run ended, calling the events of the epochs left only."""
    out = tmp_path / "failed"
    with pytest.raises(TrainingError, match=r"callback Boom\.on_epoch_end failed: ValueError: boom\..*--resume") as err:
        train(SAMPLE, out=str(out), callbacks=[Boom(at_epoch=2)], **TINY)
    assert isinstance(err.value.__cause__, ValueError)
    assert [row["epoch"] for row in RunFolder(out).read_metrics()] == [1, 2]
    assert "train_loss" in capsys.readouterr().err  # the table: on stderr when the run shows no progress

    recorder = Recorder()
    resumed = train(resume=True, out=str(out), progress=False, quiet=True, callbacks=[recorder])
    assert "train_loss" not in capsys.readouterr().err  # quiet: no table
    assert recorder.events == [
        ("run_start", True, 2),
        ("phase_start", "unfrozen", 1),
        ("epoch_start", "unfrozen", 3),
        ("epoch_end", "unfrozen", 3),
        ("run_end", 3),
    ]
    assert strip_time(resumed.history) == strip_time(recorded[0].history)
    assert [row["epoch"] for row in RunFolder(out).read_metrics()] == [1, 2, 3]


def test_emit_passes_a_pneumo_error_through_and_wraps_others(tmp_path):
    run = SimpleNamespace(folder=RunFolder(tmp_path))

    class Refuses(Callback):
        def on_run_start(self, run):
            raise PneumoError("--track x: no such tracker")

    class Breaks(Callback):
        def on_phase_start(self, run, phase_name, epochs):
            raise KeyError(phase_name)

    with pytest.raises(PneumoError, match="^--track x: no such tracker$"):
        emit([Callback(), Refuses()], "on_run_start", run)
    with pytest.raises(TrainingError, match=r"Breaks\.on_phase_start failed: KeyError: 'frozen'"):
        emit([Breaks()], "on_phase_start", run, "frozen", 2)
    emit([Callback()], "on_epoch_end", run, {"epoch": 1})  # the base class does nothing
