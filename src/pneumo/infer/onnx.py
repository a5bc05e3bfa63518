"""ONNX: a model folder's portable format, checked against PyTorch when it is written.

The exported graph holds everything after pneumo's resize: it takes the uint8 grey films a model
reads, ``pixels`` of shape ``(N, S, S)`` with ``S`` the model's image size (any ``N``), and returns
calibrated probabilities ``(N, classes)``: normalisation, the network, the temperature and the softmax
are inside, and an ensemble is one graph that averages its members as ``EnsembleModel`` does. The
resize stays outside (``data.imaging.prepare``, PIL bilinear) because it is what both runtimes must
share byte for byte; the decision threshold stays outside too, in a sidecar beside the graph
(``OUT.meta.json``: classes, positive class, threshold, image size, opset, the source model's
fingerprint), so that an ONNX consumer needs nothing else and pneumo decides with ``ModelMeta.decide``.

Export uses PyTorch's dynamo exporter (``torch.export`` then onnxscript) at opset ``OPSET``; a graph
is written only after onnxruntime agreed with PyTorch on the bundled sample (``OUT.parity.json``).

``OnnxModel`` runs such a graph with onnxruntime and offers what predict and serve use of
``LoadedModel``. This module imports neither torch nor the network at module level: the
``--runtime onnx`` route never loads torch (``export_onnx`` imports it when called).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.data.cache import decode_images
from pneumo.data.folders import is_image_file
from pneumo.errors import ModelError, PneumoError
from pneumo.extras import require
from pneumo.infer.model_card import model_fingerprint, write_model_card
from pneumo.io_utils import atomic_write, atomic_write_json
from pneumo.model_meta import ModelMeta
from pneumo.version import __version__

FEATURES = "features_{}"  # one output per network: its body's average-pooled features (infer.scope)
OPSET = 18  # the dynamo exporter's own opset: onnxruntime >= 1.14 runs it
INPUT, OUTPUT = "pixels", "probabilities"
FORMAT = "pneumo-onnx/1"
PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch|; float32 reorderings give ~1e-7
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data" / "chest_xray"
DEFAULT_NAME = "model.onnx"  # where `pneumo export MODEL` writes, inside the model folder
META_FIELDS = ("arch", "classes", "image_size", "threshold", "positive_class", "temperature", "threshold_method")


def sidecar_path(onnx_file: str | Path) -> Path:
    return Path(onnx_file).with_suffix(".meta.json")


def parity_path(onnx_file: str | Path) -> Path:
    return Path(onnx_file).with_suffix(".parity.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ export
def _networks(loaded: Any) -> list[Any]:
    """The single networks inside ``loaded`` in the order ``EnsembleModel`` lists their features."""
    members = getattr(loaded, "members", None)
    return [n for m in members for n in _networks(m)] if members else [loaded]


def _scoped_module(loaded: Any) -> Any:
    """The torch module the graph is traced from: ``loaded.probabilities`` as one forward pass, with one
    more output per network, its body's average-pooled features (``LoadedModel.logits_and_features``),
    so that the onnx runtime measures the scope check's feature distance as PyTorch does."""
    import torch

    from pneumo.infer.model_folder import EnsembleModel

    class Single(torch.nn.Module):
        def __init__(self, net: torch.nn.Module, temperature: float):
            super().__init__()
            self.net, self.temperature = net, float(temperature)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            pooled = self.net.features(x)  # [max, mean]: the head reads both, scope the mean
            probs = (self.net.head(pooled).float() / self.temperature).softmax(dim=1)
            return probs, [pooled[:, pooled.shape[1] // 2 :].float()]

    class Mean(torch.nn.Module):
        def __init__(self, members: list[torch.nn.Module], temperature: float):
            super().__init__()
            self.members, self.temperature = torch.nn.ModuleList(members), float(temperature)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            parts = [m(x) for m in self.members]
            mean = torch.stack([p for p, _ in parts]).mean(dim=0)
            features = [f for _, fs in parts for f in fs]
            if self.temperature == 1.0:
                return mean, features
            return (mean.clamp_min(1e-12).log() / self.temperature).softmax(dim=1), features

    def build(model: Any) -> torch.nn.Module:
        if isinstance(model, EnsembleModel):
            return Mean([build(m) for m in model.members], model.meta.temperature)
        return Single(model.net, model.meta.temperature)

    class Graph(torch.nn.Module):
        def __init__(self, body: torch.nn.Module):
            super().__init__()
            self.body = body

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:  # uint8 (N, S, S)
            probs, features = self.body(pixels.unsqueeze(1))
            return (probs, *features)

    return Graph(build(loaded)).eval()


def scope_outputs(loaded: Any, out: Path) -> dict[str, Any]:
    """The sidecar's ``scope`` entry: the feature outputs' names and, relative to the graph's folder,
    the folder of each network's scope statistics (``infer.scope``), and whether it is an ensemble."""
    nets = _networks(loaded)
    folders = [os.path.relpath(Path(n.folder).resolve(), out.parent.resolve()) for n in nets]
    return {
        "outputs": [FEATURES.format(i) for i in range(len(nets))],
        "folders": [Path(f).as_posix() for f in folders],
        "ensemble": bool(getattr(loaded, "members", None)),
    }


def parity_images(folder: str | Path | None = None) -> list[Path]:
    """The films the export is checked on: the bundled sample by default (260 real Kaggle films)."""
    root = Path(folder) if folder is not None else SAMPLE_DATA
    files = sorted(f for f in root.rglob("*") if is_image_file(f)) if root.is_dir() else []
    if not files:
        raise PneumoError(f"{root}: no images to check the export on")
    return files


def check_parity(loaded: Any, session: Any, pixels: np.ndarray, batch_size: int = 32) -> dict[str, Any]:
    """PyTorch's and onnxruntime's probabilities and decisions on the same pixels."""
    torch_probs = loaded.probabilities(pixels, batch_size=batch_size)
    onnx_probs = _run(session, pixels, batch_size, len(loaded.classes))
    diff = np.abs(onnx_probs.astype(np.float64) - torch_probs.astype(np.float64))
    same = loaded.decide(torch_probs) == loaded.meta.decide(onnx_probs)
    max_diff = float(diff.max()) if diff.size else 0.0
    return {
        "images": int(len(pixels)),
        "max_abs_diff": max_diff,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "decisions_identical": bool(same.all()),
        "decisions_differing": int((~same).sum()),
        "tolerance": PARITY_TOLERANCE,
        "passed": bool(same.all() and max_diff <= PARITY_TOLERANCE),
    }


def export_onnx(
    model: str | Path,
    out: str | Path | None = None,
    opset: int = OPSET,
    check_on: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out`` (default ``MODEL_FOLDER/model.onnx``), its sidecar, its parity record and a
    model card beside it; return what was written and the parity figures.

    Nothing is written unless onnxruntime's probabilities on ``check_on`` (default: the bundled
    sample) lie within ``PARITY_TOLERANCE`` of PyTorch's and every decision is the same.
    """
    onnx = require("onnx", "onnxscript", "onnx", what="pneumo export")  # (the last one named is returned)
    ort = require("onnx", "onnxruntime", what="pneumo export")
    import torch

    from pneumo.infer.model_folder import load_model, model_folder

    folder = model_folder(model)
    loaded = load_model(folder)
    out = Path(out) if out is not None else folder / DEFAULT_NAME
    if out.suffix != ".onnx":
        raise PneumoError(f"{out}: the exported file must end in .onnx")
    size = loaded.meta.image_size
    graph = _scoped_module(loaded)
    scope = scope_outputs(loaded, out)
    example = torch.zeros((2, size, size), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # the exporter prints
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=[INPUT],
                output_names=[OUTPUT, *scope["outputs"]],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
                external_data=False,
                artifacts_dir=tmp,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; all mean "not exportable"
            raise ModelError(f"{folder}: the ONNX export failed ({type(exc).__name__}: {str(exc)[:300]})") from None
    proto = program.model_proto
    source = model_fingerprint(folder)
    meta = loaded.meta
    for key, value in {"pneumo_format": FORMAT, "pneumo_source_sha256": source, "pneumo_version": __version__}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    payload = proto.SerializeToString()
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])

    images = parity_images(check_on)
    decoded = decode_images(images, size, progress=progress, use_cache=False)
    parity = check_parity(loaded, session, np.asarray(decoded.pixels)[decoded.ok])
    parity.update(data=str(Path(check_on) if check_on else "bundled sample (pneumo/sample_data)"))
    parity["unreadable"] = int((~decoded.ok).sum())
    if not parity["passed"]:
        raise ModelError(
            f"{folder}: the ONNX graph disagrees with PyTorch (max |diff| {parity['max_abs_diff']:.2e}, "
            f"{parity['decisions_differing']} of {parity['images']} decisions differ): nothing written"
        )
    atomic_write(out, lambda tmp: tmp.write_bytes(payload))
    sidecar = {
        "format": FORMAT,
        "onnx": out.name,
        "sha256": file_sha256(out),
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}, onnx {onnx.__version__}",
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["N", size, size],
            "meaning": "grey films resized to image_size x image_size by pneumo.data.imaging.prepare "
            "(PIL bilinear, reducing_gap=3; aspect ratio not kept)",
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["N", len(meta.classes)],
            "meaning": "calibrated probabilities in the order of classes (temperature applied inside)",
        },
        "decision": "positive_class when p(positive_class) >= threshold; argmax when positive_class is null",
        **{name: getattr(meta, name) for name in META_FIELDS},
        "source_model_sha256": source,
        "pneumo_version": __version__,
        "scope": scope,
    }
    atomic_write_json(sidecar_path(out), sidecar)
    record = {"onnx": str(out), "opset": opset, **parity, "onnxruntime": ort.__version__, "torch": torch.__version__}
    record["machine"] = platform.machine()
    atomic_write_json(parity_path(out), record)
    card = write_model_card(folder, out=out.parent / "MODEL_CARD.md", onnx=sidecar, parity=parity)
    return {
        "onnx": str(out),
        "sidecar": str(sidecar_path(out)),
        "parity_file": str(parity_path(out)),
        "model_card": str(card),
        "opset": opset,
        "bytes": out.stat().st_size,
        "parity": parity,
    }


def format_export(report: dict[str, Any]) -> str:
    p = report["parity"]
    return (
        f"ONNX graph written to {report['onnx']} (opset {report['opset']}, {report['bytes'] / 2**20:.1f} MB)\n"
        f"parity with PyTorch on {p['images']} films: max |diff| of probabilities {p['max_abs_diff']:.2e}, "
        f"decisions identical: {'yes' if p['decisions_identical'] else 'NO'}\n"
        f"sidecar {report['sidecar']}, parity {report['parity_file']}, model card {report['model_card']}"
    )


# ------------------------------------------------------------------------------------ runtime
def _run(session: Any, pixels: np.ndarray, batch_size: int, classes: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8))
    out = [session.run([OUTPUT], {INPUT: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, classes), np.float32)


def onnx_file(path: str | Path) -> Path:
    """The exported graph ``path`` names: an .onnx file, or ``model.onnx`` in a model or run folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".onnx":
            raise ModelError(f"{path}: --runtime onnx takes an .onnx file or a folder holding {DEFAULT_NAME}")
        return path
    for candidate in (path / DEFAULT_NAME, path / "model" / DEFAULT_NAME):
        if candidate.is_file():
            return candidate
    raise ModelError(f"{path}: no ONNX export here; write one with `pneumo export {path}` (it makes {DEFAULT_NAME})")


class OnnxModel:
    """An exported graph run by onnxruntime, with what predict and serve use of ``LoadedModel``.

    Pixels come from ``data.cache.decode_images`` / ``data.imaging.prepare`` as for PyTorch, so both
    runtimes read identical arrays. There is no Grad-CAM and no TTA here: both need the network.
    """

    runtime = "onnx"

    def __init__(self, path: Path, session: Any, meta: ModelMeta, sidecar: dict[str, Any]):
        self.path, self.session, self.meta, self.sidecar = path, session, meta, sidecar
        self.classes = meta.classes
        self.positive = meta.positive_index
        self.threshold = meta.operating_threshold
        self.scope_sources: tuple[list[Path], Path | None] | None = None  # infer.scope's statistics (load_onnx_model)

    def probabilities(self, pixels: np.ndarray, batch_size: int = 32, tta: bool = False) -> np.ndarray:
        if tta:
            raise PneumoError("--tta needs the network: use --runtime torch (the ONNX graph reads each film once)")
        return _run(self.session, pixels, batch_size, len(self.classes))

    def probabilities_and_features(
        self, pixels: np.ndarray, batch_size: int = 32, tta: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Probabilities and each network's body features from one run of the graph (``infer.scope``
        measures the features), as ``LoadedModel.probabilities_and_features`` gives them."""
        if tta:
            raise PneumoError("--tta needs the network: use --runtime torch (the ONNX graph reads each film once)")
        names = (self.sidecar.get("scope") or {}).get("outputs") or []
        if not names:
            raise ModelError(f"{self.path}: this export gives no body features (re-export it with `pneumo export`)")
        x = np.ascontiguousarray(np.asarray(pixels, dtype=np.uint8))
        wanted = [OUTPUT, *names]
        runs = [self.session.run(wanted, {INPUT: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
        if not runs:
            return np.zeros((0, len(self.classes)), np.float32), [np.zeros((0, 0), np.float32) for _ in names]
        columns = [np.concatenate([r[k] for r in runs]).astype(np.float32) for k in range(len(names) + 1)]
        return columns[0], columns[1:]

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return self.meta.decide(probs)


def scope_sources(file: Path, sidecar: dict[str, Any]) -> tuple[list[Path], Path | None] | None:
    """Where ``infer.scope`` finds each network's statistics for this graph, and the ensemble's folder
    (None for a single model); None when the graph gives no features (exported before it did)."""
    scope = sidecar.get("scope")
    if not isinstance(scope, dict) or not scope.get("outputs"):
        return None
    folders = [file.parent / f for f in scope.get("folders", [])]
    if len(folders) != len(scope["outputs"]):
        return None
    return folders, file.parent if scope.get("ensemble") else None


def read_sidecar(onnx_path: Path) -> tuple[dict[str, Any], ModelMeta]:
    """The sidecar of ``onnx_path`` and the ModelMeta it describes, checked; ModelError otherwise."""
    path = sidecar_path(onnx_path)
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; `pneumo export` writes it beside {onnx_path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a pneumo ONNX sidecar ({type(exc).__name__}: {exc})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ModelError(f"{path}: not a pneumo ONNX sidecar (format {FORMAT!r} expected)")
    missing = [k for k in (*META_FIELDS, "sha256") if k not in sidecar]
    if missing:
        raise ModelError(f"{path}: missing field(s) {', '.join(missing)}")
    try:
        meta = ModelMeta(**{k: sidecar[k] for k in META_FIELDS}).check(str(path))
    except TypeError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return sidecar, meta


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """An exported graph (an .onnx file, or a model or run folder holding ``model.onnx``), checked
    against the hash its sidecar recorded, ready for onnxruntime on the CPU."""
    ort = require("onnx", "onnxruntime", what="--runtime onnx")
    file = onnx_file(path)
    sidecar, meta = read_sidecar(file)
    if file_sha256(file) != sidecar["sha256"]:
        raise ModelError(f"{file}: changed since it was exported (its SHA-256 differs from {sidecar_path(file).name})")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors for unusable graphs have no common base
        raise ModelError(f"{file}: onnxruntime cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from None
    shape = session.get_inputs()[0].shape
    if list(shape[1:]) != [meta.image_size, meta.image_size]:
        raise ModelError(f"{file}: the graph reads {shape[1:]} pixels, the sidecar says {meta.image_size}")
    model = OnnxModel(file, session, meta, sidecar)
    model.scope_sources = scope_sources(file, sidecar)
    return model


def export_unusable(model: str | Path) -> str | None:
    """Why the ONNX export in model folder ``model`` cannot stand in for PyTorch under ``--runtime
    auto`` (one line), or None when it can: there, parity-checked, made from exactly this folder's
    weights and decision rule (``model_fingerprint``), giving the scope check's features, and
    onnxruntime installed. The graph file's own hash is checked when it is loaded."""
    from pneumo.extras import available
    from pneumo.model_meta import model_folder

    folder = model_folder(model)
    file = folder / DEFAULT_NAME
    if not file.is_file():
        return f"no ONNX export in {folder} (`pneumo export` writes one)"
    if not available("onnxruntime"):
        return "onnxruntime is not installed (pip install 'pneumo[onnx]')"
    try:
        sidecar, _ = read_sidecar(file)
        parity = json.loads(parity_path(file).read_text(encoding="utf-8"))
    except (ModelError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"the ONNX export's records are unusable ({str(exc)[:200]})"
    if not isinstance(parity, dict) or parity.get("passed") is not True:
        return f"{parity_path(file).name} does not record a passed parity check"
    try:
        fingerprint = model_fingerprint(folder)
    except PneumoError as exc:
        return str(exc)
    if sidecar.get("source_model_sha256") != fingerprint:
        return f"{file.name} is stale: the model folder changed after it was exported (re-export with `pneumo export`)"
    if scope_sources(file, sidecar) is None:
        return f"{file.name} predates the scope check's features in the graph (re-export with `pneumo export`)"
    return None


def export_after(folder: str | Path, progress: bool = False) -> str:
    """Export a model folder just written (train, ensemble, adapt) and say so in one line; without
    the onnx extra, or when parity fails, say why and leave no export: never fail the command."""
    try:
        report = export_onnx(folder, progress=progress)
    except PneumoError as exc:  # the extra missing (extras.require), or the graph disagreeing with PyTorch
        return f"no ONNX export: {exc}"
    p = report["parity"]
    return (
        f"ONNX export written to {report['onnx']} (parity on {p['images']} films: max |diff| "
        f"{p['max_abs_diff']:.1e}); --runtime auto reads through it"
    )
