"""Batched augmentation as tensor ops on the training device: no per-image Python, no loader workers.

Two policies (``--augment-policy``), both seeded only by the CPU ``torch.Generator`` a run keeps in
its checkpoints, so a seed gives the same images on every device and a resumed run draws what an
uninterrupted one draws:

- ``standard`` (``augment_batch``): small rotations, zoom and shifts (patients are never positioned
  alike), brightness and contrast changes (exposure differs between machines), and no vertical flip
  (a chest upside down is not a chest). Horizontal flips are on by default as in fastai, since the
  heart's side is not what pneumonia is judged by; ``flip=False`` turns them off.
- ``radiograph`` (``radiograph_batch``): what differs between films of other hospitals, machines and
  exports, the shifts of ``data.shifts`` drawn at random: random resized crops, the flips and
  rotations above, gamma, contrast and brightness, Gaussian blur or unsharp sharpening, sensor noise,
  and a JPEG re-encode at a random quality.

Every random number of a batch is drawn on the CPU generator and reaches the device in one
non-blocking copy: a step never waits for the host, and never reads a value back from the device
(``tests/test_device_steps.py``, ``tests/test_augment.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness, adjust_contrast_with_mean_subtraction, adjust_gamma
from kornia.filters import filter2d_separable, get_gaussian_kernel1d

from pneumo.errors import PneumoError

POLICIES = ("standard", "radiograph")  # config.AUGMENT_POLICIES names them for the CLI (a test keeps both alike)


@dataclass(frozen=True)
class AugmentConfig:
    max_rotate: float = 10.0  # degrees
    min_zoom: float = 1.0
    max_zoom: float = 1.1
    max_shift: float = 0.05  # fraction of the image
    max_lighting: float = 0.2  # brightness/contrast change, as fastai's max_lighting
    flip: bool = True
    p_affine: float = 0.75
    p_lighting: float = 0.75


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig(), *, policy: str = "standard"
) -> torch.Tensor:
    """Random affine + lighting for a batch ``(N, 1, H, W)`` of uint8 or [0, 1] floats; returns floats in [0, 1].

    ``generator`` lives on the CPU so that a seed gives the same images on every device. ``policy``
    "radiograph": ``radiograph_batch`` instead (``cfg`` is the standard policy's only).
    """
    if policy == "radiograph":
        return radiograph_batch(x, generator)
    if policy != "standard":
        raise PneumoError(f"unknown augmentation policy {policy!r}: use one of {', '.join(POLICIES)}")
    n = x.shape[0]
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    # every random number of the batch in one draw and one copy: a copy per parameter would make a GPU
    # wait for the host each time (non_blocking); rows are drawn in a fixed order, so a seed gives the
    # same images everywhere
    r = torch.rand(9, n, generator=generator).to(x.device, non_blocking=True)

    def uniform(row: int, lo: float, hi: float) -> torch.Tensor:
        return r[row] * (hi - lo) + lo

    do_affine = r[0] < cfg.p_affine
    angle = uniform(1, -cfg.max_rotate, cfg.max_rotate) * math.pi / 180 * do_affine
    zoom = torch.where(do_affine, uniform(2, cfg.min_zoom, cfg.max_zoom), 1.0)
    tx = uniform(3, -cfg.max_shift, cfg.max_shift) * 2 * do_affine
    ty = uniform(4, -cfg.max_shift, cfg.max_shift) * 2 * do_affine
    flip = torch.where(r[5] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones_like(angle)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    do_light = (r[6] < cfg.p_lighting).view(n, 1, 1, 1).float()
    brightness = uniform(7, -cfg.max_lighting, cfg.max_lighting).view(n, 1, 1, 1) * do_light
    contrast = torch.exp(uniform(8, -cfg.max_lighting, cfg.max_lighting).view(n, 1, 1, 1) * do_light)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness / 2
    return x.clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# the "radiograph" policy
# ---------------------------------------------------------------------------------------------
REFERENCE_SIZE = 224  # blur sizes are pixels at this side (the Kaggle copies'), as data.shifts states them

# ITU-T T.81 Annex K, table K.1: the luminance quantization table libjpeg (and so PIL) scales by quality
JPEG_LUMINANCE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)


@dataclass(frozen=True)
class RadiographConfig:
    """The "radiograph" policy's ranges (lo, hi: uniform) and probabilities, each image drawn on its own."""

    p_crop: float = 0.5  # random resized crop; otherwise the full film
    crop_scale: tuple[float, float] = (0.25, 1.0)  # share of the film's area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height, log-uniform
    flip: bool = True  # horizontal, p = 0.5
    p_rotate: float = 0.75
    max_rotate: float = 10.0  # degrees
    gamma: tuple[float, float] = (0.6, 1.6)  # log-uniform: another detector response or window
    contrast: tuple[float, float] = (0.6, 1.4)  # around the film's mean grey
    max_brightness: float = 0.15  # added, a share of the grey range
    p_blur: float = 0.3  # Gaussian blur ...
    blur_sigma: tuple[float, float] = (0.0, 1.5)  # pixels at 224 px
    p_sharpen: float = 0.2  # ... or else unsharp-mask sharpening x + amount * (x - blur(x))
    sharpen_amount: tuple[float, float] = (0.5, 1.5)
    sharpen_sigma: float = 1.0  # pixels at 224 px
    p_noise: float = 0.3  # additive Gaussian noise, independent per pixel
    noise_sigma: tuple[float, float] = (0.0, 0.04)  # a share of the grey range
    p_jpeg: float = 0.5  # a grey baseline JPEG re-encode
    jpeg_quality: tuple[int, int] = (30, 95)  # integers, both ends included


@dataclass(frozen=True)
class RadiographParams:
    """One batch's draw, on the batch's device: what ``apply_radiograph`` does to each image.

    ``RadiographParams.identity`` changes nothing; ``dataclasses.replace`` on it sets one component.
    """

    theta: torch.Tensor  # (N, 2, 3) affine_grid matrices: crop box, rotation, flip (``affine_theta``)
    gamma: torch.Tensor  # (N,)
    contrast: torch.Tensor  # (N,)
    brightness: torch.Tensor  # (N,)
    sigma: torch.Tensor  # (N,) Gaussian sigma, pixels at 224 px; 0: neither blur nor sharpen
    sharpen: torch.Tensor  # (N,) unsharp amount; 0 (with sigma > 0): blur
    kernel_size: int  # of the Gaussian, odd, wide enough for the largest sigma
    noise_idx: torch.Tensor  # (K,) int64: the images that get noise
    noise: torch.Tensor  # (K, C, H, W): what is added to them, each scaled by its sigma
    jpeg_idx: torch.Tensor  # (M,) int64: the images re-encoded as JPEG
    jpeg_tables: torch.Tensor  # (M, 64) their quantization tables (``jpeg_tables``)

    @classmethod
    def identity(cls, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> RadiographParams:
        n, c, h, w = shape
        one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(
            theta=affine_theta(one, one, zero, zero, zero, one),
            gamma=one,
            contrast=one,
            brightness=zero,
            sigma=zero,
            sharpen=zero,
            kernel_size=3,
            noise_idx=none,
            noise=torch.zeros(0, c, h, w, device=device),
            jpeg_idx=none,
            jpeg_tables=torch.zeros(0, 64, device=device),
        )


def affine_theta(
    width: torch.Tensor,
    height: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    angle: torch.Tensor,
    flip: torch.Tensor,
) -> torch.Tensor:
    """``affine_grid`` matrices ``(N, 2, 3)`` that take the box of half-sides ``width``, ``height`` (shares
    of the film's side) centred at ``(cx, cy)`` (in [-1, 1]), turned by ``angle`` (radians), and flipped
    where ``flip`` is -1, to the whole output: crop, rotation and flip in one resampling."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = width * flip
    return torch.stack([torch.stack([cos * sx, -sin * height, cx], 1), torch.stack([sin * sx, cos * height, cy], 1)], 1)


def jpeg_tables(quality: torch.Tensor) -> torch.Tensor:
    """libjpeg's luminance tables ``(M, 64)`` for integer qualities ``(M,)`` in 1..100 (``jpeg_quality_scaling``)."""
    q = quality.long().clamp(1, 100)
    scale = torch.where(q < 50, 5000 // q, 200 - 2 * q).view(-1, 1)
    base = torch.tensor(JPEG_LUMINANCE, dtype=torch.long, device=q.device).view(1, 64)
    return ((base * scale + 50) // 100).clamp(1, 255).float()


def jpeg_roundtrip(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Each grey plane of ``x`` ``(M, C, H, W)`` in [0, 1] encoded as a baseline JPEG with its image's
    quantization table ``(M, 64)`` and decoded again, as PIL's ``save(..., "JPEG", quality=q)`` then
    ``open`` would (8-bit pixels, 8x8 DCT, quantization rounded half away from zero, edges padded by
    replication; only the entropy coding, which is lossless, is left out)."""
    m, c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hh, ww = h + ph, w + pw
    k = torch.arange(8, device=x.device, dtype=torch.float32)
    basis = torch.cos((2 * k + 1) * k[:, None] * (math.pi / 16)) * torch.where(k[:, None] == 0, math.sqrt(1 / 8), 0.5)
    dct = torch.kron(basis, basis)  # (64, 64): a flattened 8x8 block's 2-D DCT
    blocks = (x * 255).round() - 128
    blocks = blocks.reshape(m, c, hh // 8, 8, ww // 8, 8).transpose(3, 4).reshape(m, -1, 64)
    t = tables.view(m, 1, 64)
    q = blocks @ dct.T / t
    coef = torch.sign(q) * torch.floor(q.abs() + 0.5) * t
    out = (coef @ dct).reshape(m, c, hh // 8, ww // 8, 8, 8).transpose(3, 4).reshape(m, c, hh, ww)
    return torch.floor(out[..., :h, :w] + 128.5).clamp(0, 255) / 255


def blur_or_sharpen(x: torch.Tensor, sigma: torch.Tensor, sharpen: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per image: nothing (``sigma`` 0), a Gaussian blur of ``sigma`` (pixels at 224 px, scaled to the
    image's sides), or with ``sharpen`` > 0 the unsharp mask ``x + sharpen * (x - blur(x))``."""
    n, _, h, w = x.shape
    s = sigma.clamp(min=0.01).view(n, 1)  # kornia's kernels need sigma > 0; 0.01 px is the identity
    blurred = filter2d_separable(
        x,
        get_gaussian_kernel1d(kernel_size, s * (w / REFERENCE_SIZE)),
        get_gaussian_kernel1d(kernel_size, s * (h / REFERENCE_SIZE)),
        "reflect",
    )
    amount = sharpen.view(n, 1, 1, 1)
    out = torch.where(amount > 0, x + amount * (x - blurred), blurred)
    return torch.where(sigma.view(n, 1, 1, 1) > 0, out, x).clamp(0, 1)


def draw_radiograph(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    cfg: RadiographConfig = RadiographConfig(),
) -> RadiographParams:
    """A batch's parameters, drawn on the CPU ``generator`` and moved to ``device`` in one non-blocking copy.

    Rows are drawn in a fixed order, then the noise of the images that get it: a generator state
    gives the same parameters on every device.
    """
    n, c, h, w = shape
    r = torch.rand(18, n, generator=generator)

    def uniform(row: int, lo: float, hi: float) -> torch.Tensor:
        return r[row] * (hi - lo) + lo

    crop = r[0] < cfg.p_crop
    area = uniform(1, *cfg.crop_scale)
    ratio = torch.exp(uniform(2, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
    # a box wider or taller than the film is cut to it (torchvision draws again instead)
    width = torch.where(crop, (area * ratio).sqrt().clamp(max=1), 1.0)
    height = torch.where(crop, (area / ratio).sqrt().clamp(max=1), 1.0)
    cx, cy = uniform(3, -1, 1) * (1 - width), uniform(4, -1, 1) * (1 - height)
    flip = torch.where(r[5] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    angle = torch.where(r[6] < cfg.p_rotate, uniform(7, -cfg.max_rotate, cfg.max_rotate) * math.pi / 180, 0.0)
    theta = affine_theta(width, height, cx, cy, angle, flip)
    gamma = torch.exp(uniform(8, math.log(cfg.gamma[0]), math.log(cfg.gamma[1])))
    contrast = uniform(9, *cfg.contrast)
    brightness = uniform(10, -cfg.max_brightness, cfg.max_brightness)
    blur = r[11] < cfg.p_blur
    sharpen = ~blur & (r[11] < cfg.p_blur + cfg.p_sharpen)
    sigma = torch.where(blur, uniform(12, *cfg.blur_sigma), torch.where(sharpen, cfg.sharpen_sigma, 0.0))
    amount = torch.where(sharpen, uniform(13, *cfg.sharpen_amount), 0.0)
    widest = max(cfg.blur_sigma[1], cfg.sharpen_sigma) * max(h, w) / REFERENCE_SIZE
    kernel_size = 2 * max(1, math.ceil(3 * widest)) + 1
    noise_idx = (r[14] < cfg.p_noise).nonzero().flatten()  # all on the CPU: no device is read
    noise_sigma = uniform(15, *cfg.noise_sigma)[noise_idx]
    jpeg_idx = (r[16] < cfg.p_jpeg).nonzero().flatten()
    lo, hi = cfg.jpeg_quality
    quality = (lo + (r[17] * (hi - lo + 1)).floor()).clamp(max=hi)[jpeg_idx]
    noise = torch.randn(len(noise_idx), c, h, w, generator=generator) * noise_sigma.view(-1, 1, 1, 1)

    per_image = torch.cat([theta.view(n, 6), torch.stack([gamma, contrast, brightness, sigma, amount], 1)], 1)
    parts = [per_image, noise_idx.float(), jpeg_idx.float(), jpeg_tables(quality), noise]
    flat = torch.cat([p.flatten() for p in parts]).to(device, non_blocking=True)
    per_image, noise_idx, jpeg_idx, tables, noise = (
        chunk.view(p.shape) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)
    )
    return RadiographParams(
        theta=per_image[:, :6].view(n, 2, 3),
        gamma=per_image[:, 6],
        contrast=per_image[:, 7],
        brightness=per_image[:, 8],
        sigma=per_image[:, 9],
        sharpen=per_image[:, 10],
        kernel_size=kernel_size,
        noise_idx=noise_idx.long(),
        noise=noise,
        jpeg_idx=jpeg_idx.long(),
        jpeg_tables=tables,
    )


def apply_radiograph(x: torch.Tensor, params: RadiographParams) -> torch.Tensor:
    """The "radiograph" policy with given parameters, on ``x`` ``(N, C, H, W)`` (uint8 or [0, 1] floats) on
    any device; returns floats in [0, 1]. Geometry first, then the film's exposure and post-processing,
    then its noise, then how it was stored: the order in which a real film meets them."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    grid = F.affine_grid(params.theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False).clamp(0, 1)
    x = adjust_gamma(x, params.gamma)
    x = adjust_contrast_with_mean_subtraction(x, params.contrast)
    x = adjust_brightness(x, params.brightness)
    x = blur_or_sharpen(x, params.sigma, params.sharpen, params.kernel_size)
    if params.noise_idx.numel():  # sizes are known on the host: no value is read
        x = x.index_add(0, params.noise_idx, params.noise).clamp(0, 1)
    if params.jpeg_idx.numel():
        coded = jpeg_roundtrip(x.index_select(0, params.jpeg_idx), params.jpeg_tables)
        x = x.index_copy(0, params.jpeg_idx, coded)
    return x


def radiograph_batch(
    x: torch.Tensor, generator: torch.Generator, cfg: RadiographConfig = RadiographConfig()
) -> torch.Tensor:
    """The "radiograph" policy on a batch ``(N, C, H, W)`` of uint8 or [0, 1] floats, seeded by the CPU
    ``generator``; returns floats in [0, 1] on ``x``'s device."""
    return apply_radiograph(x, draw_radiograph(x.shape, generator, x.device, cfg))
