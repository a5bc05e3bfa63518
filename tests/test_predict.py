"""Inference paths: fixed predictions on shipped images, predict and evaluate from the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pneumo
from pneumo.cli import main
from pneumo.data.cache import decode_images
from pneumo.data.imaging import prepare
from pneumo.infer.model_folder import load_model
from pneumo.infer.predict import PREDICTION_COLUMNS, evaluate_model_on_folder, predict_files
from pneumo.nets.models import create_model
from pneumo.training.loop import train

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
FIXTURE = json.loads((Path(__file__).parent / "data" / "regression.json").read_text())


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0", pretrained="imagenet").eval()


def probe_logit(model, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        feats = model.features(torch.from_numpy(pixels).unsqueeze(1)).numpy()
    return feats @ np.array(FIXTURE["coef"]) + FIXTURE["intercept"]


def test_fixed_predictions_on_shipped_images(lite0):
    """Decoding, resizing, grey conversion, normalisation and weight loading are unchanged."""
    size = FIXTURE["image_size"]
    pixels = np.stack([prepare(SAMPLE / name, size) for name in FIXTURE["images"]])
    p = np.array(FIXTURE["p_pneumonia"])
    expected = np.log(p / (1 - p))
    assert probe_logit(lite0, pixels) == pytest.approx(expected, abs=0.05)
    cached = decode_images([SAMPLE / name for name in FIXTURE["images"]], size, progress=False)
    assert np.array_equal(np.asarray(cached.pixels), pixels)  # the training path sees the same pixels
    assert ((p > 0.5) == np.array(FIXTURE["labels"], dtype=bool)).all()


def test_the_same_xray_as_16_bit_or_rgb_png_gives_the_same_prediction(lite0, tmp_path):
    size = FIXTURE["image_size"]
    source = SAMPLE / FIXTURE["images"][3]
    grey = np.asarray(Image.open(source).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "x16.png")
    Image.open(source).convert("RGB").save(tmp_path / "rgb.png")
    logits = probe_logit(
        lite0, np.stack([prepare(p, size) for p in (source, tmp_path / "x16.png", tmp_path / "rgb.png")])
    )
    assert logits[1] == pytest.approx(logits[0], abs=0.1) and logits[2] == pytest.approx(logits[0], abs=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train(
        SAMPLE, out=str(tmp_path_factory.mktemp("p") / "run"), epochs=2, image_size=64, progress=False
    ).model_dir


def test_predict_cli_formats_and_bad_files(model_dir, tmp_path, capsys):
    bad = tmp_path / "notes.jpeg"
    bad.write_text("not an image")
    good = sorted((SAMPLE / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]
    assert main(["predict", str(model_dir), *map(str, good), str(bad), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [*map(str, good), str(bad)]
    for row in rows[:2]:  # one meaning: p(PNEUMONIA) against the threshold, whatever the label
        assert row["positive_class"] == "PNEUMONIA" and row["p_positive"] == row["p_PNEUMONIA"]
        assert row["label"] == ("PNEUMONIA" if row["p_positive"] >= row["threshold"] else "NORMAL")
        side = "at or above" if row["label"] == "PNEUMONIA" else "below"
        assert row["reading"] == (
            f"p(PNEUMONIA) {100 * row['p_positive']:.1f} %: {side} the {100 * row['threshold']:.1f} % "
            "needed to call PNEUMONIA"
        )
        assert "probability" not in row  # the old column gave p(label): 0.86 beside NORMAL read as pneumonia
    assert rows[0]["p_NORMAL"] + rows[0]["p_PNEUMONIA"] == pytest.approx(1)
    assert "not an image" in rows[2]["error"]
    assert main(["predict", str(model_dir), str(SAMPLE / "test" / "NORMAL"), "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 30 and list(table[0])[:6] == PREDICTION_COLUMNS
    assert main(["predict", str(model_dir), str(good[0])]) == 0
    assert rows[0]["scope_reason"].startswith("distance check not trusted")  # 40 validation films: said once
    said = f"{good[0]}: {rows[0]['label']} ({rows[0]['reading']})\nscope: {rows[0]['scope_reason']}\n"
    assert capsys.readouterr().out == said
    loaded = load_model(model_dir)
    by_path, by_array = loaded.predict(good[0]), loaded.predict(np.asarray(Image.open(good[0]).convert("L")))
    by_pil = loaded.predict(Image.open(good[0]))
    assert by_path["p_positive"] == pytest.approx(rows[0]["p_positive"], abs=1e-6)
    assert by_array["p_positive"] == pytest.approx(by_path["p_positive"], abs=1e-6) == by_pil["p_positive"]
    assert repr(by_path) == f"Prediction({by_path['label']}: {by_path['reading']})"
    assert main(["predict", str(model_dir), str(bad)]) == 1  # nothing could be read


def test_evaluate_agrees_with_predict(model_dir, tmp_path, capsys):
    report = evaluate_model_on_folder(model_dir, SAMPLE, out=tmp_path / "ev", progress=False)
    rows = predict_files(model_dir, [SAMPLE / "test"], progress=False)
    predicted_pos = sum(r["label"] == "PNEUMONIA" for r in rows)
    m = report["metrics"]
    assert report["split"] == "test" and m["n"] == 60
    assert m["tp"] + m["fp"] == predicted_pos
    assert {p.name for p in (tmp_path / "ev").iterdir()} >= {"evaluation.json", "roc.png", "confusion_matrix.png"}
    assert main(["evaluate", str(model_dir), str(SAMPLE / "test"), "--json"]) == 0
    as_folder = json.loads(capsys.readouterr().out)
    assert as_folder["metrics"]["accuracy"] == m["accuracy"]
    assert as_folder["split"] == "test" and as_folder["evaluated_on"] == "test (test)"  # not "train"
    assert main(["evaluate", str(model_dir), str(SAMPLE / "test")]) == 0
    assert "60 images, split test, from" in capsys.readouterr().out
    assert "Evaluation(test" in repr(report) and "<table>" in report._repr_html_()


def test_evaluate_refuses_unknown_classes(model_dir, tmp_path):
    (tmp_path / "COVID").mkdir()
    Image.new("L", (64, 64)).save(tmp_path / "COVID" / "a.png")
    assert main(["evaluate", str(model_dir), str(tmp_path)]) == 2
