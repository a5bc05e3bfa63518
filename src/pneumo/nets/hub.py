"""Whether ImageNet weights from the hub can be had here, asked before any data is read.

Torch-free, so ``pneumo train --arch resnet50`` on an offline machine answers with advice in about
two seconds (one bounded connection attempt) instead of a minute of the hub client's retries after
the data has been decoded.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from pneumo.errors import WeightsError
from pneumo.nets.registry import Backbone, get_backbone

HUB_PROBE = ("huggingface.co", 443)  # where timm downloads ImageNet weights from
PROBE_SECONDS = 2.0


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """One connection attempt to the hub, name lookup included, bounded by ``timeout`` seconds.

    Asked once before a download, so that an offline machine fails in seconds with advice instead of
    spending a minute on the hub client's retries. The lookup runs in a daemon thread because
    ``getaddrinfo`` ignores socket timeouts."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(HUB_PROBE, timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def hub_cached(backbone: Backbone) -> bool:
    """True when the hub's cache already holds a download of this backbone (usable offline)."""
    cache = (
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    return any(Path(cache).glob(f"models--timm--{backbone.timm_name}*"))


def check_weights_available(arch: str, pretrained: str, weights: str | Path | None) -> None:
    """Before any data is read: a backbone whose ImageNet weights come from the hub fails at once,
    with advice, when they are neither cached nor downloadable (offline)."""
    backbone = get_backbone(arch)
    if pretrained != "none" and weights is None and backbone.weights == "hub":
        check_hub(backbone)


def check_hub(backbone: Backbone) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("PNEUMO_OFFLINE") == "1"
    hint = (
        f"ImageNet weights for {backbone.name} are not on this machine and could not be downloaded. "
        f"Get them where you have internet (torchvision's '{backbone.timm_name}' ImageNet checkpoint, "
        f"or timm's '{backbone.timm_name}.a1_in1k' model.safetensors) and pass --weights FILE, "
        f"or train from scratch with --pretrained none."
    )
    if offline and not hub_cached(backbone):
        raise WeightsError(hint + " (offline mode is set: HF_HUB_OFFLINE or PNEUMO_OFFLINE)")
    if not offline and not hub_cached(backbone) and not hub_reachable():
        raise WeightsError(
            f"{hint} (offline: {HUB_PROBE[0]}:{HUB_PROBE[1]} did not answer within {PROBE_SECONDS:.0f} s; "
            "set PNEUMO_OFFLINE=1 to skip this check)"
        )
    return hint
