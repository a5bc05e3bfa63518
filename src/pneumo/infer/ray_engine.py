"""``pneumo predict ... --engine ray``: the archive streams through Ray Data on a local or remote cluster.

The file list becomes a Ray Dataset; ``decode_batch`` decodes each block (``map_batches`` on CPU
workers); ``Predictor`` actors (``map_batches`` with an ``ActorPoolStrategy`` pool) load the model
once and predict. On a cluster with GPUs each actor takes one GPU and decoding runs in separate CPU
tasks; on CPUs alone Ray fuses the two steps into the actors (one actor per CPU: each block is
decoded where it is predicted, never copied through the object store). The driver pulls finished
rows a chunk at a time (``iter_batches``) and ``infer.batch`` appends them to the output, so a rerun
skips what is done.
Ray Data's streaming executor applies backpressure: memory stays bounded by the blocks in flight,
not by the archive.

Ray is the optional extra ``ray`` (``pip install 'pneumo[ray]'``), imported only here. Without
``address`` (and without ``RAY_ADDRESS``) Ray starts a cluster on this machine and it is shut down at
the end; ``address="auto"`` or ``"ray://head:10001"`` joins a running cluster, whose nodes must see
the files under the same paths (a shared file system).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.errors import PneumoError
from pneumo.extras import require
from pneumo.infer.runtime import resolve_runtime

STRING_COLUMNS = ("path", "label", "positive_class", "reading", "scope_reason", "error")
FLAG_COLUMNS = ("in_scope",)  # True / False / None, kept as text so that every block has one type


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Paths -> uint8 pixels at the model's size, through the one preprocessing path (``data.imaging``).
    An unreadable file gets a blank image and its reason in ``error``; the run goes on."""
    from pneumo.data.cache import decode_images

    paths = [str(p) for p in batch["path"]]
    decoded = decode_images([Path(p) for p in paths], size, workers=1, progress=False, use_cache=False)
    return {
        "path": np.array(paths, dtype=object),
        "pixels": np.asarray(decoded.pixels, dtype=np.uint8).reshape(len(paths), size, size),
        "error": np.array([decoded.errors.get(p, "") if not ok else "" for p, ok in zip(paths, decoded.ok)], object),
    }


class Predictor:
    """One actor of the pool: loads the model folder once (on the runtime the driver chose), then
    predicts decoded blocks."""

    def __init__(self, folder: str, tta: bool, device: str, runtime: str = "torch"):
        from pneumo.infer.scope import ScopeCheck

        if runtime == "onnx":  # one CPU per actor: one onnxruntime thread
            from pneumo.infer.onnx import load_onnx_model

            self.loaded: Any = load_onnx_model(folder, threads=1)
        else:
            from pneumo.infer.model_folder import load_model

            self.loaded = load_model(folder, device)
        self.scope = ScopeCheck(self.loaded)
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pneumo.infer.predict import output_columns, prediction_rows, read_films

        paths = [str(p) for p in batch["path"]]
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        probs, verdicts = read_films(self.scope, paths, ok, batch["pixels"][ok], self.tta)
        errors = {p: e for p, e in zip(paths, batch["error"]) if e}
        rows = prediction_rows(self.loaded, paths, probs, ok, errors, verdicts)
        return {c: column(rows, c) for c in output_columns(self.loaded.classes)}


def column(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    """One column with fixed types across blocks: '' for a missing string, NaN for a missing number."""
    if name in STRING_COLUMNS:
        return np.array([r.get(name) or "" for r in rows], dtype=object)
    if name in FLAG_COLUMNS:
        return np.array(["" if r.get(name) is None else str(r[name]) for r in rows], dtype=object)
    return np.array([np.nan if r.get(name) is None else r[name] for r in rows], dtype=np.float64)


def to_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Ray's columns back to ``predict_files``-style rows (None where the engine wrote '' or NaN)."""
    names = list(batch)
    out = []
    for values in zip(*(batch[n] for n in names)):
        row = {}
        for name, v in zip(names, values):
            if name in FLAG_COLUMNS:
                row[name] = None if not v else v == "True"
            elif name in STRING_COLUMNS:
                row[name] = str(v) if v else None
            else:
                row[name] = None if np.isnan(v) else float(v)
        out.append(row)
    return out


def check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail at once, naming the address, when nothing listens at ``HOST:PORT`` or ``ray://HOST:PORT``.

    Without this, ``ray.init`` retries a dead head's GCS port for minutes before it gives up.
    ``None``, ``auto`` and ``local`` are Ray's to resolve (it says at once when no cluster runs)."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise PneumoError(f"--address {address}: give auto, HOST:PORT (the head's GCS, 6379) or ray://HOST:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise PneumoError(
            f"--engine ray: nothing answers at {address} ({exc.strerror or exc}); is the Ray head running "
            f"(`ray start --head` on it) and its port open from here?"
        ) from None


def ray_chunks(
    folder: Path,
    files: Sequence[str],
    chunk_size: int,
    tta: bool = False,
    address: str | None = None,
    progress: bool = True,
    actors: int | None = None,
    runtime: str = "auto",
    on_runtime: Callable[[str, str], object] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Rows for ``files``, ``chunk_size`` at a time, computed on a Ray cluster (see the module's doc).

    ``runtime`` as ``predict_files``: auto resolves with the cluster's device (a cluster with GPUs
    runs torch there); ``on_runtime(runtime, reason)`` hears the choice."""
    ray = require("ray", "ray.data", "ray", what="--engine ray")
    from pneumo.model_meta import read_model_meta

    if not files:
        return
    size = read_model_meta(folder / "model.json").image_size
    started_here = not ray.is_initialized()
    if started_here:
        check_reachable(address)
        local = {} if address else {"include_dashboard": False}  # a cluster being joined keeps its own settings
        try:
            ray.init(address=address, log_to_driver=False, **local)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; each means no cluster to work on
            where = f"join the Ray cluster at {address}" if address else "start a Ray cluster on this machine"
            raise PneumoError(f"--engine ray: could not {where} ({type(exc).__name__}: {str(exc)[:300]})") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        device = "cuda" if gpus else "cpu"
        chosen, reason = resolve_runtime(folder, runtime, tta, device=device if gpus else None)
        if on_runtime is not None:
            on_runtime(chosen, reason)
        pool = actors or gpus or cpus
        blocks = max(1, -(-len(files) // chunk_size))
        ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=blocks)
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": size}, batch_size=chunk_size, batch_format="numpy")
        ds = ds.map_batches(
            Predictor,
            fn_constructor_args=(str(folder), tta, device, chosen),
            compute=ray.data.ActorPoolStrategy(size=pool),
            batch_size=chunk_size,
            batch_format="numpy",
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
        for batch in ds.iter_batches(batch_size=chunk_size, batch_format="numpy"):
            yield to_rows(batch)
    finally:
        if started_here:
            ray.shutdown()
