"""The training loop, read top to bottom: config -> data and model -> phases of one-cycle epochs -> evaluation.

Phase 1 is the tutorial's ``fit_one_cycle(epochs, lr)`` with the body frozen (BatchNorm adapted to
X-rays). By default it runs on cached body features (see ``features.py``) on a CPU and a GPU alike;
``mode="full"`` runs the body every step on augmented batches taken straight from the uint8 image
cache on the device, as training from scratch and phase 2 always do. Phase 2 (``unfreeze_epochs`` >
0) fine-tunes the whole network with discriminative learning rates. What the phases are built from is
in ``setup.py`` (shared with the LR range test), how in ``phases.py``.

Every epoch ends with an atomic checkpoint holding the model, optimizer, RNG states (the GPU's
too), the fp16 loss scale and history, so ``resume=True`` continues a killed run and ends exactly
where an uninterrupted run ends (on a CPU; GPU kernels need not be deterministic). Then the
callbacks hear of it (``events.py``): ``metrics.csv``, the printed table and trackers are callbacks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pneumo.config import TrainConfig
from pneumo.errors import PneumoError, TrainingError
from pneumo.nets.hub import check_weights_available
from pneumo.run_folder import RunFolder, SplitRecord
from pneumo.training import distributed
from pneumo.training.events import Callback, EpochTable, MetricsCSV, Run, emit
from pneumo.training.finish import RunResult, finish_run
from pneumo.training.phases import build_phase
from pneumo.training.setup import first_phase_name, prepare_run, timed
from pneumo.training.tracking import make_trackers

__all__ = ["StopRequested", "new_run_dir", "train"]


CHECKPOINT_KEYS = {"phase", "epoch", "model", "optimizer", "generator", "torch_rng", "history"}


class StopRequested(Exception):
    """Raised after a checkpoint when ``stop_after_epoch`` is reached: stands in for a kill in tests."""


def new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.arch}"


def train(
    data: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    callbacks: Sequence[Callback] = (),
    track: Sequence[str] = (),
    stop_after_epoch: int | None = None,
    **options: Any,
) -> RunResult:
    """Train a model as ``pneumo train`` does; ``options`` are TrainConfig fields.

    With ``resume=True`` and ``out=RUN_DIR``, the run continues from its last checkpoint with the
    config it was started with. ``quiet`` prints no epoch table; ``callbacks`` hear the run's events
    (``events.Callback``); ``track`` names trackers (``"tensorboard"``, ``"mlflow"``, see ``tracking.py``).

    Under torchrun (``torchrun --nproc-per-node N -m pneumo train``) every process calls this: see
    ``distributed.py`` for how the work is shared; rank 0 alone writes the run folder and calls the callbacks.
    """
    # --- the config: given, or read back from the run being resumed -----------------------------
    folder: RunFolder | None = None
    if resume:
        folder = RunFolder(options["out"]) if options.get("out") else None
        if folder is None or not folder.config_file.exists():
            raise PneumoError(
                f"--resume needs --out RUN_DIR of an earlier run (no config.json in {folder.path if folder else None})"
            )
        given = sorted(set(options) - {"out"}) + (["data"] * (data is not None))
        if given:  # never silently ignored: a resumed run is the run that was started
            raise PneumoError(
                f"--resume continues {folder.path} with the options it was started with; these cannot change: "
                f"{', '.join(given)} (drop them, or start a new run with another --out)"
            )
        cfg = folder.read_config()
        cfg.out = str(folder.path)  # where it is now, wherever it was started from
    else:
        cfg = TrainConfig.from_dict({**options, "data": str(data)})  # checked as it is made
        check_weights_available(cfg.arch, cfg.pretrained, cfg.weights)  # offline: before any data is read
    ctx = distributed.setup(cfg.device)  # torchrun's process group; one process: nothing to join
    try:
        result = _train(cfg, folder, progress and ctx.is_main, quiet, callbacks, track, stop_after_epoch)
    except BaseException:
        distributed.teardown(clean=False)
        raise
    distributed.teardown()
    return result


def _train(
    cfg: TrainConfig,
    resumed: RunFolder | None,
    progress: bool,
    quiet: bool,
    callbacks: Sequence[Callback],
    track: Sequence[str],
    stop_after_epoch: int | None,
) -> RunResult:
    """The run on each rank of a distributed run (or the one process); ``resumed``: the run folder to continue."""
    ctx = distributed.current()
    main = ctx.is_main  # rank 0 alone writes the run folder and hears the events
    state: dict | None = None
    if resumed is not None:
        folder = resumed
        state = folder.load_checkpoint() if folder.has_started() else None
        missing = sorted(CHECKPOINT_KEYS - set(state or {}))
        if state is not None and missing:
            raise TrainingError(f"{folder.checkpoint_file}: not a pneumo training checkpoint (no {', '.join(missing)})")
    else:
        folder = RunFolder(distributed.on_main(lambda: str(new_run_folder(cfg).path)))
        cfg.out = str(folder.path)
    created = None
    if main:
        callbacks = [MetricsCSV(), *([] if quiet else [EpochTable()]), *make_trackers(track, folder.path), *callbacks]
        created = folder.make()
        folder.write_config(cfg)
    else:
        callbacks = []

    # --- data and model, built as the LR range test builds them --------------------------------------
    started = time.perf_counter()
    try:
        setup = prepare_run(cfg, progress, pretrained=state is None)
    except BaseException:  # refused data, say: leave no run folder holding only config.json
        if resumed is None and main:  # a resumed run's config.json is the user's
            folder.discard_unstarted(created)
        raise
    model, generator, valid_y = setup.model, setup.generator, setup.valid_y
    split = SplitRecord(
        cfg.split,
        setup.data.classes,
        [str(s.path) for s in setup.data.train],
        [str(s.path) for s in setup.data.valid],
        setup.data.notes,
    )
    split_hashes = distributed.check_identical("the split", split_digest(split))
    if main:
        folder.write_split(split)
    history: list[dict] = json.loads(state["history"]) if state else []
    run = Run(cfg, folder, setup, history, resumed=state is not None, progress=progress)
    if state:
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError) as exc:  # another architecture's, or edited: never half-loaded
            raise TrainingError(
                f"{folder.checkpoint_file}: does not fit the run's {cfg.arch} ({str(exc).splitlines()[0][:160]})"
            ) from None
    emit(callbacks, "on_run_start", run)

    # --- phases of one-cycle epochs, a checkpoint after each epoch -----------------------------------
    valid_logits: torch.Tensor | None = None
    start_phase, start_epoch = (state["phase"], state["epoch"]) if state else (0, 0)
    phases = [(first_phase_name(cfg), cfg.epochs), ("unfrozen", cfg.unfreeze_epochs)]
    for phase_index, (name, epochs) in enumerate(phases):
        if epochs == 0 or phase_index < start_phase:
            continue
        phase = build_phase(setup, name, folder, progress)
        first = start_epoch if phase_index == start_phase else 0
        if state and phase_index == start_phase and first > 0:  # continue mid-phase exactly
            model.load_state_dict(state["model"])  # building the phase may have reloaded cached body weights
            phase.opt.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") and setup.device.type == "cuda":  # dropout on a GPU draws from it
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if state.get("scaler") and phase.scaler is not None:  # fp16 loss scale
                phase.scaler.load_state_dict(state["scaler"])
        if first < epochs:
            emit(callbacks, "on_phase_start", run, name, epochs)
        for epoch in range(first, epochs):
            emit(callbacks, "on_epoch_start", run, name, len(history) + 1)
            t0 = time.perf_counter()
            train_loss = distributed.mean_across_ranks(phase.train_epoch(epoch, progress))
            t1 = time.perf_counter()
            logits = valid_logits = phase.valid_logits().cpu()
            valid_loss = F.cross_entropy(logits, valid_y).item()
            error = (logits.argmax(1) != valid_y).float().mean().item()
            row = {
                "epoch": len(history) + 1,
                "phase": name,
                "train_loss": round(train_loss, 6),
                "valid_loss": round(valid_loss, 6),
                "error_rate": round(error, 6),
                "time": round(time.perf_counter() - t0, 2),
                "valid_time": round(time.perf_counter() - t1, 2),
                "elapsed": round(time.perf_counter() - started, 2),
            }
            history.append(row)
            if main:
                folder.save_checkpoint(
                    phase=phase_index,
                    epoch=epoch + 1,
                    model=model.state_dict(),
                    optimizer=phase.opt.state_dict(),
                    generator=generator.get_state(),
                    torch_rng=torch.get_rng_state(),
                    history=json.dumps(history),
                    cuda_rng=torch.cuda.get_rng_state_all() if setup.device.type == "cuda" else [],
                    scaler=phase.scaler.state_dict() if phase.scaler is not None else {},
                )
            emit(callbacks, "on_epoch_end", run, row)  # metrics.csv first: it lands after the checkpoint
            if stop_after_epoch is not None and len(history) >= stop_after_epoch:
                raise StopRequested(f"stopped after epoch {len(history)} as asked")
        start_phase, start_epoch = phase_index + 1, 0

    # --- every rank holds the same weights; rank 0 calibrates, chooses the threshold, writes the model ---
    weight_hashes = distributed.check_identical("the trained weights", distributed.state_hash(model))
    if cfg.tta:
        valid_logits = None  # predict afresh with flipped copies
    if not main:  # wait for rank 0's evaluation (within the process group's timeout)
        evaluation, notes = distributed.broadcast_object(None)
        return RunResult(folder.path, folder.model_dir, history, evaluation, notes)
    with timed(setup.timings, "finish_s"):
        result = finish_run(cfg, folder.path, model, setup.data, history, setup.device, valid_logits, progress)
    if ctx.enabled:
        folder.write_distributed(
            {
                "world_size": ctx.world_size,
                "backend": ctx.backend,
                "mode": setup.mode,
                "split_sha256": split_hashes,
                "weights_sha256": weight_hashes,
                "timings": {k: round(v, 3) for k, v in setup.timings.items()},
            }
        )
        distributed.broadcast_object((result.evaluation, result.notes))
    emit(callbacks, "on_run_end", run, result)
    return result


def new_run_folder(cfg: TrainConfig) -> RunFolder:
    """The folder of a new run (``--out``, else a stamped one); refused when it holds a run already."""
    folder = RunFolder(new_run_dir(cfg))
    if folder.has_started():
        raise PneumoError(f"{folder.path} holds a run already: add --resume to continue it, or choose another --out")
    return folder


def split_digest(split: SplitRecord) -> str:
    """A digest of the split (classes, train and validation files in order): equal on every rank or the run stops."""
    text = json.dumps([split.method, split.classes, split.train, split.valid])
    return hashlib.sha256(text.encode()).hexdigest()
