"""Property-based tests (hypothesis) of the one preprocessing path, ``imaging.open_image`` + ``prepare``.

Whatever a file holds, it becomes a finite ``(size, size)`` uint8 grey film or an ImageError naming the
file: any side from ``MIN_SIDE`` up, any aspect ratio, any mode PIL gives for an X-ray export.
Bounded (50 examples each, no deadline) so the file runs in seconds.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumo.data.imaging import MIN_SIDE, open_image, prepare
from pneumo.errors import ImageError

BOUNDED = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FILE_MODES = ["L", "LA", "RGB", "RGBA", "P", "I;16"]  # what PNG stores
MEMORY_MODES = ["I", "F"]  # 32-bit integer and float: prepare takes them as PIL images (serve, DICOM)

sides = st.integers(MIN_SIDE, 160)
long_sides = st.integers(MIN_SIDE, 600)
model_sizes = st.sampled_from([8, 32, 64, 224])


@st.composite
def shapes(draw) -> tuple[int, int]:
    """Width and height: both moderate, or one long and one short (any aspect ratio)."""
    if draw(st.booleans()):
        return draw(sides), draw(sides)
    short, long = draw(st.integers(MIN_SIDE, 24)), draw(long_sides)
    return (short, long) if draw(st.booleans()) else (long, short)


def _pixels(mode: str, size: tuple[int, int], seed: int, kind: str) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    if kind == "flat":
        unit = np.full((h, w), rng.random())
    elif kind == "black":
        unit = np.zeros((h, w))
    else:
        unit = rng.random((h, w))
    if mode == "I;16":
        return Image.fromarray((unit * rng.integers(1, 65536)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((unit * 2**31 - 2**30).astype(np.int32), mode="I")
    if mode == "F":
        return Image.fromarray((unit * 10.0 ** rng.integers(-3, 6) - 1).astype(np.float32), mode="F")
    grey = Image.fromarray((unit * 255).astype(np.uint8), mode="L")
    return grey.convert(mode) if mode != "LA" else Image.merge("LA", (grey, grey.point(lambda v: 255 - v)))


def _as_model_input(arr: np.ndarray, size: int) -> torch.Tensor:
    assert arr.shape == (size, size) and arr.dtype == np.uint8
    x = torch.from_numpy(arr).float().div(255)  # as the training batches see it
    assert torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
    return x


@BOUNDED
@given(
    mode=st.sampled_from(FILE_MODES),
    size=shapes(),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["noise", "flat", "black"]),
    model_size=model_sizes,
)
def test_any_png_film_becomes_a_finite_square_grey_array(tmp_path: Path, mode, size, seed, kind, model_size):
    buffer = io.BytesIO()
    _pixels(mode, size, seed, kind).save(buffer, format="PNG")
    path = tmp_path / "film.png"
    path.write_bytes(buffer.getvalue())
    from_file, from_bytes = prepare(path, model_size), prepare(buffer.getvalue(), model_size)
    _as_model_input(from_file, model_size)
    assert np.array_equal(from_file, from_bytes)  # a file and an upload are read alike
    if kind == "black":
        assert (from_file == 0).all()


@BOUNDED
@given(mode=st.sampled_from(["L", "RGB"]), size=shapes(), seed=st.integers(0, 2**16), model_size=model_sizes)
def test_any_jpeg_film_becomes_a_finite_square_grey_array(mode, size, seed, model_size):
    buffer = io.BytesIO()
    _pixels(mode, size, seed, "noise").save(buffer, format="JPEG", quality=90)
    _as_model_input(prepare(buffer.getvalue(), model_size), model_size)


@BOUNDED
@given(
    mode=st.sampled_from(MEMORY_MODES),
    size=shapes(),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["noise", "flat", "black"]),
    model_size=model_sizes,
)
def test_wide_integer_and_float_images_become_finite_grey(mode, size, seed, kind, model_size):
    _as_model_input(prepare(_pixels(mode, size, seed, kind), model_size), model_size)


@BOUNDED
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=4))
@example(values=[float("nan"), 1.0])
@example(values=[float("inf"), 2.0, float("-inf")])
@example(values=[-3e38, 1e-45])  # a huge negative over a subnormal maximum: overflowed in float32
def test_float_images_with_nan_or_infinity_still_give_finite_films(values):
    arr = np.resize(np.asarray(values, dtype=np.float32), (MIN_SIDE, MIN_SIDE + 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # casting NaN to uint8 is undefined: it must not happen
        out = prepare(Image.fromarray(arr, mode="F"), 16)
    _as_model_input(out, 16)
    finite = np.isfinite(arr)
    if not finite.any() or arr[finite].max() <= 0:
        assert (out == 0).all()  # nothing finite and bright: a black film, not noise


@BOUNDED
@given(data=st.binary(min_size=0, max_size=300))
def test_arbitrary_bytes_are_a_film_or_an_image_error_naming_the_file(tmp_path: Path, data):
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    for source, name in ((path, str(path)), (data, "<upload>")):
        try:
            arr = prepare(source, 32)
        except ImageError as exc:
            assert exc.path == name and str(exc).startswith(f"{name}: ") and exc.reason
        else:
            _as_model_input(arr, 32)


@BOUNDED
@given(size=shapes(), cut=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_a_png_cut_inside_its_pixel_data_is_an_image_error(tmp_path: Path, size, cut, seed):
    buffer = io.BytesIO()
    _pixels("L", size, seed, "noise").save(buffer, format="PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT") + 4  # the compressed pixels follow the chunk's type
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: start + int((length - 1) * cut)])
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert info.value.path == str(path)


@BOUNDED
@given(width=st.integers(1, 40), height=st.integers(1, MIN_SIDE - 1))
def test_images_under_the_minimum_side_are_refused_by_name(tmp_path: Path, width, height):
    path = tmp_path / "thumb.png"
    Image.new("L", (width, height) if width % 2 else (height, width)).save(path)
    with pytest.raises(ImageError, match=f"image too small .*at least {MIN_SIDE} a side") as info:
        open_image(path)
    assert info.value.path == str(path)
