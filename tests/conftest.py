"""Shared fixtures: tiny generated image folders (the torchxrayvision way) and the real data's paths.

Generated images are small (32 px by default) so that every test that reads pixels stays fast. File
names follow the Kermany/Kaggle pattern, so patient rules see what they see on the real data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = REPO / "src" / "pneumo" / "sample_data" / "chest_xray"
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA", REPO.parent / "shared" / "data"))
if not SHARED_DATA.exists():  # a clone elsewhere on the development machine
    SHARED_DATA = Path("/work/shared/data")
BENCH = REPO / "bench"


def free_port() -> int:
    """A loopback port nobody listens on now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_bench(name: str):
    """A bench/ script as a module (``bench/NAME.py``), importable as ``python bench/NAME.py`` runs it:
    with bench/ on ``sys.path``, where its shared ``common`` module lies."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep every decode cache the tests write out of ~/.cache (shared by the session, so hits still happen)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMO_CACHE", str(tmp_path_factory.mktemp("pneumo-cache")))
        mp.delenv("PNEUMO_NO_CACHE", raising=False)
        yield


WriteImage = Callable[..., Path]


@pytest.fixture
def write_image() -> WriteImage:
    """``write_image(path, size=(w, h), mode="L"|"RGB"|"RGBA"|"I;16", value=None)`` writes a small image.

    The format follows the suffix (.jpeg/.jpg -> JPEG, .png -> PNG; 16-bit needs .png). Without
    ``value`` the pixels are a gradient plus noise seeded by the file name, so every file differs
    byte for byte; with ``value`` the image is flat (handy to tell classes apart by brightness).
    """

    def write(path: str | Path, size: tuple[int, int] = (32, 32), mode: str = "L", value: int | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = size
        if value is None:
            seed = int.from_bytes(hashlib.sha1(path.name.encode()).digest()[:4], "little")
            noise = np.random.default_rng(seed).random((h, w))
            grey = 0.6 * np.linspace(0, 1, w)[None, :] + 0.4 * noise  # (h, w) in [0, 1]
        else:
            grey = np.full((h, w), value / (4095 if mode == "I;16" else 255))
        if mode == "I;16":  # a 12-bit detector in a 16-bit container, as real DICOM exports are
            img = Image.fromarray((grey * 4095).astype(np.uint16))
        else:
            img = Image.fromarray((grey * 255).astype(np.uint8), mode="L").convert(mode)
        img.save(path)
        return path

    return write


def kermany_names(cls: str, patients: int, per_patient: int, start: int = 100) -> list[str]:
    """Kaggle-style file names: ``IM-0123-0001.jpeg`` for NORMAL, ``person123_bacteria_7.jpeg`` otherwise."""
    names = []
    for p in range(start, start + patients):
        for k in range(1, per_patient + 1):
            if cls == "NORMAL":
                names.append(f"IM-{p:04d}-{k:04d}.jpeg")
            else:
                names.append(f"person{p}_{'bacteria' if p % 2 else 'virus'}_{p * 10 + k}.jpeg")
    return names


MakeTree = Callable[..., Path]


@pytest.fixture
def make_tree(write_image: WriteImage) -> MakeTree:
    """``make_tree(root, {"train/NORMAL": ["IM-0001-0001.jpeg", ...], ...}, size=(32, 32), values=None)``.

    ``values`` maps a class name to a flat pixel value for every image of that class.
    """

    def make(
        root: Path, layout: dict[str, list[str]], size: tuple[int, int] = (32, 32), values: dict[str, int] | None = None
    ) -> Path:
        for folder, names in layout.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            value = (values or {}).get(Path(folder).name)
            for name in names:
                write_image(root / folder / name, size=size, value=value)
        return root

    return make


# Kaggle's shape in miniature: train of multi-image patients, a 16-image val, a small test.
KAGGLE_TREE = {
    "train/NORMAL": kermany_names("NORMAL", patients=6, per_patient=2, start=100),
    "train/PNEUMONIA": kermany_names("PNEUMONIA", patients=6, per_patient=2, start=100),
    "val/NORMAL": kermany_names("NORMAL", patients=8, per_patient=1, start=300),
    "val/PNEUMONIA": kermany_names("PNEUMONIA", patients=8, per_patient=1, start=300),
    "test/NORMAL": kermany_names("NORMAL", patients=4, per_patient=1, start=500),
    "test/PNEUMONIA": kermany_names("PNEUMONIA", patients=4, per_patient=1, start=500),
}


@pytest.fixture
def kaggle_root(tmp_path: Path, make_tree: MakeTree) -> Path:
    """``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}`` with 24/16/8 images and macOS litter beside them."""
    root = make_tree(tmp_path / "chest_xray", KAGGLE_TREE)
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "NORMAL" / "._IM-0100-0001.jpeg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    litter = root / "__MACOSX" / "train" / "NORMAL"
    litter.mkdir(parents=True)
    (litter / "._IM-0100-0001.jpeg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    return root


@pytest.fixture
def sample_root() -> Path:
    """The bundled sample: real 224 px Kaggle images, train 100 + 100, test 30 + 30."""
    assert SAMPLE_ROOT.is_dir(), f"bundled sample missing at {SAMPLE_ROOT}"
    return SAMPLE_ROOT


@pytest.fixture
def xray_224_root() -> Path:
    """The full Kaggle training split at 224 px (5,216 images), where the machine has it."""
    root = SHARED_DATA / "chest_xray_224"
    if not (root / "train").is_dir():
        pytest.skip(f"{root}/train not present")
    return root


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core box they spin (2-3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small model per test session, shared by the explain and serve tests."""
    from pneumo.training.loop import train

    run = tmp_path_factory.getbasetemp() / "pneumo-model-64"
    if not (run / "model" / "model.safetensors").is_file():
        with one_torch_thread():
            train(SAMPLE_ROOT, out=run, epochs=1, image_size=64, progress=False)
    return run


@pytest.fixture(scope="session")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A copy of the session's model folder with its ONNX export (the shared run stays as it was):
    one export (~20 s of tracing) shared by the ONNX and runtime tests."""
    from pneumo.extras import available

    if not available("onnx", "onnxruntime", "onnxscript"):
        pytest.skip("needs pneumo[onnx]")
    from pneumo.infer.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(trained_run / "model", folder)
    with one_torch_thread():
        report = export_onnx(folder, progress=False)
    return folder, report
