"""What the two asynchronous loops share: the simulated one (runner.py) and the real one (server.py).

The task's model seen as one flat vector (:class:`FlatModel`), the task and run directory
(:class:`AsyncContext`, with the run length in master updates, :meth:`AsyncContext.plan`), the statistics
of a logging interval (:class:`IntervalStats`), the data position (:class:`BatchStream`), the choice of
the checkpoint to resume from (:meth:`AsyncContext.resume_checkpoint`, through slowmo_train/checkpoint.py
as the synchronous trainer's) and the inspection file of real mode (:func:`save_checkpoint`).
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
from omegaconf import OmegaConf
from torch import nn

from slowmo_train import control
from slowmo_train.asynchronous.rules import AsyncRule, WorkerSide
from slowmo_train.checkpoint import (
    FORMAT,
    Checkpointer,
    CheckpointError,
    check_compatible,
    load_rank_state,
    read_manifest,
    resolve_resume,
)
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


class BatchStream:
    """The task's batches epoch after epoch, counting the batches drawn, so a resumed run continues at
    the same batch: ``BatchStream(task, drawn)`` starts at epoch ``drawn // steps_per_epoch``, skipping the
    first ``drawn % steps_per_epoch`` batches of it (``task.train_batches(epoch, skip)`` is deterministic)."""

    def __init__(self, task: Task, drawn: int = 0):
        self.task, self.drawn = task, drawn
        self._it = self._batches(drawn)

    def _batches(self, drawn: int) -> Iterator[Any]:
        spe = max(1, self.task.steps_per_epoch)
        epoch, skip = divmod(drawn, spe)
        while True:
            yield from self.task.train_batches(epoch, skip)
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        self.drawn += 1
        return batch


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
        return {
            "loss": self.loss_sum / n,
            "staleness_mean": self.stale_sum / n,
            "staleness_max": self.stale_max,
            "updates_per_s": self.updates / elapsed,
            f"{unit}_per_s": self.units / elapsed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The interval's sums and the histogram (not its wall clock: throughput restarts on resume)."""
        return {
            "loss_sum": self.loss_sum,
            "units": self.units,
            "updates": self.updates,
            "stale_sum": self.stale_sum,
            "stale_max": self.stale_max,
            "histogram": dict(self.histogram),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.loss_sum, self.units, self.updates = float(state["loss_sum"]), int(state["units"]), int(state["updates"])
        self.stale_sum, self.stale_max = int(state["stale_sum"]), int(state["stale_max"])
        self.histogram = Counter({int(k): int(v) for k, v in state["histogram"].items()})

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
        args = TaskArgs(
            model=job.model,
            data=job.data,
            eval=job.eval,
            batch_size=job.train.batch_size,
            eval_batch_size=job.train.eval_batch_size,
            seed=job.seed,
            worker=worker,
        )
        # Every rank builds the model from the same seed, so all start from identical parameters.
        self.task: Task = TASKS[job.task.name](args)
        self.flat = FlatModel(self.task.model, self.task, job.optim.weight_decay)
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)

    def checkpointer(self) -> Checkpointer:
        c = self.job.checkpoint
        # written inside the step (no background thread): the async loops have no per-step poll point
        return Checkpointer(
            self.run_dir, c.keep, self.env.rank, self.env.world_size, None, every_steps=c.every_steps, at_end=c.at_end
        )

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint ``resume`` (none | auto | PATH) names, checked complete and compatible with
        this run (collective: rank 0 decides; any problem is the same one-line CheckpointError on
        every rank); None: start fresh."""
        choice = None
        if self.env.rank == 0:
            try:
                ckpt, warnings = resolve_resume(self.job.resume, self.run_dir)
                for warning in warnings:
                    log.warning(warning)
                if ckpt is not None:
                    check_compatible(read_manifest(ckpt), self.config_dict, self.env.world_size, ckpt)
                choice = ("ok", str(ckpt) if ckpt else None)
            except CheckpointError as err:
                choice = ("error", str(err))
        status, value = control.broadcast_object(choice)
        if status == "error":
            raise CheckpointError(value)
        return Path(value) if value else None

    def load_rank(self, ckpt: Path, mode: str) -> dict:
        """This rank's state from ``ckpt`` (verified), after checking it was written by ``mode``."""
        _, state = load_rank_state(ckpt, self.env.rank)
        saved = state.get("async", {}).get("mode")
        if saved != mode:
            raise CheckpointError(
                f"{ckpt} was not written by an asynchronous run in {mode} mode "
                f"(it holds {'mode ' + saved if saved else 'a synchronous run'})"
            )
        return state

    def save(self, checkpointer: Checkpointer, updates: int, state: dict, epoch: float) -> Path:
        """Write this rank's ``state`` as step ``updates`` (collective) and complete the checkpoint."""
        full = {"format": FORMAT, "step": updates, "rank": self.env.rank, "world_size": self.env.world_size, **state}
        path = checkpointer.save(
            updates, full, self.config_dict, {"epoch": round(epoch, 4), "algorithm": self.job.algorithm.name}
        )
        if hasattr(checkpointer, "finish"):
            checkpointer.finish()
        return path

    def evaluate(self, params: torch.Tensor, final: bool) -> dict[str, float]:
        self.flat.load(params)
        return self.task.evaluate(self.task.model, final)

    def plan(self, updates_per_epoch: int) -> Plan:
        """The run in master updates; the peak lr is scaled for the batch of one update (one worker's)."""
        return make_plan(self.job.train, self.job.optim, max(1, updates_per_epoch), self.task.batch_size)

    def log_plan(self, plan: Plan, workers: int, extra: str) -> None:
        log.info(
            "task=%s model=%s(%.2fM params) algorithm=%s (%s, %s) | %d asynchronous workers x batch %d | "
            "peak lr %.4g per update | %d master updates/epoch, %d updates",
            self.job.task.name,
            self.job.model.arch,
            self.flat.numel / 1e6,
            self.job.algorithm.name,
            self.job.algorithm.mode,
            extra,
            workers,
            plan.batch,
            plan.peak_lr,
            plan.steps_per_epoch,
            plan.total_steps,
        )

    def write_summary(self, summary: dict) -> dict:
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def one_line_reason(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def save_checkpoint(
    path: Path, rule: AsyncRule, updates: int, workers: list[WorkerSide] | None = None, extra: dict | None = None
) -> None:
    state = {
        "updates": updates,
        "rule": rule.name,
        "master": rule.state_dict(),
        "workers": [w.state_dict() for w in workers or []],
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
