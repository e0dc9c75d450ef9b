"""Real asynchronous mode: parameter-server and worker processes over gloo, on tiny CIFAR-format data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowmo_train.asynchronous.server import shard_bounds
from slowmo_train.scripting import read_metrics
from tests.distributed_helpers import run_distributed

pytestmark = pytest.mark.multiproc


def _train(rank, world_size, root, cache, out, name, servers):
    from slowmo_train.asynchronous.runner import AsyncRunner
    from slowmo_train.config import JobConfig
    from slowmo_train.config_checks import validate
    from slowmo_train.dist import read_env

    job = JobConfig()
    job.algorithm.name, job.algorithm.mode, job.algorithm.servers = name, "real", servers
    job.model.width = 0.0625
    job.data.root, job.data.cache_dir, job.data.download = root, cache, "false"
    job.train.batch_size, job.train.epochs, job.train.eval_batch_size = 10, 3.0, 50
    job.train.log_every, job.train.progress = 4, "none"
    job.optim.lr, job.optim.schedule = 0.5, "constant"
    validate(job, world_size=world_size, check_paths=False)
    Path(out).mkdir(parents=True, exist_ok=True)
    return AsyncRunner(job, read_env(), torch.device("cpu"), Path(out)).run()


def test_shard_bounds_cover_the_vector():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]


def test_one_server_two_workers_trains_with_staleness_about_one(torchvision_cifar, tmp_path):
    out = tmp_path / "run"
    results = run_distributed(_train, 3, args=(str(torchvision_cifar), str(tmp_path / "cache"), str(out), "dana", 1))
    summary = results[0]
    # 200 images over 3 ranks: 66 per rank, 6 batches of 10 per worker and epoch, 2 workers, 3 epochs
    assert summary["steps"] >= 36
    assert summary["workers"] == 2
    # two equally fast workers alternate: each gradient is about one update old
    assert 0.5 <= summary["staleness_mean"] <= 1.5, summary["staleness_histogram"]
    # it learns: the test loss is below that of a uniform guess over 10 classes, ln 10 = 2.30 (the
    # arrival order, hence the exact figure, depends on timing)
    assert summary["final_eval"]["loss"] < 2.2, summary["final_eval"]
    lines = read_metrics(out)
    evals = [r for r in lines if r["event"] == "eval"]
    assert len(evals) == 3  # after epochs 1 and 2, and the final one
    assert all("staleness_mean" in r and "updates_per_s" in r for r in lines if r["event"] == "train")
    ckpt = torch.load(out / "checkpoint_async.pt")
    assert ckpt["master"]["v"].shape[0] == 2  # DANA-Zero: one momentum buffer per worker


def test_two_servers_shard_the_parameters(torchvision_cifar, tmp_path):
    out = tmp_path / "run"
    results = run_distributed(
        _train, 4, args=(str(torchvision_cifar), str(tmp_path / "cache"), str(out), "dana_slim", 2)
    )
    # every gradient goes to both servers, so both shards apply the same number of updates
    assert results[0]["steps"] == results[1]["steps"] >= 24
    assert results[0]["final_eval"] == results[1]["final_eval"]
    a = torch.load(out / "checkpoint_async.server0.pt")["master"]["theta"]
    b = torch.load(out / "checkpoint_async.server1.pt")["master"]["theta"]
    assert abs(a.numel() - b.numel()) <= 1


@pytest.mark.slow
def test_cli_runs_real_mode_with_three_processes(tmp_path, folder_cifar):
    """Through the user's entry point: algorithm=nag_asgd algorithm.mode=real launcher.nproc_per_node=3."""
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "slowmo_train",
        "algorithm=nag_asgd",
        "algorithm.mode=real",
        "launcher.nproc_per_node=3",
        "launcher.threads_per_worker=1",
        f"data.root={folder_cifar}",
        "data.download=false",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.width=0.0625",
        "train.batch_size=10",
        "train.epochs=2",
        "train.progress=log",
        f"output_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "real" and summary["workers"] == 2
    assert 0.3 <= summary["staleness_mean"] <= 1.7
