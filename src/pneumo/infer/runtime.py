"""Which engine runs a model: PyTorch on the model folder, or onnxruntime on its ONNX export.

``predict`` and ``serve`` take ``--runtime``; both runtimes read pixels made by the same
``data.imaging.prepare``. The ONNX route imports neither torch nor the network, so a deployment
without torch serves (README: "Serving without PyTorch").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pneumo.errors import PneumoError

RUNTIMES = ("torch", "onnx")


def open_model(model: str | Path | Any, runtime: str = "torch", threads: int | None = None) -> Any:
    """A model ready to predict: ``LoadedModel`` (torch) or ``OnnxModel`` (onnx); a loaded one as it is."""
    if not isinstance(model, (str, Path)):
        return model
    if runtime == "onnx":
        from pneumo.infer.onnx import load_onnx_model

        return load_onnx_model(model, threads=threads)
    if runtime != "torch":
        raise PneumoError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    from pneumo.infer.model_folder import load_model

    return load_model(model)
