"""Failures a restart cannot fix end the job at once, under slowmo-train's launcher and under torchrun,
with our one line as the last thing on the console.

    .venv/bin/python -m pytest -q tests/test_fatal.py              # our launcher
    .venv/bin/python -m pytest -q -m slow tests/test_fatal.py      # torchrun --max-restarts=3

A NaN with ``train.nonfinite=stop`` and a corrupt checkpoint would fail again on every restart; with
``launcher.max_restarts=3`` / ``torchrun --max-restarts=3`` the old behaviour was to restart three
times. The injected NaN fires in the first launch attempt only, so a job that restarted would then
succeed: these tests see the difference.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slowmo_train.scripting import launch_env
from tests.conftest import write_image_folder_cifar

pytestmark = pytest.mark.multiproc

SMALL = [
    "task=cifar10",
    "model.width=0.125",
    "train.batch_size=16",
    "train.log_every=2",
    "train.eval_batch_size=50",
    "train.progress=log",
    "launcher.threads_per_worker=1",
    "checkpoint.every_minutes=0",
    "train.max_steps=6",
    "checkpoint.every_steps=2",
]
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "--max-restarts=3",
    "--monitor-interval=0.5",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder_cifar(tmp_path_factory.mktemp("fatal") / "cifar", n_train=128, n_test=40)


def _run(launcher: str, args: list[str], run_dir: Path, data: Path, faults: str | None = None):
    env = launch_env(drop=["SLOWMO_TRAIN_FAULTS"])
    if faults:
        env["SLOWMO_TRAIN_FAULTS"] = faults
    overrides = [*SMALL, f"data.root={data}", f"output_dir={run_dir}", *args]
    if launcher == "local":
        cmd = [sys.executable, "-m", "slowmo_train", "launcher.nproc_per_node=2", "launcher.max_restarts=3", *overrides]
    else:
        cmd = [*TORCHRUN, "-m", "slowmo_train", *overrides]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def _attempts(run_dir: Path) -> set[str]:
    """The launch attempts rank 0 logged (``launch attempt N``)."""
    text = (run_dir / "logs" / "rank0.log").read_text()
    return {line.split("launch attempt ")[1].split()[0] for line in text.splitlines() if "launch attempt " in line}


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _check_ended_at_once(result, run_dir: Path, expected: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = _last_line(result)
    assert last.startswith("slowmo-train: error:") and expected in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _attempts(run_dir) == {"0"}, f"restarted: attempts {_attempts(run_dir)}"
    assert expected in (run_dir / "FATAL").read_text()


#: the torchrun variants (a minute each) run under -m slow; the default suite keeps our launcher's
LAUNCHERS = ["local", pytest.param("torchrun", marks=pytest.mark.slow)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_nan_stop_is_not_retried(launcher, tmp_path, data):
    run = tmp_path / "run"
    result = _run(launcher, ["algorithm=local_sgd", "algorithm.period=2"], run, data, faults="nan@step=3,rank=1")
    _check_ended_at_once(result, run, "non-finite loss or parameters on rank")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_corrupt_checkpoint_is_not_retried(launcher, tmp_path, data):
    run = tmp_path / "run"
    first = _run("local", ["train.max_steps=2"], run, data)
    assert first.returncode == 0, first.stderr[-2000:]
    victim = run / "checkpoints" / "step_00000002" / "rank1.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(blob))
    (run / "logs" / "rank0.log").unlink()
    result = _run(launcher, ["resume=auto"], run, data)
    _check_ended_at_once(result, run, "is corrupt")


def test_a_new_job_forgets_the_last_verdict(tmp_path, data):
    """FATAL is the verdict on one job: starting the run again (after fixing the cause) is not blocked."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "FATAL").write_text("slowmo-train: error: an old failure\n")
    result = _run("local", ["train.max_steps=2", "resume=auto"], run, data)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run / "FATAL").exists()
