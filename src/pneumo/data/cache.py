"""Decode once: every image resized to the training size and kept as uint8 on disk.

The cache key covers the file list, each file's size and modification time, the image size and the
preprocessing version, so an edited or added file makes a new cache and nothing stale is ever read.
Later epochs and later runs read one memory-mapped array instead of decoding JPEGs again; the
processes of a distributed run on one node map the same file, so the page cache holds one copy of
the pixels for all of them (copy-on-write: a process that wrote to its pixels would get a private
page, never change the cache).

The same key guards each file's content hash (``file_digests``): byte-identical copies under
different names are found once and kept on one side of a patient split (``duplicate_groups``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm.auto import tqdm

from pneumo.data.imaging import prepare
from pneumo.errors import ImageError
from pneumo.io_utils import atomic_write_json

T = TypeVar("T")
PREPROCESS_VERSION = 2  # 2: EXIF orientation applied, images under imaging.MIN_SIDE refused


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
        # bytes as the file system holds them: a name that is not valid UTF-8 is still a key
        digest.update(b"\n" + os.fsencode(os.path.abspath(p)) + f"|{stamp}".encode())
    return digest.hexdigest()[:24]


def over_files(
    fn: Callable[[Path], T],
    paths: Sequence[Path],
    desc: str,
    unit: str = "file",
    progress: bool = True,
    workers: int | None = None,
    chunksize: int = 16,
) -> Iterator[T]:
    """``fn(path)`` for every path, in order, computed in threads (reading files and decoding images
    release the GIL) behind one progress bar: hashing, decoding and ``data check`` all walk files so."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        results = pool.map(fn, paths, chunksize=chunksize)
        yield from tqdm(results, total=len(paths), desc=desc, unit=unit, disable=not progress, leave=False)


def content_digest(data: bytes) -> str:
    """The content hash of a file's bytes: equal for byte-identical files, whatever their names."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _digest_file(path: Path) -> str | None:
    try:
        return content_digest(path.read_bytes())
    except OSError:
        return None  # an unreadable file is nobody's duplicate; decoding reports it


def file_digests(paths: Sequence[Path], cache_dir: Path | None = None, progress: bool = True) -> list[str | None]:
    """The content hash of every file (None where it cannot be read), cached under the decode cache's key.

    The cache file holds the hashes in the order of ``paths`` and no file names.
    """
    paths = [Path(p) for p in paths]
    cache_file = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"digests-{cache_key(paths, 0)}.json"
    use_disk = shared_cache_enabled()
    if use_disk and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())["digests"]
            if isinstance(cached, list) and len(cached) == len(paths):
                return cached
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file is rebuilt
    digests = list(over_files(_digest_file, paths, "hashing files", progress=progress, chunksize=32))
    if use_disk:
        try:
            atomic_write_json(cache_file, {"digests": digests})
        except OSError:
            pass  # costs a re-hash next time, never this run
    return digests


def duplicate_groups(paths: Sequence[Path], cache_dir: Path | None = None, progress: bool = True) -> dict[Path, str]:
    """File -> content hash, for the files that have a byte-identical copy among ``paths``.

    What ``folders.split_by_patient`` takes as ``groups``: the patients of copies are dealt together.
    """
    paths = [Path(p) for p in paths]
    digests = file_digests(paths, cache_dir, progress)
    seen = Counter(d for d in digests if d is not None)
    return {p: d for p, d in zip(paths, digests) if d is not None and seen[d] > 1}


def _decode_one(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return prepare(path, size), None
    except ImageError as exc:
        return None, exc.reason


def _mapped(array_file: Path) -> np.ndarray:
    """The cached pixels, memory-mapped copy-on-write: shared between processes, writable without
    touching the file (torch refuses read-only arrays)."""
    return np.load(array_file, mmap_mode="c")


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
        return DecodedImages(_mapped(array_file), np.array(meta["ok"], dtype=bool), meta["errors"], True)

    pixels = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    errors: dict[str, str] = {}
    decoded = over_files(lambda p: _decode_one(p, size), paths, f"decoding to {size}px", "img", progress, workers)
    for i, (arr, err) in enumerate(decoded):
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
            pixels = _mapped(array_file)  # the file just written, shared with any process mapping it
        except OSError as exc:  # an unwritable cache costs speed next time, never this run
            tmp.unlink(missing_ok=True)
            warnings.warn(
                f"decode cache not written to {folder}: {exc}; set PNEUMO_CACHE to a writable "
                f"folder or PNEUMO_NO_CACHE=1",
                stacklevel=2,
            )
    return DecodedImages(pixels, ok, errors, False)
