"""Batch prediction over an archive: streamed in chunks, resumable, the same rows from both engines."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import pneumo
from pneumo.cli import main
from pneumo.errors import PneumoError
from pneumo.infer import batch
from pneumo.infer.batch import local_chunks, predict_archive
from pneumo.infer.model_folder import load_model
from pneumo.infer.predict import predict_files


@pytest.fixture(scope="module")
def archive(tmp_path_factory, trained_run):
    """The sample's 60 test images in nested folders, and one file that is not an image."""
    root = tmp_path_factory.mktemp("archive")
    shutil.copytree(Path(pneumo.__file__).parent / "sample_data" / "chest_xray" / "test", root / "site" / "2024")
    (root / "site" / "broken.jpeg").write_bytes(b"not a jpeg")
    return root


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def by_path(rows) -> dict[str, dict]:
    return {r["path"]: r for r in rows}


def test_streamed_csv_has_the_rows_of_predict(trained_run, archive, tmp_path):
    out = tmp_path / "p.csv"
    summary = predict_archive(trained_run, [archive], out, chunk_size=7, progress=False)
    assert (summary.files, summary.predicted, summary.errors, summary.already_done) == (61, 61, 1, 0)
    written = by_path(read_csv(out))
    expected = by_path(predict_files(trained_run, [archive], progress=False))
    assert written.keys() == expected.keys()
    for path, want in expected.items():
        got = written[path]
        if "error" in want:
            assert got["error"] == want["error"] and got["label"] == ""
            continue
        assert got["label"] == (want["label"] or "") and got["error"] == ""  # out of scope: no label, ""
        assert got["in_scope"] == str(want["in_scope"])
        assert (
            abs(float(got["p_PNEUMONIA"]) - want["p_PNEUMONIA"]) < 1e-5
        )  # other batch sizes and thread counts round differently


def test_a_rerun_skips_what_is_done_and_a_torn_line_is_redone(trained_run, archive, tmp_path):
    out = tmp_path / "p.csv"
    first = predict_archive(trained_run, [archive / "site" / "2024" / "NORMAL"], out, chunk_size=8, progress=False)
    assert first.predicted == 30
    rows = read_csv(out)
    torn = rows[-1]["path"]
    text = out.read_text()
    out.write_text(text[: text.rindex(torn) + len(torn) + 5])  # a kill in the middle of the last line
    again = predict_archive(trained_run, [archive], out, chunk_size=8, progress=False)
    assert again.already_done == 29 and again.predicted == 61 - 29
    paths = [r["path"] for r in read_csv(out)]
    assert len(paths) == len(set(paths)) == 61 and torn in paths
    third = predict_archive(trained_run, [archive], out, progress=False)
    assert (third.already_done, third.predicted) == (61, 0)


def test_parquet_output_is_resumable_parts(trained_run, archive, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "p.parquet"
    predict_archive(trained_run, [archive / "site" / "2024" / "PNEUMONIA"], out, chunk_size=16, progress=False)
    assert len(list(out.glob("part-*.parquet"))) == 2  # 30 images, 16 a chunk
    summary = predict_archive(trained_run, [archive], out, chunk_size=16, progress=False)
    assert (summary.already_done, summary.predicted) == (30, 31)
    table = pq.read_table(out).to_pylist()
    assert len({r["path"] for r in table}) == len(table) == 61
    broken = [r for r in table if r["error"]]
    assert len(broken) == 1 and broken[0]["label"] is None and broken[0]["p_positive"] is None


def test_memory_is_bounded_by_chunks_not_by_the_archive(trained_run, archive, monkeypatch):
    """The local engine decodes one chunk ahead, never the whole archive, before rows are taken."""
    import pneumo.data.cache as cache

    decoded: list[int] = []
    real = cache.decode_images

    def counting(paths, *args, **kwargs):
        decoded.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(cache, "decode_images", counting)
    files = [str(p) for p in sorted((archive / "site" / "2024").rglob("*.jpeg"))]
    chunks = local_chunks(load_model(trained_run), files, chunk_size=10)
    first = next(chunks)
    assert len(first) == 10 and sum(decoded) <= 20  # this chunk and the next one, of 60
    assert sum(len(c) for c in chunks) == 50


def test_wrong_use_is_refused_with_a_message(trained_run, archive, tmp_path, capsys):
    assert main(["predict", str(trained_run), str(archive), "--engine", "ray"]) == 2
    assert "add --out" in capsys.readouterr().err
    with pytest.raises(PneumoError, match=r"\.csv file or a \.parquet folder"):
        predict_archive(trained_run, [archive], tmp_path / "p.txt", progress=False)
    with pytest.raises(PneumoError, match="--address"):
        predict_archive(trained_run, [archive], tmp_path / "p.csv", address="auto", progress=False)
    other = tmp_path / "other.csv"
    other.write_text("path,label,p_CAT\n")
    with pytest.raises(PneumoError, match="other columns"):
        predict_archive(trained_run, [archive], other, progress=False)


def test_without_ray_the_extra_is_named(trained_run, archive, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if pneumo[ray] were not installed
    with pytest.raises(PneumoError, match=r"pneumo\[ray\]"):
        predict_archive(trained_run, [archive], tmp_path / "p.csv", engine="ray", progress=False)


@pytest.mark.parametrize(
    "address, says",
    [
        ("127.0.0.1:1", r"nothing answers at 127\.0\.0\.1:1 .*ray start --head"),  # a head that is down
        ("ray://127.0.0.1:1", r"nothing answers at ray://127\.0\.0\.1:1"),  # Ray Client's port
        ("headnode", r"--address headnode: give auto, HOST:PORT"),
        ("auto", r"could not join the Ray cluster at auto \(ConnectionError: Could not find any running Ray"),
    ],
)
def test_a_ray_cluster_that_cannot_be_reached_is_named_at_once(
    trained_run, archive, tmp_path, monkeypatch, capsys, address, says
):
    """Each fails in well under a second (a dead head's port alone kept ray.init retrying for minutes),
    with exit code 2 and nothing written."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()  # runs before the module's cluster starts
    if address == "auto" and any(p.info["name"] == "gcs_server" for p in psutil.process_iter(["name"])):
        pytest.skip("another Ray cluster runs on this machine: 'auto' joins any cluster it finds")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "p.csv"
    args = ["predict", str(trained_run), str(archive), "--out", str(out), "--engine", "ray", "--address", address]
    started = time.perf_counter()
    assert main([*args, "--no-audit"]) == 2
    assert time.perf_counter() - started < 20
    assert re.search(says, capsys.readouterr().err)
    assert not out.exists() and not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster, usage statistics off, in a temporary folder; shut down afterwards."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        home = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=home, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(300)
def test_ray_engine_writes_the_rows_of_the_local_engine(ray_cluster, trained_run, archive, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    local = tmp_path / "local.csv"
    predict_archive(trained_run, [archive], local, chunk_size=16, progress=False)
    out = tmp_path / "ray.parquet"
    summary = predict_archive(trained_run, [archive], out, engine="ray", chunk_size=16, progress=False)
    assert (summary.engine, summary.predicted, summary.errors) == ("ray", 61, 1)
    assert ray_cluster.is_initialized()  # a cluster it did not start is left running
    rows = by_path(pq.read_table(out).to_pylist())
    want = by_path(read_csv(local))
    assert rows.keys() == want.keys()
    for path, row in rows.items():
        assert (row["error"] or "") == want[path]["error"]
        assert (row["label"] or "") == want[path]["label"]
        assert str(row["in_scope"] if row["in_scope"] is not None else "") == want[path]["in_scope"]
        if row["p_PNEUMONIA"] is not None:
            assert np.isclose(row["p_PNEUMONIA"], float(want[path]["p_PNEUMONIA"]), atol=1e-5)
    again = predict_archive(trained_run, [archive], out, engine="ray", progress=False)
    assert (again.already_done, again.predicted) == (61, 0)


def test_summary_reads_as_a_sentence(tmp_path):
    s = batch.BatchSummary(str(tmp_path / "p.csv"), "local", 10, 4, 6, 1, 2.0, 3.0)
    assert "6 images predicted (1 unreadable)" in batch.format_summary(s) and "4 of 10" in batch.format_summary(s)


def test_archive_readings_are_recorded_in_the_audit_trail(trained_run, archive, tmp_path, capsys):
    from pneumo.audit.summary import summarise

    db = tmp_path / "audit.sqlite"
    args = ["predict", str(trained_run), str(archive), "--out", str(tmp_path / "p.csv"), "--db", str(db)]
    assert main([*args, "--chunk-size", "25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predicted"] == 61
    assert summarise(db)["readings"] == 60  # every readable film, a chunk at a time; the broken file is not a reading
    assert main([*args, "--json"]) == 0  # a rerun skips what is done, and so records nothing twice
    assert summarise(db)["readings"] == 60
