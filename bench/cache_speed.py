"""What the decode cache buys: a cold first pass (decode every JPEG, write the cache) against a hit.

A fresh ``PNEUMO_CACHE`` folder is made for the run and deleted after it. Before the first pass the
JPEGs are dropped from the OS page cache where the OS allows (``posix_fadvise``), so the first pass
pays for reading as a first run does. The second pass (the hit) is timed as opening it and reading
every pixel (a sum over the memory map) while the cache file is still in the page cache (a later
epoch); also opening alone (what ``decode_images`` itself costs) and open + read after evicting the
cache file (a later run; on a virtual disk the host may still cache it).
Prints one JSON object::

    .venv/bin/python bench/cache_speed.py                      # 5,216 images of chest_xray_224/train
    .venv/bin/python bench/cache_speed.py --limit 500 --json-out bench/cache_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import DEFAULT_DATA, write_report


def evict(paths: Sequence[Path]) -> bool:
    """Ask the OS to drop these files from its page cache; False where it cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_all(pixels: np.ndarray) -> int:
    """Touch every byte (a sum over a memory map reads it all); returns the sum so nothing is skipped."""
    return int(np.asarray(pixels, dtype=np.uint8).sum(dtype=np.uint64))


def run(data: Path, size: int, limit: int | None, progress: bool) -> dict:
    from pneumo.data.cache import decode_images, default_cache_dir
    from pneumo.data.folders import discover

    samples = discover(data).samples
    paths = [s.path for s in samples][:limit] if limit else [s.path for s in samples]
    source_bytes = sum(p.stat().st_size for p in paths)
    with tempfile.TemporaryDirectory(prefix="pneumo-cache-bench-") as tmp:
        os.environ["PNEUMO_CACHE"] = tmp
        os.environ.pop("PNEUMO_NO_CACHE", None)
        assert default_cache_dir() == Path(tmp)
        evicted = evict(paths)

        t0 = time.perf_counter()
        cold = decode_images(paths, size, progress=progress)
        cold_s = time.perf_counter() - t0
        checksum = read_all(cold.pixels)

        t0 = time.perf_counter()
        hit = decode_images(paths, size, progress=progress)
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert read_all(hit.pixels) == checksum, "cache hit returned different pixels"
        warm_read_s = time.perf_counter() - t0

        cache_files = sorted(Path(tmp).iterdir())
        evict(cache_files)
        t0 = time.perf_counter()
        again = decode_images(paths, size, progress=False)
        assert read_all(again.pixels) == checksum
        disk_read_s = time.perf_counter() - t0

        cache_bytes = sum(f.stat().st_size for f in cache_files)
        assert hit.from_cache and again.from_cache and not cold.from_cache
        hit_s = open_s + warm_read_s
        return {
            "data": str(data),
            "images": len(paths),
            "image_size": size,
            "unreadable": len(cold.errors),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "source_pages_evicted": evicted,
            "first_pass_s": round(cold_s, 3),
            "first_pass_images_per_s": round(len(paths) / cold_s, 1),
            "second_pass_s": round(hit_s, 4),  # open the hit and read every pixel (page cache warm)
            "second_pass_open_only_s": round(open_s, 4),  # what decode_images itself takes on a hit
            "second_pass_evicted_s": round(disk_read_s, 4),  # the same after evicting the cache file
            "speedup": round(cold_s / hit_s, 1),
            "speedup_evicted": round(cold_s / disk_read_s, 1),
            "cache_bytes": cache_bytes,
            "cache_mib": round(cache_bytes / 2**20, 1),
            "cache_files": [f.name for f in cache_files],
            "source_bytes": source_bytes,
            "source_mib": round(source_bytes / 2**20, 1),
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of class folders or a Kaggle root")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.data, args.size, args.limit, args.progress)
    write_report(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
