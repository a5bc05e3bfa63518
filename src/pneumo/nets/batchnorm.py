"""Re-estimating a body's BatchNorm statistics on images: one implementation for training and adaptation.

Training calls it once, on a seeded sample of training films, to move the ImageNet statistics to
X-rays (``training.features``); ``pneumo adapt`` calls it again on a new site's unlabelled films
(``infer.adapt``). Only the body's BatchNorm layers move: they describe how films look (exposure,
contrast, sharpness, compression), which is what differs between sites. The head's BatchNorm1d
layers normalise pooled features that the head's linear layers were trained on, and their means
depend on the class mix of the images, so re-estimating them would change the decision with the
prevalence; they stay as trained.

Not every re-estimated statistic depends on the films. A BatchNorm in train mode outputs batch mean
exactly its bias, so a layer fed by a block's output through a 1x1 convolution (EfficientNet's
``blocks.S.B.bn1`` for B > 0) gets mean ``W @ (sum of the biases before it)`` whatever the films; its
variance still moves. Such a mean may come back equal to the trained value to the last bits, or
differ by rounding only, depending on the thread count's reduction order (issue 30).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pneumo.nets.models import XrayNet

BN_ADAPT_BATCH_SIZE = 8  # images per batch: what training uses (TrainConfig.bn_adapt_batch_size, measured)


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(
    model: XrayNet,
    pixels: np.ndarray,
    device: torch.device,
    batch_size: int = BN_ADAPT_BATCH_SIZE,
    progress: bool = True,
) -> None:
    """Re-estimate the body's BatchNorm running statistics on ``pixels`` (uint8 ``(N, H, W)``).

    Cumulative averages (momentum None) weight every batch alike, so one pass is enough. The head
    is left alone (see the module's docstring); the body is left in eval mode.
    """
    layers = batchnorm_layers(model.body)
    saved = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    model.body.train()
    for i in tqdm(
        range(0, len(pixels), batch_size), desc="adapting BatchNorm", unit="batch", disable=not progress, leave=False
    ):
        x = torch.from_numpy(np.ascontiguousarray(pixels[i : i + batch_size])).unsqueeze(1).to(device)
        model.body(model.normalize(x).contiguous(memory_format=torch.channels_last))
    for bn, momentum in zip(layers, saved):
        bn.momentum = momentum
    model.body.eval()
