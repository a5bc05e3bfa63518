"""A trained model is a folder: ``model.safetensors`` and ``model.json``. Nothing is pickled.

``model.json`` carries what inference needs (classes, image size, backbone, decision threshold,
temperature), so a fresh CPU-only process loads the folder alone, wherever it was trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pneumo.data.imaging import open_image, prepare
from pneumo.decision import describe_reading, describe_rule
from pneumo.errors import ModelError, PneumoError
from pneumo.io_utils import atomic_write
from pneumo.model_meta import ModelMeta, model_folder, read_model_meta, write_model_meta  # model_folder: torch-free
from pneumo.nets.models import XrayNet, get_backbone

__all__ = [
    "EnsembleModel",
    "LoadedModel",
    "ModelMeta",
    "Prediction",
    "as_image",
    "load_model",
    "model_folder",
    "save_model",
]


def save_model(model: XrayNet, meta: ModelMeta, folder: str | Path) -> Path:
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    meta.normalisation = {"mean": float(model.mean.item()), "std": float(model.std.item()), "input": "grey, [0, 1]"}
    write_model_meta(folder / "model.json", meta)
    return folder


class LoadedModel:
    """A model ready for inference: ``probabilities`` of prepared arrays, ``predict`` of one image (files
    and folders: ``infer.predict.predict_files``)."""

    def __init__(self, net: XrayNet, meta: ModelMeta, device: torch.device):
        self.net, self.meta, self.device = net, meta, device
        self.classes = meta.classes
        self.positive = meta.positive_index  # None: the model decides by argmax
        self.threshold = meta.operating_threshold  # on p(positive); None with argmax
        self.folder: Path | None = None  # where it was loaded from (infer.scope reads its statistics there)

    def logits(self, pixels: np.ndarray | torch.Tensor, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        """Raw logits for uint8 ``(N, H, W)`` pixels (already the model's size)."""
        return self.logits_and_features(pixels, batch_size, tta)[0]

    @torch.inference_mode()
    def logits_and_features(
        self, pixels: np.ndarray | torch.Tensor, batch_size: int = 32, tta: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and, from the same pass, the body's average-pooled features of the films as given, one
        array per network (what ``infer.scope`` measures): predicting and checking scope cost one pass."""
        x = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        out, features = [], []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].unsqueeze(1).to(self.device)
            pooled = self.net.features(xb)  # [max, mean]: the head reads both, scope the mean
            z = self.net.head(pooled).float()
            if tta:
                z = (z + self.net(xb.flip(-1)).float()) / 2
            out.append(z.cpu())
            features.append(pooled[:, pooled.shape[1] // 2 :].float().cpu())
        if not out:
            return np.zeros((0, len(self.classes)), np.float32), [np.zeros((0, 0), np.float32)]
        return torch.cat(out).numpy(), [torch.cat(features).numpy()]

    def probabilities(self, pixels: np.ndarray, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        return self.probabilities_and_features(pixels, batch_size, tta)[0]

    def probabilities_and_features(
        self, pixels: np.ndarray, batch_size: int = 32, tta: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Calibrated probabilities, and the features ``logits_and_features`` computed with them."""
        z, features = self.logits_and_features(pixels, batch_size, tta)
        return (torch.from_numpy(z) / self.meta.temperature).softmax(dim=1).numpy(), features

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: ``ModelMeta.decide``, the one decision rule."""
        return self.meta.decide(probs)

    def predict(self, image: str | Path | Image.Image | np.ndarray, tta: bool = False) -> Prediction:
        """One image (a file, a PIL image or a grey/RGB array of any size) -> its ``Prediction``:
        the label, p(positive class) against the threshold, in numbers and in words."""
        probs = self.probabilities(prepare(as_image(image), self.meta.image_size)[None], tta=tta)[0]
        label = self.classes[int(self.decide(probs[None])[0])]
        pos = self.positive
        return Prediction(
            label=label,
            positive_class=None if pos is None else self.classes[pos],
            p_positive=None if pos is None else float(probs[pos]),
            threshold=self.threshold,
            reading=describe_reading(probs, self.classes, pos, self.threshold),
            probabilities={c: float(p) for c, p in zip(self.classes, probs)},
        )

    def __repr__(self) -> str:
        rule = describe_rule(self.classes, self.positive, self.threshold)
        return f"<{type(self).__name__} {self.meta.arch}, {self.meta.image_size} px, {rule}>"


class Prediction(dict):
    """``LoadedModel.predict``'s answer: a dict that prints as one line."""

    def __repr__(self) -> str:
        return f"Prediction({self['label']}: {self['reading']})"


def as_image(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """A PIL image from a path, a PIL image or an array: uint8/uint16 grey (H, W), RGB (H, W, 3), or
    floats in [0, 1]."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise PneumoError(f"an image array must be (H, W) or (H, W, 3), not {arr.shape}")
        arr = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
        if arr.dtype.kind == "f":
            arr = np.clip(np.nan_to_num(arr) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0) + 0.5, 0, 255)
            arr = arr.astype(np.uint8)
        elif arr.dtype == np.uint16 and arr.ndim == 2:
            return Image.fromarray(arr, mode="I;16")
        elif arr.dtype != np.uint8:
            raise PneumoError(f"an image array must be uint8, uint16 or float, not {arr.dtype}")
        return Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)
    return open_image(image)


class EnsembleModel(LoadedModel):
    """Several models as one (``pneumo ensemble``): the mean of their calibrated probabilities.

    ``logits`` returns the log of that mean, so with temperature 1 everything built on
    ``LoadedModel`` (probabilities, decisions, predict, evaluate, serve) works unchanged.
    """

    def __init__(self, members: list[LoadedModel], meta: ModelMeta, device: torch.device):
        super().__init__(members[0].net, meta, device)
        self.members = members

    def logits_and_features(
        self, pixels: np.ndarray | torch.Tensor, batch_size: int = 32, tta: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The log of the members' mean probabilities, and each member's features."""
        parts = [m.probabilities_and_features(pixels, batch_size, tta) for m in self.members]
        mean = np.mean([probs for probs, _ in parts], axis=0)
        return np.log(np.clip(mean, 1e-12, None)).astype(np.float32), [f for _, fs in parts for f in fs]


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
