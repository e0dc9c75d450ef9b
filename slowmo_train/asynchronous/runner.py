"""The asynchronous training loops: simulated (one process, N workers) and real (parameter server).

    slowmo-train algorithm=dana algorithm.sim_workers=16 model.width=0.125 data.root=/path/to/cifar10
    slowmo-train algorithm=nag_asgd algorithm.mode=real launcher.nproc_per_node=3 launcher.threads_per_worker=1

``cli.worker_main`` runs :class:`AsyncRunner` instead of the synchronous ``Trainer`` for the algorithms
of kind "async" in ``slowmo_train/registry.py``; what both modes share is in ``common.py``. Both modes
reuse the task interface (``TASKS``, ``task.loss``, ``task.train_batches``, ``task.evaluate``), the lr
schedule of ``slowmo_train.optim`` (indexed by master updates; the peak lr is scaled for the batch of
ONE update, the per-worker batch, since each master update applies one worker's gradient) and the
metrics writer. Weight decay is added to the gradient at the point the worker read, as
torch.optim.SGD does. BatchNorm running statistics are not part of the master's state: in simulated
mode the one model's buffers are updated by every forward pass; in real mode each worker keeps its
own and the evaluation uses their average.

Metrics per log interval: ``staleness_mean``/``staleness_max`` (master updates between a worker's read
and its write), ``updates_per_s`` (wall clock), the training loss and lr; the summary holds the
staleness histogram. Checkpoints (``checkpoint_async.pt``, written at every evaluation) hold the
master's parameters and momentum buffers, the workers' momentum (DANA-Slim), the update count and, in
simulated mode, the event queue; resuming from them is NOT implemented (a simulated run would replay
exactly only if the in-flight gradients and batch positions were saved too; a real run's arrival order
is never replayable).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from slowmo_train.asynchronous.common import AsyncContext, IntervalStats, endless_batches, save_checkpoint
from slowmo_train.asynchronous.rules import build_rule
from slowmo_train.asynchronous.simulator import ComputeTimes, EventSimulator
from slowmo_train.evaluation import Evaluator
from slowmo_train.metrics import MetricsWriter, Progress

log = logging.getLogger("slowmo_train")


class AsyncRunner(AsyncContext):
    """Builds the task and runs the simulated or the real asynchronous loop (``algorithm.mode``)."""

    def run(self) -> dict:
        if self.job.algorithm.mode == "real":
            from slowmo_train.asynchronous.server import run_real

            return run_real(self)
        return run_simulated(self)


def run_simulated(runner: AsyncRunner) -> dict:
    """N simulated workers in one process: a worker's gradient is computed when it reads the
    parameters and applied by the master when its (random) compute time has elapsed."""
    job, task, flat = runner.job, runner.task, runner.flat
    a = job.algorithm
    n = a.sim_workers
    plan = runner.plan(task.steps_per_epoch)
    times = ComputeTimes(a.compute_time_dist, a.compute_time_shape, a.compute_time_scale)
    sim = EventSimulator(n, times, job.seed)
    rule = build_rule(a.name, flat.vector(), n, job.optim.momentum, job.optim.nesterov)
    sides = [rule.worker_side(flat.numel) for _ in range(n)]
    schedule = plan.lr_schedule(job.optim)
    runner.log_plan(plan, n, f"{a.compute_time_dist} compute times")
    metrics = MetricsWriter(runner.run_dir, 0)
    progress = Progress(job.train.progress, plan.total_steps, 0)
    evaluator = Evaluator(task.metric, plan.eval_every_steps, plan.steps_per_epoch, metrics, step_word="update")
    batches = endless_batches(task)
    stats = IntervalStats()
    inflight: dict[int, tuple[torch.Tensor, int, float, int]] = {}
    issued = 0

    def start(worker: int, version: int) -> None:
        nonlocal issued
        grad, loss, units = flat.gradient(rule.params_for(worker, schedule.lr(version)), next(batches))
        inflight[worker] = (sides[worker].message(grad), version, loss, units)
        sim.issue(worker)
        issued += 1

    # Never start more gradients than the run applies, so every method computes the same number.
    for w in range(min(n, plan.total_steps)):
        start(w, 0)
    final: dict = {}
    updates = 0
    try:
        while updates < plan.total_steps:
            w = sim.pop()
            message, read_version, loss, units = inflight.pop(w)
            lr = schedule.lr(updates)
            rule.master_update(w, message, lr)
            stats.add(loss, units, updates - read_version)
            updates += 1
            if issued < plan.total_steps:
                start(w, updates)
            done = updates == plan.total_steps
            if updates % job.train.log_every == 0 or done:
                record = {"epoch": round(updates / plan.steps_per_epoch, 4), "lr": lr, "sim_time": sim.now,
                          **stats.record(task.unit)}
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"training loss is {record['loss']} at update {updates}: lower optim.lr")
                metrics.write("train", updates, **record)
                progress.update(updates, f"loss {record['loss']:.3f} staleness {record['staleness_mean']:.1f} "
                                f"{record['updates_per_s']:.1f} updates/s", force_line=True)
                stats.reset()
            if evaluator.should_evaluate(updates, done):
                eval_start = time.perf_counter()
                final = runner.evaluate(rule.eval_params(), done)
                evaluator.record(updates, final, progress)
                save_checkpoint(runner.run_dir / "checkpoint_async.pt", rule, updates, sides,
                                {"simulator": sim.state_dict()})
                stats.start += time.perf_counter() - eval_start
    finally:
        progress.close()
        metrics.close()
    return runner.write_summary({"mode": "simulated", "algorithm": a.name, "workers": n, "steps": updates,
                                 "gradients": issued, "sim_time": sim.now, "final_eval": final,
                                 "metric": task.metric.name, "best": evaluator.best, **stats.summary()})
