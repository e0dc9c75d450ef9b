"""Bad input as a new user types it: each ends in one ``slowmo-train: error:`` line (exit 2) before
any worker starts, or, for what only a worker can find (a corrupt checkpoint file), in one line
(exit 1). No traceback either way.

    .venv/bin/python -m pytest -q tests/test_cli_errors.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowmo_train.scripting import compose_config, launch_env

TINY = [
    "task=cifar10",
    "model.width=0.125",
    "train.batch_size=16",
    "train.eval_batch_size=50",
    "train.progress=log",
    "launcher.threads_per_worker=1",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = launch_env(drop=["SLOWMO_TRAIN_FAULTS"])
    return subprocess.run(
        [sys.executable, "-m", "slowmo_train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def _one_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("slowmo-train: error:")]
    assert len(errors) == 1, result.stderr
    if code == 2:
        assert lines == errors, result.stderr  # nothing else: no worker was started
    return errors[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["model.arch=resnet50"],
            "model.arch='resnet50' is invalid: not an architecture of task cifar10; choose one of resnet18",
        ),
        (
            ["algorithm=sgp", "algorithm.peers_per_itr=5", "launcher.nproc_per_node=2"],
            "algorithm.peers_per_itr=5 is invalid",
        ),
        (
            ["train.batch_size=100000", "launcher.nproc_per_node=2"],
            "a batch of 100000 per worker is larger than the 100 training examples each of the 2 workers gets",
        ),
        (["resume=auto"], "resume='auto' is invalid: needs output_dir=DIR"),
        (["checkpoint.keep=0"], "checkpoint.keep=0 is invalid"),
        (["train.nonfinite=ignore"], "train.nonfinite='ignore' is invalid: choose one of stop, skip"),
    ],
)
def test_bad_input_is_one_line_before_workers(args, expected, tmp_path, torchvision_cifar):
    line = _one_error(_run(TINY + [f"data.root={torchvision_cifar}", *args], tmp_path))
    assert expected in line, line


def test_unwritable_output_dir(tmp_path, torchvision_cifar):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _one_error(_run(TINY + [f"data.root={torchvision_cifar}", f"output_dir={blocker}/run"], tmp_path))
    assert "output_dir=" in line and "cannot write there" in line


def _job_dict(overrides: list[str]) -> dict:
    """The resolved config the CLI would build for ``overrides``."""
    from omegaconf import OmegaConf

    from slowmo_train.config import to_job_config

    return OmegaConf.to_container(OmegaConf.structured(to_job_config(compose_config(overrides))), resolve=True)


def _fake_checkpoint(run_dir: Path, step: int, world_size: int, config: dict) -> Path:
    """A complete checkpoint directory (manifest + rank files) with the given config."""
    from slowmo_train import checkpoint as ck

    path = ck.step_dir(run_dir, step)
    path.mkdir(parents=True)
    files = {}
    for rank in range(world_size):
        sha, nbytes = ck.write_atomic(path / f"rank{rank}.pt", lambda f: torch.save({"format": ck.FORMAT}, f))
        files[str(rank)] = {"file": f"rank{rank}.pt", "sha256": sha, "bytes": nbytes}
    manifest = {"format": ck.FORMAT, "step": step, "world_size": world_size, "config": config, "files": files}
    (path / ck.MANIFEST).write_text(json.dumps(manifest))
    return path


@pytest.fixture
def saved_run(tmp_path, torchvision_cifar):
    """A run directory with a checkpoint written by 2 workers with this test's TINY config."""
    run = tmp_path / "run"
    overrides = TINY + [f"data.root={torchvision_cifar}", "launcher.nproc_per_node=2", f"output_dir={run}"]
    _fake_checkpoint(run, 4, 2, _job_dict(overrides))
    return run, overrides


def test_resume_with_another_world_size(saved_run, tmp_path):
    run, overrides = saved_run
    line = _one_error(_run([*overrides, "launcher.nproc_per_node=1", "resume=auto"], tmp_path))
    assert "step_00000004 was written by 2 workers, this run has 1" in line


def test_resume_with_another_model_shape(saved_run, tmp_path):
    run, overrides = saved_run
    line = _one_error(_run([*overrides, "model.width=0.25", "resume=auto"], tmp_path))
    assert "written with model.width=0.125, this run has model.width=0.25" in line


def test_resume_with_another_algorithm(saved_run, tmp_path):
    run, overrides = saved_run
    line = _one_error(_run([*overrides, "algorithm=sgp", "resume=auto"], tmp_path))
    assert "written with algorithm.name='allreduce', this run has algorithm.name='sgp'" in line


def test_resume_from_truncated_checkpoint_path(saved_run, tmp_path):
    run, overrides = saved_run
    rank1 = run / "checkpoints" / "step_00000004" / "rank1.pt"
    rank1.write_bytes(rank1.read_bytes()[:10])
    line = _one_error(_run([*overrides, f"resume={run / 'checkpoints' / 'step_00000004'}"], tmp_path))
    assert "rank1.pt (rank 1) is truncated or was changed" in line


def test_resume_from_missing_rank_file(saved_run, tmp_path):
    run, overrides = saved_run
    (run / "checkpoints" / "step_00000004" / "rank0.pt").unlink()
    line = _one_error(_run([*overrides, f"resume={run / 'checkpoints' / 'step_00000004'}"], tmp_path))
    assert "rank0.pt (rank 0) is missing" in line


def test_fresh_run_refuses_a_directory_with_checkpoints(saved_run, tmp_path):
    run, overrides = saved_run
    line = _one_error(_run(overrides, tmp_path))
    assert "already holds checkpoints (newest: step_00000004); continue that run with resume=auto" in line


@pytest.mark.multiproc
def test_corrupt_checkpoint_found_by_the_worker_is_one_line(tmp_path, torchvision_cifar):
    """A flipped byte keeps the size (so the pre-launch check passes); the worker's checksum catches it."""
    run = tmp_path / "run"
    args = TINY + [f"data.root={torchvision_cifar}", f"output_dir={run}", "train.max_steps=2"]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rank0 = run / "checkpoints" / "step_00000002" / "rank0.pt"
    data = bytearray(rank0.read_bytes())
    data[len(data) // 3] ^= 0x55
    rank0.write_bytes(bytes(data))
    line = _one_error(_run([*args[:-1], "train.max_steps=4", "resume=auto"], tmp_path), code=1)
    assert "rank0.pt is corrupt: its SHA-256 does not match" in line
