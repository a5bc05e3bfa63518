"""The one-cycle schedule and the LR range test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import pneumo
from pneumo.training.lr_finder import find_lr, lr_find, minimum, range_test, steep, valley
from pneumo.training.schedule import cosine, discriminative_lrs, one_cycle, one_cycle_momentum

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"


@pytest.mark.parametrize("pos, expected", [(0.0, 3e-3 / 25), (0.25, 3e-3), (1.0, 3e-3 / 1e5)])
def test_one_cycle_hits_its_landmarks(pos, expected):
    assert one_cycle(pos, 3e-3) == pytest.approx(expected)


def test_one_cycle_rises_then_falls_and_momentum_mirrors_it():
    lrs = [one_cycle(p / 100, 1.0) for p in range(101)]
    peak = int(np.argmax(lrs))
    assert peak == 25 and all(np.diff(lrs[: peak + 1]) > 0) and all(np.diff(lrs[peak:]) < 0)
    assert one_cycle_momentum(0.25) == pytest.approx(0.85) and one_cycle_momentum(0) == pytest.approx(0.95)
    assert cosine(1, 3, 0.5) == pytest.approx(2)


def test_discriminative_lrs_span_a_hundredfold():
    assert discriminative_lrs(1e-3, 3) == pytest.approx([1e-5, 1e-4, 1e-3])


def synthetic_curve(n=100, spike=False):
    lrs = np.logspace(-7, 1, n)
    x = np.log10(lrs)
    losses = 1.0 / (1 + np.exp(3 * (x + 3))) + 0.2 + np.where(x > -0.5, (x + 0.5) ** 2 * 3, 0)
    if spike:
        losses[:4] += [3.0, 2.0, 1.0, 0.5]
    return lrs.tolist(), losses.tolist()


@pytest.mark.parametrize("spike", [False, True])
def test_valley_sits_on_the_descent_even_after_an_early_spike(spike):
    lrs, losses = synthetic_curve(spike=spike)
    lr = valley(lrs, losses)
    assert isinstance(lr, float)
    assert 1e-4 < lr < 1e-1  # the falling part of the curve, far from the spike and the blow-up
    assert 1e-4 < steep(lrs, losses) < 1e-1
    assert minimum(lrs, losses) < lrs[int(np.argmin(losses))]


def test_range_test_stops_when_the_loss_diverges():
    calls = []

    def step(lr):
        calls.append(lr)
        return 1.0 if lr < 1e-2 else 1.0 + (lr * 1e3) ** 2

    result = range_test(step, num_it=100)
    assert len(calls) < 100 and result.lrs[-1] < 1e-1
    assert result.suggestion == result.suggestions["valley"]


def test_lr_find_restores_the_weights_it_perturbed(tmp_path):
    from pneumo.nets.models import create_model
    from pneumo.training.phases import HeadOnFeatures, make_optimizer

    model = create_model("efficientnet_lite0", pretrained="none")
    feats = torch.randn(1, 256, model.head[0].num_features)
    y = (feats[0, :, 0] > 0).long()
    opt = make_optimizer([list(model.head.parameters())], [1e-3], 0.01)
    phase = HeadOnFeatures(
        model,
        opt,
        1,
        32,
        n_train=256,
        generator=torch.Generator().manual_seed(0),
        class_weights=None,
        device=torch.device("cpu"),
        train_feats=feats,
        train_y=y,
        valid_feats=feats[0],
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = find_lr(model, phase, num_it=60)
    assert len(result.lrs) > 10
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lr_find_on_the_sample_writes_its_plot(tmp_path):
    result = lr_find(SAMPLE, out=tmp_path, image_size=64, progress=False, num_it=50)
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    assert isinstance(result.suggestion, float) and 1e-6 < result.suggestion < 1
    assert math.isfinite(result.losses[0])


def test_lr_find_leaves_only_its_plot_and_keeps_features_per_data_set_in_the_cache(tmp_path, monkeypatch, capsys):
    """No features file is left in --out (they are tens of MB); the shared cache keeps one per data
    set, so another data set in the same --out never reads stale features. The sweep has a bar."""
    from pneumo.data.cache import default_cache_dir

    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    for cls in ("NORMAL", "PNEUMONIA"):
        (other / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "train" / cls).glob("*.jpeg"))[:30]:
            (other / cls / f.name).symlink_to(f)
    first = lr_find(SAMPLE, out=tmp_path / "lr", image_size=48, progress=False, num_it=20)
    second = lr_find(other, out=tmp_path / "lr", image_size=48, progress=True, num_it=20)
    assert "LR sweep" in capsys.readouterr().err  # the bar over the range test itself
    assert [p.name for p in (tmp_path / "lr").rglob("*")] == ["lr_find.png"]
    cached = sorted(default_cache_dir().glob("features-*.pt"))
    sizes = sorted(torch.load(f, weights_only=True)["train"].shape[1] for f in cached)
    assert sizes[0] < 60 < sizes[-1] and len(cached) == 2  # the other set's 48 training images, the sample's 160
    assert first.lrs != [] and second.lrs != [] and "suggestion" in repr(second)
    assert second._repr_png_() == (tmp_path / "lr" / "lr_find.png").read_bytes()


def test_lr_find_command_line_writes_its_plot_into_out(tmp_path, capsys):
    """`pneumo lr-find DATA --out DIR` as the demo runs it: --out is the plot's folder, not a config clash."""
    import json

    from pneumo import cli

    out = tmp_path / "lr"
    code = cli.main(["lr-find", str(SAMPLE), "--out", str(out), "--image-size", "48", "--num-it", "12", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plot"] == str(out / "lr_find.png") and (out / "lr_find.png").stat().st_size > 1000
    assert report["suggestion"] > 0 and len(report["lrs"]) == len(report["losses"]) > 3
