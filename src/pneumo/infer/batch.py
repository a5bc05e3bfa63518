"""Predict a whole archive: files stream through in chunks (decode -> predict -> append to the output).

``pneumo predict MODEL ARCHIVE --out predictions.csv|predictions.parquet [--engine local|ray]``.

- Bounded memory: at most two chunks of pixels are alive (the one predicted, the next one decoding in
  a thread), whatever the archive's size. What does grow with the archive is the list of file names
  and the set of names already done (some 100-200 bytes a file: 20 MB per 100,000 files).
- Resumable: every chunk is appended to the output as a whole (``CsvOutput``, ``ParquetOutput``), so
  a killed run loses at most the chunk in flight, and a rerun skips every file already in the output.
- One row per file, in the columns ``output_columns`` names, whichever engine made it: ``--engine
  ray`` (``ray_engine.py``, Ray Data on a local or remote cluster) yields the same rows as the local
  engine here and they are written by the same outputs.

Parquet output is a folder of part files (``part-000000.parquet`` ...), as Spark and Ray Data write
Parquet: each part is written atomically, and ``pandas.read_parquet("predictions.parquet")`` or
``pyarrow.dataset`` reads the folder as one table. CSV is one file, a chunk appended per write.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pneumo.errors import DataError, PneumoError
from pneumo.extras import require
from pneumo.infer.predict import expand_paths, output_columns, prediction_rows, read_films, readable_pixels
from pneumo.infer.runtime import open_chosen, runtime_of
from pneumo.infer.scope import ScopeCheck
from pneumo.io_utils import atomic_write
from pneumo.model_meta import model_folder, read_model_meta

ENGINES = ("local", "ray")
DEFAULT_CHUNK = 256  # images per chunk: 256 x 224 x 224 bytes = 13 MB of pixels


# ---------------------------------------------------------------------------------------------
# outputs: each appends whole chunks and knows what is done
# ---------------------------------------------------------------------------------------------
class CsvOutput:
    """One CSV file; each chunk is one write, flushed to disk. A line torn by a kill is cut on reopening."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        if path.exists():
            self._cut_torn_tail()
            with path.open(newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), None)
            if header is not None and header != columns:
                raise DataError(
                    f"{path}: holds predictions with other columns ({', '.join(header)}), not this model's "
                    f"({', '.join(columns)}); choose another --out"
                )

    def _cut_torn_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def done(self) -> set[str]:
        if not self.path.exists():
            return set()
        with self.path.open(newline="", encoding="utf-8") as fh:
            return {row["path"] for row in csv.DictReader(fh)}

    def append(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        if not self.path.exists() or self.path.stat().st_size == 0:
            writer.writeheader()
        writer.writerows(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())


class ParquetOutput:
    """A folder of Parquet part files, one per chunk, each written atomically (pyarrow)."""

    def __init__(self, path: Path, columns: list[str]):
        self.pa = require("ray", "pyarrow", what="--out *.parquet")
        self.pq = require("ray", "pyarrow.parquet", what="--out *.parquet")
        if path.exists() and not path.is_dir():
            raise DataError(f"{path}: a file; Parquet predictions are a folder of part files: choose another --out")
        self.path, self.columns = path, columns
        strings = {"path", "label", "positive_class", "reading", "scope_reason", "error"}

        def kind(c: str) -> Any:
            return self.pa.string() if c in strings else self.pa.bool_() if c == "in_scope" else self.pa.float64()

        self.schema = self.pa.schema([(c, kind(c)) for c in columns])
        for part in self.parts()[:1]:
            found = self.pq.read_schema(part).names
            if found != columns:
                raise DataError(
                    f"{self.path}: holds predictions with other columns ({', '.join(found)}), not this "
                    f"model's ({', '.join(columns)}); choose another --out"
                )

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def done(self) -> set[str]:
        return {p for part in self.parts() for p in self.pq.read_table(part, columns=["path"]).column(0).to_pylist()}

    def append(self, rows: list[dict[str, Any]]) -> None:
        table = self.pa.Table.from_pylist([{c: r.get(c) for c in self.columns} for r in rows], schema=self.schema)
        parts = self.parts()
        index = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        atomic_write(self.path / f"part-{index:06d}.parquet", lambda tmp: self.pq.write_table(table, str(tmp)))


def open_output(out: str | Path, classes: Sequence[str]) -> CsvOutput | ParquetOutput:
    out = Path(out)
    kinds = {".csv": CsvOutput, ".parquet": ParquetOutput}
    if out.suffix.lower() not in kinds:
        raise PneumoError(f"--out {out}: name a .csv file or a .parquet folder")
    return kinds[out.suffix.lower()](out, output_columns(classes))


# ---------------------------------------------------------------------------------------------
# the local engine
# ---------------------------------------------------------------------------------------------
def predicting_threads() -> int:
    """Intra-op threads for prediction beside the decoding thread: one fewer than the machine's cores."""
    return max(1, (os.cpu_count() or 2) - 1)


def local_chunks(
    loaded: Any, files: Sequence[str], chunk_size: int = DEFAULT_CHUNK, tta: bool = False
) -> Iterator[list[dict[str, Any]]]:
    """Rows, a chunk at a time; the next chunk decodes in a thread while this one is predicted.

    Prediction gets one intra-op thread fewer than the machine has cores, the decoding thread has the
    last: on a busy 2-core machine two torch threads beside a decoder spin and predicted ~8x slower.
    An ``OnnxModel`` got its threads when its session was made (``predict_archive``)."""
    from pneumo.data.cache import decode_images

    size = loaded.meta.image_size
    chunks = [files[i : i + chunk_size] for i in range(0, len(files), chunk_size)]

    def decode(paths: Sequence[str]):
        return decode_images([Path(p) for p in paths], size, workers=1, progress=False, use_cache=False)

    if runtime_of(loaded) == "onnx":
        yield from _predict_chunks(loaded, chunks, decode, tta)
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, predicting_threads()))
    try:
        yield from _predict_chunks(loaded, chunks, decode, tta)
    finally:
        torch.set_num_threads(threads)


def _predict_chunks(loaded: Any, chunks: list, decode, tta: bool) -> Iterator[list[dict[str, Any]]]:
    scope = ScopeCheck(loaded)  # every film's verdict, as predict_files gives it
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode, chunks[0]) if chunks else None
        for i, paths in enumerate(chunks):
            decoded = pending.result()
            pending = pool.submit(decode, chunks[i + 1]) if i + 1 < len(chunks) else None
            probs, verdicts = read_films(scope, paths, decoded.ok, readable_pixels(decoded), tta)
            yield prediction_rows(loaded, paths, probs, decoded.ok, decoded.errors, verdicts)


# ---------------------------------------------------------------------------------------------
# one entry point for both engines
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    out: str
    engine: str
    files: int  # images found under the paths given
    already_done: int  # in the output before this run: skipped
    predicted: int  # rows written by this run (errors included)
    errors: int  # of those, unreadable files (a row with ``error``)
    seconds: float
    files_per_second: float | None  # None when nothing was left to predict
    runtime: str | None = None  # the runtime that read the films (None when none was opened)
    runtime_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_archive(
    model: str | Path,
    paths: Sequence[str | Path],
    out: str | Path,
    engine: str = "local",
    address: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    tta: bool = False,
    progress: bool = True,
    on_chunk: Callable[[list[dict[str, Any]], float], object] | None = None,
    runtime: str = "auto",
    on_runtime: Callable[[str, str], object] | None = None,
) -> BatchSummary:
    """Predict every image under ``paths`` into ``out`` (.csv or .parquet), skipping those already there.

    ``on_chunk(rows, seconds)`` hears each chunk once it is written (``pneumo predict`` records the
    readings in the audit trail there); rows as ``predict_files`` gives them (no key for a missing value).
    ``runtime``: as ``predict_files``; ``on_runtime(runtime, reason)`` hears the choice before the first chunk.
    """
    if engine not in ENGINES:
        raise PneumoError(f"--engine {engine}: choose {' or '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise PneumoError("--address names a Ray cluster: it goes with --engine ray")
    if chunk_size < 1:
        raise PneumoError(f"--chunk-size {chunk_size}: give 1 or more images")
    folder = model_folder(model)
    meta = read_model_meta(folder / "model.json")  # the columns, before any weights are loaded
    output = open_output(out, meta.classes)
    files = [str(p) for p in expand_paths(paths)]
    done = output.done()
    todo = [f for f in files if f not in done]
    started = time.perf_counter()
    said: list[tuple[str, str]] = []

    def chosen(name: str, reason: str) -> None:
        said.append((name, reason))
        if on_runtime is not None:
            on_runtime(name, reason)

    if engine == "ray":
        from pneumo.infer.ray_engine import ray_chunks

        chunks = ray_chunks(
            folder, todo, chunk_size, tta, address=address, progress=progress, runtime=runtime, on_runtime=chosen
        )
    elif todo:
        loaded, name, reason = open_chosen(folder, runtime, threads=predicting_threads(), tta=tta)
        chosen(name, reason)
        chunks = local_chunks(loaded, todo, chunk_size, tta)
    else:
        chunks = iter(())
    written = errors = 0
    with tqdm(total=len(todo), desc=f"predicting ({engine})", unit="img", disable=not progress) as bar:
        last = time.perf_counter()
        for rows in chunks:
            output.append(rows)
            if on_chunk is not None:
                now = time.perf_counter()
                on_chunk([{k: v for k, v in r.items() if v is not None} for r in rows], now - last)
                last = now
            written += len(rows)
            errors += sum(1 for r in rows if r.get("error"))
            bar.update(len(rows))
    seconds = time.perf_counter() - started
    return BatchSummary(
        str(out),
        engine,
        len(files),
        len(files) - len(todo),
        written,
        errors,
        round(seconds, 3),
        round(written / seconds, 2) if seconds > 0 and written else None,
        *(said[0] if said else (None, None)),
    )


def format_summary(summary: BatchSummary) -> str:
    rate = f" ({summary.files_per_second} images/s)" if summary.files_per_second else ""
    return (
        f"{summary.predicted} images predicted ({summary.errors} unreadable) with --engine {summary.engine} in "
        f"{summary.seconds:.1f} s{rate}; {summary.already_done} of {summary.files} were in {summary.out} "
        f"already and were skipped"
    )
