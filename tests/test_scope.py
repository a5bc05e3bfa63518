"""Out-of-scope films: DICOM tags that say "not a frontal chest film", and films far from the training films."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import SAMPLE_ROOT, SHARED_DATA, load_bench, one_torch_thread
from pneumo.infer import scope as scope_module
from pneumo.infer.model_folder import load_model
from pneumo.infer.predict import predict_files, write_predictions
from pneumo.infer.scope import (
    ENSEMBLE_SCOPE_FILE,
    SCOPE_FILE,
    ScopeCheck,
    dicom_tag_reasons,
    fit_feature_scope,
    read_feature_scope,
    write_ensemble_scope,
)

pydicom = pytest.importorskip("pydicom", reason="the 'dicom' extra is not installed")
from dicom_synth import write_dicom  # noqa: E402

SHARED_DICOM = SHARED_DATA / "dicom"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def trust_distance(monkeypatch):
    """The test model was validated on 40 films, too few for the distance check: trust it anyway, to
    test the check itself (training.finish writes statistics from 8 films on)."""
    monkeypatch.setattr(scope_module, "MIN_DISTANCE_FILMS", 8)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, None),
        ({"Modality": "DX", "BodyPartExamined": "", "ViewPosition": ""}, None),  # silent tags: no verdict
        ({"Modality": "CR", "BodyPartExamined": "EXTREMITY", "ViewPosition": "AP"}, "BodyPartExamined is EXTREMITY"),
        ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "LL"}, "ViewPosition is LL"),
        ({"Modality": "CT", "BodyPartExamined": "CHEST"}, "Modality is CT"),
        ({"Modality": "CR", "StudyDescription": "MODALITYLUT - TEETH"}, "description names TEETH"),
        ({"Modality": "CR", "StudyDescription": "Thorax PA, TEETH visible"}, None),  # chest named too
        ({"Modality": "CR", "BodyPartExamined": "Sm1th John 1970"}, "another value"),  # free text never echoed
    ],
)
def test_tag_rules(tags, expected):
    reasons = dicom_tag_reasons(tags)
    if expected is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and expected in reasons[0]


def test_feature_distance_flags_films_off_the_validation_subspace():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 64))
    valid = rng.normal(size=(400, 8)) @ basis + 0.1 * rng.normal(size=(400, 64))
    scope = fit_feature_scope(valid)
    assert 0.004 <= np.mean(scope.valid_distances > scope.threshold) <= 0.01  # the 99.5th percentile, held out
    same = rng.normal(size=(2000, 8)) @ basis + 0.1 * rng.normal(size=(2000, 64))
    assert np.mean(scope.distances(same) > scope.threshold) < 0.03
    other = same[:200] + 0.5 * rng.normal(size=(200, 64))  # off the subspace
    assert np.all(scope.distances(other) > scope.threshold)


def test_training_writes_scope_stats_and_predict_reports_scope(trained_run, tmp_path, trust_distance):
    stats = read_feature_scope(trained_run / "model")
    assert stats is not None and stats.threshold > 0 and stats.components.shape[1] == stats.mean.shape[0]
    chest = write_dicom(tmp_path / "chest.dcm")
    knee = write_dicom(tmp_path / "knee.dcm", body_part="KNEE", view="AP")
    jpeg = next((SAMPLE_ROOT / "test" / "NORMAL").glob("*.jpeg"))
    rows = predict_files(trained_run / "model", [chest, knee, jpeg], progress=False)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert (
        by_name["knee.dcm"]["in_scope"] is False and "BodyPartExamined is KNEE" in by_name["knee.dcm"]["scope_reason"]
    )
    assert by_name["knee.dcm"]["label"] is None and by_name["knee.dcm"]["p_PNEUMONIA"] >= 0
    assert by_name[jpeg.name]["in_scope"] is True and by_name[jpeg.name]["label"] in ("NORMAL", "PNEUMONIA")
    assert all(isinstance(r["scope_distance"], float) for r in rows)
    out = io.StringIO()
    write_predictions(rows, "csv", out)
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert {"in_scope", "scope_reason", "scope_distance"} <= set(table[0])
    out = io.StringIO()
    write_predictions(rows, "table", out)
    assert "knee.dcm: OUT OF SCOPE (DICOM BodyPartExamined is KNEE" in out.getvalue()


def test_predicting_and_checking_scope_take_one_pass_through_the_body(trained_run, trust_distance):
    """The scope check measures the features the prediction computed on the way: one pass through the
    body per batch (it was two), with the probabilities and verdicts of two separate passes."""
    from pneumo.data.imaging import prepare

    loaded = load_model(trained_run / "model")
    films = sorted((SAMPLE_ROOT / "test").rglob("*.jpeg"))[:6]
    pixels = np.stack([prepare(f, loaded.meta.image_size) for f in films])
    scope = ScopeCheck(loaded)
    assert scope.by_features
    passes = []
    hook = loaded.net.body.register_forward_hook(lambda *_: passes.append(1))
    try:
        probs, verdicts = scope.read(pixels, films)
    finally:
        hook.remove()
    assert len(passes) == 1
    assert np.allclose(probs, loaded.probabilities(pixels), atol=1e-6)
    for one_pass, separate in zip(verdicts, scope.check(pixels, films), strict=True):
        assert one_pass["in_scope"] == separate["in_scope"]
        assert one_pass["scope_distance"] == pytest.approx(separate["scope_distance"], rel=1e-5)


def test_an_older_model_folder_is_checked_by_tags_only(trained_run, tmp_path):
    old = Path(shutil.copytree(trained_run / "model", tmp_path / "old"))
    (old / SCOPE_FILE).unlink()
    check = ScopeCheck(load_model(old))
    assert not check.by_features and "tags only" in check.method
    knee = write_dicom(tmp_path / "knee.dcm", body_part="KNEE")
    rows = predict_files(old, [knee, write_dicom(tmp_path / "chest.dcm")], progress=False)
    assert [r["in_scope"] for r in rows] == [False, True] and rows[1]["scope_distance"] is None


def test_ensemble_threshold_from_member_distances(trained_run, tmp_path):
    members = [Path(shutil.copytree(trained_run / "model", tmp_path / f"m{i}")) for i in range(2)]
    threshold = write_ensemble_scope(members, tmp_path)
    stored = json.loads((tmp_path / ENSEMBLE_SCOPE_FILE).read_text())
    assert stored["threshold"] == pytest.approx(threshold) and 0.5 < threshold <= 1.0 + 1e-9  # same member twice
    (members[1] / SCOPE_FILE).unlink()
    assert write_ensemble_scope(members, tmp_path / "x") is None


def test_serve_says_out_of_scope_for_a_dicom_upload(trained_run, tmp_path, trust_distance):
    from pneumo.serve.app import create_app

    client = TestClient(create_app(trained_run / "model"))
    knee = write_dicom(tmp_path / "knee.dcm", body_part="KNEE").read_bytes()
    r = client.post("/api/predict?heatmap=false", files={"file": ("k.dcm", knee, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["in_scope"] is False and body["label"] is None and "KNEE" in body["warning"]
    assert body["reading"] is None and body["p_positive"] == body["probabilities"]["PNEUMONIA"]  # kept, undecided
    chest = write_dicom(tmp_path / "chest.dcm").read_bytes()
    r = client.post("/api/predict?heatmap=false", files={"file": ("c.dcm", chest, "application/octet-stream")})
    assert r.status_code == 200 and "in_scope" in r.json() and r.json()["image"]["mode"] == "L"
    assert (
        client.get("/api/model").json()["scope_check"] == "DICOM tags and distance from the validation films' features"
    )


def test_a_model_validated_on_few_films_is_checked_by_tags_only_and_says_why(trained_run, tmp_path):
    """The demo model (40 validation films) called a NORMAL test film of the sample out of scope: its
    99.5th percentile is about the largest of 40 distances. Below MIN_DISTANCE_FILMS the distance
    check is not trusted, DICOM tags decide, and every verdict (predict's rows, serve's answers and
    /api/model) says so."""
    from pneumo.serve.app import create_app

    loaded = load_model(trained_run / "model")
    n, least = len(read_feature_scope(trained_run / "model").valid_distances), scope_module.MIN_DISTANCE_FILMS
    assert n < least
    why = f"distance check not trusted: the model was validated on {n} films, fewer than {least}"
    check = ScopeCheck(loaded)
    assert not check.by_features and check.method == f"DICOM tags only ({why})"
    films = sorted((SAMPLE_ROOT / "test").rglob("*.jpeg"))
    knee = write_dicom(tmp_path / "knee.dcm", body_part="KNEE")
    rows = predict_files(loaded, [*films, knee], progress=False)
    assert all(r["in_scope"] for r in rows[:-1])  # every in-distribution film keeps its label
    assert all(r["scope_reason"] == why and r["scope_distance"] is None and r["label"] for r in rows[:-1])
    assert rows[-1]["in_scope"] is False and rows[-1]["scope_reason"].startswith("DICOM BodyPartExamined is KNEE")
    assert rows[-1]["scope_reason"].endswith(why)
    table = io.StringIO()
    write_predictions(rows, "table", table)
    assert table.getvalue().count(why) == 2  # the knee's line, and once for the films read by tags alone
    assert table.getvalue().endswith(f"scope: {why}\n")
    client = TestClient(create_app(trained_run / "model"))
    r = client.post("/api/predict?heatmap=false", files={"file": (films[0].name, films[0].read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["in_scope"] is True and r.json()["scope_reason"] == why
    assert r.json()["scope_distance"] is None and r.json()["label"]
    assert why in client.get("/api/model").json()["scope_check"]


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"shared DICOM films not found at {SHARED_DICOM}")
def test_the_shared_dental_and_tibia_films_are_out_of_scope_by_their_tags(tmp_path):
    from pneumo.infer.scope import dicom_reasons

    for name, expected in [
        ("teeth_cr_mono1_modality_lut_jpeg_lossless.dcm", "TEETH"),
        ("tibia_cr_mono1_jpeg2000_lossless.dcm", "EXTREMITY"),
        ("chest_cr_mono1_15bit_jpeg2000.dcm", None),
        ("chest_cr_mono2_jpeg_baseline.dcm", None),
        ("chest_cr_mono1_10bit_no_meta.dcm", None),
    ]:
        path = Path(shutil.copy(SHARED_DICOM / name, tmp_path / name))
        reasons = dicom_reasons(path)
        assert (expected in " ".join(reasons)) if expected else reasons == [], (name, reasons)


def test_min_distance_films_is_the_number_the_benchmark_measured():
    """MIN_DISTANCE_FILMS comes from bench/results/scope_valid_films.json, which reproduced the issue."""
    result = json.loads((SAMPLE_ROOT.parents[3] / "bench" / "results" / "scope_valid_films.json").read_text())
    assert result["summary"]["trusted_from"] == scope_module.MIN_DISTANCE_FILMS
    own = result["model_own_scope"]  # the demo model: 40 validation films, a sample test film flagged
    assert own["valid_films"] < scope_module.MIN_DISTANCE_FILMS and own["sample_test_flagged"] >= 1
    rows = {r["valid_films"]: r for r in result["by_valid_films"]}
    assert rows[8]["pool_false_rate_mean"] > 5 * rows[scope_module.MIN_DISTANCE_FILMS]["pool_false_rate_mean"]


def test_the_benchmark_finds_where_false_out_of_scope_calls_settle():
    """bench/scope_valid_films.py on synthetic features: few validation films, many false calls."""
    bench = load_bench("scope_valid_films")
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 64))
    pool = rng.normal(size=(600, 8)) @ basis + 0.3 * rng.normal(size=(600, 64))
    labels, patients = np.arange(600) % 2, np.arange(600)
    test = rng.normal(size=(60, 8)) @ basis + 0.3 * rng.normal(size=(60, 64))
    few, many = (bench.false_rates(pool, labels, patients, test, n, 10, 0) for n in (10, 200))
    assert few["pool_false_rate_mean"] > 3 * many["pool_false_rate_mean"] and many["pool_false_rate_mean"] < 0.02
    rows = [
        {"valid_films": 8, "pool_false_rate_mean": 0.05, "pool_false_rate_p90": 0.1},
        {"valid_films": 40, "pool_false_rate_mean": 0.008, "pool_false_rate_p90": 0.015},
        {"valid_films": 80, "pool_false_rate_mean": 0.012, "pool_false_rate_p90": 0.015},  # not yet
        {"valid_films": 120, "pool_false_rate_mean": 0.005, "pool_false_rate_p90": 0.01},
    ]
    assert bench.trusted_from(rows) == 120 and bench.trusted_from(rows[:3]) is None
