"""The asynchronous training loops: simulated (one process, N workers) and real (parameter server).

    slowmo-train algorithm=dana algorithm.sim_workers=16 model.width=0.125 data.root=/path/to/cifar10
    slowmo-train algorithm=nag_asgd algorithm.mode=real launcher.nproc_per_node=3 launcher.threads_per_worker=1

``cli.worker_main`` runs :class:`AsyncRunner` instead of the synchronous ``Trainer`` for the algorithms
marked "async" in ``slowmo_train.algorithms.RUNNERS``. Both modes reuse the task interface (``TASKS``,
``task.loss``, ``task.train_batches``, ``task.evaluate``), the lr schedule of ``slowmo_train.optim``
(indexed by master updates; the peak lr is scaled for the batch of ONE update, the per-worker batch,
since each master update applies one worker's gradient) and the metrics writer. Weight decay is added
to the gradient at the point the worker read, as torch.optim.SGD does. BatchNorm running statistics are
not part of the master's state: in simulated mode the one model's buffers are updated by every
forward pass; in real mode each worker keeps its own and the evaluation uses their average.

Metrics per log interval: ``staleness_mean``/``staleness_max`` (master updates between a worker's read
and its write), ``updates_per_s`` (wall clock), the training loss and lr; the summary holds the
staleness histogram. Checkpoints (``checkpoint_async.pt``, written at every evaluation) hold the
master's parameters and momentum buffers, the workers' momentum (DANA-Slim), the update count and, in
simulated mode, the event queue; resuming from them is NOT implemented (a simulated run would replay
exactly only if the in-flight gradients and batch positions were saved too; a real run's arrival order
is never replayable).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from slowmo_train.asynchronous.rules import AsyncRule, WorkerSide, build_rule
from slowmo_train.asynchronous.simulator import ComputeTimes, EventSimulator
from slowmo_train.config import JobConfig
from slowmo_train.dist import DistEnv
from slowmo_train.metrics import MetricsWriter, Progress
from slowmo_train.optim import LrSchedule, peak_lr
from slowmo_train.tasks import TASKS, Task, TaskArgs, WorkerInfo

log = logging.getLogger("slowmo_train")


class FlatModel:
    """A model seen as one flat parameter vector: load a vector, compute a flat gradient at it."""

    def __init__(self, model: nn.Module, task: Task, weight_decay: float):
        self.model, self.task, self.weight_decay = model, task, weight_decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)

    def vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).float().cpu()

    def load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p))
                offset += n

    def gradient(self, flat: torch.Tensor, batch) -> tuple[torch.Tensor, float, int]:
        """Gradient (weight decay included) of the task loss at ``flat`` on ``batch``; loss; units."""
        self.load(flat)
        self.model.train()
        for p in self.params:
            p.grad = None
        loss, units = self.task.loss(self.model, batch)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self.params]).float().cpu()
        if self.weight_decay:
            grad.add_(flat, alpha=self.weight_decay)
        return grad, float(loss.detach()), units

    def buffers(self) -> list[torch.Tensor]:
        return [b for b in self.model.buffers() if b.is_floating_point()]


def endless_batches(task: Task, start_epoch: int = 0) -> Iterator[Any]:
    """The task's batches epoch after epoch (each epoch deterministic given the seed)."""
    epoch = start_epoch
    while True:
        yield from task.train_batches(epoch, 0)
        epoch += 1


@dataclass
class AsyncPlan:
    """Run length in master updates, decided once and logged."""

    updates_per_epoch: int
    total_updates: int
    eval_every: int
    peak_lr: float
    workers: int
    batch_per_worker: int


def make_async_plan(job: JobConfig, task: Task, workers: int, batches_per_worker_epoch: int) -> AsyncPlan:
    per_epoch = max(1, batches_per_worker_epoch)
    by_epochs = math.ceil(job.train.epochs * per_epoch)
    total = min(by_epochs, job.train.max_steps) if job.train.max_steps else by_epochs
    eval_every = max(1, round(job.train.eval_every_epochs * per_epoch))
    return AsyncPlan(per_epoch, total, eval_every, peak_lr(job.optim, task.batch_size), workers, task.batch_size)


class IntervalStats:
    """Loss, staleness and throughput over one logging interval, plus the run's staleness histogram."""

    def __init__(self):
        self.histogram: Counter[int] = Counter()
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.units, self.updates, self.stale_sum, self.stale_max = 0.0, 0, 0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: float, units: int, staleness: int) -> None:
        self.loss_sum += loss
        self.units += units
        self.updates += 1
        self.stale_sum += staleness
        self.stale_max = max(self.stale_max, staleness)
        self.histogram[staleness] += 1

    def record(self, unit: str) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        n = max(1, self.updates)
        return {"loss": self.loss_sum / n, "staleness_mean": self.stale_sum / n, "staleness_max": self.stale_max,
                "updates_per_s": self.updates / elapsed, f"{unit}_per_s": self.units / elapsed}

    def summary(self) -> dict[str, Any]:
        total = sum(self.histogram.values())
        mean = sum(k * c for k, c in self.histogram.items()) / max(1, total)
        return {"staleness_mean": mean, "staleness_histogram": {str(k): c for k, c in sorted(self.histogram.items())}}


class AsyncRunner:
    """Builds the task and runs the simulated or the real asynchronous loop (``algorithm.mode``)."""

    def __init__(self, job: JobConfig, env: DistEnv, device: torch.device, run_dir: Path):
        self.job, self.env, self.device, self.run_dir = job, env, device, run_dir
        torch.manual_seed(job.seed)
        worker = WorkerInfo(env.rank, env.world_size, env.local_rank, device)
        args = TaskArgs(model=job.model, data=job.data, eval=job.eval, batch_size=job.train.batch_size,
                        eval_batch_size=job.train.eval_batch_size, seed=job.seed, worker=worker)
        # Every rank builds the model from the same seed, so all start from identical parameters.
        self.task: Task = TASKS[job.task.name](args)
        self.flat = FlatModel(self.task.model, self.task, job.optim.weight_decay)

    def run(self) -> dict:
        if self.job.algorithm.mode == "real":
            from slowmo_train.asynchronous.server import run_real

            return run_real(self)
        return run_simulated(self)

    # shared by both modes -------------------------------------------------------------------
    def evaluate(self, params: torch.Tensor, final: bool) -> dict[str, float]:
        self.flat.load(params)
        return self.task.evaluate(self.task.model, final)

    def log_plan(self, plan: AsyncPlan, extra: str) -> None:
        log.info("task=%s model=%s(%.2fM params) algorithm=%s (%s, %s) | %d asynchronous workers x batch %d | "
                 "peak lr %.4g per update | %d master updates/epoch, %d updates",
                 self.job.task.name, self.job.model.arch, self.flat.numel / 1e6, self.job.algorithm.name,
                 self.job.algorithm.mode, extra, plan.workers, plan.batch_per_worker, plan.peak_lr,
                 plan.updates_per_epoch, plan.total_updates)

    def write_summary(self, summary: dict) -> dict:
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def save_checkpoint(path: Path, rule: AsyncRule, updates: int, workers: list[WorkerSide] | None = None,
                    extra: dict | None = None) -> None:
    state = {"updates": updates, "rule": rule.name, "master": rule.state_dict(),
             "workers": [w.state_dict() for w in workers or []], **(extra or {})}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run_simulated(runner: AsyncRunner) -> dict:
    """N simulated workers in one process: a worker's gradient is computed when it reads the
    parameters and applied by the master when its (random) compute time has elapsed."""
    job, task, flat = runner.job, runner.task, runner.flat
    a = job.algorithm
    n = a.sim_workers
    plan = make_async_plan(job, task, n, task.steps_per_epoch)
    times = ComputeTimes(a.compute_time_dist, a.compute_time_shape, a.compute_time_scale)
    sim = EventSimulator(n, times, job.seed)
    rule = build_rule(a.name, flat.vector(), n, job.optim.momentum, job.optim.nesterov)
    sides = [rule.worker_side(flat.numel) for _ in range(n)]
    schedule = LrSchedule(job.optim, plan.updates_per_epoch, job.train.epochs)
    runner.log_plan(plan, f"{a.compute_time_dist} compute times")
    metrics = MetricsWriter(runner.run_dir, 0)
    progress = Progress(job.train.progress, plan.total_updates, 0)
    batches = endless_batches(task)
    metric = task.metric
    stats = IntervalStats()

    def lr_of(update: int) -> float:
        return plan.peak_lr * schedule.factor(min(update, plan.total_updates - 1))

    inflight: dict[int, tuple[torch.Tensor, int, float, int]] = {}
    issued = 0

    def start(worker: int, version: int) -> None:
        nonlocal issued
        grad, loss, units = flat.gradient(rule.params_for(worker, lr_of(version)), next(batches))
        inflight[worker] = (sides[worker].message(grad), version, loss, units)
        sim.issue(worker)
        issued += 1

    # Never start more gradients than the run applies, so every method computes the same number.
    for w in range(min(n, plan.total_updates)):
        start(w, 0)
    best: float | None = None
    final: dict = {}
    updates = 0
    try:
        while updates < plan.total_updates:
            w = sim.pop()
            message, read_version, loss, units = inflight.pop(w)
            lr = lr_of(updates)
            rule.master_update(w, message, lr)
            stats.add(loss, units, updates - read_version)
            updates += 1
            if issued < plan.total_updates:
                start(w, updates)
            done = updates == plan.total_updates
            if updates % job.train.log_every == 0 or done:
                record = {"epoch": round(updates / plan.updates_per_epoch, 4), "lr": lr, "sim_time": sim.now,
                          **stats.record(task.unit)}
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"training loss is {record['loss']} at update {updates}: lower optim.lr")
                metrics.write("train", updates, **record)
                progress.update(updates, f"loss {record['loss']:.3f} staleness {record['staleness_mean']:.1f} "
                                f"{record['updates_per_s']:.1f} updates/s", force_line=True)
                stats.reset()
            if updates % plan.eval_every == 0 or done:
                eval_start = time.perf_counter()
                final = runner.evaluate(rule.eval_params(), done)
                value = final[metric.name]
                best = value if metric.better(value, best) else best
                metrics.write("eval", updates, epoch=round(updates / plan.updates_per_epoch, 4), split=metric.split,
                              **final, **{f"best_{metric.name}": best})
                progress.message(f"epoch {updates / plan.updates_per_epoch:.2f} update {updates}: "
                                 f"{metric.split} {metric.name} {value:.2f}")
                save_checkpoint(runner.run_dir / "checkpoint_async.pt", rule, updates, sides,
                                {"simulator": sim.state_dict()})
                stats.start += time.perf_counter() - eval_start
    finally:
        progress.close()
        metrics.close()
    return runner.write_summary({"mode": "simulated", "algorithm": a.name, "workers": n, "steps": updates,
                                 "gradients": issued, "sim_time": sim.now, "final_eval": final,
                                 "metric": metric.name, "best": best, **stats.summary()})
