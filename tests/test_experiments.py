"""The paper's 24 experiments (configs/exp/TASK_BASE[_slowmo].yaml): their settings, and a smoke run
of each (+smoke=tiny) with 2 gloo processes on tiny data of the right shape.

The default run smokes one experiment per task; ``-m slow`` smokes all 24."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slowmo_train.config import to_job_config
from slowmo_train.config_checks import validate
from slowmo_train.scripting import launch_env, read_metrics
from tests.conftest import write_image_folder_cifar, write_image_folder_imagenet, write_parallel_text
from tests.helpers import EXPERIMENTS, compose_job

TASKS = ("cifar10", "imagenet", "wmt16")
BASES = {"allreduce": "allreduce", "localsgd": "local_sgd", "sgp": "sgp", "osgp": "osgp"}
PAPER = [f"{t}_{b}{s}" for t in TASKS for b in BASES for s in ("", "_slowmo")]


def test_all_24_paper_experiments_exist():
    assert set(PAPER) <= set(EXPERIMENTS), sorted(set(PAPER) - set(EXPERIMENTS))
    assert len(PAPER) == 24


@pytest.mark.parametrize("name", PAPER)
def test_experiment_has_the_papers_settings(name, tmp_path):
    task, base, *slow = name.split("_")
    job = to_job_config(compose_job(f"+exp={name}", f"data.root={tmp_path}"))
    validate(job, world_size=32)
    assert job.task.name == task and job.algorithm.name == BASES[base] and job.name == name
    assert job.slowmo.enabled == bool(slow)
    if base == "localsgd":
        assert job.algorithm.period == 12
    if slow:
        assert job.slowmo.alpha == 1.0 and 0.4 <= job.slowmo.beta <= 0.8
        expected_tau = 12 if task == "cifar10" or base == "localsgd" else 48
        assert job.slowmo.tau == expected_tau
    if task == "cifar10":
        assert (job.model.arch, job.train.batch_size, job.train.epochs) == ("resnet18", 128, 200)
    elif task == "imagenet":
        assert (job.model.arch, job.train.epochs, job.optim.milestones) == ("resnet50", 90, [30, 60, 80])
        assert job.train.batch_size * 256 == 8192  # 32 nodes x 8 GPUs x 32 images
    else:
        assert (job.model.arch, job.optim.name, job.optim.schedule, job.train.epochs) == (
            "transformer_big",
            "adam",
            "inverse_sqrt",
            25,
        )
        assert job.optim.warmup_steps == 4000 and not job.optim.scale_lr
        if slow:
            assert job.slowmo.base_buffers == "keep"


def _data_for(task: str, tmp_path: Path) -> Path:
    root = tmp_path / f"data_{task}"
    if not root.exists():
        {
            "cifar10": lambda: write_image_folder_cifar(root, n_train=300, n_test=60),
            "imagenet": lambda: write_image_folder_imagenet(root),
            "wmt16": lambda: write_parallel_text(root),
        }[task]()
    return root


def _smoke(name: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> dict:
    task = to_job_config(compose_job(f"+exp={name}", f"data.root={tmp_path}")).task.name
    env = launch_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    run_dir = tmp_path / name
    overrides = [f"+exp={name}", "+smoke=tiny", f"data.root={_data_for(task, tmp_path)}", f"output_dir={run_dir}"]
    overrides += extra
    if task == "wmt16":
        overrides.append("data.vocab_size=60")  # the toy language has ~40 words
    result = subprocess.run(
        [sys.executable, "-m", "slowmo_train", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["metric"] in summary["final_eval"]
    events = read_metrics(run_dir)
    assert any(e["event"] == "train" and e["loss"] > 0 for e in events)
    return summary


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["cifar10_sgp_slowmo", "imagenet_localsgd_slowmo", "wmt16_osgp_slowmo"])
def test_smoke_one_experiment_per_task(name, tmp_path):
    _smoke(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10_osgp_slowmo", "imagenet_sgp_slowmo", "wmt16_localsgd_slowmo"])
def test_smoke_one_experiment_per_task_simulated(name, tmp_path):
    """Every task on the simulated cluster: 4 workers in one process (slowmo_train/simulated)."""
    extra = ("launcher.simulate=4", "launcher.nproc_per_node=1", "launcher.threads_per_worker=1")
    if name.startswith("imagenet"):
        extra += ("train.batch_size=2",)  # the toy ImageNet's 18 images over 4 workers
    summary = _smoke(name, tmp_path, extra)
    assert summary["comm_bytes_sent_per_step"] > 0


@pytest.mark.slow
@pytest.mark.multiproc
def test_smoke_every_paper_experiment(tmp_path):
    failures = {}
    for name in PAPER:
        try:
            _smoke(name, tmp_path)
        except AssertionError as err:
            failures[name] = str(err)[-500:]
    assert not failures, failures


@pytest.mark.multiproc
@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - set(PAPER)))
def test_smoke_other_experiments(name, tmp_path):
    """quickstart and the CPU-sized experiments run too."""
    _smoke(name, tmp_path)
