"""Training on several processes with PyTorch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc-per-node N -m pneumo train ...`` (or ``pneumo train --nproc N``, which calls
torchrun's own launcher, ``torch.distributed.run``) starts N copies of the command. ``setup`` joins
them into one process group from torchrun's environment (gloo on CPUs, nccl on GPUs, one GPU per
process), with a timeout on every collective so that a rank that stops answering ends the run with
an error instead of a hang; torchrun's elastic agent stops the other ranks when one exits.

How the work is shared (``training.loop``, ``features``, ``phases`` ask here):

- features mode: each rank computes the body features of its contiguous share of the images; they
  are all-gathered, so every rank holds the same features and trains the head on identical data
  with the same seed, and so keeps identical weights without exchanging gradients (a head step costs
  less than an all-reduce). BatchNorm adaptation runs on rank 0 and is broadcast. The weights are
  hashed on every rank at the end and compared: a mismatch is an error, not a silent drift.
- full mode: ``DistributedSampler`` gives each rank ``batch_size / N`` images of every global batch
  (so the learning rate and schedule mean what they mean on one process) and DDP all-reduces the
  gradients; validation is sharded and gathered.
- rank 0 alone writes the run folder, checkpoints, metrics and trackers (callbacks run on rank 0).

Without torchrun's environment (or with one process) every helper here is the identity and nothing
is initialised: one-process training is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pneumo.errors import PneumoError, TrainingError

__all__ = [
    "Dist",
    "all_gather_object",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "check_identical",
    "current",
    "gather_shards",
    "launch",
    "main_first",
    "mean_across_ranks",
    "on_main",
    "rank_generator",
    "setup",
    "shard",
    "state_hash",
    "teardown",
    "wrap_ddp",
]

TIMEOUT_ENV = "PNEUMO_DIST_TIMEOUT"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 1800  # rank 0 finishing the run (figures, model) while the others wait is the longest wait

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, number of processes, backend (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for a collective: the process's GPU with nccl, the CPU with gloo."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


_current = Dist()


def current() -> Dist:
    return _current


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise PneumoError(f"{TIMEOUT_ENV}={value!r}: give seconds, e.g. {DEFAULT_TIMEOUT_S}") from None
    if seconds <= 0:
        raise PneumoError(f"{TIMEOUT_ENV}={value!r}: must be positive")
    return seconds


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun): who prints."""
    return int(os.environ.get("RANK", "0"))


def setup(device_spec: str = "auto") -> Dist:
    """Join torchrun's process group (once); one process: nothing to join, ``Dist()``.

    nccl when the run trains on GPUs (``--device auto`` with CUDA, or ``cuda``), each process on the GPU
    of its ``LOCAL_RANK``; gloo on CPUs.
    """
    global _current
    if _current.enabled or launched_world_size() <= 1:
        return _current
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    on_gpu = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if on_gpu:
        if local >= torch.cuda.device_count():
            raise PneumoError(
                f"rank {rank}: LOCAL_RANK {local} but {torch.cuda.device_count()} GPU(s) visible; "
                f"start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local)  # "cuda" now means this process's GPU
    backend = "nccl" if on_gpu else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    _current = Dist(rank, world, local, backend)
    return _current


def teardown(clean: bool = True) -> None:
    """Leave the process group. ``clean``: first wait (with the timeout) until every rank got here,
    so that no rank exits while another still needs it; after an error, leave at once."""
    global _current
    if not _current.enabled:
        return
    try:
        if clean:
            if _current.backend == "gloo":  # names the rank that did not arrive
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s()))
            else:
                barrier()
    finally:
        dist.destroy_process_group()
        _current = Dist()


# ---------------------------------------------------------------------------------------------
# collectives (each the identity on one process)
# ---------------------------------------------------------------------------------------------
def barrier() -> None:
    if _current.enabled:
        dist.barrier(device_ids=[_current.local_rank] if _current.backend == "nccl" else None)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the others: they find what it cached (decoded images) instead
    of all doing the same work at once. Each rank still runs the block, so nothing relies on a shared disk."""
    if not _current.enabled:
        yield
        return
    if not _current.is_main:
        barrier()
    yield
    if _current.is_main:
        barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects made by pneumo itself, never user files)."""
    if not _current.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_current.comm_device)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    if not _current.enabled:
        return [obj]
    out: list[Any] = [None] * _current.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result, or raise its ``PneumoError`` on every rank
    (so that a refusal such as "this folder holds a run already" reads the same everywhere)."""
    if not _current.enabled:
        return fn()
    result, error = None, None
    if _current.is_main:
        try:
            result = fn()
        except PneumoError as exc:
            error = (type(exc), str(exc))
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error[0](error[1])
    return result


def check_identical(what: str, value: str) -> list[str]:
    """Every rank's ``value`` (a digest); a ``TrainingError`` naming ``what`` when they differ."""
    values = all_gather_object(value)
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise TrainingError(f"the ranks disagree on {what} ({per_rank}); is the data the same on every node?")
    return values


def mean_across_ranks(value: float) -> float:
    if not _current.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_current.comm_device)
    dist.all_reduce(t)
    return t.item() / _current.world_size


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers into ``module`` on every rank (in place)."""
    if not _current.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        data = t.data.to(_current.comm_device)
        dist.broadcast(data, src=0)
        t.data.copy_(data)


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ranks take one more when ``n`` does not divide)."""
    size, extra = divmod(n, _current.world_size)
    start = _current.rank * size + min(_current.rank, extra)
    return slice(start, start + size + (_current.rank < extra))


def gather_shards(n: int, compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``compute(slice(0, n))`` as one process would give it: each rank computes its ``shard(n)`` and
    the pieces are all-gathered in order (on the CPU). Shards may be empty; rows may be any shape."""
    if not _current.enabled or n < _current.world_size:
        return compute(slice(0, n))
    mine = compute(shard(n)).cpu()
    sizes = [(n // _current.world_size) + (r < n % _current.world_size) for r in range(_current.world_size)]
    padded = torch.zeros((max(sizes), *mine.shape[1:]), dtype=mine.dtype)
    padded[: len(mine)] = mine
    parts = [torch.empty_like(padded, device=_current.comm_device) for _ in sizes]
    dist.all_gather(parts, padded.to(_current.comm_device))
    return torch.cat([p[:size].cpu() for p, size in zip(parts, sizes)])


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """A generator for this rank's own random augmentation: ``generator`` itself on one process;
    otherwise seeded from one draw of ``generator`` (the same draw on every rank, so the shared
    generator stays in step across ranks and a resumed run draws the same) plus the rank."""
    if not _current.enabled:
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed + _current.rank)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients all-reduced in backward); itself on one process."""
    if not _current.enabled:
        return model
    device_ids = [_current.local_rank] if _current.backend == "nccl" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def state_hash(state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: equal hashes, equal weights."""
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------
def launch(nproc: int, args: Sequence[str], module: str | None = "pneumo") -> None:
    """Run ``python -m module args`` (or ``python args`` with ``module=None``) in ``nproc`` processes on
    this machine, through torchrun's own launcher (``torch.distributed.run``, standalone rendezvous).

    A process that fails ends the run: torchrun stops the others, and this raises a ``TrainingError``
    naming the rank and its exit code (its traceback is printed above by the process itself).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise PneumoError(f"--nproc {nproc}: give 1 or more processes")
    torchrun_args = ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0"]
    torchrun_args += ["-m", module, *args] if module else list(args)
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        others = sorted(rank for rank in exc.failures if rank != first_rank)
        stopped = f"; torchrun then stopped rank(s) {', '.join(map(str, others))}" if others else ""
        raise TrainingError(
            f"distributed run failed: rank {first_rank} exited first, with code {first.exitcode} (its error "
            f"is printed above){stopped}. A run folder keeps "
            f"its last checkpoint: `pneumo train --resume --out RUN_DIR --nproc {nproc}` continues it"
        ) from None
    finally:
        sys.stdout.flush()
