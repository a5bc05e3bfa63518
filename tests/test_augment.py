"""Augmentation policies: "standard" is the augment_batch of before, "radiograph" draws the outside films'
differences (crops, gamma, contrast, blur or sharpening, noise, JPEG quality) from the run's CPU generator."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pneumo
from pneumo.config import AUGMENT_POLICIES, TrainConfig
from pneumo.data.augment import (
    POLICIES,
    RadiographConfig,
    RadiographParams,
    affine_theta,
    apply_radiograph,
    augment_batch,
    draw_radiograph,
    jpeg_roundtrip,
    jpeg_tables,
    radiograph_batch,
)
from pneumo.data.cache import cache_key
from pneumo.errors import PneumoError
from pneumo.nets.models import create_model, set_body_trainable
from pneumo.training.features import features_key, features_key_parts
from pneumo.training.loop import StopRequested, train
from pneumo.training.phases import FullNetwork, make_optimizer
from test_device_steps import META, FailOnHostWait

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
ALWAYS = RadiographConfig(p_crop=1, p_rotate=1, p_blur=0, p_sharpen=1, p_noise=1, p_jpeg=1)  # every branch


@pytest.fixture(scope="module")
def films() -> torch.Tensor:
    """Eight real films, uint8 (8, 1, 64, 64)."""
    paths = sorted((SAMPLE / "train").rglob("*.jpeg"))[:8]
    pixels = [np.asarray(Image.open(p).convert("L").resize((64, 64), Image.Resampling.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(pixels)).unsqueeze(1)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_config_names_the_policies_augment_implements():
    assert AUGMENT_POLICIES == POLICIES
    assert TrainConfig().augment_policy == "radiograph"  # the default since issue 15
    assert TrainConfig(augment_policy="standard").augment_policy == "standard"
    for bad in ("Radiograph", "strong", "", None, 1):
        with pytest.raises(PneumoError, match="--augment-policy"):
            TrainConfig(augment_policy=bad)
    with pytest.raises(PneumoError, match="augmentation policy 'strong'"):
        augment_batch(torch.zeros(1, 1, 8, 8), generator(), policy="strong")


# ---------------------------------------------------------------------------------------------
# "standard": exactly what augment_batch gave before the policies
# ---------------------------------------------------------------------------------------------
def test_the_standard_policy_gives_the_recorded_images():
    """Figures recorded with augment_batch before the policies existed (torch 2.14.1, CPU)."""
    x = (torch.arange(4 * 16 * 16) * 37 % 256).to(torch.uint8).view(4, 1, 16, 16)
    out = augment_batch(x, generator(1234)).double()
    assert out.sum().item() == pytest.approx(499.5261458232999, rel=1e-6)
    assert (out**2).sum().item() == pytest.approx(282.723434715345, rel=1e-6)
    expected = [0.4046327471733093, 0.48184797167778015, 0.5710359215736389, 0.6602237224578857]
    assert out[0, 0, 0, :4].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(augment_batch(x, generator(1234), policy="standard").double(), out)
    drew, reference = generator(1234), generator(1234)
    augment_batch(x, drew)
    torch.rand(9, 4, generator=reference)  # one (9, N) draw, as before: later batches match too
    assert torch.equal(drew.get_state(), reference.get_state())


# ---------------------------------------------------------------------------------------------
# "radiograph": seeded, shaped and ranged like the standard policy
# ---------------------------------------------------------------------------------------------
def test_radiograph_is_fixed_by_the_generator_state(films):
    g = generator(7)
    first = radiograph_batch(films, g)
    saved = g.get_state()  # what a checkpoint keeps
    second = radiograph_batch(films, g)
    assert torch.equal(radiograph_batch(films, generator(7)), first)
    assert not torch.equal(second, first)  # the generator moved on
    assert torch.equal(radiograph_batch(films, torch.Generator().set_state(saved)), second)  # a resume
    assert not torch.equal(radiograph_batch(films, generator(8)), first)
    assert torch.equal(augment_batch(films, generator(7), policy="radiograph"), first)


@pytest.mark.parametrize("cfg", [RadiographConfig(), ALWAYS], ids=["default", "every-branch"])
def test_radiograph_changes_films_and_keeps_shape_dtype_and_range(films, cfg):
    for x in (films, films.float() / 255, films[:, :, :60, :44]):  # 60 x 44: JPEG pads to whole blocks
        out = radiograph_batch(x, generator(3), cfg)
        assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
        changed = (out - (x.float() / 255 if x.dtype == torch.uint8 else x)).abs().flatten(1).mean(1)
        assert (changed > 0.005).all()  # every film changes (gamma, contrast and brightness always apply)


def test_the_draw_follows_its_probabilities_and_ranges():
    p = draw_radiograph((4000, 1, 32, 32), generator(0))
    width, height = p.theta[:, :, 0].norm(dim=1), p.theta[:, :, 1].norm(dim=1)  # the box's half-sides
    whole = ((width - 1).abs() < 1e-5) & ((height - 1).abs() < 1e-5)
    assert 0.45 < whole.float().mean() < 0.55  # p = 0.5 keeps the full film
    assert (width * height).min() >= 0.25 - 1e-5  # the crop's share of the area
    ratio = (width / height)[~whole & (width < 1) & (height < 1)]  # (a box wider than the film is cut to it)
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert 0.6 - 1e-5 <= p.gamma.min() and p.gamma.max() <= 1.6 + 1e-5
    assert 0.6 <= p.contrast.min() and p.contrast.max() <= 1.4 and p.brightness.abs().max() <= 0.15
    blur, sharpen = (p.sigma > 0) & (p.sharpen == 0), p.sharpen > 0
    assert 0.27 < blur.float().mean() < 0.33 and 0.17 < sharpen.float().mean() < 0.23
    assert p.sigma[blur].max() <= 1.5 and p.sigma[sharpen].eq(1.0).all()
    assert 0.27 < len(p.noise_idx) / 4000 < 0.33 and 0.47 < len(p.jpeg_idx) / 4000 < 0.53
    assert 0.02 < p.noise.std() < 0.03  # sigma uniform in 0..0.04: sqrt(E[sigma^2]) = 0.023
    qualities = {int(t[0]) for t in p.jpeg_tables}  # the DC step grows as quality falls
    assert (
        min(qualities) == jpeg_tables(torch.tensor([95]))[0, 0]
        and max(qualities) == jpeg_tables(torch.tensor([30]))[0, 0]
    )


# ---------------------------------------------------------------------------------------------
# each component, with parameters set by hand
# ---------------------------------------------------------------------------------------------
def fixed(x: torch.Tensor, **component) -> torch.Tensor:
    return apply_radiograph(x, dataclasses.replace(RadiographParams.identity(x.shape), **component))


def per_image(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_identity_parameters_change_nothing(films):
    x = films.float() / 255
    assert torch.allclose(fixed(x), x, atol=1e-6)
    assert torch.allclose(fixed(films), x, atol=1e-6)  # uint8 in, [0, 1] floats out


def test_crop_flip_and_rotation_are_one_resampling(films):
    x = films.float() / 255
    n = len(x)
    one, zero = torch.ones(n), torch.zeros(n)
    flipped = fixed(x, theta=affine_theta(one, one, zero, zero, zero, -one))
    assert torch.allclose(flipped, x.flip(-1), atol=1e-6)
    turned = fixed(x, theta=affine_theta(one, one, zero, zero, torch.full((n,), math.pi / 2), one))
    assert torch.allclose(turned, torch.rot90(x, 1, (2, 3)), atol=1e-5)
    # half the side, centred: the middle 32 x 32 pixels resized to 64 (bilinear; the edge row differs)
    middle = fixed(x, theta=affine_theta(one / 2, one / 2, zero, zero, zero, one))
    resized = F.interpolate(x[..., 16:48, 16:48], size=64, mode="bilinear", align_corners=False)
    assert torch.allclose(middle[..., 1:-1, 1:-1], resized[..., 1:-1, 1:-1], atol=1e-5)
    # a box in the top-left corner (centre -0.5, -0.5) shows the top-left quarter
    corner = fixed(x, theta=affine_theta(one / 2, one / 2, -one / 2, -one / 2, zero, one))
    resized = F.interpolate(x[..., :32, :32], size=64, mode="bilinear", align_corners=False)
    assert torch.allclose(corner[..., 1:-1, 1:-1], resized[..., 1:-1, 1:-1], atol=1e-5)


def test_gamma_contrast_and_brightness(films):
    x = films[:2].float() / 255 * 0.5 + 0.25  # in 0.25..0.75: nothing clips
    assert torch.allclose(fixed(x, gamma=per_image(2.0, 0.5)), torch.cat([x[:1] ** 2, x[1:] ** 0.5]), atol=1e-6)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    stretched = fixed(x, contrast=per_image(1.4, 0.6))
    assert torch.allclose(stretched, mean + torch.tensor([1.4, 0.6]).view(2, 1, 1, 1) * (x - mean), atol=1e-6)
    assert torch.allclose(fixed(x, brightness=per_image(0.1, -0.15)), x + torch.tensor([0.1, -0.15]).view(2, 1, 1, 1))
    assert fixed(torch.ones(1, 1, 8, 8), brightness=per_image(0.15)).max() == 1  # clipped to the range


def test_blur_and_sharpen(films):
    x = films[:3].float() / 255
    blur = fixed(x, sigma=per_image(1.5, 0.0, 1.0), kernel_size=5)
    assert torch.equal(blur[1], fixed(x)[1])  # sigma 0: untouched
    assert (blur[[0, 2]].std(dim=(1, 2, 3)) < x[[0, 2]].std(dim=(1, 2, 3))).all()
    sharp = fixed(x, sigma=per_image(1.0, 1.0, 1.0), sharpen=per_image(1.0, 0.0, 0.5), kernel_size=5)
    soft = fixed(x, sigma=per_image(1.0, 1.0, 1.0), kernel_size=5)
    assert torch.allclose(sharp[1], soft[1])  # amount 0: a blur
    for i, amount in ((0, 1.0), (2, 0.5)):  # x + amount * (x - blur(x)), clipped
        assert torch.allclose(sharp[i], (x[i] + amount * (x[i] - soft[i])).clamp(0, 1), atol=1e-6)
        assert sharp[i].std() > x[i].std()
    flat = fixed(torch.full((1, 1, 16, 16), 0.3), sigma=per_image(1.5), kernel_size=5)
    assert torch.allclose(flat, torch.full_like(flat, 0.3))
    # sigma is stated at 224 px: the same blur on a 4x larger film spreads 4x as many pixels
    small, large = torch.zeros(1, 1, 56, 56), torch.zeros(1, 1, 224, 224)
    small[..., 28, 28], large[..., 112, 112] = 1, 1
    spread = [fixed(z, sigma=per_image(4.0), kernel_size=k)[0, 0] for z, k in ((small, 7), (large, 25))]
    assert spread[0].max().item() == pytest.approx(spread[1].max().item() * 16, rel=0.02)


def test_noise_goes_to_the_chosen_films_only(films):
    x = films[:3].float() / 255 * 0.5 + 0.25
    noise = torch.randn(1, 1, 64, 64, generator=generator()) * 0.04
    out, same = fixed(x, noise_idx=torch.tensor([1]), noise=noise), fixed(x)
    assert torch.equal(out[[0, 2]], same[[0, 2]])
    assert torch.equal(out[1], (same[1] + noise[0]).clamp(0, 1))


def pil_jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer))


def test_the_jpeg_tables_are_libjpegs():
    for quality in (30, 50, 75, 95):
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        assert jpeg_tables(torch.tensor([quality]))[0].tolist() == list(Image.open(buffer).quantization[0])


@pytest.mark.parametrize("quality", [30, 60, 90])
def test_the_jpeg_roundtrip_is_pils_jpeg(quality):
    """The re-encode is PIL's (libjpeg's) grey baseline JPEG but for libjpeg's integer DCT rounding:
    0.15 grey levels on average at most, under a third of what the JPEG itself moves a pixel (measured:
    0.06, 0.04 and 0.10 at qualities 30, 60, 90). Real 224 px films, which are quality-75 copies: not
    quality 50, whose steps are twice theirs, so that its quantization rounds on ties."""
    paths = sorted((SAMPLE / "train").rglob("*.jpeg"))[:4]
    pixels = np.stack([np.asarray(Image.open(p).convert("L").resize((224, 224))) for p in paths])
    x = torch.from_numpy(pixels).unsqueeze(1).float() / 255
    ours = jpeg_roundtrip(x, jpeg_tables(torch.full((4,), quality))) * 255
    assert torch.equal(ours, ours.round())  # 8-bit pixels, as a decoder gives
    pil = torch.from_numpy(np.stack([pil_jpeg(p, quality) for p in pixels])).unsqueeze(1).float()
    moved = (pil - x * 255).abs().mean()
    assert (ours - pil).abs().mean() < min(0.15, moved / 3)
    assert ((ours - pil).abs() > 1).float().mean() < 0.02


def test_the_jpeg_goes_to_the_chosen_films_only(films):
    x = films[:3].float() / 255
    tables = jpeg_tables(torch.tensor([30, 90]))
    out, same = fixed(x, jpeg_idx=torch.tensor([0, 2]), jpeg_tables=tables), fixed(x)
    assert torch.equal(out[1], same[1])
    assert torch.equal(out[[0, 2]], jpeg_roundtrip(same[[0, 2]], tables))
    assert (out[0] - x[0]).abs().mean() > (out[2] - x[2]).abs().mean() > 0  # quality 30 moves it more


# ---------------------------------------------------------------------------------------------
# on the device: one copy, no waits
# ---------------------------------------------------------------------------------------------
class CountCopies(FailOnHostWait):
    """FailOnHostWait that also counts the copies onto the device."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu":
            self.copies += kwargs.get("device", torch.device("cpu")).type != "cpu"
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize(
    "augment",
    [lambda x: augment_batch(x, generator(), policy="radiograph"), lambda x: radiograph_batch(x, generator(), ALWAYS)],
    ids=["default", "every-branch"],
)
def test_radiograph_on_the_device_never_waits_and_copies_once(augment):
    x = torch.zeros(8, 1, 32, 32, dtype=torch.uint8, device=META)
    with CountCopies() as mode:
        out = augment(x)
    assert out.shape == (8, 1, 32, 32) and out.device == META and out.dtype == torch.float32
    assert mode.copies == 1  # every random number of the batch in one non-blocking copy


def test_full_network_steps_with_the_radiograph_policy_never_wait():
    model = create_model("efficientnet_lite0", 2, "none").to(memory_format=torch.channels_last)
    set_body_trainable(model, False, train_bn=True)
    model = model.to(META)
    x = torch.zeros(8, 32, 32, dtype=torch.uint8, device=META)
    y = torch.zeros(8, dtype=torch.long, device=META)
    phase = FullNetwork(
        model,
        make_optimizer([[p for p in model.parameters() if p.requires_grad]], [1e-3], 0.01),
        1,
        4,
        name="frozen",
        n_train=8,
        generator=generator(),
        class_weights=None,
        device=META,
        train_x=x,
        train_y=y,
        valid_x=x,
        augment=True,
        augment_policy="radiograph",
        amp=None,
        channels_last=True,
    )
    with FailOnHostWait():
        for idx in phase.batches():
            phase.update(phase.step(idx))


# ---------------------------------------------------------------------------------------------
# in a run: the features cache, training, resuming
# ---------------------------------------------------------------------------------------------
def test_the_features_key_names_the_policy_and_keeps_the_standard_key():
    paths = sorted((SAMPLE / "train").rglob("*.jpeg"))
    data = SimpleNamespace(train=[SimpleNamespace(path=p) for p in paths[:6]], valid=[SimpleNamespace(path=paths[6])])
    cfg = TrainConfig(data=str(SAMPLE), augment_policy="standard")
    images = [cache_key([s.path for s in samples], cfg.image_size) for samples in (data.train, data.valid)]
    # features_key as it was before the policies: the caches of standard runs stay valid
    before = [cfg.arch, cfg.pretrained, "None", cfg.image_size, cfg.bn_adapt_images, cfg.bn_adapt_batch_size]
    before += [cfg.feature_views, cfg.augment, cfg.trainable_stages, cfg.seed, *images]
    assert features_key(cfg, data) == hashlib.sha256(repr(before).encode()).hexdigest()[:24]
    radiograph = TrainConfig(data=str(SAMPLE), augment_policy="radiograph")
    assert features_key_parts(radiograph, data) == [*before, "radiograph"]
    assert features_key(radiograph, data) != features_key(cfg, data)


def strip_time(history):
    return [{k: v for k, v in row.items() if k not in ("time", "valid_time", "elapsed")} for row in history]


@pytest.mark.parametrize("mode", ["features", "full"])
def test_a_radiograph_run_trains_and_resumes_exactly(tmp_path, mode):
    options = dict(epochs=2, mode=mode, augment_policy="radiograph", image_size=32, progress=False, seed=3)
    whole = train(SAMPLE, out=str(tmp_path / "whole"), **options)
    assert [r["epoch"] for r in whole.history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in whole.history)
    saved = (whole.run_dir / "config.json").read_text()
    assert '"augment_policy": "radiograph"' in saved
    with pytest.raises(StopRequested):
        train(SAMPLE, out=str(tmp_path / "killed"), stop_after_epoch=1, **options)
    resumed = train(resume=True, out=str(tmp_path / "killed"), progress=False)
    assert strip_time(resumed.history) == strip_time(whole.history)
    assert resumed.evaluation["metrics"] == whole.evaluation["metrics"]
