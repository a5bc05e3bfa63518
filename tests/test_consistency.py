"""``--consistency``: two cached views of one film asked for the same reading (issue 26's consistency table)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pneumo.config import TrainConfig
from pneumo.errors import PneumoError
from pneumo.nets.models import create_model, set_body_trainable
from pneumo.training.phases import HeadOnFeatures, make_optimizer

N_FILMS = 96


def head_phase(feats: torch.Tensor, y: torch.Tensor, consistency: float, epochs: int = 1) -> HeadOnFeatures:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, "none")
    for m in model.modules():  # no dropout: the same film must give the same reading twice
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    set_body_trainable(model, False, train_bn=False)
    opt = make_optimizer([list(model.head.parameters())], [1e-2], 0.01)
    return HeadOnFeatures(
        model,
        opt,
        epochs,
        16,
        n_train=len(y),
        generator=torch.Generator().manual_seed(0),
        class_weights=None,
        device=torch.device("cpu"),
        train_feats=feats,
        train_y=y,
        valid_feats=feats[0],
        consistency=consistency,
    )


def films(n_views: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose first channel says the class, weakly; in every view after the first a second
    channel says it loudly too (a shortcut that one kind of view has and the other has not)."""
    gen = torch.Generator().manual_seed(1)
    width = create_model("efficientnet_lite0", 2, "none").head[0].num_features
    clean = torch.randn(N_FILMS, width, generator=gen) * 0.1
    y = (torch.arange(N_FILMS) % 2).long()
    clean[:, 0] += (y * 2.0 - 1.0) * 0.3
    shortcut = torch.zeros_like(clean)
    shortcut[:, 1] = (y * 2.0 - 1.0) * 3.0
    return torch.stack([clean] + [clean + shortcut] * (n_views - 1)), y


def js_between_views(phase: HeadOnFeatures) -> float:
    phase.trained.eval()
    with torch.no_grad():
        p, q = (phase.model.forward_from(v, 0).softmax(dim=1) for v in phase.train_feats)
    m = ((p + q) / 2).log()
    return float((F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean")) / 2)


def test_the_loss_is_cross_entropy_alone_when_the_two_views_agree():
    clean, y = films(1)
    phase = head_phase(torch.stack([clean[0], clean[0]]), y, consistency=10.0)
    idx = torch.arange(16)
    loss = phase.step(idx)
    phase.trained.train()
    plain = F.cross_entropy(phase.model.forward_from(clean[0, :8], 0), y[:8])  # the step's half batch
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), abs=1e-5)


def test_views_that_differ_add_their_divergence():
    feats, y = films(2)
    with_term = head_phase(feats, y, consistency=10.0).step(torch.arange(16))
    without = head_phase(feats, y, consistency=1e-12).step(torch.arange(16))  # same draws, the term ~0
    assert float(with_term.detach()) > float(without.detach())


def test_training_with_it_brings_the_readings_of_two_views_together():
    feats, y = films(2)
    results = {}
    for weight in (1e-12, 20.0):
        phase = head_phase(feats, y, consistency=weight, epochs=3)
        for epoch in range(phase.epochs):
            phase.train_epoch(epoch, progress=False)
        results[weight] = js_between_views(phase)
    assert results[20.0] < 0.5 * results[1e-12]


@pytest.mark.parametrize("options", [dict(feature_views=1), dict(mode="full")])
def test_it_needs_two_cached_views(options):
    with pytest.raises(PneumoError, match="--consistency"):
        TrainConfig(consistency=1.0, **options)
