"""The event simulator (reproducible order, staleness) and the simulated runner end to end on tiny data."""

from __future__ import annotations

import pytest
import torch

from slowmo_train.asynchronous.simulator import ComputeTimes, EventSimulator


def _orders(sim: EventSimulator, events: int) -> tuple[list[int], list[int]]:
    """Pop ``events`` arrivals, re-issuing each worker; return the order and each update's staleness."""
    version, read_at, order, stale = 0, {}, [], []
    for w in range(sim.workers):
        sim.issue(w)
        read_at[w] = 0
    for _ in range(events):
        w = sim.pop()
        order.append(w)
        stale.append(version - read_at[w])
        version += 1
        read_at[w] = version
        sim.issue(w)
    return order, stale


def test_event_order_is_a_function_of_the_seed():
    times = ComputeTimes("gamma", 2.0, 1.0)
    a, _ = _orders(EventSimulator(8, times, seed=5), 300)
    b, _ = _orders(EventSimulator(8, times, seed=5), 300)
    c, _ = _orders(EventSimulator(8, times, seed=6), 300)
    assert a == b
    assert a != c


def test_constant_times_round_robin_with_staleness_n_minus_one():
    order, stale = _orders(EventSimulator(4, ComputeTimes("constant", scale=1.0), seed=0), 40)
    assert order == [0, 1, 2, 3] * 10
    assert stale[:4] == [0, 1, 2, 3]
    assert set(stale[4:]) == {3}


def test_one_worker_has_no_staleness():
    _, stale = _orders(EventSimulator(1, ComputeTimes("gamma", 2.0, 1.0), seed=0), 50)
    assert set(stale) == {0}


@pytest.mark.parametrize("dist", ["gamma", "exponential", "uniform"])
def test_equal_speeds_mean_staleness_is_workers_minus_one(dist):
    _, stale = _orders(EventSimulator(6, ComputeTimes(dist, 2.0, 1.0), seed=1), 6000)
    mean = sum(stale) / len(stale)
    assert abs(mean - 5.0) < 0.3, mean
    assert max(stale) > 5  # random times: some gradients wait longer than a round


def test_heterogeneous_speeds_make_the_slow_worker_staler():
    sim = EventSimulator(3, ComputeTimes("gamma", 2.0, 1.0, speeds=(1.0, 1.0, 0.25)), seed=2)
    order, stale = _orders(sim, 3000)
    slow = [s for w, s in zip(order, stale) if w == 2]
    fast = [s for w, s in zip(order, stale) if w == 0]
    assert sum(slow) / len(slow) > 2 * sum(fast) / len(fast)


def test_state_dict_resumes_the_same_order():
    times = ComputeTimes("gamma", 2.0, 1.0)
    full, _ = _orders(EventSimulator(5, times, seed=9), 60)
    sim = EventSimulator(5, times, seed=9)
    for w in range(5):
        sim.issue(w)
    first = []
    for _ in range(30):
        w = sim.pop()
        first.append(w)
        sim.issue(w)
    copy = EventSimulator(5, times, seed=123)
    copy.load_state_dict(sim.state_dict())
    rest = []
    for _ in range(30):
        w = copy.pop()
        rest.append(w)
        copy.issue(w)
    assert first + rest == full


def test_bad_distribution_is_rejected():
    with pytest.raises(ValueError, match="compute_time_dist"):
        ComputeTimes("weibull")
    with pytest.raises(ValueError, match="> 0"):
        ComputeTimes("gamma", shape=0.0)


# --- the simulated runner on tiny CIFAR-format data -------------------------------------------------


@pytest.fixture
def one_thread():
    # tiny convolutions on a shared, busy CPU are many times slower with several intra-op threads
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job(root, cache, name: str, workers: int, out):
    from slowmo_train.config import JobConfig

    job = JobConfig()
    job.algorithm.name, job.algorithm.sim_workers = name, workers
    job.algorithm.compute_time_dist = "constant"
    job.model.width = 0.0625
    job.data.root, job.data.cache_dir, job.data.download = str(root), str(cache), "false"
    job.train.batch_size, job.train.epochs, job.train.eval_batch_size = 20, 1.0, 50
    job.train.log_every, job.train.progress = 5, "none"
    job.optim.lr, job.optim.schedule = 0.5, "constant"
    job.output_dir = str(out)
    return job


def _run(job):
    from pathlib import Path

    from slowmo_train.asynchronous.runner import AsyncRunner
    from slowmo_train.dist import DistEnv

    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = AsyncRunner(job, DistEnv(), torch.device("cpu"), out).run()
    return summary, torch.load(out / "checkpoint_async.pt")


@pytest.mark.parametrize("name", ["nag_asgd", "dana_slim"])
def test_simulated_runner_with_one_worker_is_nesterov_sgd(
    torchvision_cifar, tmp_path, single_process_group, one_thread, name
):
    """Staleness 0 end to end: one simulated worker trains exactly as torch's Nesterov SGD on the task."""
    from slowmo_train.optim import peak_lr
    from slowmo_train.tasks import TASKS, TaskArgs, WorkerInfo

    job = _job(torchvision_cifar, tmp_path / "cache", name, 1, tmp_path / "run")
    summary, ckpt = _run(job)
    assert summary["steps"] == 10 and summary["staleness_mean"] == 0.0

    torch.manual_seed(job.seed)
    task = TASKS["cifar10"](
        TaskArgs(
            job.model,
            job.data,
            job.eval,
            job.train.batch_size,
            job.train.eval_batch_size,
            job.seed,
            WorkerInfo(0, 1, 0, torch.device("cpu")),
        )
    )
    o = job.optim
    opt = torch.optim.SGD(
        task.model.parameters(),
        lr=peak_lr(o, job.train.batch_size),
        momentum=o.momentum,
        nesterov=True,
        weight_decay=o.weight_decay,
    )
    for batch in task.train_batches(0, 0):
        opt.zero_grad()
        task.loss(task.model, batch)[0].backward()
        opt.step()
    reference = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    torch.testing.assert_close(ckpt["master"]["theta"], reference, rtol=1e-5, atol=1e-6)


def test_simulated_runner_many_workers_records_staleness(torchvision_cifar, tmp_path, single_process_group, one_thread):
    job = _job(torchvision_cifar, tmp_path / "cache", "dana", 4, tmp_path / "run")
    summary, ckpt = _run(job)
    # constant times: round robin, so after the first round every update is 3 updates stale; the
    # last 3 updates drain the queue without new reads
    assert summary["steps"] == summary["gradients"] == 10
    assert summary["staleness_histogram"] == {"0": 1, "1": 1, "2": 1, "3": 7}
    assert ckpt["master"]["v"].shape[0] == 4
    assert 0 <= summary["final_eval"]["top1"] <= 100
