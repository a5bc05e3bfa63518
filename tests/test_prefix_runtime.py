"""The features pass's runtime: onnxruntime on a CPU when it agrees with PyTorch, PyTorch otherwise, and why."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pneumo.extras import available
from pneumo.nets.models import create_model
from pneumo.training import prefix_runtime
from pneumo.training.features import extract_features, fold_batchnorm
from pneumo.training.prefix_runtime import frozen_prefix

needs_onnx = pytest.mark.skipif(not available("onnx", "onnxruntime"), reason="the onnx extra is not installed")
CPU = torch.device("cpu")
STAGES = 2  # the default trainable_stages: the prefix ends with a feature map


@pytest.fixture(scope="module")
def folded():
    model = create_model("efficientnet_lite0", 2, "imagenet").to(memory_format=torch.channels_last)
    return fold_batchnorm(model)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (12, 64, 64), dtype=np.uint8)


def first_batch(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels[:8]).unsqueeze(1)


@pytest.fixture(scope="module")
def onnx_prefix(folded, pixels):
    return frozen_prefix(folded, STAGES, CPU, first_batch(pixels))


@needs_onnx
def test_on_a_cpu_onnxruntime_runs_the_prefix_after_a_recorded_parity_check(onnx_prefix):
    record = onnx_prefix.record
    assert onnx_prefix.runtime == record["runtime"] == "onnxruntime"
    assert 0 <= record["max_abs_diff"] <= record["tolerance"] < 0.01
    assert record["parity_images"] == 8 and set(record["first_batch_s"]) == {"torch", "onnxruntime"}


@needs_onnx
def test_onnx_features_match_torch_features_on_augmented_views(folded, pixels, onnx_prefix):
    """Other images than the checked batch, augmented (floats), in half precision as training stores them."""

    def features(prefix):
        gen = torch.Generator().manual_seed(5)
        return extract_features(
            folded, pixels, CPU, batch_size=4, generator=gen, progress=False, trainable_stages=STAGES, prefix=prefix
        )

    torch_maps, onnx_maps = features(None), features(onnx_prefix.run)
    assert onnx_maps.shape == torch_maps.shape and onnx_maps.dtype == torch_maps.dtype == torch.float16
    assert onnx_maps.is_contiguous(memory_format=torch.channels_last)
    scale = torch_maps.float().abs().max().item()
    assert (onnx_maps.float() - torch_maps.float()).abs().max().item() <= 2e-3 * scale  # float16's own step


def test_without_the_onnx_extra_torch_runs_and_says_why(folded, pixels, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    prefix = frozen_prefix(folded, STAGES, CPU, first_batch(pixels))
    assert prefix.runtime == prefix.record["runtime"] == "torch"
    assert "pip install 'pneumo[onnx]'" in prefix.record["reason"]
    x = first_batch(pixels)
    with torch.inference_mode():
        assert torch.equal(prefix.run(x), folded.features_before(x.float().div(255), STAGES))


def test_on_a_gpu_torch_runs_the_prefix(folded, pixels):
    prefix = frozen_prefix(folded, STAGES, torch.device("cuda"), first_batch(pixels))
    assert prefix.runtime == "torch" and "cuda" in prefix.record["reason"]


@needs_onnx
def test_a_failed_parity_check_falls_back_to_torch_with_the_difference(folded, pixels, monkeypatch):
    monkeypatch.setattr(prefix_runtime, "PARITY_RTOL", -1.0)  # no difference can pass
    prefix = frozen_prefix(folded, STAGES, CPU, first_batch(pixels))
    assert prefix.runtime == "torch"
    assert prefix.record["reason"].startswith("onnxruntime differs from PyTorch by")
    assert prefix.record["max_abs_diff"] >= 0


def test_a_failed_export_falls_back_to_torch_with_the_error(folded, pixels, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    prefix = frozen_prefix(folded, STAGES, CPU, first_batch(pixels))
    assert prefix.runtime == "torch"
    if available("onnx", "onnxruntime"):
        assert "export of the prefix failed (RuntimeError: unsupported operator)" in prefix.record["reason"]
