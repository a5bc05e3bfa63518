"""DICOM radiographs rendered as DICOM says, then handed to the one preprocessing path as 8-bit grey.

Rendering follows PS3.3 C.11 in order: the Modality LUT (or RescaleSlope/Intercept), the VOI LUT
(or WindowCenter/Width), MONOCHROME1 inverted, then 8 bits. The 8-bit scale is the range the
stored bit depth can reach through those transforms (every possible stored value is pushed through
them as a lookup table), never 16 bits and never the film's own extremes: a 10-bit film squeezed
as if it were 16-bit comes out nearly black, and a per-film stretch would hide a wrong window.

pydicom (with pylibjpeg and its openjpeg and libjpeg plugins for compressed films) is the optional
extra ``pneumo[dicom]``, imported only when a DICOM file is actually read. Recognising a DICOM
file (``is_dicom``) needs no extra, so a folder of ``.dcm`` files is discovered without pydicom and
each file then fails with an error naming the extra.

Tag values are read for two purposes only, and returned to the caller, never logged: the patient
identity (hashed by ``data.folders``) and the scope tags (``infer.scope``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.errors import ImageError
from pneumo.extras import require

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
PREAMBLE_END = 132  # 128 bytes of preamble, then b"DICM"
SCOPE_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "StudyDescription", "SeriesDescription", "ProtocolName")
EXTRA_HINT = "pip install 'pneumo[dicom]' (pydicom, pylibjpeg and its openjpeg and libjpeg plugins)"


def looks_like_dicom(head: bytes) -> bool:
    """True for the first bytes of a DICOM file: the ``DICM`` preamble, or (old files without a file
    meta header) a little-endian data set starting with a group 0002 or 0008 element."""
    if head[128:PREAMBLE_END] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00" and head[2] < 0x20


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or one without an extension (or with a numeric one, as UID-named
    exports have) whose first bytes are DICOM's. Files with other extensions are never opened here."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix and not suffix[1:].isdigit():
        return False
    try:
        with path.open("rb") as handle:
            return looks_like_dicom(handle.read(PREAMBLE_END))
    except OSError:
        return False


def _pydicom() -> Any:
    return require("dicom", "pydicom", what="reading DICOM")


def _read(source: Path | bytes, name: str, pixels: bool, tags: list[str] | None = None) -> Any:
    """The data set (``force=True`` for files without a meta header; the transfer syntax then guessed
    from the encoding pydicom detected)."""
    pydicom = _pydicom()
    handle: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = pydicom.dcmread(handle, force=True, stop_before_pixels=not pixels, specific_tags=tags)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on hostile bytes: all unreadable
        raise ImageError(name, f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:160]})") from None
    if pixels and "TransferSyntaxUID" not in ds.file_meta:
        uid = pydicom.uid
        little = getattr(ds, "is_little_endian", None) is not False
        implicit = getattr(ds, "is_implicit_VR", None) is not False
        ds.file_meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian
            if implicit
            else uid.ExplicitVRLittleEndian
            if little
            else uid.ExplicitVRBigEndian
        )
    return ds


def read_tags(source: Path | bytes, names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The named tags as text ("" when absent), read without the pixel data (cheap)."""
    name = "<upload>" if isinstance(source, bytes) else str(source)
    ds = _read(source, name, pixels=False, tags=list(names))
    return {n: str(ds.get(n, "") or "").strip() for n in names}


def render_dicom(source: Path | bytes, max_pixels: int) -> Image.Image:
    """The film as an 8-bit grey PIL image (``L``; an RGB film as ``RGB``), rendered as DICOM says."""
    name = "<upload>" if isinstance(source, bytes) else str(source)
    ds = _read(source, name, pixels=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImageError(name, "DICOM file without pixel data (a report, a DICOMDIR or a structured document?)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols > max_pixels:
        raise ImageError(
            name,
            f"image too large ({cols}x{rows} pixels; limit {max_pixels:,}): refusing a possible decompression bomb",
        )
    if frames > 1:
        raise ImageError(name, f"multi-frame DICOM ({frames} frames): pneumo reads single radiographs")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder plugins, corrupt or truncated pixel data
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "plugin" in reason.lower() or "decoder" in reason.lower():
            reason += f"; {EXTRA_HINT}"
        raise ImageError(name, f"cannot decode the DICOM pixel data ({reason})") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:  # colour (secondary capture): grey conversion as for RGB
        if stored.dtype != np.uint8:
            raise ImageError(name, f"colour DICOM with {stored.dtype} samples: only 8-bit colour is read")
        return Image.fromarray(np.ascontiguousarray(stored), mode="RGB")
    try:
        grey = _render_grey(ds, stored)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed LUT or window is bad input, not a crash
        raise ImageError(name, f"cannot apply the DICOM LUTs or window ({type(exc).__name__}: {exc})") from None
    return Image.fromarray(grey, mode="L")


def _render_grey(ds: Any, stored: np.ndarray) -> np.ndarray:
    pixels = require("dicom", "pydicom.pixels", what="reading DICOM")

    def transform(values: np.ndarray) -> np.ndarray:
        return np.asarray(pixels.apply_voi_lut(pixels.apply_modality_lut(values, ds), ds), dtype=np.float64)

    bits = int(ds.get("BitsStored", 0) or 0)
    if np.issubdtype(stored.dtype, np.integer) and 1 <= bits <= 16:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        lut = transform(np.arange(low, high + 1, dtype=np.int32 if signed else np.uint32))
        values = lut[np.clip(stored.astype(np.int64), low, high) - low]
        bottom, top = float(lut.min()), float(lut.max())
    else:  # float pixel data or more than 16 bits: no finite table; the film's own range
        values = transform(stored)
        bottom, top = float(values.min()), float(values.max())
    scaled = (values - bottom) / (top - bottom) if top > bottom else np.zeros_like(values)
    inverse = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip() == "INVERSE":
        inverse = not inverse
    if inverse:
        scaled = 1.0 - scaled
    return np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
