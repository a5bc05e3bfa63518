"""The training loop's events, and the callbacks that listen to them.

``train(..., callbacks=[...])`` calls, in this order::

    on_run_start(run)                          data loaded, model built, config.json and split.json written
      on_phase_start(run, phase_name, epochs)    per phase that has epochs left ("frozen"/"scratch", "unfrozen")
        on_epoch_start(run, phase_name, epoch)     epoch: 1-based across phases, as row["epoch"]
        on_epoch_end(run, row)                     after the epoch's checkpoint is written
    on_run_end(run, result)                    after evaluation, figures and the model folder

``row`` is the history dict of the epoch (``epoch``, ``phase``, ``train_loss``, ``valid_loss``,
``error_rate``, ``time``, ``valid_time``, ``elapsed``; seconds as numbers). ``run`` (``Run``) holds the
config, the run folder, the history so far and the stage timings. A resumed run starts with the
earlier rows in ``run.history`` and calls the epoch events for new epochs only.

Built in: ``MetricsCSV`` (``metrics.csv``, always on) and ``EpochTable`` (the printed table; off with
``train(quiet=True)``); trackers live in ``tracking.py``. A callback that raises stops the run with a
``TrainingError`` naming the callback and the event; the last checkpoint stays, so ``--resume`` continues.
Callbacks only watch: they must not draw random numbers from torch or touch the model's weights.
Under torchrun (``distributed.py``) callbacks run on rank 0 alone, the one rank that writes the run
folder; ``row["train_loss"]`` is then the mean over the ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from tqdm.auto import tqdm

from pneumo.config import TrainConfig
from pneumo.errors import PneumoError, TrainingError
from pneumo.run_folder import RunFolder

if TYPE_CHECKING:
    from pneumo.training.finish import RunResult
    from pneumo.training.setup import RunSetup


@dataclass
class Run:
    """What callbacks see of a training run."""

    cfg: TrainConfig
    folder: RunFolder  # every file of the run (``folder.path`` is the run directory)
    setup: RunSetup  # device, data (classes, samples, notes), model
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch, grows
    resumed: bool = False  # continued from a checkpoint: ``history`` starts with earlier rows
    progress: bool = True  # the run shows progress bars (False: quiet, or --json)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per costly stage, filled as they happen: ``decode_s``, ``create_model_s`` (before
        ``on_run_start``), ``bn_adapt_s`` and ``features_s`` (before the frozen phase's
        ``on_phase_start``, when features are computed rather than read from a cache), ``finish_s``
        (before ``on_run_end``)."""
        return self.setup.timings


class Callback:
    """Override the events you need; each does nothing by default."""

    def on_run_start(self, run: Run) -> None:
        pass

    def on_phase_start(self, run: Run, phase_name: str, epochs: int) -> None:
        pass

    def on_epoch_start(self, run: Run, phase_name: str, epoch: int) -> None:
        pass

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        pass

    def on_run_end(self, run: Run, result: RunResult) -> None:
        pass


def emit(callbacks: Sequence[Callback], event: str, run: Run, *args: Any) -> None:
    """Call ``event`` on every callback in order; a failure names the callback and the event."""
    for callback in callbacks:
        try:
            getattr(callback, event)(run, *args)
        except PneumoError:
            raise  # already a message a user can act on
        except Exception as exc:
            raise TrainingError(
                f"callback {type(callback).__name__}.{event} failed: {type(exc).__name__}: {exc}. The run "
                f"folder keeps its last checkpoint: `pneumo train --resume --out {run.folder.path}` "
                f"continues it"
            ) from exc


# ---------------------------------------------------------------------------------------------
# built in
# ---------------------------------------------------------------------------------------------
class MetricsCSV(Callback):
    """``RUN/metrics.csv``, rewritten after each epoch's checkpoint (a resumed run keeps its rows)."""

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        run.folder.write_metrics(run.history)


class EpochTable(Callback):
    """The epoch table as fastai prints it, after the data notes; on stdout, or on stderr when the run
    shows no progress (``--json`` keeps stdout for its JSON). ``file`` chooses another stream."""

    HEADER = f"{'epoch':>5}  {'phase':<8}  {'train_loss':>10}  {'valid_loss':>10}  {'error_rate':>10}  {'time':>6}"

    def __init__(self, file: TextIO | None = None):
        self.file = file

    def write(self, run: Run, line: str) -> None:
        tqdm.write(line, file=self.file or (sys.stdout if run.progress else sys.stderr))

    def on_run_start(self, run: Run) -> None:
        for note in run.setup.data.notes:
            self.write(run, f"note: {note}")
        self.write(run, self.HEADER)
        for row in run.history:
            self.write(run, format_row(row))

    def on_epoch_end(self, run: Run, row: dict[str, Any]) -> None:
        self.write(run, format_row(row))


def format_row(row: dict[str, Any]) -> str:
    minutes, seconds = divmod(int(row["time"]), 60)
    return (
        f"{row['epoch']:>5}  {row['phase']:<8}  {row['train_loss']:>10.4f}  {row['valid_loss']:>10.4f}  "
        f"{row['error_rate']:>10.4f}  {minutes:02d}:{seconds:02d}"
    )
