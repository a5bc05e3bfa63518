"""Which engine runs a model: PyTorch on the model folder, or onnxruntime on its ONNX export.

``predict``, ``evaluate``, ``serve`` and the archive engines take ``--runtime``; every runtime reads
pixels made by the same ``data.imaging.prepare``. The ONNX route imports neither torch nor the
network, so a deployment without torch serves (README: "Serving without PyTorch").

``auto`` (the default) reads through onnxruntime when that is the same model, faster: the folder
holds ``model.onnx`` whose sidecar names this folder's weights and decision rule (the model's
fingerprint: an export left behind by retraining or adapting is stale), whose parity record
passed, whose graph gives the body features the scope check measures, and onnxruntime imports.
Otherwise, and whenever the work needs the network (``--tta``, ``--adapt``, Grad-CAM) or a device
other than the CPU was asked for, it is PyTorch. Deciding never imports torch (asking torch about
CUDA would load it on the torch-free route): pneumo's reading commands run PyTorch on the CPU
unless a ``device`` is passed (the Ray engine on a cluster with GPUs), and that is the only device
rule. ``resolve_runtime`` says which, and why, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pneumo.errors import ModelError, PneumoError

RUNTIMES = ("torch", "onnx")
CHOICES = ("auto", *RUNTIMES)  # what --runtime takes


def runtime_of(model: Any) -> str:
    """The runtime a loaded model runs on (``OnnxModel.runtime``; ``LoadedModel`` has none: torch)."""
    return getattr(model, "runtime", "torch")


def resolve_runtime(
    model: str | Path | Any,
    runtime: str = "auto",
    tta: bool = False,
    device: str | None = None,
    needs_network: str | None = None,
) -> tuple[str, str]:
    """``(runtime, reason)``: the runtime ``runtime`` means for ``model`` and one line saying why.

    ``needs_network`` names work only PyTorch can do ("--adapt"): auto then picks torch.
    """
    if runtime not in CHOICES:
        raise PneumoError(f"unknown runtime {runtime!r}: choose one of {', '.join(CHOICES)}")
    if runtime == "onnx" and needs_network:
        raise PneumoError(f"{needs_network} needs the network: use --runtime torch or auto")
    if runtime in RUNTIMES:
        return runtime, f"--runtime {runtime} asked for"
    if not isinstance(model, (str, Path)):
        return runtime_of(model), "the model was given loaded"
    if Path(model).suffix == ".onnx" and Path(model).is_file():
        return "onnx", "an .onnx file was given"
    if tta:
        return "torch", "--tta needs the network (the ONNX graph reads each film once)"
    if needs_network:
        return "torch", f"{needs_network} needs the network"
    if device is not None and str(device) != "cpu":
        return "torch", f"the model runs on {device}; onnxruntime runs here on the CPU"
    from pneumo.infer.onnx import export_unusable

    why_not = export_unusable(model)
    if why_not:
        return "torch", why_not
    return "onnx", "the model folder's ONNX export is this model's, parity-checked against PyTorch"


def open_chosen(
    model: str | Path | Any,
    runtime: str = "auto",
    threads: int | None = None,
    tta: bool = False,
    device: str | None = None,
    needs_network: str | None = None,
) -> tuple[Any, str, str]:
    """``(model, runtime, reason)``: the model opened on the runtime ``resolve_runtime`` chose. An
    auto choice of onnx whose graph then fails to load (its file changed since its export) falls back
    to PyTorch, and the reason says so."""
    chosen, reason = resolve_runtime(model, runtime, tta, device, needs_network)
    if not isinstance(model, (str, Path)):
        return model, chosen, reason
    if chosen == "onnx" and runtime == "auto":
        try:
            return open_model(model, "onnx", threads), chosen, reason
        except ModelError as exc:
            return open_model(model, "torch"), "torch", f"the ONNX export could not be used ({exc})"
    return open_model(model, chosen, threads), chosen, reason


def open_model(model: str | Path | Any, runtime: str = "torch", threads: int | None = None) -> Any:
    """A model ready to predict: ``LoadedModel`` (torch) or ``OnnxModel`` (onnx); ``auto`` as
    ``open_chosen`` decides; a loaded one as it is."""
    if not isinstance(model, (str, Path)):
        return model
    if runtime == "auto":
        return open_chosen(model, runtime, threads)[0]
    if runtime == "onnx":
        from pneumo.infer.onnx import load_onnx_model

        return load_onnx_model(model, threads=threads)
    if runtime != "torch":
        raise PneumoError(f"unknown runtime {runtime!r}: choose one of {', '.join(CHOICES)}")
    from pneumo.infer.model_folder import load_model

    return load_model(model)
