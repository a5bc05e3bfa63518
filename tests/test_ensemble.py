"""Ensembles: runs validated on the same images become one model folder every command takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_ROOT, one_torch_thread
from pneumo.errors import ModelError, PneumoError
from pneumo.infer.ensemble import make_ensemble
from pneumo.infer.explain import explain_image
from pneumo.infer.model_folder import EnsembleModel, load_model
from pneumo.infer.predict import evaluate_model_on_folder, predict_files
from pneumo.training.loop import train

FAST = dict(epochs=1, image_size=64, progress=False)


def valid_probs(run: Path) -> tuple[list[str], np.ndarray]:
    rows = [line.split(",") for line in (run / "valid_predictions.csv").read_text().splitlines()[1:]]
    return [r[0] for r in rows], np.array([float(r[4]) for r in rows])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ens")
    with one_torch_thread():
        a = train(SAMPLE_ROOT, out=str(root / "a"), seed=1, **FAST).run_dir
        b = train(SAMPLE_ROOT, out=str(root / "b"), seed=1, trainable_stages=0, class_balance="none", **FAST).run_dir
    return [a, b]


def test_an_ensemble_averages_its_members_and_predicts_as_validated(two_runs, tmp_path):
    report = make_ensemble(two_runs, tmp_path / "ens")
    paths, pa = valid_probs(two_runs[0])
    _, pb = valid_probs(two_runs[1])
    _, pe = valid_probs(tmp_path / "ens")
    assert np.allclose(pe, (pa + pb) / 2, atol=1e-6)
    meta = json.loads((tmp_path / "ens" / "model" / "model.json").read_text())
    assert meta["threshold"] == report["threshold"] and 0 < meta["threshold"] < 1
    assert len(meta["members"]) == 2 and meta["arch"].startswith("ensemble:")

    model = load_model(tmp_path / "ens")  # the run-like folder, as for a training run
    assert isinstance(model, EnsembleModel) and len(model.members) == 2
    with one_torch_thread():
        fresh = predict_files(tmp_path / "ens" / "model", paths, progress=False)
        test = evaluate_model_on_folder(tmp_path / "ens" / "model", SAMPLE_ROOT, progress=False)
        explained = explain_image(tmp_path / "ens" / "model", paths[0], tmp_path / "heat.png")
    assert [r["p_PNEUMONIA"] for r in fresh] == pytest.approx(list(pe), abs=1e-4)
    assert test["n"] == 60 and 0 <= test["metrics"]["accuracy"] <= 1 and test["threshold"] == meta["threshold"]
    assert (tmp_path / "heat.png").stat().st_size > 0 and "averaged over 2 members" in explained["method"]

    meta["members"][1] = "../../b/model"  # a model.json may not reach outside its folder
    (tmp_path / "ens" / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="inside"):
        load_model(tmp_path / "ens")


def test_members_validated_on_other_images_are_refused(two_runs, tmp_path):
    with one_torch_thread():
        other = train(SAMPLE_ROOT, out=str(tmp_path / "c"), seed=2, **FAST).run_dir
    with pytest.raises(PneumoError, match="validated on other images"):
        make_ensemble([two_runs[0], other], tmp_path / "ens")
    with pytest.raises(PneumoError, match="at least two"):
        make_ensemble([two_runs[0]], tmp_path / "ens")


def test_members_run_from_other_folders_name_the_same_films():
    """A run started with a relative data path records relative paths: still the same validation films."""
    from pneumo.infer.ensemble import same_films

    absolute = ["/work/shared/data/train/NORMAL/IM-1.jpeg", "/work/shared/data/train/PNEUMONIA/p2.jpeg"]
    relative = ["../shared/data/train/NORMAL/IM-1.jpeg", "../shared/data/train/PNEUMONIA/p2.jpeg"]
    assert same_films(absolute, relative) and same_films(relative, absolute)
    assert not same_films(absolute, relative[::-1])  # another order
    assert not same_films(absolute, ["../other/NORMAL/IM-9.jpeg", relative[1]])  # another film
    assert not same_films(absolute, relative[:1])
    assert not same_films(["/a/x.jpeg"], ["x.jpeg"])  # a bare file name is not enough
