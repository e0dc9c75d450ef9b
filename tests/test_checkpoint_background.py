"""Background checkpoints (checkpoint.background=true): a host snapshot at the step, the rank file
written by a thread, the checkpoint completed later on the main thread; every guarantee of a direct
save still holds (atomic files, manifest last, errors on every rank, incomplete never loaded).

    .venv/bin/python -m pytest -q tests/test_checkpoint_background.py
    .venv/bin/python -m pytest -q -s -m slow tests/test_checkpoint_background.py   # kill in a write, drill

The drill (slow, ~1 min, ~10 GB of memory) runs the real trainer under torchrun on the
transformer-big state (Adam + SlowMo, toy data), sends SIGTERM mid-run and checks that a complete
checkpoint exists before the grace period that scripts/slurm/slowmo_train.sbatch gives torchrun
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT); with -s it prints its timings (docs/RESULTS.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slowmo_train import checkpoint as ck
from slowmo_train.faults import FaultInjector
from tests.distributed_helpers import run_distributed
from tests.helpers import merge, rank_state, run_trainer, states_equal

CONFIG = {"seed": 0, "checkpoint": {"background": True}}
REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    torch.manual_seed(step)
    weight = torch.randn(64, 32)
    flat = torch.randn(100)
    return {
        "format": ck.FORMAT,
        "step": step,
        "rank": 0,
        "model": {
            "embed": weight,
            "out": weight,  # tied: one storage, as a shared embedding
            "bias": torch.zeros(32),
        },
        "algorithm": {"flat": flat, "pieces": [flat[:40], flat[40:]]},  # views into one buffer
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "betas": (0.9, 0.98)}}, "lr": 0.1},
    }


def _saver(run_dir: Path, faults=None, keep: int = 5) -> ck.Checkpointer:
    return ck.Checkpointer(run_dir, keep=keep, rank=0, world_size=1, faults=faults, background=True)


def _wait_written(saver: ck.Checkpointer) -> None:
    saver._pending.thread.join(timeout=30)


def test_background_save_completes_at_a_later_poll_with_the_state_of_its_step(tmp_path):
    saver = _saver(tmp_path)
    state = _state(4)
    expected = {k: v.clone() for k, v in state["model"].items()}
    path = saver.save(4, state, CONFIG)
    with torch.no_grad():  # training continues: the live tensors change after the snapshot
        state["model"]["embed"].add_(1.0)
        state["algorithm"]["flat"].zero_()
    assert saver.pending and not (path / ck.MANIFEST).exists()
    _wait_written(saver)
    assert saver.poll() is None, "the first poll only starts the agreement"
    assert saver.poll() == path and not saver.pending and saver.last_path == path
    _, saved = ck.load_rank_state(path, 0)
    assert torch.equal(saved["model"]["embed"], expected["embed"]) and torch.equal(
        saved["model"]["bias"], expected["bias"]
    )
    assert saved["model"]["out"].untyped_storage().data_ptr() == saved["model"]["embed"].untyped_storage().data_ptr()
    pieces = saved["algorithm"]["pieces"]
    assert pieces[1].untyped_storage().data_ptr() == saved["algorithm"]["flat"].untyped_storage().data_ptr()
    assert torch.equal(torch.cat(pieces), _state(4)["algorithm"]["flat"])
    assert saved["optimizer"]["state"][0]["betas"] == (0.9, 0.98)
    assert not [p for p in path.iterdir() if ".tmp" in p.name]
    assert set(saver.last_timing) == {"snapshot_s", "written_s", "durable_s"}


def test_background_file_is_byte_identical_to_a_direct_save(tmp_path):
    """The snapshot copies storages, not tensors: torch.save writes the same bytes."""
    direct = ck.Checkpointer(tmp_path / "direct", keep=5, rank=0, world_size=1).save(2, _state(2), CONFIG)
    saver = _saver(tmp_path / "background")
    saver.save(2, _state(2), CONFIG)
    background = saver.finish()
    assert ck.read_manifest(background)["files"] == ck.read_manifest(direct)["files"]


def test_the_host_buffers_are_reused_by_the_next_save(tmp_path):
    saver = _saver(tmp_path)
    saver.save(2, _state(2), CONFIG)
    saver.finish()
    first = {b.data_ptr() for buffers in saver._staging._free.values() for b in buffers}
    saver.save(4, _state(4), CONFIG)
    assert {b.data_ptr() for _, b in saver._pending.buffers} == first
    saver.finish()
    _, saved = ck.load_rank_state(ck.step_dir(tmp_path, 4), 0)
    assert torch.equal(saved["model"]["embed"], _state(4)["model"]["embed"])


def test_next_save_finishes_the_one_in_flight_and_keep_prunes(tmp_path):
    saver = _saver(tmp_path, keep=2)
    for step in (2, 4, 6):
        saver.save(step, _state(step), CONFIG)  # each save first completes the previous one
    assert [s for s, _ in ck.list_step_dirs(ck.checkpoint_root(tmp_path))] == [6, 4, 2]
    assert saver.finish() == ck.step_dir(tmp_path, 6)
    assert [s for s, _ in ck.list_step_dirs(ck.checkpoint_root(tmp_path))] == [6, 4]
    assert ck.resolve_resume("auto", tmp_path)[0] == ck.step_dir(tmp_path, 6)


def test_incomplete_background_save_is_not_resumed(tmp_path):
    """A process killed after the file was written but before the manifest: resume skips it."""
    saver = _saver(tmp_path)
    saver.save(3, _state(3), CONFIG)
    saver.finish()
    saver.save(6, _state(6), CONFIG)
    _wait_written(saver)  # written, never completed (the process "dies" here)
    assert (ck.step_dir(tmp_path, 6) / "rank0.pt").exists()
    path, warnings = ck.resolve_resume("auto", tmp_path)
    assert path == ck.step_dir(tmp_path, 3) and "step_00000006" in warnings[0]


def _stall_until_cancelled(monkeypatch):
    """Background writes (the only ones with a cancel event) wait until they are cancelled."""
    write = ck._HashingWriter.write

    def slow_write(self, data):
        while self.cancel is not None and not self.cancel.is_set():
            time.sleep(0.005)
        return write(self, data)

    monkeypatch.setattr(ck._HashingWriter, "write", slow_write)


def test_stop_save_cancels_the_background_save_in_flight(tmp_path, monkeypatch):
    _stall_until_cancelled(monkeypatch)
    saver = _saver(tmp_path)
    saver.save(4, _state(4), CONFIG)
    path = saver.save(5, _state(5), CONFIG, wait=True)  # SIGTERM: written directly, complete now
    assert not saver.pending and saver.last_path == path == ck.step_dir(tmp_path, 5)
    ck.check_complete(path)
    assert not ck.step_dir(tmp_path, 4).exists(), "the cancelled checkpoint's directory is removed"


def test_disk_full_in_the_background_raises_at_completion_and_keeps_the_previous(tmp_path):
    saver = _saver(tmp_path, faults=FaultInjector(0, "disk_full@step=6"))
    saver.save(3, _state(3), CONFIG)
    saver.finish()
    saver.save(6, _state(6), CONFIG)  # the snapshot succeeds; the write fails in the thread
    with pytest.raises(ck.CheckpointError, match="step 6 not written.*No space left on device.*step_00000003"):
        saver.finish()
    assert not saver.pending
    assert ck.resolve_resume("auto", tmp_path)[0] == ck.step_dir(tmp_path, 3)
    assert not (ck.step_dir(tmp_path, 6) / "rank0.pt").exists()


def test_a_write_error_wins_over_a_cancel(tmp_path):
    saver = _saver(tmp_path, faults=FaultInjector(0, "disk_full@step=6"))
    saver.save(6, _state(6), CONFIG)
    _wait_written(saver)
    with pytest.raises(ck.CheckpointError, match="No space left on device"):
        saver.save(7, _state(7), CONFIG, wait=True)


def test_an_unpicklable_state_is_one_error_line_not_a_hang(tmp_path):
    saver = _saver(tmp_path)
    saver.save(2, {**_state(2), "bad": lambda: None}, CONFIG)
    with pytest.raises(ck.CheckpointError, match="rank 0 cannot write .*rank0.pt: .*Error"):
        saver.finish()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_goes_through_pinned_buffers_and_one_sync(tmp_path):
    """On a GPU: pinned non-blocking copies, then the device keeps training (in-place updates
    queued right after the save) without touching what is written."""
    state = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _state(3)["model"].items()}
    expected = {k: v.cpu() for k, v in state.items()}
    saver = _saver(tmp_path)
    saver.save(3, {"format": ck.FORMAT, "step": 3, "rank": 0, "model": state}, CONFIG)
    assert all(size[1] for size, _ in saver._pending.buffers), "device storages go to pinned buffers"
    for _ in range(10):
        state["embed"].mul_(2.0)
    path = saver.finish()
    _, saved = ck.load_rank_state(path, 0)
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)


def test_a_state_under_the_threshold_is_written_directly(tmp_path):
    small = ck.state_bytes(_state(2))
    assert small == 64 * 32 * 4 + 32 * 4 + 100 * 4 + 4  # tied and viewed storages counted once
    saver = ck.Checkpointer(tmp_path, keep=5, rank=0, world_size=1, background=True, background_min_bytes=small + 1)
    path = saver.save(2, _state(2), CONFIG)
    assert not saver.pending and saver.last_path == path
    ck.check_complete(path)


def test_background_is_a_mutable_config_key():
    from slowmo_train.config import CheckpointConfig

    assert CheckpointConfig().background is True
    saved = {"world_size": 2, "config": {"checkpoint": {"background": True}}}
    ck.check_compatible(saved, {"checkpoint": {"background": False}}, 2, Path("ckpt"))  # no CheckpointError


# --- the trainer, 2 gloo ranks ----------------------------------------------------------------------
BASE = {
    "model": {"width": 0.125},
    "train": {
        "batch_size": 16,
        "epochs": 3,
        "log_every": 3,
        "eval_every_epochs": 100,
        "eval_batch_size": 100,
        "progress": "none",
    },
    "optim": {"warmup_epochs": 1.0},
    "algorithm": {"name": "osgp", "synch_freq": 2},
    "slowmo": {"enabled": True, "tau": 4, "beta": 0.5},
    "checkpoint": {"every_minutes": 0, "every_steps": 3, "keep": 5, "background_min_mb": 0},
}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _trainer_cases(rank: int, world_size: int, root: str, data_root: str) -> dict:
    torch.set_num_threads(1)
    lines = _Lines()
    logger = logging.getLogger("slowmo_train")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    base = merge(BASE, {"data": {"root": data_root}, "train": {"max_steps": 8}})
    runs = {mode: Path(root) / mode for mode in ("background", "direct", "resumed")}
    straight = run_trainer(merge(base, {"checkpoint": {"background": True}}), runs["background"])
    run_trainer(merge(base, {"checkpoint": {"background": False}}), runs["direct"])
    # resume the background run's step-6 checkpoint (written while steps 7-8 ran) in a new run
    resumed = run_trainer(merge(base, {"resume": str(ck.step_dir(runs["background"], 6))}), runs["resumed"])
    manifests = {
        mode: {step: ck.read_manifest(ck.step_dir(runs[mode], step))["files"] for step in (3, 6, 8)}
        for mode in ("background", "direct")
    }
    return {
        "manifests": manifests,
        "model_equal": all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"]),
        "algorithm_equal": states_equal(
            rank_state(runs["background"], 8, rank)["algorithm"], rank_state(runs["resumed"], 8, rank)["algorithm"]
        ),
        "log": "\n".join(lines.lines),
    }


@pytest.mark.multiproc
def test_trainer_background_checkpoints_equal_direct_ones_and_resume_exactly(tmp_path):
    """OSGP + SlowMo (messages in flight), saves at 3 and 6 in the background, 8 at the end: every
    rank file is byte-identical to the one a direct save writes, and a run resumed from the
    background step-6 checkpoint ends bit-identical to the uninterrupted one."""
    from tests.conftest import write_torchvision_cifar

    data = write_torchvision_cifar(tmp_path / "data")
    results = run_distributed(_trainer_cases, 2, args=(str(tmp_path / "runs"), str(data)), timeout=600)
    for rank, r in enumerate(results):
        assert r["manifests"]["background"] == r["manifests"]["direct"], f"rank {rank}: files differ"
        assert r["model_equal"] and r["algorithm_equal"], f"rank {rank}: resumed run differs"
    assert re.search(r"checkpoint of step 3: .*s in the step, durable after", results[0]["log"]), results[0]["log"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_kill_during_a_background_write_falls_back_to_the_previous_checkpoint(tmp_path):
    """Rank 1's writer thread SIGKILLs its process after writing its step-6 file (the previous save,
    step 3, is complete: a save first completes the one before): no manifest for step 6, so the
    restart skips it with a warning and resumes from step 3."""
    from tests.conftest import write_torchvision_cifar
    from tests.test_faults import _launch, _train_steps

    data = write_torchvision_cifar(tmp_path / "data")
    run = tmp_path / "run"
    result = _launch(
        ["train.max_steps=8", "checkpoint.every_steps=3", "launcher.max_restarts=1", "checkpoint.background_min_mb=0"],
        run,
        data,
        faults="kill_in_save@step=6,rank=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "skipping incomplete checkpoint" in log0 and "step_00000006" in log0
    assert re.search(r"checkpoint of step 3: .*s in the step, durable after", log0), log0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["resumed_from"].endswith("step_00000003")
    assert _train_steps(run) == [2, 4, 6, 8]


# --- the grace period the Slurm script gives torchrun ------------------------------------------------
SBATCH = REPO / "scripts" / "slurm" / "slowmo_train.sbatch"


def _sbatch_grace_s() -> int:
    return int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", SBATCH.read_text()).group(1))


@pytest.mark.parametrize(("given", "expected"), [({}, "110"), ({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}, "300")])
def test_sbatch_gives_torchrun_a_grace_period_under_the_usr1_lead(tmp_path, given, expected):
    from tests.test_slurm import _fake_bin

    env, log = _fake_bin(tmp_path)
    recorder = tmp_path / "bin" / "envpython"
    recorder.write_text(
        '#!/bin/bash\necho "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset}" > "$FAKE_LOG/node$SLURM_NODEID.grace"\n'
    )
    recorder.chmod(0o755)
    env.update(PYTHON=str(recorder), **given)
    result = subprocess.run(
        ["bash", str(SBATCH), "task=cifar10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert {(log / f"node{n}.grace").read_text().strip() for n in range(3)} == {expected}
    lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", SBATCH.read_text(), re.M).group(1))
    assert _sbatch_grace_s() < lead


# --- SIGTERM drill: transformer-big under torchrun --------------------------------------------------


# slowmo.base_buffers=keep (configs/paper/wmt16.yaml): Adam's moments are in every checkpoint
DRILL = [
    "task=wmt16",
    "model.arch=transformer_big",
    "optim=adam",
    "slowmo.enabled=true",
    "slowmo.tau=4",
    "slowmo.base_buffers=keep",
    "data.vocab_size=60",
    "data.max_tokens=64",
    "train.max_steps=1000",
    "train.log_every=1",
    "train.progress=log",
    "train.eval_every_epochs=100",
    "checkpoint.every_minutes=0",
    "checkpoint.every_steps=3",
    "launcher.threads_per_worker=1",
]


@pytest.mark.slow
def test_sigterm_drill_transformer_big_under_torchrun(tmp_path):
    """torchrun --standalone, one worker, transformer big (176M parameters with the toy vocabulary)
    with Adam and SlowMo: a background save every 3 steps, SIGTERM to torchrun mid-run, right after
    a background save started (the worst case: it is cancelled and a direct save written). A
    complete checkpoint must exist before torchrun's grace period (the sbatch script's) ends, and
    torchrun must exit without having to kill the worker."""
    from tests.conftest import write_parallel_text

    grace = _sbatch_grace_s()
    data = write_parallel_text(tmp_path / "multi30k")
    run = tmp_path / "run"
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "slowmo_train",
        *DRILL,
        f"data.root={data}",
        f"output_dir={run}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    log0 = run / "logs" / "rank0.log"
    try:
        deadline = time.time() + 600
        while not (log0.exists() and "checkpoint of step 3:" in log0.read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        while "step 6/" not in log0.read_text():  # the save of step 6 starts after this line
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=grace + 60)
        elapsed = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its worker
    text = log0.read_text()
    stopped = re.search(r"stopped at step (\d+) \(SIGTERM\); checkpoint (\S+)", text)
    assert stopped, out[-3000:] + text[-3000:]
    step, path = int(stopped.group(1)), Path(stopped.group(2))
    ck.check_complete(path)
    assert ck.resolve_resume("auto", run)[0] == path == ck.step_dir(run, step)
    assert elapsed < grace, f"torchrun needed {elapsed:.1f}s after SIGTERM, the grace period is {grace}s"
    # torchrun re-raises the SIGTERM it got (exit status != 0); what matters is that it never had to kill
    assert "forcefully exiting via" not in out, out[-3000:]
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    manifest = json.loads((path / ck.MANIFEST).read_text())
    mb = manifest["files"]["0"]["bytes"] / 2**20
    complete = (path / ck.MANIFEST).stat().st_mtime - sent
    summary = (run / "summary.json").stat().st_mtime - sent  # the worker's last act
    print(
        f"\nSIGTERM drill: stop at step {step}, {mb:.0f} MB/rank; after SIGTERM: checkpoint complete "
        f"{complete:.1f}s, worker done {summary:.1f}s, torchrun exited {elapsed:.1f}s (grace {grace}s)\n"
        + "\n".join(line for line in text.splitlines() if "checkpoint" in line or "SIGTERM" in line)
    )
