"""Unsupervised adaptation steps beyond BatchNorm statistics, for ``pneumo adapt --method``.

Each runs after ``nets.batchnorm.adapt_batchnorm`` has re-estimated the body's statistics on the
site's films, on one network (an ensemble calls it per member), and reads no label:

- ``tent`` (Wang et al., ICLR 2021): the body's BatchNorm scales and shifts are moved to lower the
  entropy of the model's predictions on the site's films. TENT as published keeps adapting online with
  batch statistics; here the statistics are the ones just re-estimated and stay fixed, so the adapted
  model is an ordinary model folder that reads one film as it reads a batch.
- ``self-training``: the head's last linear layer refitted on the site's films that the BatchNorm-adapted
  model reads with confidence (pseudo-labels), pulled towards the trained layer as the labelled
  calibration is (``infer.calibrate.fit_last_layer``).

Which of them ``pneumo adapt`` uses by default was measured on outside-dev (bench/outside.py); see
``infer.adapt.DEFAULT_METHOD``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from pneumo.evaluation.metrics import softmax
from pneumo.infer.model_folder import LoadedModel
from pneumo.nets.batchnorm import batchnorm_layers

TENT_LR = 1e-3
TENT_EPOCHS = 1
TENT_BATCH = 16
CONFIDENT = 0.9  # self-training keeps films whose calibrated p(class) reaches this
SELF_TRAINING_ANCHOR = 1e-1


@torch.inference_mode()
def hidden_activations(member: LoadedModel, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """What the head's last linear layer reads: pooled body features through the rest of the head (eval mode)."""
    net = member.net.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.as_tensor(pixels[i : i + batch_size]).unsqueeze(1).to(member.device)
        out.append(net.head[:-1](net.features(x)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.head[-1].in_features), np.float32)


def fit_last_layer(hidden: np.ndarray, labels: np.ndarray, start: torch.Tensor, anchor: float = 1e-2) -> torch.Tensor:
    """The last layer's weights ``(classes, hidden)`` minimising class-weighted cross-entropy plus
    ``anchor * ||W - start||^2``: a convex problem, solved by L-BFGS from the trained weights."""
    h = torch.as_tensor(hidden, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    w0 = start.detach().to(torch.float64)
    counts = torch.bincount(y, minlength=w0.shape[0]).clamp(min=1).to(torch.float64)
    weights = len(y) / (len(counts) * counts)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(h @ w.T, y, weight=weights) + anchor * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().to(start.dtype)


def entropy_minimisation(member: LoadedModel, pixels: np.ndarray, progress: bool = True, seed: int = 0) -> dict:
    """TENT on the body's BatchNorm affine parameters (statistics fixed); returns what it did."""
    net = member.net
    layers = batchnorm_layers(net.body)
    params = [p for bn in layers for p in (bn.weight, bn.bias) if p is not None]
    saved = {id(p): p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=TENT_LR)
    rng = np.random.default_rng(seed)
    net.eval()  # statistics as re-estimated: only the affine parameters learn
    losses = []
    steps = []
    for _ in range(TENT_EPOCHS):
        order = rng.permutation(len(pixels))
        steps += [order[i : i + TENT_BATCH] for i in range(0, len(pixels), TENT_BATCH)]
    with torch.enable_grad():
        for idx in tqdm(steps, desc="entropy minimisation", unit="batch", disable=not progress, leave=False):
            x = torch.as_tensor(pixels[np.sort(idx)]).unsqueeze(1).to(member.device)
            logp = (net(x).float() / member.meta.temperature).log_softmax(1)
            loss = -(logp.exp() * logp).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    for p in net.parameters():
        p.requires_grad_(saved[id(p)])
    net.eval()
    return {
        "tent": {
            "parameters": "body BatchNorm weight and bias",
            "lr": TENT_LR,
            "epochs": TENT_EPOCHS,
            "batch_size": TENT_BATCH,
            "entropy_first_batch": round(losses[0], 4) if losses else None,
            "entropy_last_batch": round(losses[-1], 4) if losses else None,
        }
    }


def self_training(member: LoadedModel, pixels: np.ndarray, progress: bool = True) -> dict:
    """The last layer refitted on confident pseudo-labels of the site's films; returns what it did."""
    hidden = hidden_activations(member, pixels)  # one body pass: the probabilities are the last layer's
    last = member.net.head[-1].weight
    probs = softmax(hidden @ last.detach().numpy().T, member.meta.temperature)
    confident = probs.max(1) >= CONFIDENT
    pseudo = probs.argmax(1)
    kept = {member.classes[i]: int((pseudo[confident] == i).sum()) for i in range(len(member.classes))}
    if min(kept.values()) < 2:  # one class only: nothing to fit a decision to
        return {"self_training": {"confident_films": kept, "fitted": False}}
    with torch.no_grad():
        last.copy_(fit_last_layer(hidden[confident], pseudo[confident], last, SELF_TRAINING_ANCHOR))
    return {
        "self_training": {
            "confidence": CONFIDENT,
            "confident_films": kept,
            "anchor": SELF_TRAINING_ANCHOR,
            "fitted": True,
        }
    }
