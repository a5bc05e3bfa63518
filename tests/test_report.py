"""The run report: one offline HTML page from whatever a run folder holds."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pneumo.evaluation.metrics as ev
from pneumo.config import TrainConfig
from pneumo.errors import PneumoError
from pneumo.model_meta import ModelMeta, write_model_meta
from pneumo.report.html import worst_mistakes, write_report
from pneumo.report.interpret import interpret_run
from pneumo.run_folder import RunFolder, ValidPredictions

CLASSES = ["NORMAL", "PNEUMONIA"]
P10 = np.array([0.95, 0.85, 0.70, 0.45, 0.30, 0.60, 0.40, 0.20, 0.15, 0.05])
Y10 = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def _png(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), (colour, colour, colour)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(path: Path, size: tuple[int, int] = (300, 240)) -> Path:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), mode="L").save(path, format="JPEG")
    return path


def _make_run(run: Path, images: Path) -> None:
    """A run folder written through RunFolder, as the trainer writes it, with three real JPEGs."""
    images.mkdir()
    folder = RunFolder(run)
    folder.write_config(
        TrainConfig(
            data=str(images / "<script>alert(1)</script>"),
            arch="resnet34",
            epochs=4,
            lr=0.001,
            seed=42,
            split="patient",
        )
    )
    folder.write_metrics(
        [
            {"epoch": 1, "phase": "frozen", "train_loss": 0.61, "valid_loss": 0.52, "error_rate": 0.21, "time": 30.0},
            {"epoch": 2, "phase": "unfrozen", "train_loss": 0.40, "valid_loss": 0.35, "error_rate": 0.12, "time": 41.0},
        ]
    )
    for i, name in enumerate(["curves.png", "lr_find.png", "confusion_matrix.png", "roc.png", "reliability.png"]):
        (run / name).write_bytes(_png(40 * i))
    subtypes = ["bacteria", "virus", "bacteria", "virus", "bacteria"] + [None] * 5
    probs = np.stack([1 - P10, P10], axis=1)
    report = ev.evaluate_predictions(
        probs, Y10, CLASSES, threshold=0.5, subtypes=subtypes, n_boot=100, reweight_to=0.625
    )
    folder.write_evaluation(report)
    write_model_meta(
        folder.model_dir / "model.json",
        ModelMeta(arch="resnet34", classes=CLASSES, image_size=224, threshold=0.5, positive_class="PNEUMONIA"),
    )
    # Worst by -log p(true): pneumonia at 0.30 (1.20), at 0.45 (0.80), normal at 0.60 (0.92).
    paths = {
        0.30: _jpeg(images / "person1_virus_2.jpeg"),
        0.60: _jpeg(images / "IM-0001.jpeg"),
        0.45: images / "gone.jpeg",
    }  # listed but missing on disk
    _jpeg(images / "person3_bacteria_7.jpeg")
    listed = [paths.get(float(p), images / f"other_{i}.jpeg") for i, p in enumerate(P10)]
    listed[0] = images / "person3_bacteria_7.jpeg"
    folder.write_predictions(
        ValidPredictions(CLASSES, [str(p) for p in listed], Y10, [f"p{i}" for i in range(10)], probs)
    )


@pytest.fixture
def full_run(tmp_path) -> Path:
    _make_run(tmp_path / "run", tmp_path / "images")
    return tmp_path / "run"


def _data_uris(page: str) -> list[str]:
    return re.findall(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', page)


def test_full_report_is_self_contained(full_run):
    out = write_report(full_run)
    assert out == full_run / "report.html"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://", page), "the page must make no external request"
    assert "<link" not in page and "<script" not in page
    # Five 12x8 figures plus a thumbnail for each of the three prediction images that exist.
    sizes = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in _data_uris(page)]
    assert sorted(sizes) == [(12, 8)] * 5 + [(160, 128)] * 3  # 300x240 JPEGs shrunk to 160 px wide


def test_full_report_shows_the_numbers(full_run):
    page = write_report(full_run).read_text()
    # At 0.5: sensitivity 3/5, specificity 4/5, PPV 3/4, AUC 22/25.
    for text in [
        "60.0%",
        "80.0%",
        "75.0%",
        "0.880",
        "resnet34",
        "Expected calibration error",
        "bacteria",
        "virus",
        "re-weighted to 62.5% positive",
        "TP 3, FP 1, TN 4, FN 2",
    ]:
        assert text in page, text
    # config text is escaped (the data folder shows by its last name only: "script>")
    assert "<td>script&gt;</td>" in page and "alert(1)" not in page
    # Worst mistakes appear in order of loss, without file names (they identify patients); a missing
    # file is noted, not fatal.
    first, second, third = (page.index(n) for n in ("loss 1.20", "loss 0.92", "loss 0.80"))
    assert first < second < third
    for name in ("person1_virus_2", "IM-0001", "gone.jpeg", str(full_run.parent)):
        assert name not in page, name
    assert "7 of 10 image files were not found" in page
    # one meaning of probability: p(PNEUMONIA) against the threshold on each card
    assert "read <b>NORMAL</b>, actually PNEUMONIA<br>p(PNEUMONIA) 0.300 vs threshold 0.500" in page


def test_report_leads_with_the_result_and_ends_with_the_configuration(full_run):
    """Headline metrics with intervals and the small-validation warning first; a test evaluation stored
    in the run folder is included; the configuration comes last."""
    test_dir = full_run / "test"
    probs = np.stack([1 - P10, P10], axis=1)
    stored = ev.evaluate_predictions(probs, Y10, CLASSES, threshold=0.5, n_boot=50)
    stored.update(split="test", evaluated_on="test (chest_xray)")
    ev.write_evaluation_figures(stored, probs, Y10, test_dir)
    (test_dir / "evaluation.json").write_text(json.dumps(stored))
    folder = RunFolder(full_run)
    valid = folder.read_evaluation()
    valid["threshold_choice"] = {"method": "fixed:0.5", "interval": [0.2, 0.7], "warning": "too few films"}
    folder.write_evaluation(valid)
    page = write_report(full_run).read_text()
    assert "≥ 0.500 (by fixed:0.5; 95% interval 0.200–0.700)" in page and "Threshold: too few films." in page
    order = [
        page.index("On 10 validation images, calling PNEUMONIA when p(PNEUMONIA) ≥ 0.500 (by fixed:0.5"),
        page.index("accuracy <b>70.0%"),
        page.index("Small validation set: 10 images"),
        page.index("Confusion matrix: validation, threshold 0.500"),
        page.index("Evaluation on test (chest_xray)"),
        page.index("<h2>Training</h2>"),
        page.index("Learning-rate finder"),
        page.index("<h2>Configuration</h2>"),
    ]
    assert order == sorted(order)


def test_reweighted_metrics_of_older_runs_are_read(full_run):
    """Runs before the run_folder module stored bare re-weighted metrics under another key."""
    ev_path = full_run / "valid_eval.json"
    report = json.loads(ev_path.read_text())
    block = report.pop("reweighted")
    report["reweighted_to_test_balance"] = block["metrics"]
    ev_path.write_text(json.dumps(report))
    page = write_report(full_run).read_text()
    assert "re-weighted to 62.5% positive" in page


def test_report_written_to_a_chosen_path(full_run, tmp_path):
    out = write_report(full_run, tmp_path / "elsewhere" / "r.html")
    assert out.is_file() and not (full_run / "report.html").exists()


def test_run_folder_missing_optional_files_still_yields_a_page(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    RunFolder(run).write_config(TrainConfig(data="somewhere", arch="resnet18", split="random"))
    page = write_report(run).read_text()
    assert "resnet18" in page
    for name in ["valid_eval.json", "metrics.csv", "valid_predictions.csv", "curves.png", "roc.png"]:
        assert f"{name} not found" in page, name
    assert "likely optimistic" in page  # random split warning
    assert not _data_uris(page)


def test_damaged_files_become_notes(tmp_path):
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    (run / "valid_eval.json").write_text("[1, 2]")
    (run / "valid_predictions.csv").write_text("path,label,prob_NORMAL,prob_PNEUMONIA\nx.jpeg,NORMAL,abc,0.5\n")
    page = write_report(run).read_text()
    assert "config.json could not be read" in page
    assert "valid_eval.json could not be read (does not hold an evaluation object)" in page
    assert "No usable rows" in page


def test_missing_run_folder_is_a_pneumo_error(tmp_path):
    with pytest.raises(PneumoError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_worst_mistakes_ranks_by_loss_and_decides_as_the_model_does():
    preds = ValidPredictions(
        CLASSES,
        ["a", "b", "c"],
        np.array([0, 1, 0]),
        ["pa", "pb", "pc"],
        np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]),
    )
    worst = worst_mistakes(preds, n=2)
    assert [r["path"] for r in worst] == ["b", "c"]
    assert worst[0]["loss"] == pytest.approx(-np.log(0.2)) and worst[0]["pred"] == "NORMAL"
    # At an operating threshold of 0.15 the same image is called PNEUMONIA.
    meta = ModelMeta(arch="resnet18", classes=CLASSES, image_size=224, threshold=0.15, positive_class="PNEUMONIA")
    assert worst_mistakes(preds, meta, n=1)[0]["pred"] == "PNEUMONIA"


def test_report_and_interpret_agree_at_the_threshold(full_run):
    """A film whose p(positive) equals the stored threshold is called positive by both readers."""
    folder = RunFolder(full_run)
    meta = folder.read_model_meta()
    preds = folder.read_predictions()
    meta.threshold = float(preds.probs[5, 1])  # exactly one stored score, as a Youden threshold is
    write_model_meta(folder.model_dir / "model.json", meta)
    interpreted = interpret_run(full_run, k=10)
    reported = {r["path"]: r["pred"] for r in worst_mistakes(folder.read_predictions(), folder.read_model_meta(), n=10)}
    for row in interpreted["top_losses"]:
        assert reported[row["path"]] == row["predicted"]
    assert reported[preds.paths[5]] == "PNEUMONIA"


def test_confusion_matrices_name_their_split_and_threshold():
    validation = ev.evaluate_predictions(np.stack([1 - P10, P10], axis=1), Y10, CLASSES, threshold=0.42, n_boot=10)
    assert ev.matrix_title(validation) == "Confusion matrix: validation\nPNEUMONIA when p(PNEUMONIA) \u2265 0.420"
    tested = {**validation, "evaluated_on": "test (chest_xray)"}
    assert ev.matrix_title(tested).startswith("Confusion matrix: test (chest_xray)\n")
