"""pneumo adapt: the body's BatchNorm re-estimated on a site's unlabelled films, the threshold re-derived
without labels, recorded in model.json without a file name; evaluate --adapt; bench/adapt.py."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SAMPLE_ROOT, load_bench, one_torch_thread
from pneumo.cli import main
from pneumo.data.cache import decode_images
from pneumo.errors import ModelError, PneumoError
from pneumo.extras import available
from pneumo.infer.adapt import (
    MIN_ADAPT_FILMS,
    THRESHOLD_RULES,
    adapt_films,
    adapt_loaded,
    adapt_model,
    estimate_prevalence,
    prior_shift_threshold,
    resolve_rule,
)
from pneumo.infer.ensemble import make_ensemble
from pneumo.infer.model_folder import EnsembleModel, load_model
from pneumo.infer.predict import evaluate_model_on_folder, expand_paths, predict_files
from pneumo.infer.runtime import resolve_runtime
from pneumo.model_meta import read_model_meta
from pneumo.nets.batchnorm import BN_ADAPT_BATCH_SIZE

SITE = SAMPLE_ROOT / "test"  # 30 + 30 films the tiny model never trained on


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def site_pixels() -> np.ndarray:
    decoded = decode_images(expand_paths([SITE]), 64, progress=False, use_cache=False)
    assert decoded.ok.all()
    return np.asarray(decoded.pixels)


def running_stats(state: dict, prefix: str) -> list[str]:
    return [k for k in state if k.startswith(prefix) and k.rsplit(".", 1)[-1] in ("running_mean", "running_var")]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_body_reestimated(before: dict, after: dict, films: int, other: dict) -> None:
    """Every body BatchNorm layer saw every batch and took its statistics from the films, naming any layer that did not.

    A variance always depends on the films. A mean need not: a train-mode BatchNorm's output has batch mean
    exactly its bias, so the mean of a layer fed by a block's output through a 1x1 convolution (EfficientNet's
    ``blocks.S.B.bn1``, B > 0) is ``W @ (sum of the biases before it)`` whatever the films; it may equal the
    trained value to the last bits (issue 30: ``blocks.5.2.bn1`` at one thread). Such a mean must then be the
    same in ``other``, an adaptation on different films; every other mean must have moved.
    """
    batches = math.ceil(films / BN_ADAPT_BATCH_SIZE)
    layers = sorted({k.rsplit(".", 1)[0] for k in running_stats(before, "body.")})
    assert len(layers) > 30
    for layer in layers:
        assert int(after[f"{layer}.num_batches_tracked"]) == batches, (
            f"{layer} saw {after[f'{layer}.num_batches_tracked']} batches, not {batches}"
        )
        var, mean = f"{layer}.running_var", f"{layer}.running_mean"
        assert not torch.allclose(before[var], after[var]), f"{var} was left as trained"
        if torch.allclose(before[mean], after[mean]):
            torch.testing.assert_close(
                other[mean], after[mean], rtol=1e-4, atol=1e-5, msg=lambda m, k=mean: f"{k} left as trained: {m}"
            )


@pytest.mark.parametrize("threads", [1, 2])
def test_the_body_batchnorm_is_re_estimated_on_the_films_and_the_head_is_left_as_trained(
    trained_run, site_pixels, threads
):
    model = load_model(trained_run)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    with torch_threads(threads):
        adapted = adapt_loaded(model, site_pixels, progress=False).model
        other = adapt_loaded(model, 255 - site_pixels[:40], progress=False).model.net.state_dict()
    after = adapted.net.state_dict()
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())  # the given model is untouched

    body, head = running_stats(before, "body."), running_stats(before, "head.")
    assert len(body) > 60 and len(head) == 4
    assert_body_reestimated(before, after, len(site_pixels), other)
    assert all(torch.equal(before[k], after[k]) for k in head)
    learnt = [k for k in before if not k.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))]
    assert all(torch.equal(before[k], after[k]) for k in learnt)  # weights as trained

    # a direct recomputation: the same films through a copy of the body in train mode, momentum None
    net = copy.deepcopy(model.net)
    for bn in net.body.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    net.body.train()
    batches = [torch.from_numpy(site_pixels[i : i + 8]).unsqueeze(1) for i in range(0, len(site_pixels), 8)]
    with torch.no_grad():
        for x in batches:
            net.body(net.normalize(x))
        expected = net.state_dict()
        for k in body:
            torch.testing.assert_close(after[k], expected[k], rtol=1e-4, atol=1e-5)
        # and, from first principles, the first BatchNorm: the mean over batches of each batch's statistics
        maps = [model.net.body.conv_stem(model.net.normalize(x)) for x in batches]
    flat = [m.transpose(0, 1).flatten(1) for m in maps]
    bn1 = adapted.net.body.bn1
    torch.testing.assert_close(bn1.running_mean, torch.stack([f.mean(1) for f in flat]).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn1.running_var, torch.stack([f.var(1) for f in flat]).mean(0), rtol=1e-4, atol=1e-5)

    assert not np.allclose(adapted.probabilities(site_pixels), model.probabilities(site_pixels))


def site_copy(tmp_path: Path, n: int | None = None) -> Path:
    """The sample's test films in class folders (labels there, never read), plus one unreadable file."""
    site = tmp_path / "site"
    for f in expand_paths([SITE])[:n]:
        dest = site / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    (site / "broken.jpeg").write_bytes(b"not an image")
    return site


def test_the_re_estimation_does_not_depend_on_the_thread_count(trained_run, site_pixels):
    model = load_model(trained_run)
    states = []
    for threads in (1, 2):
        with torch_threads(threads):
            states.append(adapt_loaded(model, site_pixels, progress=False).model.net.state_dict())
    for k in running_stats(states[0], "body."):
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_pneumo_adapt_writes_a_model_folder_that_predicts_and_names_no_film(trained_run, tmp_path, capsys):
    site, out = site_copy(tmp_path), tmp_path / "adapted"
    assert main(["adapt", str(trained_run), str(site), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    record = summary["adaptation"]
    assert summary["out"] == str(out) and list(summary["skipped"]) == [str(site / "broken.jpeg")]
    assert record["films"] == 60 and record["films_skipped"] == 1 and record["labels_used"] is False
    assert record["method"] == "batchnorm" and record["batch_size"] == 8 and record["min_films"] == MIN_ADAPT_FILMS
    assert record["date"] and len(record["films_sha256"]) == 64
    if available("onnx", "onnxruntime", "onnxscript"):  # pneumo[onnx]: the new folder is exported, parity-checked
        assert summary["onnx_export"].startswith(f"ONNX export written to {out / 'model.onnx'}")
        assert resolve_runtime(out)[0] == "onnx"
    # the sample's validation is too small for a threshold rule, so the run fell back to the calibrated
    # cut fixed:0.5, and auto moves a posterior cut with the prior (a rule's threshold it would keep)
    kind = read_model_meta(Path(trained_run) / "model" / "model.json").threshold_method.split(":")[0]
    assert record["threshold"]["rule"] == ("prior" if kind == "fixed" else "keep")
    assert 0 < record["estimated_prevalence"] < 1 and 0 < record["training_prevalence"]["value"] < 1

    meta = read_model_meta(out / "model.json")
    assert meta.adaptation == record and meta.threshold == record["threshold"]["after"]
    text = (out / "model.json").read_text()
    films = [f for f in site.rglob("*") if f.is_file()]
    assert len(films) == 61 and not [f for f in films if f.name in text or f.stem in text]
    assert str(site) not in text and str(tmp_path) not in text

    trained = load_model(trained_run)
    adapted = load_model(out)
    body = running_stats(trained.net.state_dict(), "body.")
    assert not torch.allclose(trained.net.state_dict()[body[0]], adapted.net.state_dict()[body[0]])
    rows = predict_files(out, [site / "NORMAL"], progress=False)
    assert len(rows) == 30 and all(r["threshold"] == meta.threshold for r in rows)

    assert main(["adapt", str(trained_run), str(site), "--out", str(tmp_path / "again"), "--no-export"]) == 0
    said = capsys.readouterr().out
    assert "no ONNX export: --no-export" in said and not (tmp_path / "again" / "model.onnx").exists()
    assert "adapted on 60 unlabelled films" in said and "skipped" in said and "broken.jpeg" in said
    again = read_model_meta(tmp_path / "again" / "model.json").adaptation
    assert again["films_sha256"] == record["films_sha256"]  # the same films give the same hash

    assert adapt_model(trained_run, [site / "PNEUMONIA", site / "NORMAL"], tmp_path / "api", progress=False).is_dir()
    shuffled = read_model_meta(tmp_path / "api" / "model.json").adaptation
    assert shuffled["films_sha256"] == record["films_sha256"]  # in another order, from other paths


def test_too_few_films_are_refused_with_the_count_unless_allowed(trained_run, tmp_path, capsys):
    site, out = site_copy(tmp_path, n=5), tmp_path / "out"
    with pytest.raises(PneumoError, match=rf"5 readable films found in {site}.*needs at least {MIN_ADAPT_FILMS}"):
        adapt_films(trained_run, site, out, progress=False)
    assert not out.exists()
    assert main(["adapt", str(trained_run), str(site), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "5 readable films" in err and f"at least {MIN_ADAPT_FILMS}" in err and "--allow-few" in err

    result = adapt_films(trained_run, site, out, allow_few=True, progress=False)
    assert result.record["films"] == 5 and result.record["few_films_allowed"] is True
    with pytest.raises(PneumoError, match="holds a model already"):
        adapt_films(trained_run, site, out, allow_few=True, progress=False)


def test_evaluate_adapt_adapts_on_the_evaluated_films_without_their_labels(trained_run, capsys):
    assert main(["evaluate", str(trained_run), str(SAMPLE_ROOT), "--adapt", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    adapted = report["adapted"]
    assert adapted["films"] == 60 and adapted["labels_used"] is False and adapted["method"] == "batchnorm"
    assert report["threshold"] == pytest.approx(adapted["threshold"]["after"])
    plain = evaluate_model_on_folder(trained_run, SAMPLE_ROOT, progress=False)
    assert "adapted" not in plain and plain["n"] == report["n"] == 60
    assert plain["metrics"]["roc_auc"] != report["metrics"]["roc_auc"]  # another model read the films

    assert main(["evaluate", str(trained_run), str(SAMPLE_ROOT), "--adapt", "--threshold", "prior"]) == 0
    text = capsys.readouterr().out
    assert "adapted      to these 60 films, labels unused" in text and "(prior)" in text
    assert main(["evaluate", str(trained_run), str(SAMPLE_ROOT), "--threshold", "prior"]) == 2
    assert "go with --adapt" in capsys.readouterr().err


def test_an_ensemble_is_adapted_member_by_member(trained_run, site_pixels, tmp_path):
    runs = [tmp_path / f"run{i}" for i in range(2)]
    for run in runs:
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    make_ensemble(runs, tmp_path / "ens")
    result = adapt_films(tmp_path / "ens", SITE, tmp_path / "ens_adapted", progress=False)
    original, adapted = load_model(tmp_path / "ens"), load_model(tmp_path / "ens_adapted")
    assert isinstance(adapted, EnsembleModel) and len(adapted.members) == 2
    assert adapted.meta.adaptation == result.record and adapted.threshold == result.record["threshold"]["after"]
    assert "valid_predictions.csv" in result.record["training_prevalence"]["source"]
    for old, new in zip(original.members, adapted.members):
        before, after = old.net.state_dict(), new.net.state_dict()
        other = adapt_loaded(old, 255 - site_pixels[:40], progress=False).model.net.state_dict()
        assert_body_reestimated(before, after, len(site_pixels), other)
        assert all(torch.equal(before[k], after[k]) for k in running_stats(before, "head."))
        assert new.meta.adaptation["films"] == 60 and new.meta.adaptation["threshold"] is None
        assert new.meta.adaptation["films_sha256"] == result.record["films_sha256"]
    rows = predict_files(tmp_path / "ens_adapted", [SITE / "NORMAL"], progress=False)
    assert len(rows) == 30 and "error" not in rows[0]


def test_the_prior_rule_moves_the_threshold_and_readapting_starts_from_the_trained_state(trained_run, tmp_path):
    first = adapt_films(trained_run, SITE, tmp_path / "a1", threshold_rule="prior", progress=False).record
    t, pi, est = first["threshold"], first["training_prevalence"]["value"], first["estimated_prevalence"]
    assert t["rule"] == "prior" and t["before"] == pytest.approx(load_model(trained_run).threshold)
    assert t["after"] == pytest.approx(prior_shift_threshold(t["before"], pi, est))
    # an adapted folder has no run around it: its record keeps the training site's prevalence and threshold
    second = adapt_films(tmp_path / "a1", SITE, tmp_path / "a2", threshold_rule="prior", progress=False).record
    assert second["training_prevalence"] == first["training_prevalence"]
    assert second["threshold"]["before"] == t["before"] and second["threshold"]["after"] == pytest.approx(t["after"])
    # a model folder copied away from its run: prior cannot run, auto keeps the threshold
    bare = tmp_path / "bare"
    shutil.copytree(trained_run / "model", bare)
    with pytest.raises(PneumoError, match="prior threshold rule needs"):
        adapt_films(bare, SITE, tmp_path / "a3", threshold_rule="prior", progress=False)
    third = adapt_films(bare, SITE, tmp_path / "a4", progress=False).record
    assert third["threshold"]["rule"] == "keep" and third["estimated_prevalence"] is None
    with pytest.raises(PneumoError, match="unknown threshold rule"):
        adapt_films(trained_run, SITE, tmp_path / "a5", threshold_rule="median", progress=False)


def test_em_finds_a_new_prevalence_and_the_prior_rule_decides_as_the_reweighted_posterior():
    rng = np.random.default_rng(0)

    def posterior(score: np.ndarray, prior: float) -> np.ndarray:  # N(0,1) negatives, N(2,1) positives
        odds = np.exp(2 * score - 2) * prior / (1 - prior)
        return odds / (1 + odds)

    for true in (0.3, 0.5, 0.85):
        y = rng.random(4000) < true
        assert estimate_prevalence(posterior(rng.normal(2.0 * y, 1.0), 0.7), 0.7) == pytest.approx(true, abs=0.03)
    p = rng.random(500)
    assert estimate_prevalence(p, p.mean()) == pytest.approx(p.mean(), abs=1e-6)  # no shift, no move

    t, pi, new = 0.4, 0.74, 0.625
    moved = prior_shift_threshold(t, pi, new)
    p = np.linspace(0.0005, 0.9995, 2000)
    r = new * (1 - pi) / (pi * (1 - new))
    assert np.array_equal(p >= moved, r * p / (r * p + 1 - p) >= t) and moved > t
    assert prior_shift_threshold(t, pi, pi) == pytest.approx(t) and prior_shift_threshold(0.0, pi, new) == 0.0

    assert resolve_rule("auto", "youden") == resolve_rule("auto", "sensitivity:0.95") == "keep"
    assert resolve_rule("auto", "fixed:0.5") == resolve_rule("prior", "youden") == "prior"


def test_model_json_without_adaptation_still_loads_and_a_bad_one_is_refused(trained_run, tmp_path, capsys):
    values = json.loads((trained_run / "model" / "model.json").read_text())
    values.pop("adaptation", None)
    (tmp_path / "model.json").write_text(json.dumps(values))
    assert read_model_meta(tmp_path / "model.json").adaptation == {}
    (tmp_path / "model.json").write_text(json.dumps({**values, "adaptation": ["films"]}))
    with pytest.raises(ModelError, match="'adaptation' must be an object"):
        read_model_meta(tmp_path / "model.json")
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    said = capsys.readouterr().out
    assert all(rule in said for rule in THRESHOLD_RULES)


def test_bench_adapt_runs_on_a_small_run(trained_run, tmp_path, capsys):
    bench = load_bench("adapt")
    out = tmp_path / "adapt.json"
    args = ["--shifts", "clean,gamma_1.6+jpeg_50", "--sizes", "8,all", "--repeats", "2", "--prevalence", "native,0.625"]
    assert bench.main([str(trained_run), "--out", str(out), "--no-progress", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert printed.pop("written_to") == str(out) and printed == report
    rows = {(r["shift"], r["prevalence"], r["setting"], r["films"], r["rule"]): r for r in report["results"]}
    for shift in ("clean", "gamma_1.6+jpeg_50"):
        for prevalence in ("native", "0.625"):
            for setting in ("transductive", "disjoint"):
                for films in ("none", 8, "all"):
                    for rule in ("keep", "prior"):
                        row = rows[(shift, prevalence, setting, films, rule)]
                        for key in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "threshold"):
                            assert 0.0 <= row[key] <= 1.0, (shift, prevalence, setting, films, rule, key)
                    assert rows[(shift, prevalence, setting, 8, "keep")]["draws"] == 2
    assert rows[("clean", "0.625", "transductive", "all", "keep")]["true_prevalence"] == pytest.approx(0.625, abs=0.05)
    # the clean films are the run's validation films: EM finds the training prevalence, the prior rule keeps t
    plain = rows[("clean", "native", "transductive", "none", "prior")]
    assert plain["estimated_prevalence"] == pytest.approx(report["training_prevalence"]["value"], abs=1e-3)
    assert plain["threshold"] == pytest.approx(report["threshold"], abs=1e-3)
    assert set(report["summary"]) == {"transductive", "disjoint"}
    assert "8" in report["summary"]["transductive"]["accuracy_gap_to_all_films"]


@pytest.mark.parametrize("method", ["tent", "self-training"])
def test_the_other_methods_adapt_beyond_batchnorm_and_say_what_they_did(trained_run, site_pixels, method):
    model = load_model(trained_run)
    plain = adapt_loaded(model, site_pixels, progress=False)
    done = adapt_loaded(model, site_pixels, progress=False, method=method)
    rec = done.record
    assert rec["method"] == method and rec["labels_used"] is False and len(rec["steps"]) == 1
    a, b = plain.model.net.state_dict(), done.model.net.state_dict()
    last = f"head.{len(model.net.head) - 1}.weight"
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    if method == "tent":  # only the body's BatchNorm scales and shifts, beyond the statistics
        assert moved and all(k.startswith("body.") and k.rsplit(".", 1)[-1] in ("weight", "bias") for k in moved)
        step = rec["steps"][0]["tent"]
        assert step["entropy_last_batch"] is not None
    else:  # only the last layer, fitted on the films read with confidence
        step = rec["steps"][0]["self_training"]
        assert moved == ([last] if step["fitted"] else [])
    assert "/" not in json.dumps(rec)


def test_an_unknown_method_is_refused_by_name(trained_run, site_pixels):
    with pytest.raises(PneumoError, match="--method 'tnet'"):
        adapt_loaded(load_model(trained_run), site_pixels, progress=False, method="tnet")


def test_an_unknown_method_is_refused_before_any_film_is_decoded(trained_run, tmp_path, monkeypatch):
    import pneumo.infer.adapt as adapt_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("films were decoded before --method was checked")

    monkeypatch.setattr(adapt_module, "decode_images", no_decoding)
    with pytest.raises(PneumoError, match="--method 'tnet'"):
        adapt_module.adapt_films(trained_run, SITE, tmp_path / "out", progress=False, method="tnet")
