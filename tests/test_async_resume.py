"""Exact resume of asynchronous runs: an uncut run equals one cut (SIGTERM, checkpoint) and resumed by a
new runner that knows only the run directory (``resume=auto``), bit for bit: final master state,
logged training losses and evaluations.

    .venv/bin/python -m pytest -q tests/test_async_resume.py

Simulated mode (one process): dana, asgd and dana_slim (worker-side momentum), random (gamma) compute
times, cut mid-epoch and mid log interval with gradients in flight.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from slowmo_train.checkpoint import CheckpointError, load_rank_state, resolve_resume
from slowmo_train.scripting import read_metrics

TOTAL, CUT = 20, 7  # 200 images / batch 20 = 10 updates per epoch, 2 epochs; log_every 3


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job(root, cache, name: str, out, workers: int = 4):
    from slowmo_train.config import JobConfig

    job = JobConfig()
    job.algorithm.name, job.algorithm.sim_workers = name, workers
    job.algorithm.compute_time_dist = "gamma"
    job.model.width = 0.0625
    job.data.root, job.data.cache_dir, job.data.download = str(root), str(cache), "false"
    job.train.batch_size, job.train.epochs, job.train.eval_batch_size = 20, 2.0, 50
    job.train.log_every, job.train.progress = 3, "none"
    job.optim.lr, job.optim.schedule = 0.5, "constant"
    job.optim.warmup_epochs = 1.0  # the lr changes across the cut
    job.output_dir = str(out)
    return job


def _run(job) -> dict:
    from slowmo_train.asynchronous.runner import AsyncRunner
    from slowmo_train.dist import DistEnv

    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return AsyncRunner(job, DistEnv(), torch.device("cpu"), out).run()


def _final_state(out: Path) -> dict:
    ckpt, _ = resolve_resume("auto", out)
    assert ckpt is not None and ckpt.name == f"step_{TOTAL:08d}"
    return load_rank_state(ckpt, 0)[1]


def _records(out: Path, event: str, keys: tuple[str, ...]) -> list:
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(out) if r["event"] == event]


def _sigterm_at_pop(monkeypatch, at: int) -> None:
    """SIGTERM arrives while the simulator hands out the ``at``-th arrival (the loop stops after it)."""
    from slowmo_train.asynchronous.simulator import EventSimulator

    pop, count = EventSimulator.pop, [0]

    def pop_and_signal(self):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return pop(self)

    monkeypatch.setattr(EventSimulator, "pop", pop_and_signal)


@pytest.mark.parametrize("name", ["dana", "asgd", "dana_slim"])
def test_simulated_cut_and_resumed_equals_uncut(
    torchvision_cifar, tmp_path, single_process_group, one_thread, monkeypatch, name
):
    cache = tmp_path / "cache"
    straight = _run(_job(torchvision_cifar, cache, name, tmp_path / "straight"))
    assert straight["steps"] == TOTAL and straight["stopped_by"] is None

    cut_dir = tmp_path / "cut"
    with monkeypatch.context() as m:
        _sigterm_at_pop(m, CUT)
        first = _run(_job(torchvision_cifar, cache, name, cut_dir))
    assert first["stopped_by"] == "SIGTERM" and first["steps"] == CUT
    assert Path(first["checkpoint"]).name == f"step_{CUT:08d}"
    job = _job(torchvision_cifar, cache, name, cut_dir)
    job.resume = "auto"
    second = _run(job)  # a new runner: everything crosses through the checkpoint files
    assert second["steps"] == TOTAL and second["resumed_from"] == first["checkpoint"]

    a, b = _final_state(tmp_path / "straight"), _final_state(cut_dir)
    for key, value in a["async"]["master"].items():
        assert torch.equal(value, b["async"]["master"][key]), key
    for wa, wb in zip(a["async"]["workers"], b["async"]["workers"]):
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for key, value in a["model"].items():  # BatchNorm statistics too
        assert torch.equal(value, b["model"][key]), key
    assert a["async"]["simulator"] == b["async"]["simulator"]
    assert a["async"]["batches_drawn"] == b["async"]["batches_drawn"] == TOTAL

    losses = _records(tmp_path / "straight", "train", ("loss", "staleness_mean", "lr"))
    assert [r[0] for r in losses] == [3, 6, 9, 12, 15, 18, 20]
    assert _records(cut_dir, "train", ("loss", "staleness_mean", "lr")) == losses
    evals = _records(tmp_path / "straight", "eval", ("loss", "top1"))
    assert len(evals) == 2 and _records(cut_dir, "eval", ("loss", "top1")) == evals
    assert second["staleness_histogram"] == straight["staleness_histogram"]
    assert second["final_eval"] == straight["final_eval"] and second["best"] == straight["best"]


def test_simulated_resume_refuses_another_worker_count(
    torchvision_cifar, tmp_path, single_process_group, one_thread, monkeypatch
):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _sigterm_at_pop(m, 3)
        assert _run(_job(torchvision_cifar, tmp_path / "cache", "dana", out))["steps"] == 3
    job = _job(torchvision_cifar, tmp_path / "cache", "dana", out, workers=2)
    job.resume = "auto"
    with pytest.raises(CheckpointError, match="algorithm.sim_workers=4"):
        _run(job)


# --- real mode: 1 server + 1 worker, whose arrival order is deterministic ------------------------------


def _real_runs(rank, world_size, root, cache, base, name):
    """In the same gloo ranks: an uncut run, a run cut at update 15 (train.max_steps: it stops at an
    evaluation barrier and writes its checkpoint there) and its continuation by new runners."""
    from slowmo_train.asynchronous.runner import AsyncRunner
    from slowmo_train.config import JobConfig
    from slowmo_train.config_checks import validate
    from slowmo_train.dist import read_env

    torch.set_num_threads(1)

    def run(out, max_steps=None, resume="none"):
        job = JobConfig()
        job.algorithm.name, job.algorithm.mode, job.algorithm.servers = name, "real", 1
        job.model.width = 0.0625
        job.data.root, job.data.cache_dir, job.data.download = root, cache, "false"
        job.train.batch_size, job.train.epochs, job.train.eval_batch_size = 10, 3.0, 50
        job.train.log_every, job.train.progress, job.train.max_steps = 4, "none", max_steps
        job.optim.lr, job.optim.schedule = 0.5, "constant"
        job.checkpoint.every_steps, job.resume, job.output_dir = 10, resume, out
        validate(job, world_size=world_size, check_paths=False)
        Path(out).mkdir(parents=True, exist_ok=True)
        return AsyncRunner(job, read_env(), torch.device("cpu"), Path(out)).run()

    return [run(f"{base}/straight"), run(f"{base}/cut", max_steps=15), run(f"{base}/cut", resume="auto")]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["dana_slim", "nag_asgd"])
def test_real_one_server_one_worker_cut_and_resumed_equals_uncut(torchvision_cifar, tmp_path, name):
    from tests.distributed_helpers import run_distributed

    results = run_distributed(
        _real_runs, 2, args=(str(torchvision_cifar), str(tmp_path / "cache"), str(tmp_path), name)
    )
    straight, cut, resumed = results[0]
    total = straight["steps"]  # 200 images / 2 ranks / batch 10 = 10 updates per epoch, 3 epochs
    assert total == 30 and cut["steps"] == 15 and resumed["steps"] == total
    assert Path(cut["checkpoint"]).name == "step_00000015" and resumed["resumed_from"] == cut["checkpoint"]
    for rank in (0, 1):  # the server's shard and the worker's momentum, BatchNorm statistics and data position
        ckpt_a = tmp_path / "straight" / "checkpoints" / f"step_{total:08d}"
        ckpt_b = tmp_path / "cut" / "checkpoints" / f"step_{total:08d}"
        a, b = load_rank_state(ckpt_a, rank)[1], load_rank_state(ckpt_b, rank)[1]
        for part in ("master", "side"):
            for key, value in a["async"].get(part, {}).items():
                assert torch.equal(value, b["async"][part][key]), (rank, part, key)
        for key, value in a.get("model", {}).items():
            assert torch.equal(value, b["model"][key]), (rank, key)
        assert a["async"].get("batches_drawn") == b["async"].get("batches_drawn")
    losses = _records(tmp_path / "straight", "train", ("loss", "staleness_mean", "lr"))
    assert len(losses) == 7 and _records(tmp_path / "cut", "train", ("loss", "staleness_mean", "lr")) == losses
    evals = {r[0]: r for r in _records(tmp_path / "straight", "eval", ("loss", "top1"))}
    resumed_evals = {r[0]: r for r in _records(tmp_path / "cut", "eval", ("loss", "top1"))}
    assert sorted(evals) == [10, 20, 30] and all(resumed_evals[k] == evals[k] for k in evals)
    assert resumed["final_eval"] == straight["final_eval"]
    assert resumed["staleness_histogram"] == straight["staleness_histogram"]
