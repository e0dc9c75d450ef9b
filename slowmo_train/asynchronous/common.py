"""What the two asynchronous loops share: the simulated one (runner.py) and the real one (server.py).

The task's model seen as one flat vector (:class:`FlatModel`), the task and run directory
(:class:`AsyncContext`, with the run length in master updates, :meth:`AsyncContext.plan`), the statistics
of a logging interval (:class:`IntervalStats`) and the checkpoint file (:func:`save_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slowmo_train.asynchronous.rules import AsyncRule, WorkerSide
from slowmo_train.config import JobConfig
from slowmo_train.dist import DistEnv
from slowmo_train.plan import Plan, make_plan
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


class AsyncContext:
    """The task, its model as a flat vector, and the run's plan, metrics and summary: what the simulated
    and the real loop both work with."""

    def __init__(self, job: JobConfig, env: DistEnv, device: torch.device, run_dir: Path):
        self.job, self.env, self.device, self.run_dir = job, env, device, run_dir
        torch.manual_seed(job.seed)
        worker = WorkerInfo(env.rank, env.world_size, env.local_rank, device)
        args = TaskArgs(model=job.model, data=job.data, eval=job.eval, batch_size=job.train.batch_size,
                        eval_batch_size=job.train.eval_batch_size, seed=job.seed, worker=worker)
        # Every rank builds the model from the same seed, so all start from identical parameters.
        self.task: Task = TASKS[job.task.name](args)
        self.flat = FlatModel(self.task.model, self.task, job.optim.weight_decay)

    def evaluate(self, params: torch.Tensor, final: bool) -> dict[str, float]:
        self.flat.load(params)
        return self.task.evaluate(self.task.model, final)

    def plan(self, updates_per_epoch: int) -> Plan:
        """The run in master updates; the peak lr is scaled for the batch of one update (one worker's)."""
        return make_plan(self.job.train, self.job.optim, max(1, updates_per_epoch), self.task.batch_size)

    def log_plan(self, plan: Plan, workers: int, extra: str) -> None:
        log.info("task=%s model=%s(%.2fM params) algorithm=%s (%s, %s) | %d asynchronous workers x batch %d | "
                 "peak lr %.4g per update | %d master updates/epoch, %d updates",
                 self.job.task.name, self.job.model.arch, self.flat.numel / 1e6, self.job.algorithm.name,
                 self.job.algorithm.mode, extra, workers, plan.batch, plan.peak_lr, plan.steps_per_epoch,
                 plan.total_steps)

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
