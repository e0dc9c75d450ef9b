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
staleness histogram.

Checkpoints and resume: the synchronous trainer's (slowmo_train/checkpoint.py: ``RUN_DIR/checkpoints/
step_N/rank*.pt`` + ``manifest.json``, ``resume=auto|PATH``, completeness, checksum and config checks
with one-line errors; ``checkpoint.every_steps`` counts master updates). Simulated mode saves every
``checkpoint.every_steps`` updates, at the end (``checkpoint.at_end``) and after the update during
which SIGTERM/SIGINT arrived (then it stops, ``stopped_by`` in the summary), and resumes EXACTLY: a
run cut and resumed equals the uncut one bit for bit (parameters, logged losses, evaluations;
tests/test_async_resume.py). The rank file holds the master rule's state (parameters, momentum
buffers, DANA-Zero's per-worker momentum and their running sum), every worker's side state
(DANA-Slim's momentum), the event simulator (clock, queue, issue count, PCG64 state), the gradients
in flight (message, read version, loss, units per worker), the number of batches drawn (the data
position), the log interval's sums and the staleness histogram, the evaluator's best, the model's
BatchNorm statistics and the global RNG states. Not saved: wall-clock throughput (``updates_per_s``
restarts); ``checkpoint.every_minutes`` is not used. Real mode: see server.py. Besides,
``checkpoint_async.pt`` (the master's state at the last evaluation, one file) is kept for inspection.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from slowmo_train.asynchronous.common import AsyncContext, BatchStream, IntervalStats, one_line_reason, save_checkpoint
from slowmo_train.asynchronous.rules import build_rule
from slowmo_train.asynchronous.simulator import ComputeTimes, EventSimulator
from slowmo_train.checkpoint import CheckpointError, capture_rng, check_model_shapes, restore_rng
from slowmo_train.evaluation import Evaluator
from slowmo_train.faults import StopSignals
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
    evaluator = Evaluator(task.metric, plan.eval_every_steps, plan.steps_per_epoch, None, step_word="update")
    checkpointer = runner.checkpointer()
    stats = IntervalStats()
    inflight: dict[int, tuple[torch.Tensor, int, float, int]] = {}
    issued = updates = 0
    final: dict = {}

    def state() -> dict:
        """Everything the next update depends on (module docstring): exact resume."""
        return {
            "async": {
                "mode": "simulated",
                "rule": rule.name,
                "master": rule.state_dict(),
                "workers": [side.state_dict() for side in sides],
                "simulator": sim.state_dict(),
                "inflight": {
                    w: {"message": m, "read_version": v, "loss": loss, "units": u}
                    for w, (m, v, loss, u) in inflight.items()
                },
                "issued": issued,
                "batches_drawn": batches.drawn,
                "stats": stats.state_dict(),
                "evaluator": evaluator.state_dict(),
                "final": final,
            },
            "model": task.model.state_dict(),  # the BatchNorm statistics every forward pass updates
            "rng": capture_rng(),
        }

    ckpt = runner.resume_checkpoint()
    if ckpt is not None:
        saved = runner.load_rank(ckpt, "simulated")
        s = saved["async"]
        try:
            check_model_shapes(saved["model"], task.model, ckpt)
            if len(s["workers"]) != n:
                raise CheckpointError(f"{ckpt} holds {len(s['workers'])} simulated workers, this run has {n}")
            task.model.load_state_dict(saved["model"])
            rule.load_state_dict(s["master"])
            for side, side_state in zip(sides, s["workers"]):
                side.load_state_dict(side_state)
            sim.load_state_dict(s["simulator"])
            inflight = {
                int(w): (e["message"], int(e["read_version"]), float(e["loss"]), int(e["units"]))
                for w, e in s["inflight"].items()
            }
            issued, updates, final = int(s["issued"]), int(saved["step"]), s["final"]
            stats.load_state_dict(s["stats"])
            evaluator.load_state_dict(s["evaluator"])
            restore_rng(saved["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{ckpt}: cannot restore the simulated run: {one_line_reason(err)}") from None
        checkpointer.last_path = ckpt
        log.info(
            "resumed from %s at update %d (%d gradients issued, %d in flight)", ckpt, updates, issued, len(inflight)
        )
    batches = BatchStream(task, int(s["batches_drawn"]) if ckpt is not None else 0)
    # a resumed run drops the records written after its checkpoint
    metrics = MetricsWriter(runner.run_dir, 0, resume_step=updates if ckpt is not None else None)
    evaluator.writer = metrics
    progress = Progress(job.train.progress, plan.total_steps, 0)
    signals = StopSignals.install()

    def start(worker: int, version: int) -> None:
        nonlocal issued
        grad, loss, units = flat.gradient(rule.params_for(worker, schedule.lr(version)), next(batches))
        inflight[worker] = (sides[worker].message(grad), version, loss, units)
        sim.issue(worker)
        issued += 1

    if ckpt is None:
        # Never start more gradients than the run applies, so every method computes the same number.
        for w in range(min(n, plan.total_steps)):
            start(w, 0)
    stopped_by = None
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
                record = {
                    "epoch": round(updates / plan.steps_per_epoch, 4),
                    "lr": lr,
                    "sim_time": sim.now,
                    **stats.record(task.unit),
                }
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"training loss is {record['loss']} at update {updates}: lower optim.lr")
                metrics.write("train", updates, **record)
                progress.update(
                    updates,
                    f"loss {record['loss']:.3f} staleness {record['staleness_mean']:.1f} "
                    f"{record['updates_per_s']:.1f} updates/s",
                    force_line=True,
                )
                stats.reset()
            if evaluator.should_evaluate(updates, done):
                eval_start = time.perf_counter()
                final = runner.evaluate(rule.eval_params(), done)
                evaluator.record(updates, final, progress)
                # the master's state at this evaluation in one file, for inspection (resume: checkpoints/)
                save_checkpoint(
                    runner.run_dir / "checkpoint_async.pt", rule, updates, sides, {"simulator": sim.state_dict()}
                )
                stats.start += time.perf_counter() - eval_start
            if checkpointer.should_save(updates, done, signals.requested):
                runner.save(checkpointer, updates, state(), updates / plan.steps_per_epoch)
            if signals.requested and not done:
                stopped_by = signals.name
                log.info("stopped at update %d (%s); checkpoint %s", updates, stopped_by, checkpointer.last_path)
                break
    finally:
        signals.restore()
        progress.close()
        metrics.close()
    return runner.write_summary(
        {
            "mode": "simulated",
            "algorithm": a.name,
            "workers": n,
            "steps": updates,
            "gradients": issued,
            "sim_time": sim.now,
            "final_eval": final,
            "metric": task.metric.name,
            "best": evaluator.best,
            "stopped_by": stopped_by,
            "checkpoint": str(checkpointer.last_path) if checkpointer.last_path else None,
            "resumed_from": str(ckpt) if ckpt else None,
            **stats.summary(),
        }
    )
