"""A training phase: one optimizer, one one-cycle schedule, its epochs. Two kinds of step.

``HeadOnFeatures`` trains the head (and the body's last stages) on cached body features: the frozen
phase by default, on any device. ``FullNetwork`` runs the body every step on augmented batches cut
from the uint8 image tensor on the device, under autocast where asked (``--mode full``, training from
scratch, fine-tuning).

``build_phase(setup, name, folder)`` makes the phase a run (or an LR range test) calls ``name``
("frozen", "scratch" or "unfrozen") from the ``RunSetup``: which parameters train, at which peak
LRs, on cached features or on the whole network.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pneumo.config import TrainConfig
from pneumo.data.augment import augment_batch
from pneumo.errors import TrainingError
from pneumo.nets.models import XrayNet, set_body_trainable
from pneumo.run_folder import RunFolder
from pneumo.training import distributed
from pneumo.training.features import cached_features
from pneumo.training.schedule import discriminative_lrs, one_cycle, one_cycle_momentum
from pneumo.training.setup import RunSetup


# ---------------------------------------------------------------------------------------------
def make_optimizer(groups: list[list[torch.nn.Parameter]], lrs: list[float], wd: float) -> torch.optim.AdamW:
    param_groups = [{"params": [p for p in g if p.requires_grad], "max_lr": lr} for g, lr in zip(groups, lrs)]
    param_groups = [g for g in param_groups if g["params"]]
    return torch.optim.AdamW(param_groups, lr=lrs[-1], betas=(0.95, 0.99), eps=1e-5, weight_decay=wd)


def set_schedule(opt: torch.optim.Optimizer, pos: float) -> None:
    for group in opt.param_groups:
        group["lr"] = one_cycle(pos, group["max_lr"])
        group["betas"] = (one_cycle_momentum(pos), group["betas"][1])


LOSS_READ_EVERY = 16  # steps between reading losses back on a GPU (each read waits for the device)


def first_non_finite(losses: list[float]) -> int | None:
    return next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)


class Phase:
    """The epochs of one optimizer and one schedule. Subclasses say what a step and a validation are.

    Nothing in a step reads a value back from the device: batch indices go over once per epoch and
    losses come back every ``LOSS_READ_EVERY`` steps (every step on a CPU, where a read costs nothing),
    so on a GPU Python queues the next steps while the device runs this one.
    """

    name = "phase"

    def __init__(
        self,
        model: XrayNet,
        opt: torch.optim.Optimizer,
        epochs: int,
        batch_size: int,
        n_train: int,
        generator: torch.Generator,
        class_weights: torch.Tensor | None,
        device: torch.device,
    ):
        self.model, self.opt, self.epochs, self.bs = model, opt, epochs, batch_size
        self.n_train, self.gen, self.class_weights, self.device = n_train, generator, class_weights, device
        self.steps_per_epoch = max(1, n_train // batch_size)  # drop the last partial batch, as fastai
        self.scaler: torch.amp.GradScaler | None = None  # loss scaling, for fp16 only
        self.read_every = 1 if device.type == "cpu" else LOSS_READ_EVERY

    def batches(self) -> list[torch.Tensor]:
        """This epoch's shuffled index batches, on the device (drawn from the CPU generator)."""
        order = torch.randperm(self.n_train, generator=self.gen).to(self.device, non_blocking=True)
        return [order[i * self.bs : (i + 1) * self.bs] for i in range(self.steps_per_epoch)]

    def position(self, epoch: int, step: int) -> float:
        """How far through this phase's one-cycle schedule a step is, from 0 to 1."""
        return (epoch * self.steps_per_epoch + step) / (self.epochs * self.steps_per_epoch)

    def update(self, loss: torch.Tensor) -> None:
        """Backward and one optimizer step."""
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def train_epoch(self, epoch: int, progress: bool) -> float:
        batches = self.batches()
        losses: list[float] = []
        pending: list[torch.Tensor] = []
        bar = tqdm(
            total=len(batches),
            desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for step, idx in enumerate(batches):
            set_schedule(self.opt, self.position(epoch, step))
            loss = self.step(idx)
            self.update(loss)
            pending.append(loss.detach())
            if len(pending) == self.read_every or step + 1 == len(batches):
                values = torch.stack(pending).float().cpu().tolist()
                bad = first_non_finite(values)
                if bad is not None:
                    at = len(losses) + bad
                    lr = one_cycle(self.position(epoch, at), self.opt.param_groups[-1]["max_lr"])
                    raise TrainingError(
                        f"the loss became {values[bad]} at {self.name} epoch {epoch + 1} step "
                        f"{at + 1} (lr {lr:.2e}); lower --lr (`pneumo lr-find` suggests "
                        f"one) or use --precision fp32"
                    )
                losses.extend(values)
                pending.clear()
                bar.update(len(values))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        return float(np.mean(losses))

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def valid_logits(self) -> torch.Tensor:
        raise NotImplementedError


class HeadOnFeatures(Phase):
    """Frozen body, cached features: each step is the head alone, or the head and the last
    ``trainable_stages`` of the body on cached feature maps (``(V, N, ...)``: V views per image)."""

    name = "frozen"

    def __init__(
        self,
        *args,
        train_feats: torch.Tensor,
        train_y: torch.Tensor,
        valid_feats: torch.Tensor,
        trainable_stages: int = 0,
        consistency: float = 0.0,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.train_feats, self.train_y, self.valid_feats = train_feats, train_y, valid_feats
        self.trainable_stages, self.consistency = trainable_stages, consistency
        self.trained = torch.nn.ModuleList([self.model.head, self.model.tail(trainable_stages)])

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        self.trained.train()
        if self.consistency:
            return self.consistency_step(idx[: max(1, len(idx) // 2)])
        views = torch.randint(len(self.train_feats), (len(idx),), generator=self.gen)
        views = views.to(self.device, non_blocking=True)
        logits = self.model.forward_from(self.train_feats[views, idx].float(), self.trainable_stages)
        return F.cross_entropy(logits, self.train_y[idx], weight=self.class_weights)

    def consistency_step(self, films: torch.Tensor) -> torch.Tensor:
        """Two different views of each film in one batch: the cross-entropy of both plus ``consistency``
        times the Jensen-Shannon divergence of their two readings (AugMix, Hendrycks et al. 2020)."""
        n_views = len(self.train_feats)
        first = torch.randint(n_views, (len(films),), generator=self.gen)
        second = (first + torch.randint(1, n_views, (len(films),), generator=self.gen)) % n_views
        views = torch.cat([first, second]).to(self.device, non_blocking=True)
        both = films.repeat(2)
        logits = self.model.forward_from(self.train_feats[views, both].float(), self.trainable_stages)
        loss = F.cross_entropy(logits, self.train_y[both], weight=self.class_weights)
        p, q = logits.float().softmax(dim=1).chunk(2)
        log_mean = ((p + q) / 2).clamp_min(1e-7).log()
        js = (F.kl_div(log_mean, p, reduction="batchmean") + F.kl_div(log_mean, q, reduction="batchmean")) / 2
        return loss + self.consistency * js

    @torch.inference_mode()
    def valid_logits(self, batch_size: int = 256) -> torch.Tensor:
        self.trained.eval()
        return torch.cat(
            [
                self.model.forward_from(self.valid_feats[i : i + batch_size].float(), self.trainable_stages)
                for i in range(0, len(self.valid_feats), batch_size)
            ]
        )


class FullNetwork(Phase):
    """The body runs every step on augmented batches cut from the uint8 image tensor on the device."""

    def __init__(
        self,
        *args,
        name: str,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        valid_x: torch.Tensor,
        augment: bool,
        amp: torch.dtype | None,
        channels_last: bool,
        augment_policy: str = "standard",
        **kw,
    ):
        super().__init__(*args, **kw)
        self.augment_policy = augment_policy
        self.name, self.train_x, self.train_y, self.valid_x = name, train_x, train_y, valid_x
        self.augment, self.amp, self.channels_last = augment, amp, channels_last
        if amp == torch.float16:  # fp16 gradients underflow without scaling; bf16 has fp32's range
            self.scaler = torch.amp.GradScaler(self.device.type)
        # under torchrun: DDP all-reduces the gradients, each rank augments with its own generator
        self.net, self.augment_gen = distributed.wrap_ddp(self.model), self.gen

    def batches(self) -> list[torch.Tensor]:
        """One process: ``Phase.batches``. Under torchrun: this rank's ``batch_size / N`` images of each
        global batch, from a ``DistributedSampler`` seeded by the shared generator (so resume draws the same)."""
        ctx = distributed.current()
        if not ctx.enabled:
            return super().batches()
        seed = int(torch.randint(2**31, (1,), generator=self.gen))
        self.augment_gen = distributed.rank_generator(self.gen)
        sampler = DistributedSampler(
            range(self.n_train), ctx.world_size, ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        order = torch.tensor(list(sampler)).to(self.device, non_blocking=True)
        bs = max(1, self.bs // ctx.world_size)
        return [order[i * bs : (i + 1) * bs] for i in range(self.steps_per_epoch)]

    def train_epoch(self, epoch: int, progress: bool) -> float:
        loss = super().train_epoch(epoch, progress)
        distributed.broadcast_module(self.model)  # BatchNorm statistics moved on each rank's own last batch
        return loss

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        self.model.train()
        x = self.train_x[idx]
        x = (
            augment_batch(x.unsqueeze(1), self.augment_gen, policy=self.augment_policy).squeeze(1)
            if self.augment
            else x
        )
        with self._autocast():
            logits = self.net(self._prepare(x))
        return F.cross_entropy(logits.float(), self.train_y[idx], weight=self.class_weights)

    @torch.inference_mode()
    def valid_logits(self, batch_size: int = 128) -> torch.Tensor:
        """Under torchrun each rank predicts its share of the validation images, then all gather."""
        self.model.eval()

        def predict(rows: slice) -> torch.Tensor:
            valid_x, out = self.valid_x[rows], []
            for i in range(0, len(valid_x), batch_size):
                with self._autocast():
                    out.append(self.model(self._prepare(valid_x[i : i + batch_size])).float())
            return torch.cat(out)

        return distributed.gather_shards(len(self.valid_x), predict).to(self.device)


# ---------------------------------------------------------------------------------------------
# a run's phases
# ---------------------------------------------------------------------------------------------
TAIL_LR_RATIO = 0.1  # the trainable body stages learn at a tenth of the head's rate (bench/experiments)


def frozen_phase_groups(
    model: XrayNet, cfg: TrainConfig, with_body_bn: bool = False
) -> tuple[list[list[torch.nn.Parameter]], list[float]]:
    """Parameter groups and peak LRs of the frozen phase: [the rest of the body: BN only], the
    trainable stages, the head."""
    tail = list(model.tail(cfg.trainable_stages).parameters())
    tail_ids = {id(p) for p in tail}
    rest = [p for p in model.body.parameters() if p.requires_grad and id(p) not in tail_ids] if with_body_bn else []
    return [rest, tail, list(model.head.parameters())], [cfg.lr, cfg.lr * TAIL_LR_RATIO, cfg.lr]


def build_phase(setup: RunSetup, name: str, folder: RunFolder, progress: bool = True) -> Phase:
    """The phase called ``name`` ("frozen", "scratch", "unfrozen") of the run ``setup`` describes.

    The frozen phase in features mode computes (or reloads) the cached features first, in
    ``folder`` (``RUN/checkpoints/features.pt``) and the shared cache.
    """
    cfg, model, data, device = setup.cfg, setup.model, setup.data, setup.device
    common = dict(n_train=len(data.train), generator=setup.generator, class_weights=setup.class_weights, device=device)
    if name == "frozen" and setup.mode == "features":
        feats = cached_features(setup, folder, progress)
        set_body_trainable(model, False, train_bn=False, trainable_stages=cfg.trainable_stages)
        opt = make_optimizer(*frozen_phase_groups(model, cfg), cfg.weight_decay)
        return HeadOnFeatures(
            model,
            opt,
            cfg.epochs,
            cfg.batch_size,
            train_feats=feats["train"].to(device),
            train_y=setup.train_y.to(device),
            valid_feats=feats["valid"].to(device),
            trainable_stages=cfg.trainable_stages,
            consistency=cfg.consistency,
            **common,
        )
    if name == "frozen":
        set_body_trainable(model, False, train_bn=True, trainable_stages=cfg.trainable_stages)
        opt = make_optimizer(*frozen_phase_groups(model, cfg, with_body_bn=True), cfg.weight_decay)
        epochs = cfg.epochs
    elif name == "scratch":  # from scratch nothing is frozen: random features teach nothing
        set_body_trainable(model, True)
        opt = make_optimizer([list(model.parameters())], [cfg.lr], cfg.weight_decay)
        epochs = cfg.epochs
    else:
        set_body_trainable(model, True)
        lr = cfg.unfreeze_lr or cfg.lr / 2
        groups = model.parameter_groups()
        opt = make_optimizer(groups, discriminative_lrs(lr, len(groups)), cfg.weight_decay)
        epochs = cfg.unfreeze_epochs
    return FullNetwork(
        model,
        opt,
        epochs,
        cfg.batch_size,
        name=name,
        train_x=torch.from_numpy(data.train_pixels).to(device),
        train_y=setup.train_y.to(device),
        valid_x=torch.from_numpy(data.valid_pixels).to(device),
        augment=cfg.augment,
        augment_policy=cfg.augment_policy,
        amp=setup.amp,
        channels_last=cfg.channels_last,
        **common,
    )
