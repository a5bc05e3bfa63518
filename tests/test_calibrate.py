"""Labelled site calibration (pneumo adapt --labelled): BatchNorm, the last layer and the threshold moved on a
site's labelled films, out-of-fold, recorded as such."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import SAMPLE_ROOT, one_torch_thread
from pneumo.cli import main
from pneumo.errors import PneumoError
from pneumo.evaluation.metrics import choose_threshold
from pneumo.infer.calibrate import (
    MIN_LABELLED_PER_CLASS,
    calibrate_films,
    calibrate_loaded,
    labelled_films,
    patient_folds,
)
from pneumo.infer.ensemble import make_ensemble
from pneumo.infer.model_folder import EnsembleModel, load_model
from pneumo.infer.predict import predict_files
from pneumo.infer.site_methods import fit_last_layer, hidden_activations

SITE = SAMPLE_ROOT / "test"  # 30 NORMAL + 30 PNEUMONIA films the tiny model never trained on


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def site(trained_run):
    model = load_model(trained_run)
    return labelled_films(SITE, model.classes, model.meta.image_size, progress=False)


def test_the_last_layer_fit_is_the_minimum_of_its_objective():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(80, 16)).astype(np.float32)
    labels = (hidden[:, 0] + 0.3 * rng.normal(size=80) > 0).astype(int)
    start = torch.as_tensor(rng.normal(size=(2, 16)) * 0.1, dtype=torch.float32)
    w = fit_last_layer(hidden, labels, start, anchor=1e-2).double().requires_grad_(True)
    counts = np.bincount(labels)
    weights = torch.as_tensor(len(labels) / (2 * counts), dtype=torch.float64)
    h, y = torch.as_tensor(hidden, dtype=torch.float64), torch.as_tensor(labels)
    loss = F.cross_entropy(h @ w.T, y, weight=weights) + 1e-2 * ((w - start.double()) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-4  # a stationary point of a convex objective: its minimum
    # the pull: a huge anchor keeps the trained layer, none lets the site decide
    held = fit_last_layer(hidden, labels, start, anchor=1e4)
    assert torch.allclose(held, start, atol=1e-3) and not torch.allclose(w.detach().float(), start, atol=1e-2)


def test_folds_keep_a_patient_together_and_spread_the_classes():
    labels = np.array([0] * 20 + [1] * 30)
    patients = np.array([f"p{i // 2}" for i in range(50)])  # two films a patient
    fold = patient_folds(labels, patients, 5)
    for p in set(patients):
        assert len(set(fold[patients == p])) == 1, p
    for k in range(5):
        assert {0, 1} <= set(labels[fold == k])


def test_calibration_refits_the_last_layer_and_chooses_the_threshold_out_of_fold(trained_run, site):
    pixels, labels, patients, skipped = site
    assert not skipped and np.bincount(labels).tolist() == [30, 30]
    model = load_model(trained_run)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    done = calibrate_loaded(model, pixels, labels, patients, allow_few=True, progress=False)  # 30 a class
    after = done.model.net.state_dict()
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())  # the given model untouched
    last = f"head.{len(model.net.head) - 1}.weight"
    assert not torch.allclose(before[last], after[last])
    learnt_elsewhere = [k for k in before if k.startswith("head.") and k != last]
    assert all(torch.equal(before[k], after[k]) for k in learnt_elsewhere)  # the rest of the head as trained
    assert not torch.allclose(before["body.bn1.running_var"], after["body.bn1.running_var"])  # BatchNorm re-estimated

    rec = done.record
    assert rec["labels_used"] is True and rec["method"] == "labelled site calibration" and rec["fit"] == "head"
    assert rec["films_per_class"] == {"NORMAL": 30, "PNEUMONIA": 30} and rec["folds"] == 5
    assert rec["few_films_allowed"] is True and rec["min_films_per_class"] == MIN_LABELLED_PER_CLASS
    assert done.model.threshold == pytest.approx(rec["threshold"]["after"])
    assert done.model.meta.adaptation == rec
    # the layer fitted on all films reads them at least as well as the out-of-fold layers did
    p = done.model.probabilities(pixels)[:, done.model.positive]
    pos = done.model.positive
    in_sample = ((p >= done.model.threshold) == (labels == pos)).mean()
    assert in_sample >= rec["out_of_fold"]["accuracy"] - 1e-9
    assert "/" not in json.dumps(rec)  # no path, no file name


def test_threshold_only_moves_the_threshold_to_youden_on_the_site(trained_run, site):
    pixels, labels, patients, _ = site
    model = load_model(trained_run)
    done = calibrate_loaded(model, pixels, labels, patients, fit="threshold", allow_few=True, progress=False)
    last = f"head.{len(model.net.head) - 1}.weight"
    assert torch.equal(done.model.net.state_dict()[last], model.net.state_dict()[last])
    assert done.model.meta.temperature == model.meta.temperature
    p = done.model.probabilities(pixels)[:, done.model.positive]  # nothing fitted: out-of-fold is in-sample
    assert done.model.threshold == pytest.approx(choose_threshold(p, labels, "youden", done.model.positive), abs=1e-6)
    h = hidden_activations(done.model, pixels)
    assert h.shape == (60, model.net.head[-1].in_features)


def test_too_few_labelled_films_are_refused_naming_the_folder_unless_allowed(trained_run, tmp_path):
    small = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (small / cls).mkdir(parents=True)
        for f in sorted((SITE / cls).iterdir())[:8]:
            shutil.copy(f, small / cls / f.name)
    with pytest.raises(PneumoError, match=rf"{small}.*at least {MIN_LABELLED_PER_CLASS} films of each class"):
        calibrate_films(trained_run, small, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    out, record, _ = calibrate_films(trained_run, small, tmp_path / "out", allow_few=True, progress=False)
    assert record["few_films_allowed"] is True and record["films"] == 16
    rows = predict_files(out, [SITE / "NORMAL"], progress=False)
    assert len(rows) == 30 and "error" not in rows[0]


def test_an_ensemble_is_calibrated_member_by_member_with_one_threshold(trained_run, site, tmp_path):
    runs = [tmp_path / f"run{i}" for i in range(2)]
    for run in runs:
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    make_ensemble(runs, tmp_path / "ens")
    out, record, _ = calibrate_films(tmp_path / "ens", SITE, tmp_path / "cal", allow_few=True, progress=False)
    loaded = load_model(out)
    assert isinstance(loaded, EnsembleModel) and len(loaded.members) == 2
    assert loaded.threshold == pytest.approx(record["threshold"]["after"])
    assert all(m.meta.adaptation["labels_used"] and m.meta.adaptation["threshold"] is None for m in loaded.members)
    assert len(record["temperatures"]) == 2


def test_pneumo_adapt_labelled_writes_a_calibrated_folder_whose_card_says_labels_were_used(
    trained_run, tmp_path, capsys
):
    out = tmp_path / "calibrated"
    argv = ["adapt", str(trained_run), str(SITE), "--labelled", "--out", str(out), "--json"]
    assert main(argv) == 2  # 30 films a class: under the measured minimum
    assert f"at least {MIN_LABELLED_PER_CLASS} films of each class" in capsys.readouterr().err
    assert main([*argv, "--allow-few", "--no-export"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["out"] == str(out) and said["adaptation"]["labels_used"] is True
    meta = json.loads((out / "model.json").read_text())
    assert meta["adaptation"]["method"] == "labelled site calibration"
    assert meta["threshold"] == pytest.approx(said["adaptation"]["threshold"]["after"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "Calibrated on a site's labelled films" in card and "labels were used" in card
    assert str(SITE) not in card and str(SITE) not in json.dumps(meta)
    assert (
        main(
            ["adapt", str(trained_run), str(SITE), "--labelled", "--allow-few", "--fit", "threshold", "--out", str(out)]
        )
        == 2
    )
    assert "holds a model already" in capsys.readouterr().err


def test_adapt_options_that_do_not_go_together_are_refused(trained_run, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["adapt", str(trained_run), str(SITE), "--fit", "head", "--out", out]) == 2
    assert "--fit" in capsys.readouterr().err
    assert main(["adapt", str(trained_run), str(SITE), "--labelled", "--method", "tent", "--out", out]) == 2
    assert "--labelled chooses both" in capsys.readouterr().err
    assert main(["adapt", str(trained_run), str(SITE), "--labelled", "--allow-few", "--fit", "all", "--out", out]) == 2
    assert "--fit 'all'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
