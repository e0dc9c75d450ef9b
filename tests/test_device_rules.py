"""The GPU rules that need no GPU to check: one GPU per local rank, the default group's backends,
each plane rejecting what the other carries, CUDA-event timing read without a host sync, and the
GPU math settings.

    .venv/bin/python -m pytest -q tests/test_device_rules.py
"""

from __future__ import annotations

import pytest
import torch

from slowmo_train import control
from slowmo_train import dist as sdist
from slowmo_train.algorithms import comm
from slowmo_train.algorithms.comm import CommStats
from slowmo_train.precision import configure_device_math


def _fake_gpus(monkeypatch, count: int) -> list[int]:
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_each_local_rank_gets_its_own_gpu(monkeypatch):
    chosen = _fake_gpus(monkeypatch, 8)
    env = sdist.DistEnv(rank=13, world_size=16, local_rank=5, local_world_size=8, under_launcher=True)
    assert sdist.device_for(env, "nccl") == torch.device("cuda", 5) and chosen == [5]
    assert sdist.device_for(env, "gloo") == torch.device("cpu")


def test_two_local_ranks_on_one_gpu_fail_with_one_line(monkeypatch):
    _fake_gpus(monkeypatch, 4)
    env = sdist.DistEnv(rank=6, world_size=8, local_rank=6, local_world_size=8, under_launcher=True)
    with pytest.raises(sdist.DeviceError) as err:
        sdist.device_for(env, "nccl")
    message = str(err.value)
    assert "\n" not in message
    assert "8 processes on this node but 4 GPU(s)" in message and "--nproc_per_node" in message


def test_nccl_without_gpus_says_what_to_use(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(sdist.DeviceError, match="launcher.backend=gloo"):
        sdist.device_for(sdist.DistEnv(), "nccl")


def test_the_default_group_also_takes_cpu_tensors_under_nccl():
    assert sdist.default_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert sdist.default_group_backend("gloo") == "gloo"


def test_the_control_plane_refuses_device_tensors():
    with pytest.raises(ValueError, match="control.all_reduce carries host values, got a tensor on meta"):
        control.all_reduce(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="control.send carries host tensors"):
        control.send(torch.zeros(2, device="meta"), dst=1)


def test_the_control_plane_returns_floats_without_a_group():
    # world size 1 (no process group): values come back as floats, reduced over the one rank
    assert control.all_reduce([1, 2.5]) == [1.0, 2.5]
    assert control.mean(torch.tensor([4.0])) == [4.0]
    assert control.flags(True) == [0] and control.flags(False) == []
    assert control.all_gather_object({"a": 1}) == [{"a": 1}]


def test_the_data_plane_refuses_host_tensors_on_nccl_groups(monkeypatch, single_process_group):
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    with pytest.raises(ValueError, match="comm.all_reduce: a CPU tensor .* on an NCCL training group"):
        comm.all_reduce(torch.zeros(3))
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "gloo")
    t = torch.ones(3)
    comm.all_reduce(t)  # gloo moves CPU tensors
    assert torch.equal(t, torch.ones(3))


class FakeEvent:
    """Stands in for torch.cuda.Event: ``done`` says whether the GPU has reached it."""

    def __init__(self, ms: float, done: bool = True):
        self.ms, self.done, self.waited = ms, done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.ms - self.ms


def test_cuda_intervals_are_read_once_complete_without_waiting(monkeypatch):
    stats = CommStats(cuda=True)
    times = iter([FakeEvent(0.0), FakeEvent(5.0), FakeEvent(10.0), FakeEvent(30.0, done=False)])
    monkeypatch.setattr(stats, "mark", lambda: next(times))
    with stats.blocking():  # 0 -> 5 ms, complete
        pass
    with stats.outer(), stats.blocking():  # 10 -> 30 ms, not yet reached by the GPU
        pass
    first = stats.pop()
    assert first["blocking_s"] == pytest.approx(0.005) and first["outer_blocking_s"] == 0
    assert len(stats._intervals) == 1  # kept for a later pop, not waited for
    stats._intervals[0][2].done = True
    second = stats.pop()
    assert second["blocking_s"] == pytest.approx(0.020) and second["outer_blocking_s"] == pytest.approx(0.020)
    assert stats.totals["blocking_s"] == pytest.approx(0.025)


def test_settle_waits_for_the_last_intervals(monkeypatch):
    stats = CommStats(cuda=True)
    end = FakeEvent(7.0, done=False)
    times = iter([FakeEvent(0.0), end])
    monkeypatch.setattr(stats, "mark", lambda: next(times))
    with stats.blocking():
        pass
    stats.settle()
    assert end.waited and stats.pop()["blocking_s"] == pytest.approx(0.007)


def test_host_timing_on_the_cpu():
    stats = CommStats()
    posted = stats.mark()
    stats.wait([], posted, overlapped=True)
    step = stats.pop()
    assert step["overlapped_s"] >= 0 and step["blocking_s"] >= 0 and not stats._intervals


def test_gpu_math_settings_are_a_no_op_on_the_cpu():
    before = torch.backends.cudnn.benchmark
    assert configure_device_math(torch.device("cpu"), tf32=True) == "cpu"
    assert torch.backends.cudnn.benchmark == before
