"""``pneumo show-batch``: look at what the model will see before training on it.

As fastai's ``show_batch``: a seeded draw of training images, decoded and (by default) augmented by
exactly the code training uses, each titled with its label. Upside-down, blank or mislabelled images
show up here long before they show up as a bad validation score.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np

from pneumo.data.folders import discover
from pneumo.errors import DataError, PneumoError


def show_batch(
    path: str | Path,
    out: str | Path,
    rows: int = 3,
    cols: int | None = None,
    image_size: int = 224,
    augment: bool = True,
    seed: int = 0,
) -> Path:
    """Write a ``rows x cols`` grid of training images (``cols`` defaults to ``rows``) to ``out``; return its path.

    Images come from the ``train`` split (all images for a folder of class folders), drawn with
    ``seed``; unreadable files are skipped. The same seed gives the same picture.
    """
    import torch  # heavy: only when a batch is drawn

    from pneumo.data.augment import augment_batch
    from pneumo.data.cache import decode_images
    from pneumo.plots import plot_image_grid

    cols = rows if cols is None else cols
    if rows < 1 or cols < 1:
        raise PneumoError(f"rows and cols must be at least 1, got rows={rows}, cols={cols}")
    if image_size < 8:
        raise PneumoError(f"image_size must be at least 8 pixels, got {image_size}")
    out = Path(out)
    _require_writable(out)
    data = discover(path)
    pool = data.split("train") or data.samples
    chosen = random.Random(seed).sample(pool, min(rows * cols, len(pool)))
    decoded = decode_images([s.path for s in chosen], image_size, progress=False)
    keep = [i for i in range(len(chosen)) if decoded.ok[i]]
    if not keep:
        raise DataError(
            f"{data.root}: none of the {len(chosen)} images drawn could be read: "
            + "; ".join(f"{p}: {r}" for p, r in list(decoded.errors.items())[:3])
        )
    pixels = np.ascontiguousarray(decoded.pixels[keep])  # (n, size, size) uint8
    if augment:
        x = torch.from_numpy(pixels).unsqueeze(1)  # (n, 1, size, size)
        x = augment_batch(x, torch.Generator().manual_seed(seed))
        pixels = x.squeeze(1).mul(255).round().to(torch.uint8).numpy()
    titles = [data.classes[chosen[i].label] for i in keep]
    note = "augmented" if augment else "not augmented"
    suptitle = f"{len(keep)} training images from {data.root.name} ({note}, seed {seed}, {image_size} px)"
    try:
        return plot_image_grid(list(pixels), titles, out, ncols=cols, suptitle=suptitle)
    except OSError as exc:  # the folder changed under us since the check above
        raise PneumoError(f"{out}: cannot write the picture ({exc.strerror or exc}); choose another --out") from None


def _require_writable(out: Path) -> None:
    """Fail before any decoding when ``out`` cannot be written (its folder cannot be made, is read-only...)."""
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PneumoError(f"{out}: cannot write the picture there ({blocking} is a file, not a folder)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise PneumoError(
            f"{out}: cannot write the picture there ({out.parent}: {exc.strerror or exc}); choose another --out"
        ) from None
