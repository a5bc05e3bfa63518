"""The run report and the model card, rendered from fixed folders and compared with committed files.

The folders are built by hand (``RunFolder``, fixed numbers, fixed pixels), so every figure on the
page is known and nothing depends on training. What changes from one machine to the next is
normalised before comparing: the temporary folder, today's date, the software versions, the model's
fingerprint, and the PNG encoding of embedded images (each data URI becomes its size and a digest of
its pixels, which does not depend on the zlib that wrote it).

After an intended change of the page or the card (or of ``TrainConfig`` / ``ModelMeta``, whose fields
the page lists), regenerate with ``PNEUMO_UPDATE_GOLDEN=1 pytest tests/test_golden_pages.py`` and
read the diff of ``tests/data/golden/`` before committing it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pneumo.config import TrainConfig
from pneumo.infer.model_card import card_text, model_fingerprint, write_model_card
from pneumo.model_meta import ModelMeta, write_model_meta
from pneumo.report.html import write_report
from pneumo.run_folder import RunFolder, SplitRecord, ValidPredictions
from pneumo.version import __version__

GOLDEN = Path(__file__).parent / "data" / "golden"
UPDATE = os.environ.get("PNEUMO_UPDATE_GOLDEN") == "1"
BINARY = ["NORMAL", "PNEUMONIA"]
THREE = ["NORMAL", "BACTERIA", "VIRUS"]
VERSIONS = {"torch": "2.0.0", "timm": "1.0.0", "numpy": "2.0.0", "onnxruntime": "1.18.0"}  # onnx: not installed


def _png(path: Path, size: tuple[int, int], seed: int, title: str | None = None) -> Path:
    """A grey PNG of fixed pixels; ``title`` as the text chunk that ``pneumo explain`` writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)
    info = None
    if title is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("pneumo:title", title)
    Image.fromarray(pixels, mode="L").save(path, format="PNG", pnginfo=info)
    return path


def _pixels_digest(match: re.Match) -> str:
    img = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    digest = hashlib.sha256(img.mode.encode() + img.tobytes()).hexdigest()[:16]
    return f"data:image/png;{img.width}x{img.height},{img.mode},{digest}"


def normalise_page(page: str, tmp: Path) -> str:
    page = re.sub(r"data:image/png;base64,([A-Za-z0-9+/=]+)", _pixels_digest, page)
    return page.replace(str(tmp), "<tmp>")


def normalise_card(card: str, folder: Path, tmp: Path) -> str:
    card = re.sub(r"Written \d{4}-\d\d-\d\d \d\d:\d\d UTC by pneumo \S+\.", "Written <date> UTC by pneumo <v>.", card)
    return card.replace(model_fingerprint(folder), "<fingerprint>").replace(str(tmp), "<tmp>")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    assert path.is_file(), f"{path} missing: run with PNEUMO_UPDATE_GOLDEN=1 to write it"
    expected = path.read_bytes().decode("utf-8")
    assert text == expected, f"{name} differs from {path}; if intended, regenerate (PNEUMO_UPDATE_GOLDEN=1)"


@pytest.fixture
def fixed_software(monkeypatch: pytest.MonkeyPatch) -> None:
    """The card names the Python and package versions it was written with: fix them."""

    def version(package: str) -> str:
        if package not in VERSIONS:
            raise importlib.metadata.PackageNotFoundError(package)
        return VERSIONS[package]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(platform, "python_version", lambda: "3.12.0")


# ---------------------------------------------------------------- run folders


def _binary_evaluation(n: int = 10, **extra) -> dict:
    metrics = {
        "accuracy": 0.7,
        "sensitivity": 0.6,
        "specificity": 0.8,
        "ppv": 0.75,
        "npv": 2 / 3,
        "f1": 2 / 3,
        "error_rate": 0.3,
        "roc_auc": 0.88,
        "n": n,
        "n_pos": 5,
        "n_neg": 5,
        "tp": 3,
        "fp": 1,
        "tn": 4,
        "fn": 2,
    }
    return {
        "task": "binary",
        "positive_class": "PNEUMONIA",
        "threshold": 0.42,
        "ci_unit": "patient",
        "n": n,
        "metrics": metrics,
        "ci": {"accuracy": [0.4, 0.9], "sensitivity": [0.2, 1.0], "specificity": [0.4, 1.0], "roc_auc": [0.61, 1.0]},
        "metrics_at_0.5": {"accuracy": 0.7, "sensitivity": 0.6, "specificity": 0.8, "roc_auc": 0.88},
        **extra,
    }


def _full_run(tmp: Path) -> Path:
    """A binary run with every file the report reads, some of them awkward (markup in names, gaps)."""
    run, films = tmp / "run", tmp / "films"
    folder = RunFolder(run)
    folder.write_config(
        TrainConfig(data=str(tmp / "chest_xray <b>&"), arch="resnet34", epochs=4, lr=0.001, seed=42, split="patient")
    )
    folder.write_metrics(
        [
            {"epoch": 1, "phase": "frozen", "train_loss": 0.61, "valid_loss": 0.52, "error_rate": 0.21, "time": 30.0},
            {"epoch": 2, "phase": "unfrozen", "train_loss": 0.40, "valid_loss": 0.35, "error_rate": 0.12},
        ]
    )
    for i, name in enumerate(
        ["curves.png", "lr_find/lr_find.png", "confusion_matrix.png", "roc.png", "reliability.png"]
    ):
        _png(run / name, (12, 8), seed=i)
    evaluation = _binary_evaluation(
        n_train=40,
        n_valid=10,
        reweighted={"target_pos_fraction": 0.625, "metrics": {"accuracy": 0.675, "sensitivity": 0.6, "ppv": 0.83}},
        ece=0.1234,
        calibration={
            "temperature_source": "fitted <on> validation",
            "temperature": 1.3,
            "ece_before": 0.2,
            "ece_after": 0.1,
        },
        subtypes={"bacteria": {"n": 3, "sensitivity": 2 / 3}, "virus": {"n": 2, "sensitivity": None}},
        threshold_choice={"method": "youden", "interval": [0.2, 0.7], "warning": "too few films & <patients>"},
    )
    folder.write_evaluation(evaluation)
    write_model_meta(
        folder.model_dir / "model.json",
        ModelMeta(
            arch="resnet34",
            classes=BINARY,
            image_size=224,
            threshold=0.42,
            positive_class="PNEUMONIA",
            temperature=1.3,
            threshold_method="youden",
            pneumo_version="0.0.9",
            trained_with={"data": "/somewhere/chest_xray", "split": "patient", "epochs": 3, "unfreeze_epochs": 2},
        ),
    )
    (folder.model_dir / "MODEL_CARD.md").write_text("# Model card: resnet34\n\n| a | <b> & 'c' \"d\" |\n")
    p = np.array([0.95, 0.85, 0.70, 0.45, 0.30, 0.60, 0.40, 0.20, 0.15, 0.05])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    paths = [str(_png(films / f"film{i}.png", (300, 240), seed=10 + i)) for i in range(4)]
    _png(run / "relative.png", (200, 100), seed=20)
    paths += ["relative.png", str(films / "gone.png")] + [str(films / f"absent{i}.png") for i in range(4)]
    folder.write_predictions(ValidPredictions(BINARY, paths, y, [f"p{i}" for i in range(10)], np.stack([1 - p, p], 1)))
    # a test evaluation stored by `pneumo evaluate --out RUN/test`, one damaged, one not an object
    (run / "test").mkdir()
    stored = _binary_evaluation(split="test", evaluated_on="test (chest_xray)")
    (run / "test" / "evaluation.json").write_text(json.dumps(stored))
    _png(run / "test" / "confusion_matrix.png", (12, 8), seed=7)
    (run / "broken").mkdir()
    (run / "broken" / "evaluation.json").write_text("{not json")
    (run / "listed").mkdir()
    (run / "listed" / "evaluation.json").write_text("[1, 2]")
    _png(run / "explain" / "cam.png", (30, 20), seed=8, title="PNEUMONIA <b>p=0.91</b> & more")
    return run


def _multiclass_run(tmp: Path) -> Path:
    run = tmp / "run"
    folder = RunFolder(run)
    folder.write_evaluation(
        {
            "task": "multiclass",
            "n": 9,
            "metrics": {
                "accuracy": 5 / 9,
                "macro_auc_ovr": 0.71,
                "per_class": {
                    "NORMAL": {"recall": 2 / 3, "precision": 1.0, "n": 3},
                    "BACTERIA": {"recall": 1 / 3, "precision": 0.5, "n": 3},
                    "<VIRUS>": {"recall": float("nan"), "precision": None, "n": 3},
                },
            },
            "ece": 0.05,
        }
    )
    write_model_meta(
        folder.model_dir / "model.json",
        ModelMeta(arch="resnet18", classes=THREE, image_size=128, threshold_method="argmax", pneumo_version="0.0.9"),
    )
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    folder.write_predictions(
        ValidPredictions(THREE, ["a.png", "b.png", "c.png"], np.array([1, 2, 0]), ["", "", ""], probs)
    )
    _png(run / "confusion_matrix.png", (12, 8), seed=3)
    return run


def _bare_run(tmp: Path) -> Path:
    run = tmp / "run"
    RunFolder(run).write_config(TrainConfig(data="somewhere", arch="resnet18", split="random"))
    return run


def _damaged_run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "config.json").write_text("[]")
    (run / "valid_eval.json").write_text("[1, 2]")
    (run / "metrics.csv").write_text("epoch,phase\n")
    (run / "valid_predictions.csv").write_text("path,label,prob_NORMAL,prob_PNEUMONIA\nx.jpeg,NORMAL,abc,0.5\n")
    return run


@pytest.mark.parametrize(
    "name, build",
    [("full", _full_run), ("multiclass", _multiclass_run), ("bare", _bare_run), ("damaged", _damaged_run)],
)
def test_report_page_matches_its_golden_file(name: str, build: Callable[[Path], Path], tmp_path: Path) -> None:
    run = build(tmp_path)
    page = write_report(run).read_text(encoding="utf-8")
    check_golden(f"report_{name}.html", normalise_page(page, tmp_path))


# ---------------------------------------------------------------- model cards


def _model_folder(folder: Path, meta: ModelMeta) -> Path:
    write_model_meta(folder / "model.json", meta)
    (folder / "model.safetensors").write_bytes(b"fixed weights")
    return folder


def _binary_card(tmp: Path) -> tuple[Path, str]:
    meta = ModelMeta(
        arch="efficientnet_lite0",
        classes=BINARY,
        image_size=224,
        threshold=0.4213,
        positive_class="PNEUMONIA",
        temperature=1.25,
        threshold_method="sensitivity:0.95",
        pneumo_version="0.0.9",
        adaptation={"method": "batch-norm statistics on 40 films"},
    )
    folder = _model_folder(tmp / "model", meta)
    evaluation = _binary_evaluation(
        calibration={"temperature": 1.3, "ece_before": 0.2, "ece_after": 0.1},
        subtypes={"bacteria": {"n": 3, "sensitivity": 2 / 3}, "virus": {"n": 2, "sensitivity": 0.5}},
    )
    counts = {
        "train": {"images": 40, "patients": 31, "per_class": {"NORMAL": 20, "PNEUMONIA": 20}},
        "valid": {"images": 10, "patients": 8, "per_class": {"NORMAL": 5}},
    }
    config = {"data": "/data/kaggle/chest_xray/train", "patient_rule": "kermany", "split": "patient", "valid_pct": 0.2}
    onnx = {"onnx": "out/model.onnx", "sha256": "ab" * 32, "opset": 18, "exporter": "torch.onnx (dynamo)"}
    parity = {"images": 8, "max_abs_diff": 1.5e-7, "decisions_identical": True}
    return folder, card_text(folder, meta, evaluation, counts, config, onnx, parity)


def _ensemble_card(tmp: Path) -> tuple[Path, str]:
    meta = ModelMeta(
        arch="ensemble:efficientnet_lite0+resnet18",
        classes=BINARY,
        image_size=96,
        threshold=0.5,
        positive_class="PNEUMONIA",
        pneumo_version="0.0.9",
        members=["members/0", "members/1"],
    )
    folder = _model_folder(tmp / "model", meta)
    member = {"data": "/x/sample/train", "split": "random", "pretrained": "none", "patient_rule": "filename"}
    config = {"members": [member, {**member, "pretrained": "imagenet"}]}
    evaluation = {"metrics": {"accuracy": 0.8, "n": 10, "label": "text is left out"}, "ece": 0.07}
    counts = {"train": {"images": 12}, "valid": {"images": 4}}
    return folder, card_text(folder, meta, evaluation, counts, config)


def _multiclass_card(tmp: Path) -> tuple[Path, str]:
    meta = ModelMeta(arch="resnet18", classes=THREE, image_size=64, threshold_method="argmax", pneumo_version="0.0.9")
    folder = _model_folder(tmp / "model", meta)
    return folder, card_text(folder, meta, None, None, {"weights": "/weights/imagenet-resnet18.pth"})


def _written_card(tmp: Path) -> tuple[Path, str]:
    """``write_model_card`` on an older run folder: counts from split.json, the export beside the model."""
    run = RunFolder(tmp / "run")
    run.write_config(TrainConfig(data=str(tmp / "chest_xray" / "train"), arch="efficientnet_lite0", split="patient"))
    run.write_split(
        SplitRecord(
            "patient",
            BINARY,
            ["NORMAL/IM-0001-0001.jpeg", "NORMAL/IM-0001-0002.jpeg", "PNEUMONIA/person1_virus_6.jpeg"],
            ["NORMAL/IM-0003-0001.jpeg", "PNEUMONIA/person2_bacteria_3.jpeg"],
        )
    )
    run.write_evaluation(_binary_evaluation(n=2, ece=0.3))
    meta = ModelMeta(arch="efficientnet_lite0", classes=BINARY, image_size=64, positive_class="PNEUMONIA")
    meta.pneumo_version = "0.0.9"
    folder = _model_folder(run.model_dir, meta)
    (folder / "model.meta.json").write_text(json.dumps({"onnx": "model.onnx", "sha256": "cd" * 32, "opset": 17}))
    (folder / "model.parity.json").write_text(json.dumps({"images": 2, "max_abs_diff": None}))
    return folder, write_model_card(folder).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "name, build",
    [
        ("binary", _binary_card),
        ("ensemble", _ensemble_card),
        ("multiclass", _multiclass_card),
        ("written", _written_card),
    ],
)
def test_model_card_matches_its_golden_file(
    name: str, build: Callable[[Path], tuple[Path, str]], tmp_path: Path, fixed_software: None
) -> None:
    folder, card = build(tmp_path)
    assert f"by pneumo {__version__}." in card
    check_golden(f"card_{name}.md", normalise_card(card, folder, tmp_path))
