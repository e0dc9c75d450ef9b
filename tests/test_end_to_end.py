"""End to end: real launches (torchrun and the built-in local launcher) on tiny CIFAR-10 copies in
both layouts, checking the run directory a user gets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slowmo_train.scripting import launch_env, read_metrics

pytestmark = pytest.mark.multiproc

TRAIN_KEYS = {
    "event",
    "step",
    "epoch",
    "loss",
    "lr",
    "samples_per_s",
    "comm_bytes_sent_per_step",
    "comm_bytes_received_per_step",
    "comm_blocking_s_per_step",
    "comm_overlapped_s_per_step",
}
SMALL = [
    "task=cifar10",
    "model.width=0.125",
    "train.batch_size=16",
    "train.max_steps=6",
    "train.log_every=2",
    "train.eval_batch_size=50",
    "train.progress=log",
]


def _env() -> dict:
    env = launch_env()
    env["XDG_CACHE_HOME"] = str(Path(env.get("PYTEST_TMP", "/tmp")) / "slowmo-test-cache")
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _check_run_dir(run_dir: Path, world_size: int) -> None:
    assert (run_dir / "config.yaml").exists()
    for rank in range(world_size):
        assert (run_dir / "logs" / f"rank{rank}.log").exists()
    events = read_metrics(run_dir)
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in train] == [2, 4, 6]
    for e in train:
        assert TRAIN_KEYS <= set(e), set(e)
        assert e["loss"] > 0 and e["samples_per_s"] > 0 and e["lr"] > 0
    assert evals and evals[-1]["split"] == "test" and 0 <= evals[-1]["top1"] <= 100
    if world_size > 1:
        assert (run_dir / f"metrics.rank{world_size - 1}.jsonl").exists()
        assert train[-1]["comm_bytes_sent_per_step"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "test/top1"} <= tags, tags
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6


@pytest.mark.parametrize("layout", ["imagefolder", "torchvision"])
def test_torchrun_two_workers(layout, tmp_path, torchvision_cifar, folder_cifar):
    root = folder_cifar if layout == "imagefolder" else torchvision_cifar
    run_dir = tmp_path / "run"
    result = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "slowmo_train",
            *SMALL,
            "algorithm=allreduce",
            f"data.root={root}",
            f"output_dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    _check_run_dir(run_dir, 2)
    assert "test top1" in result.stdout + result.stderr


def test_builtin_launcher_spawns_workers(tmp_path, folder_cifar):
    """`slowmo-train launcher.nproc_per_node=2` without torchrun; default run directory under outputs/."""
    _run(
        [sys.executable, "-m", "slowmo_train", *SMALL, "launcher.nproc_per_node=2", f"data.root={folder_cifar}"],
        cwd=tmp_path,
    )
    run_dirs = list((tmp_path / "outputs").glob("*/*_run"))
    assert len(run_dirs) == 1, run_dirs
    _check_run_dir(run_dirs[0], 2)


@pytest.mark.parametrize("algorithm", ["local_sgd", "sgp", "osgp"])
def test_slowmo_over_base_algorithms_through_the_cli(algorithm, tmp_path, folder_cifar):
    """The trainer drives every base algorithm under SlowMo; gossip logs its consensus distance."""
    run_dir = tmp_path / "run"
    _run(
        [
            sys.executable,
            "-m",
            "slowmo_train",
            *SMALL,
            f"algorithm={algorithm}",
            "algorithm.period=2",
            "algorithm.consensus_every=2",
            "slowmo.enabled=true",
            "slowmo.tau=2",
            "slowmo.sharded=true",
            "launcher.nproc_per_node=2",
            f"data.root={folder_cifar}",
            f"output_dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    _check_run_dir(run_dir, 2)
    events = read_metrics(run_dir)
    assert any("consensus_distance" in e for e in events if e["event"] == "train")
