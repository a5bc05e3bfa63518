"""The run report: one offline HTML page from whatever a run folder holds."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pneumo.evaluation.metrics as ev
from pneumo.errors import PneumoError
from pneumo.report.html import worst_mistakes, write_report

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
    """A run folder as the trainer writes it, with three real JPEGs among the predictions."""
    run.mkdir()
    images.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"arch": "resnet34", "epochs": 4, "lr": 0.001, "seed": 42, "split_method": "patient",
         "note": "<script>alert(1)</script>"}))
    (run / "metrics.csv").write_text("epoch,phase,train_loss,valid_loss,error_rate,time\n"
                                     "1,frozen,0.61,0.52,0.21,00:30\n2,unfrozen,0.40,0.35,0.12,00:41\n")
    for i, name in enumerate(["curves.png", "lr_find.png", "confusion_matrix.png", "roc.png", "reliability.png"]):
        (run / name).write_bytes(_png(40 * i))
    subtypes = ["bacteria", "virus", "bacteria", "virus", "bacteria"] + [None] * 5
    report = ev.evaluate_predictions(np.stack([1 - P10, P10], axis=1), Y10, CLASSES, threshold=0.5,
                                     subtypes=subtypes, n_boot=100, reweight_to=0.625)
    (run / "valid_eval.json").write_text(json.dumps(report))
    (run / "model").mkdir()
    (run / "model" / "model.json").write_text(json.dumps(
        {"classes": CLASSES, "image_size": 224, "arch": "resnet34", "threshold": 0.5}))
    # Worst by -log p(true): pneumonia at 0.30 (1.20), at 0.45 (0.80), normal at 0.60 (0.92).
    paths = {0.30: _jpeg(images / "person1_virus_2.jpeg"), 0.60: _jpeg(images / "IM-0001.jpeg"),
             0.45: images / "gone.jpeg"}  # listed but missing on disk
    _jpeg(images / "person3_bacteria_7.jpeg")
    with (run / "valid_predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient", "prob_NORMAL", "prob_PNEUMONIA"])
        for i, (p, y) in enumerate(zip(P10, Y10)):
            path = paths.get(float(p), images / f"other_{i}.jpeg")
            if i == 0:
                path = images / "person3_bacteria_7.jpeg"
            w.writerow([str(path), CLASSES[y], f"p{i}", f"{1 - p:.4f}", f"{p:.4f}"])


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
    for text in ["60.0%", "80.0%", "75.0%", "0.880", "resnet34", "Expected calibration error",
                 "bacteria", "virus", "re-weighted to 62.5% positive", "TP 3, FP 1, TN 4, FN 2"]:
        assert text in page, text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # config text is escaped
    # Worst mistakes appear in order of loss; a missing file is noted, not fatal.
    first, second, third = (page.index(n) for n in ("person1_virus_2.jpeg", "IM-0001.jpeg", "gone.jpeg"))
    assert first < second < third
    assert "7 of 10 image files were not found" in page


def test_reweighted_metrics_as_the_trainer_writes_them(full_run):
    ev_path = full_run / "valid_eval.json"
    report = json.loads(ev_path.read_text())
    block = report.pop("reweighted")
    report["reweighted_to_test_balance"] = block["metrics"]  # bare metrics, no stated target
    ev_path.write_text(json.dumps(report))
    page = write_report(full_run).read_text()
    assert "re-weighted to 62.5% positive" in page  # recovered from the weighted counts


def test_report_written_to_a_chosen_path(full_run, tmp_path):
    out = write_report(full_run, tmp_path / "elsewhere" / "r.html")
    assert out.is_file() and not (full_run / "report.html").exists()


def test_run_folder_missing_optional_files_still_yields_a_page(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": "resnet18", "split_method": "random"}))
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
    assert "does not hold an evaluation" in page
    assert "No usable rows" in page


def test_missing_run_folder_is_a_pneumo_error(tmp_path):
    with pytest.raises(PneumoError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_worst_mistakes_ranks_by_loss_of_the_true_class():
    rows = [{"path": "a", "label": "NORMAL", "prob_NORMAL": "0.9", "prob_PNEUMONIA": "0.1"},
            {"path": "b", "label": "PNEUMONIA", "prob_NORMAL": "0.8", "prob_PNEUMONIA": "0.2"},
            {"path": "c", "label": "NORMAL", "prob_NORMAL": "0.4", "prob_PNEUMONIA": "0.6"},
            {"path": "d", "label": "CAT", "prob_NORMAL": "0.4", "prob_PNEUMONIA": "0.6"}]
    worst = worst_mistakes(rows, n=2)
    assert [r["path"] for r in worst] == ["b", "c"]
    assert worst[0]["loss"] == pytest.approx(-np.log(0.2)) and worst[0]["pred"] == "NORMAL"
    # At an operating threshold of 0.15 the same image is called PNEUMONIA.
    assert worst_mistakes(rows, n=1, threshold=0.15, positive="PNEUMONIA")[0]["pred"] == "PNEUMONIA"
