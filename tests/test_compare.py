"""pneumo compare: identical validation sets, nested stratified patient subsets, resumable runs, outputs."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import pneumo
from pneumo.cli import main
from pneumo.compare import experiment as compare
from pneumo.compare import summary
from pneumo.compare.plots import plot_error_vs_epoch, plot_error_vs_size, plot_error_vs_time, table_markdown
from pneumo.data.folders import discover, make_split
from pneumo.errors import PneumoError

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
FRACTIONS = [0.1, 0.25]


@pytest.fixture(scope="module")
def split():
    data = discover(SAMPLE)
    return data, make_split(data, None, "patient", compare.SPLIT_SEED)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One real comparison on the bundled sample: 2 fractions, 1 seed, 1 epoch, 48 px."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread beats two fighting over a shared CPU
    try:
        out = tmp_path_factory.mktemp("compare")
        yield (
            compare.run_compare(
                SAMPLE, fractions=FRACTIONS, seeds=1, epochs=1, out=out, image_size=48, device="cpu", progress=False
            ),
            out,
        )
    finally:
        torch.set_num_threads(threads)


# --- subsets ---------------------------------------------------------------------------------
def test_subsets_are_nested_stratified_and_whole_patients(split):
    data, sp = split
    pool_patients = compare.patients_by_class(sp.train)
    for seed in (0, 1):
        previous: set = set()
        for f in (0.05, 0.1, 0.25, 0.5, 1.0):
            subset = compare.patient_subset(sp.train, f, seed)
            paths = {s.path for s in subset}
            assert previous <= paths, f"fraction {f} does not contain the smaller one (seed {seed})"
            previous = paths
            chosen = compare.patients_by_class(subset)
            for label, pids in pool_patients.items():  # every class, in proportion to its patients
                assert len(chosen[label]) == max(1, math.ceil(f * len(pids) - 1e-9))
            patients = {s.patient for s in subset}
            assert {s.path for s in sp.train if s.patient in patients} == paths, "a patient was cut in two"
        assert previous == {s.path for s in sp.train}
    assert compare.patient_subset(sp.train, 0.25, 0) == compare.patient_subset(sp.train, 0.25, 0)
    assert compare.patient_subset(sp.train, 0.25, 0) != compare.patient_subset(sp.train, 0.25, 1)
    with pytest.raises(PneumoError, match="fractions"):
        compare.patient_subset(sp.train, 0, 0)


def test_materialised_folder_is_read_back_as_the_same_split(split, tmp_path):
    data, sp = split
    subset = compare.patient_subset(sp.train, 0.25, 0)
    folder = compare.materialise(tmp_path / "f0.25-s0", data.classes, subset, sp.valid)
    again = discover(folder)
    read = make_split(again, None, "patient", 7, keep_small_valid=True)
    assert read.method == "folder"
    assert compare.digest([s.path for s in read.train]) == compare.digest([s.path for s in subset])
    assert compare.digest([s.path for s in read.valid]) == compare.digest([s.path for s in sp.valid])
    assert Counter(again.classes[s.label] for s in read.valid) == Counter(data.classes[s.label] for s in sp.valid)
    assert all(p.is_symlink() for p in (folder / "val").rglob("*.jpeg"))
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    compare.materialise(folder, data.classes, subset, sp.valid)  # unchanged: reused as it is
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*tmp*"))


# --- a real comparison -------------------------------------------------------------------------
def test_compare_writes_report_table_plots_and_records(result):
    res, out = result
    for key in ("report", "csv"):
        assert Path(res[key]).is_file()
    assert set(res["plots"]) == {"error_vs_epoch", "error_vs_time", "error_vs_size"}
    for path in res["plots"].values():
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 300
    records = sorted((out / "runs").glob("*.json"))
    assert [p.stem for p in records] == sorted(s.name for s in compare.plan_runs(["efficientnet_lite0"], FRACTIONS, 1))
    assert len(res["table"]) == 4 and {r["arm"] for r in res["table"]} == {"pretrained", "scratch"}
    assert "%" in res["answer"] and "n=" in res["answer"]
    report = Path(res["report"]).read_text()
    assert "error_vs_time.png" in report and res["answer"] in report
    for r in res["runs"]:
        walls = [row["wall_s"] for row in r["history"]]
        assert walls[0] >= r["setup_s"] >= 0 and walls == sorted(walls)
        assert r["phase"] == ("scratch" if r["arm"] == "scratch" else "frozen")
        assert not (Path(r["run_dir"]) / "checkpoints").exists()  # pruned


def test_arms_share_validation_and_training_images(result):
    res, out = result
    runs = res["runs"]
    assert len({r["valid_fingerprint"] for r in runs}) == 1
    by_fraction: dict = {}
    for r in runs:
        by_fraction.setdefault(r["fraction"], set()).add(r["train_fingerprint"])
    assert all(len(prints) == 1 for prints in by_fraction.values())
    small, large = (
        json.loads((Path(r["run_dir"]) / "split.json").read_text())
        for r in sorted((r for r in runs if r["arm"] == "scratch"), key=lambda r: r["fraction"])
    )
    names = lambda paths: {Path(p).resolve() for p in paths}
    assert names(small["valid"]) == names(large["valid"])
    assert names(small["train"]) < names(large["train"])


def test_finished_runs_are_skipped_and_json_output_is_clean(result, monkeypatch, capsys):
    res, out = result

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("pneumo.training.loop.train", no_training)
    code = main(
        [
            "compare",
            str(SAMPLE),
            "--fractions",
            ",".join(map(str, FRACTIONS)),
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--image-size",
            "48",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    again = json.loads(capsys.readouterr().out)
    assert again["design"]["skipped_existing"] == 4
    assert again["table"] == json.loads(json.dumps(res["table"]))
    with pytest.raises(PneumoError, match="image_size"):  # records made at 48 px do not answer for 64 px
        compare.run_compare(
            SAMPLE, fractions=FRACTIONS, seeds=1, epochs=1, out=out, image_size=64, device="cpu", progress=False
        )


# --- summary and figures on made-up records ------------------------------------------------------
def fake(arm: str, fraction: float, seed: int, errors: list[float], epoch_s: float, setup_s: float) -> dict:
    history, clock = [], setup_s
    for i, e in enumerate(errors):
        clock += epoch_s
        history.append({"epoch": i + 1, "error_rate": e, "time": epoch_s, "wall_s": clock})
    return {
        "name": f"a-{arm}-f{fraction}-s{seed}",
        "arch": "a",
        "arm": arm,
        "fraction": fraction,
        "seed": seed,
        "n_train": int(1000 * fraction),
        "history": history,
        "final_error": errors[-1],
        "best_error": min(errors),
        "train_s": clock,
        "roc_auc": None,
        "valid_fingerprint": "v",
    }


RECORDS = (
    [fake("pretrained", 0.1, s, [0.20, 0.12, 0.10], 1.0, 10.0) for s in (0, 1)]
    + [fake("scratch", 0.1, s, [0.40, 0.25, 0.15 + 0.02 * s], 20.0, 1.0) for s in (0, 1)]
    + [fake("pretrained", 0.5, 0, [0.10, 0.08], 2.0, 20.0), fake("scratch", 0.5, 0, [0.30, 0.06], 40.0, 1.0)]
)


def test_target_error_time_and_budget():
    s = summary.summarise(RECORDS)
    assert s["targets"] == {0.1: 0.18, 0.5: 0.10}  # the worse method's mean final error plus 2 points
    assert "the worse final error (16.0%, a scratch) plus 2 points" in s["answer"]
    assert "standard deviation between seeds is at most 1.4 points" in s["answer"]
    rows = {(r["fraction"], r["arm"]): r for r in s["table"]}
    assert rows[0.1, "pretrained"]["time_to_target_s"] == 12.0 and rows[0.1, "pretrained"]["epochs_to_target"] == 2
    assert rows[0.1, "scratch"]["reached"] == "2/2" and rows[0.1, "scratch"]["time_to_target_s"] == 61.0
    assert rows[0.1, "scratch"]["error_at_budget"] is None  # no scratch epoch ends within pretrained's 13 s
    assert rows[0.5, "scratch"]["error_at_budget"] is None and rows[0.5, "pretrained"]["error_at_budget"] == 0.08
    fixed = summary.summarise(RECORDS, target_error=0.09)
    rows = {(r["fraction"], r["arm"]): r for r in fixed["table"]}
    assert rows[0.1, "scratch"]["time_to_target_s"] is None and rows[0.1, "scratch"]["reached"] == "0/2"
    assert "not reached" in table_markdown(fixed["table"])
    assert "n=100 images" in s["answer"] and "lower final error at 1 of 2" in s["answer"]
    assert "scratch is lower at n=500" in s["answer"] and "Data efficiency" not in s["answer"]
    rows = {(r["fraction"], r["arm"]): r for r in summary.summarise(RECORDS[:4])["table"]}
    assert summary.data_efficiency("a", rows) == []  # better, but on as many images: no saving to claim
    assert summary.data_efficiency("a", {**rows, (0.1, "scratch"): {**rows[0.1, "scratch"], "n_train": 400}}) == [
        "Data efficiency: pretrained a with n=100 images (10.0%) already matches scratch with n=400 (16.0%), "
        "4x fewer images."
    ]


def test_automatic_target_is_never_chance():
    """Scratch stuck at chance: the target follows pretrained's final error, and scratch never reaches it."""
    stuck = [fake("pretrained", 0.1, 0, [0.2, 0.1], 1.0, 1.0), fake("scratch", 0.1, 0, [0.5, 0.5], 2.0, 1.0)]
    for r in stuck:
        r["n_valid_per_class"] = {"NORMAL": 50, "PNEUMONIA": 50}
    s = summary.summarise(stuck)
    assert s["targets"] == {0.1: 0.12}
    assert "a scratch ends no better than chance (50.0%)" in s["target_rules"][0.1]
    rows = {r["arm"]: r for r in s["table"]}
    assert rows["scratch"]["reached"] == "0/1" and rows["pretrained"]["time_to_target_s"] == 3.0
    assert "never beats always answering the majority class" in s["answer"]


def test_different_validation_sets_are_refused():
    with pytest.raises(PneumoError, match="different image sets"):
        compare.check_identical_validation([RECORDS[0], {**RECORDS[1], "valid_fingerprint": "other"}])


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(PneumoError, match="unknown architecture"):
        compare.run_compare(SAMPLE, archs=["nope"], out=tmp_path)
    with pytest.raises(PneumoError, match="fractions"):
        compare.run_compare(SAMPLE, fractions=[0.0, 1.5], out=tmp_path)
    with pytest.raises(PneumoError, match="target-error"):
        compare.run_compare(SAMPLE, target_error=8.0, out=tmp_path)


@pytest.mark.parametrize("plot", [plot_error_vs_epoch, plot_error_vs_time, plot_error_vs_size])
def test_plots_are_pngs(plot, tmp_path):
    import matplotlib.pyplot as plt

    path = plot(RECORDS, tmp_path / "figure.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 400
    assert plt.get_fignums() == [] and not list(tmp_path.glob(".*.tmp*"))
    with pytest.raises(PneumoError, match="no finished runs"):
        plot([], tmp_path / "empty.png")
