"""The training loop. It calls the algorithm's hooks (see algorithms/base.py) and never branches on
an algorithm's name.

    config -> task (model, data) -> optimizer -> algorithm wraps model and optimizer -> loop -> metrics
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from slowmo_train.algorithms import build_algorithm
from slowmo_train.algorithms.base import Algorithm, averaged_model
from slowmo_train.config import JobConfig, per_worker_batch
from slowmo_train.dist import DistEnv, build_topology, resolve_procs_per_node
from slowmo_train.metrics import MeanMeter, MetricsWriter, Progress
from slowmo_train.optim import LrSchedule, build_optimizer, peak_lr
from slowmo_train.precision import Precision
from slowmo_train.tasks import TASKS, Task, TaskArgs, WorkerInfo

log = logging.getLogger("slowmo_train")


def broadcast_model_(model: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    if dist.get_world_size() == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=src)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class Plan:
    """How long the run is, decided once and logged."""

    steps_per_epoch: int
    total_steps: int
    eval_every_steps: int
    total_batch: int
    peak_lr: float


def make_plan(job: JobConfig, task: Task, world_size: int) -> Plan:
    total_batch = task.batch_size * world_size
    by_epochs = math.ceil(job.train.epochs * task.steps_per_epoch)
    total = min(by_epochs, job.train.max_steps) if job.train.max_steps else by_epochs
    eval_every = max(1, round(job.train.eval_every_epochs * task.steps_per_epoch))
    return Plan(task.steps_per_epoch, total, eval_every, total_batch, peak_lr(job.optim, total_batch))


def keep_artifacts(artifacts: dict[str, str], run_dir: Path) -> None:
    """Copy the files a task needs to use its model later (e.g. the subword vocabulary) into
    ``run_dir/artifacts/`` so a run directory is self-contained."""
    if not artifacts:
        return
    folder = run_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    for path in artifacts.values():
        shutil.copy2(path, folder / Path(path).name)


class Trainer:
    def __init__(self, job: JobConfig, env: DistEnv, device: torch.device, run_dir: Path):
        self.job, self.env, self.device, self.run_dir = job, env, device, run_dir
        seed_everything(job.seed)
        self.topology = build_topology(resolve_procs_per_node(job.algorithm.nprocs_per_node, env))
        worker = WorkerInfo(env.rank, env.world_size, env.local_rank, device)
        args = TaskArgs(model=job.model, data=job.data, eval=job.eval,
                        batch_size=per_worker_batch(job.train, env.world_size),
                        eval_batch_size=job.train.eval_batch_size, seed=job.seed, worker=worker)
        self.task: Task = TASKS[job.task.name](args)
        if env.rank == 0:
            keep_artifacts(self.task.artifacts, run_dir)
        broadcast_model_(self.task.model)
        self.plan = make_plan(job, self.task, env.world_size)
        self.optimizer = build_optimizer(job.optim, self.task.model, self.plan.peak_lr)
        self.schedule = LrSchedule(job.optim, self.plan.steps_per_epoch, job.train.epochs)
        self.precision = Precision(job.train.precision, device)
        self.algorithm: Algorithm = build_algorithm(job.algorithm, job.slowmo, self.task.model, self.optimizer,
                                                    self.topology, device)
        self.metrics = MetricsWriter(run_dir, env.rank)
        self.step = 0
        self.evals_done = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self._log_plan()

    def _log_plan(self) -> None:
        p, t = self.plan, self.topology
        params = sum(x.numel() for x in self.task.model.parameters())
        log.info(
            "task=%s model=%s(%.2fM params) algorithm=%s | %d processes = %d worker(s) x %d per node | "
            "batch %d/worker, %d total | peak lr %.4g | %d steps/epoch, %d steps | precision %s | torch threads %d",
            self.job.task.name, self.job.model.arch, params / 1e6, self.algorithm.describe(),
            self.env.world_size, t.workers, t.procs_per_node, self.task.batch_size, p.total_batch, p.peak_lr,
            p.steps_per_epoch, p.total_steps, self.precision.mode, torch.get_num_threads(),
        )

    def evaluate(self, final: bool = False) -> dict[str, float]:
        with averaged_model(self.algorithm, self.task.model) as model:
            return self.task.evaluate(model, final)

    def _reduce_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return t.tolist()

    def train_step(self, batch, k: int) -> tuple[torch.Tensor, int]:
        """One optimizer step through the algorithm's hooks; returns the (device) loss and units."""
        algo = self.algorithm
        lr = self.schedule.apply(self.optimizer, algo.lr_schedule_step(k))
        algo.before_forward(k)
        with self.precision.autocast():
            loss, units = self.task.loss(algo.train_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        algo.after_backward(k)
        self.precision.step(self.optimizer)
        algo.after_optimizer_step(k)
        self.lr = lr
        return loss.detach(), units

    def _eval_and_log(self, progress: Progress, final: bool) -> dict:
        metric = self.task.metric
        result = self.evaluate(final)
        self.evals_done += 1
        value = result[metric.name]
        if metric.better(value, self.best):
            self.best, self.best_step = value, self.step
        record = {"split": metric.split, **result, f"best_{metric.name}": self.best}
        self.metrics.write("eval", self.step, epoch=round(self.step / self.plan.steps_per_epoch, 4), **record)
        shown = " ".join(f"{k} {v:.4g}" for k, v in result.items() if k != metric.name)
        progress.message(f"epoch {self.step / self.plan.steps_per_epoch:.2f} step {self.step}: "
                         f"{metric.split} {metric.name} {value:.2f} ({shown})")
        return record

    def run(self) -> dict:
        job, plan, algo = self.job, self.plan, self.algorithm
        algo.train_model.train()
        progress = Progress(job.train.progress, plan.total_steps, self.env.rank)
        unit = self.task.unit
        loss_sum, units_sum, comm_meters = torch.zeros((), device=self.device), 0, {}
        interval_start, interval_steps = time.perf_counter(), 0
        final: dict = {}
        epoch = self.step // plan.steps_per_epoch
        batches = self.task.train_batches(epoch, self.step % plan.steps_per_epoch)
        try:
            while self.step < plan.total_steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    epoch += 1
                    batches = self.task.train_batches(epoch, 0)
                    continue
                loss, units = self.train_step(batch, self.step)
                self.step += 1
                interval_steps += 1
                # accumulated on the device: reading the loss every step would synchronise with it
                loss_sum += loss.float()
                units_sum += units
                for key, value in algo.comm.pop().items():
                    comm_meters.setdefault(key, MeanMeter()).add(value)
                extra = algo.pop_metrics()

                done = self.step == plan.total_steps
                if self.step % job.train.log_every == 0 or done:
                    elapsed = time.perf_counter() - interval_start
                    mean_loss, total_units = self._reduce_mean([loss_sum.item() / interval_steps, units_sum])
                    total_units *= dist.get_world_size()
                    rate = total_units / max(elapsed, 1e-9)
                    record = {
                        "epoch": round(self.step / plan.steps_per_epoch, 4), "loss": mean_loss, "lr": self.lr,
                        f"{unit}_per_s": rate,
                        **{f"comm_{key}_per_step": m.mean() for key, m in comm_meters.items()},
                        **extra,
                    }
                    if self.precision.skipped_steps:
                        record["fp16_skipped_steps"] = self.precision.skipped_steps
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"training loss is {mean_loss} at step {self.step}: lower optim.lr or check the data"
                        )
                    self.metrics.write("train", self.step, **record)
                    progress.update(self.step, f"loss {mean_loss:.3f} lr {self.lr:.3g} {rate:.0f} {unit}/s",
                                    force_line=True)
                    loss_sum, units_sum, comm_meters = torch.zeros((), device=self.device), 0, {}
                    interval_start, interval_steps = time.perf_counter(), 0
                elif extra:
                    self.metrics.write("train", self.step, **extra)
                else:
                    progress.update(self.step, f"lr {self.lr:.3g}")

                if self.step % plan.eval_every_steps == 0 or done:
                    eval_start = time.perf_counter()
                    final = self._eval_and_log(progress, final=done)
                    interval_start += time.perf_counter() - eval_start  # evaluation is not training throughput
        finally:
            progress.close()
            algo.close()
            self.metrics.close()
        return self._write_summary(final)

    def _write_summary(self, final: dict) -> dict:
        totals = self.algorithm.comm.totals
        steps = max(1, self.step)
        summary = {"steps": self.step, "final_eval": final, "metric": self.task.metric.name,
                   "higher_is_better": self.task.metric.higher_is_better,
                   "best": self.best, "best_step": self.best_step,
                   "comm_bytes_sent_per_step": totals["bytes_sent"] / steps,
                   "comm_bytes_received_per_step": totals["bytes_received"] / steps,
                   "comm_blocking_s_per_step": totals["blocking_s"] / steps,
                   "comm_overlapped_s_per_step": totals["overlapped_s"] / steps}
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
