"""Faults injected into real 2-worker launches on tiny CIFAR-10 data: a killed worker with restarts,
a kill during a save, SIGTERM (one rank, or the launcher like Slurm), Ctrl-C, a hung peer, NaN
(stop and skip), a full disk, and the train.max_steps resume through the CLI.

    .venv/bin/python -m pytest -q tests/test_faults.py             # the default set
    .venv/bin/python -m pytest -q -m slow tests/test_faults.py     # the rest

Faults come from ``SLOWMO_TRAIN_FAULTS`` (slowmo_train/faults.py): they fire at a given step on a given
rank in the first launch attempt only, so a restarted job runs clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slowmo_train.scripting import launch_env, read_metrics

pytestmark = pytest.mark.multiproc

SMALL = [
    "task=cifar10",
    "model.width=0.125",
    "train.batch_size=16",
    "train.log_every=2",
    "train.eval_batch_size=50",
    "train.progress=log",
    "launcher.nproc_per_node=2",
    "launcher.threads_per_worker=1",
    "checkpoint.every_minutes=0",
]


def _env(faults: str | None = None) -> dict:
    env = launch_env(drop=["SLOWMO_TRAIN_FAULTS"])
    if faults:
        env["SLOWMO_TRAIN_FAULTS"] = faults
    return env


def _launch(
    args: list[str], run_dir: Path, data: Path, faults: str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slowmo_train", *SMALL, f"data.root={data}", f"output_dir={run_dir}", *args]
    return subprocess.run(cmd, cwd=run_dir.parent, env=_env(faults), capture_output=True, text=True, timeout=timeout)


def _train_steps(run_dir: Path) -> list[int]:
    events = read_metrics(run_dir)
    return [e["step"] for e in events if e["event"] == "train" and "loss" in e]


def _ckpt_steps(run_dir: Path) -> list[int]:
    from slowmo_train.checkpoint import checkpoint_root, list_step_dirs

    return sorted(s for s, _ in list_step_dirs(checkpoint_root(run_dir)))


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("slowmo-train:")]


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


def _worker_pids(run_dir: Path) -> list[int]:
    pids = []
    for log_file in (run_dir / "logs").glob("rank*.log"):
        for line in log_file.read_text().splitlines():
            if ": process " in line:
                pids.append(int(line.split(": process ")[1].split(",")[0]))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture
def data(tmp_path) -> Path:
    from tests.conftest import write_torchvision_cifar

    return write_torchvision_cifar(tmp_path / "data")


def test_killed_worker_restarts_and_finishes(tmp_path, data):
    """SIGKILL rank 1 at step 5 with launcher.max_restarts=1: the job restarts, resumes from step 3,
    and ends at step 8 with every train line once."""
    run = tmp_path / "run"
    result = _launch(
        ["train.max_steps=8", "checkpoint.every_steps=3", "launcher.max_restarts=1"],
        run,
        data,
        faults="kill@step=5,rank=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from"].endswith("step_00000003")
    assert _train_steps(run) == [2, 4, 6, 8]
    assert "launch attempt 1" in (run / "logs" / "rank1.log").read_text()
    _no_traceback(result)
    final = torch.load(run / "model_final.pt", weights_only=True)  # the averaged model, no code in it
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


@pytest.mark.slow
def test_kill_during_save_never_leaves_a_loadable_checkpoint(tmp_path, data):
    """Rank 1 dies while its step-6 file is written: no manifest for step 6, so the restart skips it
    (with a warning) and resumes from step 3."""
    run = tmp_path / "run"
    result = _launch(
        ["train.max_steps=8", "checkpoint.every_steps=3", "launcher.max_restarts=1"],
        run,
        data,
        faults="kill_in_save@step=6,rank=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "skipping incomplete checkpoint" in log0 and "step_00000006" in log0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from"].endswith("step_00000003")
    assert _train_steps(run) == [2, 4, 6, 8]


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_at_the_same_step_then_resume(tmp_path, data):
    """SIGTERM reaching only rank 1 during step 3: the poll started after step 3 carries it and is
    read after step 4 (polls are pipelined), so both ranks save step 4 and exit 0; resume=auto
    finishes the run."""
    run = tmp_path / "run"
    result = _launch(["train.max_steps=6"], run, data, faults="sigterm@step=3,rank=1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("slowmo-train: stopped by SIGTERM at step 4; checkpoint: "), lines
    assert lines[0].endswith("checkpoints/step_00000004; continue with resume=auto output_dir=" + str(run.resolve()))
    assert _ckpt_steps(run) == [4]
    assert not (run / "model_final.pt").exists()
    again = _launch(["train.max_steps=6", "resume=auto"], run, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert _train_steps(run) == [2, 4, 6]  # a stop writes no train line; the resumed run continues the interval
    assert (run / "model_final.pt").exists()


def _signal_launcher(tmp_path, data, sig: int, group: bool) -> tuple[subprocess.Popen, Path, str, float]:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "slowmo_train",
        *SMALL,
        f"data.root={data}",
        f"output_dir={run}",
        "train.max_steps=400",
        "train.log_every=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(_train_steps(run)) >= 2:
            break
        time.sleep(0.2)
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: the whole foreground group
    else:
        os.kill(proc.pid, sig)  # what a scheduler does to the launcher process
    _, stderr = proc.communicate(timeout=120)
    return proc, run, stderr, time.monotonic() - start


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path, data):
    proc, run, stderr, elapsed = _signal_launcher(tmp_path, data, signal.SIGTERM, group=False)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("slowmo-train:")]
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], stderr[-3000:]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert _ckpt_steps(run) == [step]
    assert "Traceback" not in stderr
    pids = _worker_pids(run)
    assert len(pids) == 2 and not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_ctrl_c_one_line_and_no_worker_left(tmp_path, data):
    proc, run, stderr, elapsed = _signal_launcher(tmp_path, data, signal.SIGINT, group=True)
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("slowmo-train:")]
    assert len(lines) == 1 and "stopped by SIGINT at step" in lines[0] and "resume=auto" in lines[0], stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert _ckpt_steps(run) == [step]
    pids = _worker_pids(run)
    assert len(pids) == 2 and not any(_alive(p) for p in pids)


def test_hung_peer_times_out_with_one_line(tmp_path, data):
    """Rank 1 sleeps 15 s at step 4 of an SGP run with launcher.timeout_s=4: rank 0's gossip receive
    times out; one line names the operation, the step and the rank; checkpoint 2 stays complete."""
    run = tmp_path / "run"
    result = _launch(
        ["algorithm=sgp", "train.max_steps=8", "checkpoint.every_steps=2", "launcher.timeout_s=4"],
        run,
        data,
        faults="hang@step=4,rank=1,seconds=15",
    )
    assert result.returncode == 1
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "training step timed out after launcher.timeout_s=4s at step 4" in lines[0] and "rank 0" in lines[0]
    _no_traceback(result)
    from slowmo_train.checkpoint import check_complete, step_dir

    check_complete(step_dir(run, 2))
    assert _ckpt_steps(run) == [2]


def test_nan_stop_names_step_and_rank_and_keeps_last_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    result = _launch(
        ["algorithm=local_sgd", "algorithm.period=4", "train.max_steps=8", "checkpoint.every_steps=2"],
        run,
        data,
        faults="nan@step=5,rank=1",
    )
    assert result.returncode == 1
    lines = _error_lines(result)
    assert len(lines) == 1 and "non-finite loss or parameters on rank 1 in steps 5-6" in lines[0], result.stderr
    assert "step_00000004" in lines[0]
    _no_traceback(result)
    from slowmo_train.checkpoint import load_rank_state, step_dir

    for rank in (0, 1):
        state = load_rank_state(step_dir(run, 4), rank)[1]
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert _ckpt_steps(run) == [2, 4]


@pytest.mark.slow
def test_nan_skip_drops_the_update_everywhere_and_counts_it(tmp_path, data):
    run = tmp_path / "run"
    result = _launch(
        ["algorithm=sgp", "train.max_steps=6", "train.nonfinite=skip", "train.log_every=1"],
        run,
        data,
        faults="nan@step=3,rank=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_metrics(run)
    skips = [e["nonfinite_skips"] for e in events if e["event"] == "train" and "loss" in e]
    assert skips == [0, 0, 1, 1, 1, 1]
    assert all(e["loss"] == e["loss"] for e in events if "loss" in e)  # no NaN was logged
    # too many skips end the run with one line
    run2 = tmp_path / "run2"
    result = _launch(
        ["algorithm=sgp", "train.max_steps=6", "train.nonfinite=skip", "train.max_nonfinite_skips=1"],
        run2,
        data,
        faults="nan@step=2,rank=0;nan@step=4,rank=1",
    )
    assert result.returncode == 1
    lines = _error_lines(result)
    assert len(lines) == 1 and "2 steps skipped for non-finite values (train.max_nonfinite_skips=1)" in lines[0]


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    result = _launch(["train.max_steps=6", "checkpoint.every_steps=2"], run, data, faults="disk_full@step=4,rank=1")
    assert result.returncode == 1
    lines = _error_lines(result)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "step_00000002" in lines[0], result.stderr
    _no_traceback(result)
    from slowmo_train.checkpoint import resolve_resume, step_dir

    assert resolve_resume("auto", run)[0] == step_dir(run, 2)


@pytest.mark.slow
def test_max_steps_then_resume_equals_one_run(tmp_path, data):
    """train.max_steps=6 then train.max_steps=12 resume=auto == one 12-step run: bit-identical model
    and algorithm state on every rank, identical logged losses (OSGP s=2 under SlowMo tau=4, so the
    cut is mid-outer-iteration with messages in flight, and crosses the 6-step epoch)."""
    algo = ["algorithm=osgp", "algorithm.synch_freq=2", "slowmo.enabled=true", "slowmo.tau=4", "train.log_every=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for args, run in (
        (["train.max_steps=12"], straight),
        (["train.max_steps=6"], split),
        (["train.max_steps=12", "resume=auto"], split),
    ):
        result = _launch(algo + args, run, data)
        assert result.returncode == 0, result.stderr[-3000:]
    from slowmo_train.checkpoint import load_rank_state, step_dir

    for rank in (0, 1):
        a, b = (load_rank_state(step_dir(r, 12), rank)[1] for r in (straight, split))
        for key in ("model", "algorithm", "optimizer"):
            assert _equal(a[key], b[key]), (rank, key)

    def losses(run):
        events = read_metrics(run)
        return {e["step"]: e["loss"] for e in events if e["event"] == "train" and "loss" in e}

    ref, got = losses(straight), losses(split)
    assert list(ref) == [3, 6, 9, 12] and all(got[s] == ref[s] for s in ref)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
