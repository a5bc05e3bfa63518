"""The GPU path without a GPU: a training step must never make the host wait for the device.

A wait (reading a value back, a shape that depends on values, a blocking copy onto the device)
stalls a GPU between steps. The steps run here on PyTorch's ``meta`` device, which has shapes but
no values, under a dispatch mode that fails on any op that would wait; on a CPU the deferred loss
reading is checked against reading every step.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pneumo.data.augment import augment_batch
from pneumo.errors import TrainingError
from pneumo.nets.models import create_model, set_body_trainable
from pneumo.training.phases import FullNetwork, HeadOnFeatures, make_optimizer

aten = torch.ops.aten
META = torch.device("meta")
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.masked_select.default}


class FailOnHostWait(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in READS and any(t.device.type != "cpu" for t in tensors):
            raise AssertionError(f"{func} reads a value back from the device")
        if (
            func is aten._to_copy.default
            and tensors[0].device.type == "cpu"
            and kwargs.get("device", torch.device("cpu")).type != "cpu"
            and not kwargs.get("non_blocking")
        ):
            raise AssertionError("a blocking copy onto the device")
        return func(*args, **kwargs)


def test_augmentation_on_the_device_never_waits():
    x = torch.zeros(4, 1, 32, 32, dtype=torch.uint8, device=META)
    with FailOnHostWait():
        out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 32, 32) and out.device == META


def test_the_dispatch_mode_catches_a_read_back():  # the guard itself can fail
    with pytest.raises(AssertionError, match="reads a value back"), FailOnHostWait():
        torch.ones(2, device=META).sum().item()
    with pytest.raises(AssertionError, match="blocking copy"), FailOnHostWait():
        torch.ones(2).to(META)


def full_phase(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    augment: bool = True,
    amp: torch.dtype | None = None,
    class_weights: torch.Tensor | None = None,
) -> FullNetwork:
    """A frozen-phase FullNetwork over ``x`` in batches of 4 (meta) or 8, on ``x``'s device."""
    opt = make_optimizer([[p for p in model.parameters() if p.requires_grad]], [1e-3], 0.01)
    return FullNetwork(
        model,
        opt,
        1,
        4 if x.device == META else 8,
        name="frozen",
        n_train=len(x),
        generator=torch.Generator().manual_seed(0),
        class_weights=class_weights,
        device=x.device,
        train_x=x,
        train_y=y,
        valid_x=x,
        augment=augment,
        amp=amp,
        channels_last=True,
    )


@pytest.mark.parametrize("frozen", [True, False])
def test_full_network_steps_never_wait(frozen):
    model = create_model("efficientnet_lite0", 2, "none").to(memory_format=torch.channels_last)
    set_body_trainable(model, not frozen, train_bn=True)
    x = torch.zeros(8, 32, 32, dtype=torch.uint8, device=META)
    y = torch.zeros(8, dtype=torch.long, device=META)
    phase = full_phase(model.to(META), x, y, class_weights=torch.ones(2, device=META))
    with FailOnHostWait():
        for idx in phase.batches():
            phase.update(phase.step(idx))
        logits = phase.valid_logits()
    assert logits.shape == (8, 2)


def test_head_on_features_steps_never_wait():
    model = create_model("efficientnet_lite0", 2, "none")
    maps = model.features_before(torch.zeros(1, 1, 64, 64), 2)
    model = model.to(META)
    set_body_trainable(model, False, train_bn=False, trainable_stages=2)
    opt = make_optimizer([list(model.tail(2).parameters()), list(model.head.parameters())], [1e-4, 1e-3], 0.01)
    feats = torch.zeros(2, 8, *maps.shape[1:], dtype=torch.float16, device=META)
    phase = HeadOnFeatures(
        model,
        opt,
        1,
        4,
        n_train=8,
        generator=torch.Generator().manual_seed(0),
        class_weights=None,
        device=META,
        train_feats=feats,
        train_y=torch.zeros(8, dtype=torch.long, device=META),
        valid_feats=feats[0].float(),
        trainable_stages=2,
    )
    with FailOnHostWait():
        for idx in phase.batches():
            phase.update(phase.step(idx))
        assert phase.valid_logits().shape == (8, 2)


def head_phase(lr: float, read_every: int) -> HeadOnFeatures:
    torch.manual_seed(0)  # the model, and the dropout that follows
    model = create_model("efficientnet_lite0", 2, "none")
    feats = torch.randn(1, 96, model.head[0].num_features)
    y = (feats[0, :, 0] > 0).long()
    set_body_trainable(model, False, train_bn=False)
    opt = make_optimizer([list(model.head.parameters())], [lr], 0.01)
    phase = HeadOnFeatures(
        model,
        opt,
        2,
        8,
        n_train=96,
        generator=torch.Generator().manual_seed(0),
        class_weights=None,
        device=torch.device("cpu"),
        train_feats=feats,
        train_y=y,
        valid_feats=feats[0],
    )
    phase.read_every = read_every  # what a GPU phase does: LOSS_READ_EVERY
    return phase


def test_reading_losses_in_chunks_gives_the_losses_of_reading_each_step():
    losses = {}
    for read_every in (1, 5):  # 12 steps an epoch: chunks of 5, 5 and 2
        phase = head_phase(3e-3, read_every)
        losses[read_every] = [phase.train_epoch(epoch, False) for epoch in range(2)]
    assert losses[1] == losses[5]
    assert losses[1][1] < losses[1][0]


def test_a_divergence_inside_a_chunk_names_its_first_step():
    messages = []
    for read_every in (1, 5):
        with pytest.raises(TrainingError, match="lower --lr") as error:
            phase = head_phase(1e12, read_every)
            for epoch in range(2):
                phase.train_epoch(epoch, False)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert "step" in messages[0]


def test_fp16_steps_scale_the_loss_and_still_learn():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, "none")
    set_body_trainable(model, False, train_bn=True)
    before = [p.detach().clone() for p in model.head.parameters()]
    x = torch.randint(0, 256, (64, 32, 32), dtype=torch.uint8)
    y = torch.arange(64) % 2
    phase = full_phase(model, x, y, amp=torch.float16)
    loss = phase.train_epoch(0, False)
    assert phase.scaler is not None and phase.scaler.get_scale() > 1  # gradients were scaled up
    # (steps whose scaled gradients overflow are skipped and the scale halves: 8 steps leave some)
    assert loss == loss and loss > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.head.parameters()))
    assert full_phase(model, x, y, augment=False, amp=torch.bfloat16).scaler is None  # bf16 has fp32's range
