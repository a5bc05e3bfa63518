"""A training phase: one optimizer, one one-cycle schedule, its epochs. Two kinds of step.

``HeadOnFeatures`` trains the head alone on cached body features (the frozen body on a CPU);
``FullNetwork`` runs the body every step on augmented batches cut from the uint8 image tensor on the
device, under autocast where asked (the frozen body on a GPU, training from scratch, fine-tuning).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pneumo.augment import augment_batch
from pneumo.errors import TrainingError
from pneumo.models import XrayNet
from pneumo.schedule import one_cycle, one_cycle_momentum


# ---------------------------------------------------------------------------------------------
def make_optimizer(groups: list[list[torch.nn.Parameter]], lrs: list[float], wd: float) -> torch.optim.AdamW:
    param_groups = [{"params": [p for p in g if p.requires_grad], "max_lr": lr} for g, lr in zip(groups, lrs)]
    param_groups = [g for g in param_groups if g["params"]]
    return torch.optim.AdamW(param_groups, lr=lrs[-1], betas=(0.95, 0.99), eps=1e-5, weight_decay=wd)


def set_schedule(opt: torch.optim.Optimizer, pos: float) -> None:
    for group in opt.param_groups:
        group["lr"] = one_cycle(pos, group["max_lr"])
        group["betas"] = (one_cycle_momentum(pos), group["betas"][1])


def check_finite(loss: torch.Tensor, where: str, lr: float) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss became {loss.item()} at {where} (lr {lr:.2e}); lower --lr "
                            f"(`pneumo lr-find` suggests one) or use --precision fp32")


class Phase:
    """The epochs of one optimizer and one schedule. Subclasses say what a step and a validation are."""
    name = "phase"

    def __init__(self, model: XrayNet, opt: torch.optim.Optimizer, epochs: int, batch_size: int,
                 n_train: int, generator: torch.Generator, class_weights: torch.Tensor | None):
        self.model, self.opt, self.epochs, self.bs = model, opt, epochs, batch_size
        self.n_train, self.gen, self.class_weights = n_train, generator, class_weights
        self.steps_per_epoch = max(1, n_train // batch_size)  # drop the last partial batch, as fastai

    def batches(self) -> list[torch.Tensor]:
        order = torch.randperm(self.n_train, generator=self.gen)
        return [order[i * self.bs:(i + 1) * self.bs] for i in range(self.steps_per_epoch)]

    def train_epoch(self, epoch: int, progress: bool) -> float:
        losses = []
        bar = tqdm(self.batches(), desc=f"{self.name} epoch {epoch + 1}/{self.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for step, idx in enumerate(bar):
            set_schedule(self.opt, (epoch * self.steps_per_epoch + step) / (self.epochs * self.steps_per_epoch))
            loss = self.step(idx)
            check_finite(loss, f"{self.name} epoch {epoch + 1} step {step + 1}", self.opt.param_groups[-1]["lr"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        return float(np.mean(losses))

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def valid_logits(self) -> torch.Tensor:
        raise NotImplementedError


class HeadOnFeatures(Phase):
    """Frozen body, cached features: each step is the head alone, or the head and the last
    ``trainable_stages`` of the body on cached feature maps (``(V, N, ...)``: V views per image)."""
    name = "frozen"

    def __init__(self, *args, train_feats: torch.Tensor, train_y: torch.Tensor, valid_feats: torch.Tensor,
                 trainable_stages: int = 0, **kw):
        super().__init__(*args, **kw)
        self.train_feats, self.train_y, self.valid_feats = train_feats, train_y, valid_feats
        self.trainable_stages = trainable_stages
        self.trained = torch.nn.ModuleList([self.model.head, self.model.tail(trainable_stages)])

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        self.trained.train()
        views = torch.randint(len(self.train_feats), (len(idx),), generator=self.gen)
        logits = self.model.forward_from(self.train_feats[views, idx].float(), self.trainable_stages)
        return F.cross_entropy(logits, self.train_y[idx], weight=self.class_weights)

    @torch.inference_mode()
    def valid_logits(self, batch_size: int = 256) -> torch.Tensor:
        self.trained.eval()
        return torch.cat([self.model.forward_from(self.valid_feats[i:i + batch_size].float(), self.trainable_stages)
                          for i in range(0, len(self.valid_feats), batch_size)])


class FullNetwork(Phase):
    """The body runs every step on augmented batches cut from the uint8 image tensor on the device."""

    def __init__(self, *args, name: str, train_x: torch.Tensor, train_y: torch.Tensor, valid_x: torch.Tensor,
                 augment: bool, amp: torch.dtype | None, channels_last: bool, **kw):
        super().__init__(*args, **kw)
        self.name, self.train_x, self.train_y, self.valid_x = name, train_x, train_y, valid_x
        self.augment, self.amp, self.channels_last = augment, amp, channels_last
        self.device = train_x.device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        self.model.train()
        x = self.train_x[idx.to(self.device)]
        x = augment_batch(x.unsqueeze(1), self.gen).squeeze(1) if self.augment else x
        y = self.train_y[idx.to(self.device)]
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(self._prepare(x))
        loss = F.cross_entropy(logits.float(), y, weight=self.class_weights)
        if not torch.isfinite(loss) and self.amp is not None:
            tqdm.write(f"non-finite loss under {self.amp}: continuing in full precision")
            self.amp = None
            return self.step(idx)
        return loss

    @torch.inference_mode()
    def valid_logits(self, batch_size: int = 128) -> torch.Tensor:
        self.model.eval()
        out = []
        for i in range(0, len(self.valid_x), batch_size):
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out.append(self.model(self._prepare(self.valid_x[i:i + batch_size])).float())
        return torch.cat(out)
