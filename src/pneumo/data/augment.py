"""Batched augmentation as tensor ops on the training device: no per-image Python, no loader workers.

Suited to radiographs: small rotations, zoom and shifts (patients are never positioned alike),
brightness and contrast changes (exposure differs between machines), and no vertical flip (a chest
upside down is not a chest). Horizontal flips are on by default as in fastai, since the heart's side
is not what pneumonia is judged by; ``flip=False`` turns them off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def augment_batch(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Random affine + lighting for a batch ``(N, 1, H, W)`` of uint8 or [0, 1] floats; returns floats in [0, 1].

    ``generator`` lives on the CPU so that a seed gives the same images on every device.
    """
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
