"""The LR range test (Smith 2015, as fastai's ``lr_find``): ramp the LR exponentially, watch the loss.

The weights are saved before the test and restored after it, so the model is untouched. The
suggestion is a plain float from a pure function of ``(lrs, losses)``; ``valley`` (fastai's default)
ignores an early spike because it looks for the longest run of falling loss.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pneumo.config import TrainConfig
from pneumo.training.schedule import exponential


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's default: the middle of the longest stretch over which the loss keeps falling."""
    n = len(losses)
    run = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[best_end]:
            best_end, best_start = i, i - run[i]
    third = (best_end - best_start) / 3
    return float(lrs[min(n - 1, best_start + int(third) + int(third / 2))])


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """Where the loss falls fastest against log(lr), ignoring the noisy first tenth of the ramp."""
    skip = len(lrs) // 10
    grads = np.gradient(np.asarray(losses[skip:]), np.log(np.asarray(lrs[skip:])))
    return float(lrs[skip + int(np.argmin(grads))])


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A tenth of the LR at the lowest loss (the classic rule of thumb)."""
    return float(lrs[int(np.argmin(losses))] / 10)


SUGGESTERS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
}


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed, debiased
    suggestion: float  # by ``method``
    method: str
    suggestions: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode_s, ..., range_test_s, plot_s
    plot: Path | None = None  # lr_find.png, when ``lr_find`` drew it

    def __repr__(self) -> str:
        others = ", ".join(f"{k} {v:.2e}" for k, v in self.suggestions.items() if k != self.method)
        return (
            f"LRFindResult(suggestion {self.suggestion:.2e} by {self.method} [{others}], "
            f"{len(self.lrs)} steps from {self.lrs[0]:.1e} to {self.lrs[-1]:.1e}, plot {self.plot})"
        )

    def _repr_png_(self) -> bytes | None:  # a notebook shows the plot
        return self.plot.read_bytes() if self.plot is not None and self.plot.is_file() else None


MIN_ITERATIONS = 3  # the suggesters need a curve, not a point


def check_range(start_lr: float, end_lr: float, num_it: int, method: str) -> None:
    """Refuse a ramp that cannot run, before any data is read (the options as ``pneumo lr-find`` spells them)."""
    from pneumo.errors import PneumoError

    def finite_positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not finite_positive(start_lr) or not finite_positive(end_lr):
        raise PneumoError(f"--start-lr and --end-lr must be finite numbers above 0, not {start_lr!r} and {end_lr!r}")
    if start_lr >= end_lr:
        raise PneumoError(f"--start-lr ({start_lr:g}) must lie below --end-lr ({end_lr:g}): the ramp goes up")
    if isinstance(num_it, bool) or not isinstance(num_it, int) or num_it < MIN_ITERATIONS:
        raise PneumoError(f"--num-it must be an integer >= {MIN_ITERATIONS}, not {num_it!r}")
    if method not in SUGGESTERS:
        raise PneumoError(f"--suggest must be one of {', '.join(SUGGESTERS)}, not {method!r}")


def range_test(
    step: Callable[[float], float],
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    beta: float = 0.98,
    stop_div: float = 4.0,
    method: str = "valley",
    progress: bool = False,
) -> LRFindResult:
    """Call ``step(lr) -> loss`` on an exponential ramp until the smoothed loss diverges.

    With ``progress`` a bar counts the ``num_it`` steps (the sweep is the longest part of lr-find)
    and shows the LR and smoothed loss; it stops early, and says so, when the loss diverges."""
    check_range(start_lr, end_lr, num_it, method)
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, float("inf")
    bar = tqdm(total=num_it, desc="LR sweep", unit="step", disable=not progress, leave=False)
    with bar:
        for i in range(num_it):
            lr = exponential(start_lr, end_lr, i / (num_it - 1))
            loss = step(lr)
            bar.update()
            if not np.isfinite(loss):
                break
            avg = beta * avg + (1 - beta) * loss
            smoothed = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smoothed:.3f}", refresh=False)
            if i > 5 and smoothed > stop_div * best:
                bar.set_description("LR sweep (loss diverged: stopped)")
                break
    if len(lrs) < 3:
        from pneumo.errors import TrainingError

        raise TrainingError("the loss diverged at once: lower --start-lr")
    suggestions = {name: f(lrs, losses) for name, f in SUGGESTERS.items()}
    return LRFindResult(lrs, losses, suggestions[method], method, suggestions)


def find_lr(
    model: torch.nn.Module,
    phase: Any,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    method: str = "valley",
    progress: bool = False,
) -> LRFindResult:
    """The range test on a training ``Phase``; the model's weights are restored afterwards."""
    saved = copy.deepcopy(model.state_dict())
    batches: list[torch.Tensor] = []

    def step(lr: float) -> float:
        if not batches:
            batches.extend(phase.batches())
        top = phase.opt.param_groups[-1]["max_lr"]  # the head's; other groups keep their ratio to it
        for group in phase.opt.param_groups:
            group["lr"] = lr * group["max_lr"] / top
        loss = phase.step(batches.pop())
        phase.update(loss)
        return loss.item()  # the stopping rule needs every loss: one wait per step, as fastai

    try:
        return range_test(step, start_lr, end_lr, num_it, method=method, progress=progress)
    finally:
        model.load_state_dict(saved)


def lr_find(
    data: str | Path,
    out: str | Path | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    method: str = "valley",
    progress: bool = True,
    **options: Any,
) -> LRFindResult:
    """Run the range test on the first training phase exactly as ``pneumo train`` would run it."""
    from pneumo.nets.hub import check_weights_available
    from pneumo.plots import plot_lr_find
    from pneumo.run_folder import RunFolder
    from pneumo.training.phases import build_phase
    from pneumo.training.setup import first_phase_name, prepare_run, timed

    cfg = TrainConfig.from_dict({**options, "data": str(data)})  # checked as it is made
    check_range(start_lr, end_lr, num_it, method)
    out = Path(out or "runs/lr_find")
    out.mkdir(parents=True, exist_ok=True)
    check_weights_available(cfg.arch, cfg.pretrained, cfg.weights)  # before the data is decoded
    setup = prepare_run(cfg, progress)
    # The features file (tens of MB) goes to a scratch folder deleted at the end, not into OUT: the
    # shared cache keeps its copy (unless PNEUMO_NO_CACHE), so `pneumo train` with the same options
    # reuses it.
    with tempfile.TemporaryDirectory(prefix="pneumo-lr-find-") as scratch:
        phase = build_phase(setup, first_phase_name(cfg), RunFolder(scratch), progress)
        with timed(setup.timings, "range_test_s"):
            result = find_lr(setup.model, phase, start_lr, end_lr, num_it, method, progress=progress)
    with timed(setup.timings, "plot_s"):
        result.plot = plot_lr_find(
            result.lrs,
            result.losses,
            result.suggestion,
            out / "lr_find.png",
            extra_suggestions={k: v for k, v in result.suggestions.items() if k != method},
        )
    result.timings = setup.timings
    return result
