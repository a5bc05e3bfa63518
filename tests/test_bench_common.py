"""bench/common.py: the seeded stratified subsets and the way every bench script ends (JSON out, errors in a line)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_bench
from pneumo.errors import DataError

common = load_bench("common")


def test_stratified_indices_keep_proportions_add_up_and_are_seeded():
    labels = np.array([0] * 30 + [1] * 90)
    keep = common.stratified_indices(labels, 40, np.random.default_rng(1))
    assert len(keep) == 40 and (labels[keep] == 0).sum() == 10 and np.all(np.diff(keep) > 0)
    assert np.array_equal(keep, common.stratified_indices(labels, 40, np.random.default_rng(1)))
    assert not np.array_equal(keep, common.stratified_indices(labels, 40, np.random.default_rng(2)))
    assert len(common.stratified_indices(labels, 7, np.random.default_rng(0))) == 7  # remainders fill the quota
    assert np.array_equal(common.stratified_indices(labels, None, np.random.default_rng(0)), np.arange(120))
    assert np.array_equal(common.stratified_indices(labels, 500, np.random.default_rng(0)), np.arange(120))


def test_stratified_subset_links_a_seeded_share_of_each_class(tmp_path, write_image):
    for i in range(30):
        write_image(tmp_path / "data" / "NORMAL" / f"IM-{i:04d}-0001.jpeg")
    for i in range(90):
        write_image(tmp_path / "data" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg")
    root = common.stratified_subset(tmp_path / "data", 40, 1, tmp_path / "a")
    normal, pneumonia = sorted((root / "NORMAL").iterdir()), sorted((root / "PNEUMONIA").iterdir())
    assert (len(normal), len(pneumonia)) == (10, 30)
    assert all(p.is_symlink() and p.resolve().parent.parent == tmp_path / "data" for p in normal + pneumonia)
    again = common.stratified_subset(tmp_path / "data", 40, 1, tmp_path / "b")
    other = common.stratified_subset(tmp_path / "data", 40, 2, tmp_path / "c")
    names = lambda r: sorted(p.name for p in r.rglob("*.jpeg"))  # noqa: E731
    assert names(again) == names(root) and names(other) != names(root)
    assert common.stratified_subset(tmp_path / "data", 500, 1, tmp_path / "d") == tmp_path / "data"


@pytest.mark.parametrize(("value", "expected"), [(0.123456, 0.1235), (float("nan"), None), (None, None), (3, 3.0)])
def test_rounded_is_json_safe(value, expected):
    assert common.rounded(value) == expected


def test_run_report_prints_json_writes_it_and_keeps_pneumo_prints_off_stdout(tmp_path, capsys):
    def run() -> dict:
        print("an epoch table")  # what pneumo prints while the benchmark runs
        return {"figure": 1.5}

    out = tmp_path / "sub" / "r.json"
    assert common.run_report(run, out) == 0
    said = capsys.readouterr()
    printed = json.loads(said.out)
    assert printed.pop("written_to") == str(out) and printed == json.loads(out.read_text()) == {"figure": 1.5}
    assert "an epoch table" in said.err
    assert common.run_report(run, lambda report: tmp_path / f"named_{report['figure']}.json") == 0
    assert (tmp_path / "named_1.5.json").is_file()


def test_run_report_says_a_pneumo_error_in_one_line_with_status_2(tmp_path, capsys):
    def run() -> dict:
        raise DataError("data/: no images found")

    assert common.run_report(run, tmp_path / "never.json") == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err.strip() == "error: data/: no images found"
    assert not (tmp_path / "never.json").exists()


def test_bench_scripts_import_common_not_their_own_copies():
    """The helpers live once: no bench script defines its own copy of a common one."""
    shared = {
        "stratified_indices",
        "stratified_subset",
        "cpu_seconds",
        "free_port",
        "rounded",
        "write_report",
        "wait_for_health",
    }
    for script in sorted(common.BENCH.glob("*.py")):
        if script.name == "common.py":
            continue
        text = script.read_text()
        copies = [name for name in shared if f"def {name}(" in text]
        assert not copies, f"{script.name} defines {copies}: import them from bench/common.py"


def test_wait_for_health_ends_the_benchmark_naming_the_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("Traceback: no model here\n")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    with pytest.raises(SystemExit, match=r"bench_x: server exited with 0; see .*server.log:\nTraceback"):
        common.wait_for_health(exited, f"http://127.0.0.1:{common.free_port()}", log, 5, "bench_x")
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(SystemExit, match=r"did not answer /health within 0.5 s"):
        common.wait_for_health(silent, f"http://127.0.0.1:{common.free_port()}", log, 0.5, "bench_x")
    assert silent.wait(timeout=10) != 0  # killed, not left running
