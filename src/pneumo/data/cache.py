"""Decode once: every image resized to the training size and kept as uint8 on disk.

The cache key covers the file list, each file's size and modification time, the image size and the
preprocessing version, so an edited or added file makes a new cache and nothing stale is ever read.
Later epochs and later runs read one memory-mapped array instead of decoding JPEGs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pneumo.data.imaging import prepare
from pneumo.errors import ImageError
from pneumo.io_utils import atomic_write_json

PREPROCESS_VERSION = 1


def default_cache_dir() -> Path:
    """``$PNEUMO_CACHE``, else ``~/.cache/pneumo``: decoded training images and cached features."""
    return Path(os.environ.get("PNEUMO_CACHE", Path.home() / ".cache" / "pneumo"))


def shared_cache_enabled() -> bool:
    """False when ``PNEUMO_NO_CACHE=1``: nothing is read from or written to the shared cache.

    The one place that reads the variable (the decode cache and the features cache both ask here).
    """
    return os.environ.get("PNEUMO_NO_CACHE") != "1"


@dataclass
class DecodedImages:
    """``pixels[i]`` is image i as uint8 ``(size, size)``; ``ok[i]`` is False where it could not be read."""

    pixels: np.ndarray
    ok: np.ndarray
    errors: dict[str, str]  # path -> reason
    from_cache: bool


def cache_key(paths: Sequence[Path], size: int) -> str:
    digest = hashlib.sha256(f"v{PREPROCESS_VERSION}|{size}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"\n{os.path.abspath(p)}|{stamp}".encode())
    return digest.hexdigest()[:24]


def _decode_one(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return prepare(path, size), None
    except ImageError as exc:
        return None, exc.reason


def decode_images(
    paths: Sequence[Path],
    size: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> DecodedImages:
    """Decoded pixels for ``paths``: read from the cache when it matches, else decoded and stored.

    A file that cannot be read is reported in ``errors`` and left black with ``ok`` False; the
    run goes on. ``use_cache=False`` (inference: the images a model reads are not training data)
    or ``PNEUMO_NO_CACHE=1`` decodes in memory and writes nothing to disk.
    """
    paths = [Path(p) for p in paths]
    use_disk = use_cache and shared_cache_enabled()
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(paths, size)
    array_file, meta_file = folder / f"{key}.npy", folder / f"{key}.json"
    if use_disk and array_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        pixels = np.load(array_file, mmap_mode="r")
        return DecodedImages(pixels, np.array(meta["ok"], dtype=bool), meta["errors"], True)

    pixels = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    errors: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        results = pool.map(lambda p: _decode_one(p, size), paths, chunksize=16)
        for i, (arr, err) in enumerate(
            tqdm(results, total=len(paths), desc=f"decoding to {size}px", unit="img", disable=not progress, leave=False)
        ):
            if err is None:
                pixels[i] = arr
            else:
                ok[i] = False
                errors[str(paths[i])] = err
    if use_disk:
        tmp = array_file.with_suffix(f".tmp{os.getpid()}.npy")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            np.save(tmp, pixels)
            os.replace(tmp, array_file)
            atomic_write_json(
                meta_file,
                {"ok": ok.tolist(), "errors": errors, "size": size, "n": len(paths), "version": PREPROCESS_VERSION},
            )
        except OSError as exc:  # an unwritable cache costs speed next time, never this run
            tmp.unlink(missing_ok=True)
            warnings.warn(
                f"decode cache not written to {folder}: {exc}; set PNEUMO_CACHE to a writable "
                f"folder or PNEUMO_NO_CACHE=1",
                stacklevel=2,
            )
    return DecodedImages(pixels, ok, errors, False)
