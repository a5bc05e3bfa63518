"""Named, seeded, deterministic perturbations of a grey film: a shift benchmark without an outside split.

pneumo's validation says 0.98 while the official test split says 0.825, and the same film's
p(pneumonia) moves from 0.46 to 0.95 with nothing but JPEG quality. Films from another scanner,
another export or another resize differ from the Kaggle copies in exactly such ways, so each shift
here is one of them, applied to the *decoded* image before ``imaging.prepare`` (the one
preprocessing path), never to the prepared array: what a model sees is what a user's file would
give it.

Two families:

- ``photometric``: how the film was exposed and post-processed (gamma, contrast, brightness,
  blur, unsharp-mask sharpening, sensor noise).
- ``acquisition``: how the file was stored and resized (JPEG re-encode at several qualities,
  lossless PNG as a control, the filter that resizes a larger film to the model's size).

Every shift takes any PIL image and returns a grey ``"L"`` image. Sizes in pixels are given at the
224 px scale the Kaggle copies use and scaled to the image's own size, so a blur of sigma 1 means
the same thing for a 224 px copy and for its 2,000 px original. Noise is seeded from the shift's
seed and the image's own pixels: the same film always gets the same noise, two films get different
noise. Nothing here reads the clock or a global random state.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from pneumo.data.imaging import to_grey_uint8
from pneumo.errors import PneumoError

REFERENCE_SIZE = 224  # the scale at which pixel sizes (blur sigma) are stated: the Kaggle copies'
KAGGLE_COPY_QUALITY = 75  # the copies in chest_xray_224 (and the withheld test split) are quality-75 JPEGs
NOISE_SEED = 20_261_201

PHOTOMETRIC = "photometric"
ACQUISITION = "acquisition"

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

Transform = Callable[[Image.Image], Image.Image]


@dataclass(frozen=True)
class Shift:
    """One named perturbation: callable on a PIL image, with its family and a one-line description."""

    name: str
    family: str
    description: str
    transform: Transform

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.transform(img)


# ---------------------------------------------------------------- pixel helpers


def grey(img: Image.Image) -> Image.Image:
    """The film as 8-bit grey, by pneumo's own conversion (16-bit scaled by its maximum, RGB to luma)."""
    return img if img.mode == "L" else Image.fromarray(to_grey_uint8(img), mode="L")


def _unit(img: Image.Image) -> np.ndarray:
    """Grey pixels as float64 in [0, 1]: photometric shifts are stated as fractions of the range."""
    return np.asarray(grey(img), dtype=np.float64) / 255.0


def _from_unit(x: np.ndarray) -> Image.Image:
    """Back to an 8-bit grey image, clipped and rounded half up (a pixel at 0.5/255 steps stays put)."""
    return Image.fromarray(np.clip(np.floor(x * 255.0 + 0.5), 0, 255).astype(np.uint8), mode="L")


def _scale(img: Image.Image, sigma: float) -> tuple[float, float]:
    """A 224-scale length in this image's pixels, per axis (prepare squashes the film to a square)."""
    return sigma * img.width / REFERENCE_SIZE, sigma * img.height / REFERENCE_SIZE


def _gaussian(img: Image.Image, sigma: float) -> Image.Image:
    return grey(img).filter(ImageFilter.GaussianBlur(_scale(img, sigma)))


def _seed_for(img: Image.Image, seed: int) -> np.random.Generator:
    """A generator fixed by ``seed`` and the film's pixels: deterministic, yet different per film."""
    g = grey(img)
    digest = hashlib.blake2b(f"{g.width}x{g.height}:".encode() + np.asarray(g).tobytes(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def _encode(img: Image.Image, fmt: str, **options: object) -> Image.Image:
    """Write to an in-memory file and decode it again, as a user's export then pneumo's loader would."""
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return grey(decoded.copy())


# ---------------------------------------------------------------- constructors (parametrised)


def gamma(value: float) -> Transform:
    """``x ** value`` on [0, 1]: a different detector response or window; > 1 darkens mid-greys."""
    if not value > 0:
        raise PneumoError(f"gamma must be positive, got {value}")
    return lambda img: _from_unit(_unit(img) ** value)


def contrast(factor: float) -> Transform:
    """Stretch (> 1) or flatten (< 1) around the film's own mean grey, as a window-width change does."""

    def apply(img: Image.Image) -> Image.Image:
        x = _unit(img)
        m = x.mean()
        return _from_unit(m + factor * (x - m))

    return apply


def brightness(offset: float) -> Transform:
    """Add ``offset`` (a fraction of the range) to every pixel: a window-level change or exposure."""
    return lambda img: _from_unit(_unit(img) + offset)


def blur(sigma: float) -> Transform:
    """Gaussian blur of ``sigma`` pixels at 224 px scale: a softer detector or a smoothing export."""
    if not sigma > 0:
        raise PneumoError(f"blur sigma must be positive, got {sigma}")
    return lambda img: _gaussian(img, sigma)


def sharpen(amount: float = 1.0, sigma: float = 1.0) -> Transform:
    """Unsharp mask ``x + amount * (x - blur(x, sigma))``: the edge enhancement many consoles apply."""

    def apply(img: Image.Image) -> Image.Image:
        x = _unit(img)
        return _from_unit(x + amount * (x - _unit(_gaussian(img, sigma))))

    return apply


def noise(sigma: float, seed: int = NOISE_SEED) -> Transform:
    """Additive Gaussian noise of ``sigma`` (fraction of the range) per pixel: a noisier, lower-dose film.

    The noise is per pixel of the image it is given (at 224 px for the Kaggle copies); on a larger
    original most of it averages away when pneumo resizes, as real sensor noise does.
    """
    if not sigma >= 0:
        raise PneumoError(f"noise sigma must not be negative, got {sigma}")

    def apply(img: Image.Image) -> Image.Image:
        x = _unit(img)
        return _from_unit(x + _seed_for(img, seed).normal(0.0, sigma, size=x.shape))

    return apply


def jpeg(quality: int) -> Transform:
    """Re-encode as a grey baseline JPEG at ``quality`` (libjpeg's standard tables) and decode it."""
    if not 1 <= int(quality) <= 100:
        raise PneumoError(f"JPEG quality must lie in [1, 100], got {quality}")
    return lambda img: _encode(grey(img), "JPEG", quality=int(quality))


def png() -> Transform:
    """Re-encode as PNG: lossless, so the film must not change (a control for the benchmark itself)."""
    return lambda img: _encode(grey(img), "PNG")


def resample(method: str, size: int = REFERENCE_SIZE) -> Transform:
    """Resize to the model's ``size`` with ``method`` before ``prepare`` (which then resizes nothing).

    A film already at ``size`` is returned unchanged: the filter only matters for films of another
    size (a full-resolution original, or any film for a model of another size). PIL's bilinear,
    bicubic and lanczos filters widen with the reduction (antialiased); nearest takes one pixel.
    """
    if method not in RESAMPLE_FILTERS:
        raise PneumoError(f"unknown resampling method {method!r}: use one of {sorted(RESAMPLE_FILTERS)}")
    if int(size) < 1:
        raise PneumoError(f"resampling size must be positive, got {size}")

    def apply(img: Image.Image) -> Image.Image:
        g = grey(img)
        return g if g.size == (size, size) else g.resize((size, size), RESAMPLE_FILTERS[method])

    return apply


def kaggle_copy(img: Image.Image, size: int = REFERENCE_SIZE, quality: int = KAGGLE_COPY_QUALITY) -> Image.Image:
    """What the Kaggle 224 px copies are: antialiased bilinear to ``size`` squared, 3-channel JPEG at 75.

    Used by the full-resolution comparison to tell whether an original and its copy disagree
    because of the resize, the JPEG, or both (``data/README.md``: it reproduces the copies to within
    JPEG noise).
    """
    small = grey(img).resize((size, size), Image.Resampling.BILINEAR)
    return _encode(small.convert("RGB"), "JPEG", quality=int(quality))


# ---------------------------------------------------------------- the registry


def make_shifts(size: int = REFERENCE_SIZE) -> dict[str, Shift]:
    """Every named shift, photometric first, for a model of ``size`` px (only resampling depends on it)."""
    entries: list[Shift] = []
    add = lambda name, family, description, transform: entries.append(  # noqa: E731
        Shift(name, family, description, transform)
    )
    for g in (0.6, 0.8, 1.25, 1.6):
        add(
            f"gamma_{g:g}",
            PHOTOMETRIC,
            f"gamma {g:g} on [0, 1] ({'darker' if g > 1 else 'brighter'} mid-greys)",
            gamma(g),
        )
    for c in (0.7, 1.3):
        add(f"contrast_{c:g}", PHOTOMETRIC, f"contrast x{c:g} around the film's mean grey", contrast(c))
    for b in (-0.1, 0.1):
        add(f"brightness_{b:+g}", PHOTOMETRIC, f"brightness {b:+g} of the grey range", brightness(b))
    for s in (1, 2):
        add(f"blur_{s}", PHOTOMETRIC, f"Gaussian blur, sigma {s} px at 224 px scale", blur(s))
    add("sharpen", PHOTOMETRIC, "unsharp mask, amount 1, sigma 1 px at 224 px scale", sharpen(1.0, 1.0))
    for s in (0.02, 0.05):
        add(f"noise_{s:g}", PHOTOMETRIC, f"Gaussian noise, sigma {s:g} of the grey range, seeded per film", noise(s))
    for q in (50, 75, 90, 95, 100):
        add(f"jpeg_{q}", ACQUISITION, f"grey JPEG re-encode at quality {q}", jpeg(q))
    add("png", ACQUISITION, "PNG re-encode (lossless: a control, must change nothing)", png())
    for m in RESAMPLE_FILTERS:
        add(
            f"resample_{m}",
            ACQUISITION,
            f"{m} resize to the model's {size} px before prepare (identity for films already at {size} px)",
            resample(m, size),
        )
    return {s.name: s for s in entries}


SHIFTS: dict[str, Shift] = make_shifts(REFERENCE_SIZE)
FAMILIES: dict[str, tuple[str, ...]] = {
    family: tuple(name for name, s in SHIFTS.items() if s.family == family) for family in (PHOTOMETRIC, ACQUISITION)
}


def select_shifts(spec: str | Iterable[str] | None, size: int = REFERENCE_SIZE) -> dict[str, Shift]:
    """The shifts named in ``spec`` (comma-separated names or family names; None or "all": every one).

    An unknown name is refused with the list of valid ones, so a typo never silently drops a shift.
    """
    registry = make_shifts(size)
    if spec is None:
        return registry
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names or names == ["all"]:
        return registry
    chosen: list[str] = []
    for name in names:
        if name in FAMILIES:
            chosen += [n for n in FAMILIES[name] if n not in chosen]
        elif name in registry:
            chosen += [name] if name not in chosen else []
        else:
            raise PneumoError(
                f"unknown shift {name!r}: use family names {sorted(FAMILIES)} or shift names {', '.join(registry)}"
            )
    return {n: registry[n] for n in chosen}
