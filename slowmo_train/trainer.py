"""The training loop. It calls the algorithm's hooks (see algorithms/base.py) and never branches on
an algorithm's name.

    config -> task (model, data) -> optimizer -> algorithm wraps model and optimizer -> loop -> metrics
"""

from __future__ import annotations

import json
import logging
import math
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
from slowmo_train.tasks import TASKS, Task, WorkerInfo

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


class Trainer:
    def __init__(self, job: JobConfig, env: DistEnv, device: torch.device, run_dir: Path):
        self.job, self.env, self.device, self.run_dir = job, env, device, run_dir
        seed_everything(job.seed)
        self.topology = build_topology(resolve_procs_per_node(job.algorithm.nprocs_per_node, env))
        worker = WorkerInfo(env.rank, env.world_size, env.local_rank, device)
        batch = per_worker_batch(job.train, env.world_size)
        self.task = TASKS[job.task.name](job.model, job.data, batch, job.train.eval_batch_size, job.seed, worker)
        broadcast_model_(self.task.model)
        self.plan = make_plan(job, self.task, env.world_size)
        self.optimizer = build_optimizer(job.optim, self.task.model, self.plan.peak_lr)
        self.schedule = LrSchedule(job.optim, self.plan.steps_per_epoch, job.train.epochs)
        self.algorithm: Algorithm = build_algorithm(job.algorithm, job.slowmo, self.task.model, self.optimizer,
                                                    self.topology, device)
        self.metrics = MetricsWriter(run_dir, env.rank)
        self.step = 0
        self._log_plan()

    def _log_plan(self) -> None:
        p, t = self.plan, self.topology
        params = sum(x.numel() for x in self.task.model.parameters())
        log.info(
            "task=%s model=%s(width=%s, %.2fM params) algorithm=%s | %d processes = %d worker(s) x %d per node | "
            "batch %d/worker, %d total | peak lr %.4g | %d steps/epoch, %d steps | torch threads %d",
            self.job.task.name, self.job.model.arch, self.job.model.width, params / 1e6, self.algorithm.describe(),
            self.env.world_size, t.workers, t.procs_per_node, self.task.batch_size, p.total_batch, p.peak_lr,
            p.steps_per_epoch, p.total_steps, torch.get_num_threads(),
        )

    def evaluate(self) -> dict[str, float]:
        with averaged_model(self.algorithm, self.task.model) as model:
            return self.task.evaluate(model)

    def _reduce_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return t.tolist()

    def run(self) -> dict:
        job, plan, algo = self.job, self.plan, self.algorithm
        model = algo.train_model
        model.train()
        progress = Progress(job.train.progress, plan.total_steps, self.env.rank)
        loss_meter, comm_meters = MeanMeter(), {}
        interval_start, interval_steps = time.perf_counter(), 0
        final: dict = {}
        epoch = self.step // plan.steps_per_epoch
        batches = self.task.train_batches(epoch, self.step % plan.steps_per_epoch)
        try:
            while self.step < plan.total_steps:
                try:
                    x, y = next(batches)
                except StopIteration:
                    epoch += 1
                    batches = self.task.train_batches(epoch, 0)
                    continue
                k = self.step
                lr = self.schedule.apply(self.optimizer, algo.lr_schedule_step(k))
                algo.before_forward(k)
                loss = self.task.loss_fn(model(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                algo.after_backward(k)
                self.optimizer.step()
                algo.after_optimizer_step(k)
                self.step += 1
                interval_steps += 1
                loss_value = loss.item()
                loss_meter.add(loss_value)
                for key, value in algo.comm.pop().items():
                    comm_meters.setdefault(key, MeanMeter()).add(value)
                extra = algo.pop_metrics()

                done = self.step == plan.total_steps
                if self.step % job.train.log_every == 0 or done:
                    elapsed = time.perf_counter() - interval_start
                    (mean_loss,) = self._reduce_mean([loss_meter.mean()])
                    rate = interval_steps * plan.total_batch / max(elapsed, 1e-9)
                    record = {
                        "epoch": round(self.step / plan.steps_per_epoch, 4), "loss": mean_loss, "lr": lr,
                        "samples_per_s": rate,
                        **{f"comm_{key}_per_step": m.mean() for key, m in comm_meters.items()},
                        **extra,
                    }
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"training loss is {mean_loss} at step {self.step}: lower optim.lr or check the data"
                        )
                    self.metrics.write("train", self.step, **record)
                    progress.update(self.step, f"loss {mean_loss:.3f} lr {lr:.3g} {rate:.0f} samples/s", force_line=True)
                    loss_meter, comm_meters = MeanMeter(), {}
                    interval_start, interval_steps = time.perf_counter(), 0
                elif extra:
                    self.metrics.write("train", self.step, **extra)
                else:
                    progress.update(self.step, f"loss {loss_value:.3f} lr {lr:.3g}")

                if self.step % plan.eval_every_steps == 0 or done:
                    eval_start = time.perf_counter()
                    result = self.evaluate()
                    final = {"split": "test", **result}
                    self.metrics.write("eval", self.step, epoch=round(self.step / plan.steps_per_epoch, 4), **final)
                    progress.message(
                        f"epoch {self.step / plan.steps_per_epoch:.2f} step {self.step}: test top1 {result['top1']:.2f}% "
                        f"loss {result['loss']:.4f}"
                    )
                    interval_start += time.perf_counter() - eval_start  # evaluation is not training throughput
        finally:
            progress.close()
            algo.close()
            self.metrics.close()
        totals = algo.comm.totals
        summary = {"steps": self.step, "final_eval": final,
                   "comm_bytes_sent_per_step": totals["bytes_sent"] / max(1, self.step),
                   "comm_bytes_received_per_step": totals["bytes_received"] / max(1, self.step),
                   "comm_blocking_s_per_step": totals["blocking_s"] / max(1, self.step),
                   "comm_overlapped_s_per_step": totals["overlapped_s"] / max(1, self.step)}
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
