"""The frozen prefix of the body on the fastest runtime the device has, checked against PyTorch first.

The features pass runs the BatchNorm-adapted, frozen part of the body once per image and view: most
of what a CPU run spends before its first epoch. On a CPU, onnxruntime on an export of that prefix
(BatchNorm folded) ran it several times faster than PyTorch eager, and ``torch.jit.freeze`` with
oneDNN ran it slower (``bench/prefix_runtimes.py``, figures in bench/README.md). So on a CPU the
prefix is exported in memory (no file is written), onnxruntime's output on the first batch is
compared with PyTorch's, and onnxruntime runs the pass only when they agree within
``PARITY_RTOL`` of the largest activation. Anything else runs PyTorch, and says why in the record:
a GPU (PyTorch runs the prefix there), the optional extra ``onnx`` missing, an export or session
that fails, a parity check that fails.

The choice does not depend on a timing taken during the run: two runs of one config pick the same
runtime, so they compute the same features. Both runtimes' seconds on the first batch are recorded
beside the choice, as a check of the measurement on the machine that ran.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pneumo.errors import PneumoError
from pneumo.extras import require
from pneumo.nets.models import XrayNet

PARITY_RTOL = 1e-4  # max |onnx - torch| over max |torch|: what tests/test_models.py asks of BatchNorm folding
OPSET = 18  # as infer.onnx.OPSET: onnxruntime >= 1.14 runs it
Features = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Prefix:
    """What the features pass calls on each batch ``(N, 1, S, S)`` (uint8, or floats in [0, 1]), and
    the record of how it was chosen (``RUN/features_runtime.json``)."""

    runtime: str  # "onnxruntime" or "torch"
    run: Features
    record: dict[str, Any] = field(default_factory=dict)


def as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as floats in [0, 1], as ``XrayNet.normalize`` makes them; floats as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def torch_prefix(folded: XrayNet, trainable_stages: int) -> Features:
    """PyTorch eager on a BatchNorm-folded copy, channels-last (what the features pass always ran)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return folded.features_before(x.contiguous(memory_format=torch.channels_last), trainable_stages)

    return run


class _PrefixGraph(torch.nn.Module):
    """The graph that is exported: floats in [0, 1] ``(N, 1, S, S)`` -> ``features_before``."""

    def __init__(self, model: XrayNet, trainable_stages: int):
        super().__init__()
        self.model, self.trainable_stages = model, trainable_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features_before(x, self.trainable_stages)


def onnx_prefix(folded: XrayNet, trainable_stages: int, example: torch.Tensor) -> tuple[Features, str]:
    """onnxruntime on an in-memory export of the folded prefix; PneumoError when it cannot be had.

    The TorchScript exporter (``dynamo=False``) is used: it exported the prefix of efficientnet_lite0
    in a fifth of the dynamo exporter's time, and this export happens in every run that computes
    features. The session gets PyTorch's thread count (``--nproc`` ranks share the cores alike).
    """
    ort = require("onnx", "onnx", "onnxruntime", what="the onnxruntime features pass")
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # chosen for its speed; a removal falls back
            torch.onnx.export(
                _PrefixGraph(folded, trainable_stages).eval(),
                (as_unit_float(example),),
                buffer,
                input_names=["x"],
                output_names=["features"],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - exporter and onnxruntime raise many kinds; all mean "not here"
        raise PneumoError(f"the ONNX export of the prefix failed ({type(exc).__name__}: {str(exc)[:200]})") from None

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {"x": as_unit_float(x).contiguous().numpy()})
        out = torch.from_numpy(out)
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out  # as torch's

    return run, f"onnxruntime {ort.__version__}"


@torch.inference_mode()
def _timed(fn: Features, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - start, out


def frozen_prefix(
    folded: XrayNet, trainable_stages: int, device: torch.device, first_batch: torch.Tensor, runtime: str = "auto"
) -> Prefix:
    """The runtime the features pass uses for ``folded`` (a BatchNorm-folded, eval-mode copy).

    ``first_batch``: the first batch of the pass, as it will be given. ``runtime`` "torch" skips the
    export (the record says it was asked for). The record: runtime, max_abs_diff (None when no
    comparison ran), tolerance, reason, and both runtimes' seconds on the first batch.
    """
    torch_run = torch_prefix(folded, trainable_stages)

    def fallback(reason: str, **extra: Any) -> Prefix:
        record = {"runtime": "torch", "max_abs_diff": None, "reason": reason, **extra}
        return Prefix("torch", torch_run, record)

    if runtime == "torch":
        return fallback("asked for")
    if device.type != "cpu":
        return fallback(f"the device is {device.type}: PyTorch runs the prefix there")
    first_batch = first_batch.to(device)
    start = time.perf_counter()
    try:
        onnx_run, version = onnx_prefix(folded, trainable_stages, first_batch)
    except PneumoError as exc:
        return fallback(str(exc))
    export_s = time.perf_counter() - start
    onnx_run(first_batch)  # warm-up: the first run of a session allocates
    torch_s, expected = _timed(torch_run, first_batch)
    onnx_s, got = _timed(onnx_run, first_batch)
    diff = float((got.double() - expected.double()).abs().max())
    scale = max(float(expected.abs().max()), 1.0)
    tolerance = PARITY_RTOL * scale
    facts = {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "parity_images": len(first_batch),
        "export_s": round(export_s, 3),
        "first_batch_s": {"torch": round(torch_s, 4), "onnxruntime": round(onnx_s, 4)},
        "onnxruntime": version,
    }
    if not diff <= tolerance:  # NaN fails too
        return fallback(
            f"onnxruntime differs from PyTorch by {diff:.3g} on the first batch (> {tolerance:.3g})", **facts
        )
    reason = "CPU: onnxruntime ran the prefix fastest (bench/prefix_runtimes.py) and agrees with PyTorch"
    return Prefix("onnxruntime", onnx_run, {"runtime": "onnxruntime", **facts, "reason": reason})
