"""Distributed training: two CPU processes (gloo, launched through torchrun's API) against one process.

Tolerance: in features mode the two ranks compute the same features as one process (each its share,
then all-gathered) and train the head on identical data with the same seed, so the only difference
is float rounding from other thread counts (torchrun gives each rank one thread): validation loss
within 1e-3, error rate within one validation image. Full mode (DDP, DistributedSampler) draws other
batches than one process, so there the test checks identical weights on every rank and a run that
learns, not equal metrics.

Each launch starts two Python processes (about 10 s each on an idle 2-core machine, more when it is
shared), hence the timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from safetensors.torch import load_file

import pneumo
from conftest import one_torch_thread
from pneumo.cli.training import without_option
from pneumo.training import distributed
from pneumo.training.loop import StopRequested, train

SAMPLE = Path(pneumo.__file__).parent / "sample_data" / "chest_xray"
TINY = dict(image_size=32, epochs=2, feature_views=1, seed=3)  # feature_views 1: no randomly augmented views
LOSS_TOLERANCE, ERROR_TOLERANCE = 1e-3, 1 / 40 + 1e-9  # the sample's validation split has 40 images


def cli_flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def child_env() -> dict[str, str]:
    """This checkout's source first on the path; a stuck collective fails within a minute instead of hanging."""
    path = os.pathsep.join([str(Path(pneumo.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, distributed.TIMEOUT_ENV: "60"}


def pneumo_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m pneumo ARGS`` in a child process (``--nproc`` then launches torchrun from there)."""
    return subprocess.run(
        [sys.executable, "-m", "pneumo", *args], env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    from pneumo.run_folder import RunFolder

    return RunFolder(run_dir).read_metrics()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    with one_torch_thread():  # as each torchrun rank runs; on a busy machine more threads spin
        return train(SAMPLE, out=str(tmp_path_factory.mktemp("one") / "run"), progress=False, quiet=True, **TINY)


@pytest.mark.timeout(600)
def test_two_processes_train_as_one(one_process, tmp_path):
    out = tmp_path / "two"
    done = pneumo_cli(
        "train", str(SAMPLE), "--nproc", "2", "--out", str(out), "--json", "--no-export", *cli_flags(TINY)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone prints: one JSON document
    assert summary["run_dir"] == str(out)

    record = json.loads((out / "distributed.json").read_text())
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["mode"] == "features"
    # the same split on both ranks, and the one process's split
    assert len(set(record["split_sha256"])) == 1
    assert json.loads((out / "split.json").read_text()) == json.loads((one_process.run_dir / "split.json").read_text())
    # every rank hashed its own weights: all equal, and equal to the saved model
    assert len(set(record["weights_sha256"])) == 1
    assert distributed.state_hash(load_file(str(out / "model" / "model.safetensors"))) == record["weights_sha256"][0]
    # metrics as one process, within the stated tolerance
    for two, one in zip(read_metrics(out), one_process.history, strict=True):
        assert abs(two["valid_loss"] - one["valid_loss"]) <= LOSS_TOLERANCE
        assert abs(two["error_rate"] - one["error_rate"]) <= ERROR_TOLERANCE
    assert abs(summary["valid"]["roc_auc"] - one_process.evaluation["metrics"]["roc_auc"]) <= 0.03


@pytest.mark.timeout(300)
def test_a_killed_run_resumes_on_two_processes_in_full_mode(tmp_path):
    out = tmp_path / "full"
    options = dict(TINY, mode="full", batch_size=32)
    with pytest.raises(StopRequested):  # stands in for a kill after the first epoch's checkpoint
        train(SAMPLE, out=str(out), progress=False, quiet=True, stop_after_epoch=1, **options)
    first = read_metrics(out)
    assert len(first) == 1

    done = pneumo_cli("train", "--resume", "--out", str(out), "--nproc", "2", "--no-export")
    assert done.returncode == 0, done.stderr[-3000:]
    history = read_metrics(out)
    assert [r["epoch"] for r in history] == [1, 2] and history[0] == first[0]  # continued, not restarted
    record = json.loads((out / "distributed.json").read_text())
    assert record["mode"] == "full" and len(set(record["weights_sha256"])) == 1  # DDP kept the ranks equal
    assert distributed.state_hash(load_file(str(out / "model" / "model.safetensors"))) == record["weights_sha256"][0]
    assert history[1]["train_loss"] < 5 and (out / "valid_eval.json").exists()


@pytest.mark.timeout(120)
def test_a_rank_that_dies_ends_the_run_with_a_message(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(
        "import os\n"
        "from pneumo.training import distributed\n"
        "ctx = distributed.setup('cpu')\n"
        "if ctx.rank == 1:\n"
        "    os._exit(3)\n"
        "distributed.barrier()  # rank 0 would wait here for ever without torchrun's agent\n"
    )
    launcher = (
        "import sys\n"
        "from pneumo.errors import PneumoError\n"
        "from pneumo.training.distributed import launch\n"
        "try:\n"
        f"    launch(2, [{str(script)!r}], module=None)\n"
        "except PneumoError as exc:\n"
        "    sys.exit(f'pneumo: error: {exc}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", launcher], env=child_env(), capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 1  # not a hang: the launcher returned
    assert "rank 1 exited first, with code 3" in done.stderr
    assert "torchrun then stopped rank(s) 0" in done.stderr


def test_one_process_needs_no_process_group():
    ctx = distributed.current()
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert distributed.shard(10) == slice(0, 10)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_shards_cover_every_item_once(monkeypatch):
    for n, world in [(10, 3), (2, 2), (7, 4), (40, 2)]:
        taken = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "_current", distributed.Dist(rank, world, rank, "gloo"))
            taken += list(range(n))[distributed.shard(n)]
        assert taken == list(range(n))


def test_state_hash_sees_one_changed_weight():
    import torch

    net = torch.nn.Linear(3, 2)
    before = distributed.state_hash(net)
    assert before == distributed.state_hash(dict(net.state_dict()))
    with torch.no_grad():
        net.bias[0] += 1e-6
    assert distributed.state_hash(net) != before


def test_the_launched_copies_do_not_launch_again():
    argv = ["train", "DATA", "--nproc", "2", "--epochs", "1", "--nproc=3"]
    assert without_option(argv, "--nproc") == ["train", "DATA", "--epochs", "1"]


@pytest.mark.parametrize(
    "device, gpus, backend",
    [("auto", 2, "nccl"), ("cuda", 2, "nccl"), ("auto", 0, "gloo"), ("cpu", 2, "gloo")],
)
def test_each_rank_joins_with_nccl_on_its_own_gpu_or_gloo_on_cpus(monkeypatch, device, gpus, backend):
    """The choice torchrun's ranks make on a GPU node, run here with CUDA's answers simulated (no GPU on
    this machine): nccl and the GPU of LOCAL_RANK when training on GPUs, gloo otherwise; the process
    group is given the collective timeout."""
    import torch

    joined, gpu_set = [], []
    monkeypatch.setattr(distributed, "_current", distributed.Dist())
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", gpu_set.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda b, timeout: joined.append((b, timeout)))
    ctx = distributed.setup(device)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (3, 4, 1, backend)
    assert joined == [(backend, timedelta(seconds=42))]
    assert gpu_set == ([1] if backend == "nccl" else [])
    assert ctx.comm_device == (torch.device("cuda", 1) if backend == "nccl" else torch.device("cpu"))
    assert not ctx.is_main


def test_more_ranks_than_gpus_is_refused_before_joining(monkeypatch):
    import torch

    monkeypatch.setattr(distributed, "_current", distributed.Dist())
    for name, value in {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    with pytest.raises(distributed.PneumoError, match=r"rank 2: LOCAL_RANK 2 but 2 GPU\(s\) visible"):
        distributed.setup("auto")
