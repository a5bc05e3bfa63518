"""A trained model is a folder: ``model.safetensors`` and ``model.json``. Nothing is pickled.

``model.json`` carries what inference needs (classes, image size, backbone, decision threshold,
temperature), so a fresh CPU-only process loads the folder alone, wherever it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pneumo.data.cache import decode_images
from pneumo.errors import ModelError, PneumoError
from pneumo.io_utils import atomic_write
from pneumo.model_meta import ModelMeta, model_folder, read_model_meta, write_model_meta  # model_folder: torch-free
from pneumo.nets.models import XrayNet, get_backbone

__all__ = ["EnsembleModel", "LoadedModel", "ModelMeta", "load_model", "model_folder", "save_model"]


def save_model(model: XrayNet, meta: ModelMeta, folder: str | Path) -> Path:
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    meta.normalisation = {"mean": float(model.mean.item()), "std": float(model.std.item()), "input": "grey, [0, 1]"}
    write_model_meta(folder / "model.json", meta)
    return folder


class LoadedModel:
    """A model ready for inference: ``predict_pixels`` for prepared arrays, ``predict_paths`` for files."""

    def __init__(self, net: XrayNet, meta: ModelMeta, device: torch.device):
        self.net, self.meta, self.device = net, meta, device
        self.classes = meta.classes
        self.positive = meta.positive_index  # None: the model decides by argmax
        self.threshold = meta.operating_threshold  # on p(positive); None with argmax
        self.folder: Path | None = None  # where it was loaded from (infer.scope reads its statistics there)

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        """Raw logits for uint8 ``(N, H, W)`` pixels (already the model's size)."""
        x = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].unsqueeze(1).to(self.device)
            z = self.net(xb).float()
            if tta:
                z = (z + self.net(xb.flip(-1)).float()) / 2
            out.append(z.cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, pixels: np.ndarray, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        z = torch.from_numpy(self.logits(pixels, batch_size, tta)) / self.meta.temperature
        return z.softmax(dim=1).numpy()

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: ``ModelMeta.decide``, the one decision rule."""
        return self.meta.decide(probs)

    def predict_paths(
        self, paths: Sequence[str | Path], progress: bool = True, tta: bool = False
    ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """(probs, ok, errors) for image files; unreadable files are reported, not fatal."""
        decoded = decode_images([Path(p) for p in paths], self.meta.image_size, progress=progress, use_cache=False)
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        if decoded.ok.any():
            probs[decoded.ok] = self.probabilities(np.asarray(decoded.pixels)[decoded.ok], tta=tta)
        return probs, decoded.ok, decoded.errors


class EnsembleModel(LoadedModel):
    """Several models as one (``pneumo ensemble``): the mean of their calibrated probabilities.

    ``logits`` returns the log of that mean, so with temperature 1 everything built on
    ``LoadedModel`` (probabilities, decisions, predict, evaluate, serve) works unchanged.
    """

    def __init__(self, members: list[LoadedModel], meta: ModelMeta, device: torch.device):
        super().__init__(members[0].net, meta, device)
        self.members = members

    def logits(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        mean = np.mean([m.probabilities(pixels, batch_size, tta) for m in self.members], axis=0)
        return np.log(np.clip(mean, 1e-12, None)).astype(np.float32)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model folder written by ``save_model`` (or a run folder holding ``model/``)."""
    folder = model_folder(folder)
    meta_file, weights_file = folder / "model.json", folder / "model.safetensors"
    if meta_file.is_file() and not weights_file.exists():  # an ensemble: members, no weights of its own
        meta = read_model_meta(meta_file)
        if meta.members:
            inside = [(folder / m).resolve() for m in meta.members]
            if not all(m.is_relative_to(folder.resolve()) for m in inside):
                raise ModelError(f"{meta_file}: ensemble members must lie inside {folder}")
            members = [load_model(m, device) for m in inside]
            ensemble = EnsembleModel(members, meta, torch.device(device))
            ensemble.folder = folder
            return ensemble
    for f in (meta_file, weights_file):
        if not f.is_file():
            raise ModelError(
                f"{f}: missing; a model folder holds model.json and model.safetensors "
                f"(written by `pneumo train` under RUN/model)"
            )
    meta = read_model_meta(meta_file)
    try:
        backbone = get_backbone(meta.arch)
    except PneumoError as exc:
        raise ModelError(f"{meta_file}: field 'arch': {exc}") from None
    net = XrayNet(backbone, len(meta.classes), meta.hidden, meta.dropout)
    try:
        state = load_file(str(weights_file))
        expected = net.state_dict()
        missing = [k for k in expected if k not in state]
        if missing or len(state) != len(expected):
            raise ModelError(  # another backbone's weights, or model.json's arch edited
                f"{len(missing)} of the {len(expected)} tensors {meta.arch} needs are missing (such as "
                f"{missing[0] if missing else 'none'}) and {len(set(state) - set(expected))} are foreign"
            )
        net.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - truncated, empty or foreign files: all unusable weights
        why = " ".join(str(exc).split())[:200]  # one line: the CLI prints it as one
        raise ModelError(f"{weights_file}: not usable weights for {meta.arch} ({type(exc).__name__}: {why})") from None
    device = torch.device(device)
    loaded = LoadedModel(net.to(device).eval(), meta, device)
    loaded.folder = folder
    return loaded
