"""The one preprocessing function shared by training, evaluation, predict, explain and serve.

Every image becomes a square uint8 grey array of the model's size: X-rays carry no colour, so one
channel is kept (the first convolution's RGB weights are summed to match). Normalisation lives in
the model itself, so nothing downstream can apply the wrong mean and std.

``open_image`` turns a film upright by its EXIF orientation tag (a phone or scanner may store the
pixels sideways and say so in the tag), so train, predict, serve and explain all see what a reader
sees. It reads JPEG and PNG, as ``serve`` accepts and the folder walks pick up; anything else, and
any image under ``MIN_SIDE`` pixels a side, is an ImageError naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pneumo.data.dicom import PREAMBLE_END, is_dicom, looks_like_dicom, render_dicom
from pneumo.errors import ImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, never silently grey
MAX_PIXELS = 80_000_000  # decompression-bomb guard: far above any radiograph (~ 3000 x 3000)
MIN_SIDE = 8  # pixels: smaller is a thumbnail or a placeholder (a 1x1 pixel), not a film to read
READ_FORMATS = {"JPEG", "MPO", "PNG"}  # MPO: the JPEG a phone camera writes, multi-picture


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, or raise ImageError naming the file and the problem.

    A DICOM file (by extension or by its first bytes) is rendered by ``data.dicom`` to 8-bit grey.
    """
    name = "<upload>" if isinstance(source, bytes) else str(source)
    if _is_dicom_source(source):
        return render_dicom(source if isinstance(source, bytes) else Path(source), max_pixels)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(name, "empty file (0 bytes)")
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(name, "no such file")
            if path.stat().st_size == 0:
                raise ImageError(name, "empty file (0 bytes)")
            handle = path.open("rb")
        with handle, Image.open(handle) as img:
            if img.format not in READ_FORMATS:
                raise ImageError(name, f"a {img.format} image; pneumo reads JPEG and PNG only (convert it to PNG)")
            if img.width * img.height > max_pixels:
                raise ImageError(
                    name,
                    f"image too large ({img.width}x{img.height} pixels; "
                    f"limit {max_pixels:,}): refusing a possible decompression bomb",
                )
            if min(img.width, img.height) < MIN_SIDE:
                raise ImageError(name, f"image too small ({img.width}x{img.height} pixels; at least {MIN_SIDE} a side)")
            img.load()
            return ImageOps.exif_transpose(img)  # a new, upright image (a copy when there is no tag)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image PIL can read (wrong extension or corrupt header)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"refusing a possible decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image data ({reason})"
        raise ImageError(name, reason) from None


def _is_dicom_source(source: str | Path | bytes) -> bool:
    if isinstance(source, bytes):
        return looks_like_dicom(source[:PREAMBLE_END])
    path = Path(source)
    return path.is_file() and path.stat().st_size > 0 and is_dicom(path)


def to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Grey uint8 pixels from any mode: 8-bit grey or RGB(A), palette, or 16-bit grey.

    16-bit radiographs rarely use the full range (12-bit detectors are common), so they are
    scaled by their own maximum rather than by 65535.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # float64: any float32 pixel over the maximum stays finite
        arr = np.where(np.isfinite(arr), arr, 0.0)  # a NaN or infinite pixel (float exports) carries nothing
        top = float(arr.max())
        arr = np.clip(arr / top, 0.0, 1.0) * 255.0 if top > 0 else np.zeros_like(arr)
        return (arr + 0.5).astype(np.uint8)
    if img.mode == "LA" or img.mode == "RGBA" or img.mode == "P":
        img = img.convert("RGB")
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def prepare(source: str | Path | bytes | Image.Image, size: int) -> np.ndarray:
    """Any image -> ``(size, size)`` uint8 grey, squashed to square as the Kaggle 224 px copy was."""
    img = source if isinstance(source, Image.Image) else open_image(source)
    grey = Image.fromarray(to_grey_uint8(img), mode="L")
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    return np.array(grey, dtype=np.uint8)  # writable: torch warns on read-only arrays
