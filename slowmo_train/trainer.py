"""The synchronous training loop. It calls the algorithm's hooks (see algorithms/base.py) and never
branches on an algorithm's name or a task's.

    trainer = Trainer(job, env, device, run_dir)    # build: task, optimizer, algorithm, components
    trainer.resume()                                  # resume=auto|PATH (always after a launcher restart)
    summary = trainer.train()                         # the loop; trainer.run() does both

    config -> task (model, data) -> optimizer -> algorithm wraps model and optimizer -> loop -> metrics
                                                                                          -> checkpoints

Each component owns its cadence and its state: ``TrainLog`` (metrics.py) when a log line is due and
what it averages, ``Evaluator`` (evaluation.py) when to evaluate and the best result,
``Checkpointer`` (checkpoint.py) when to save, ``StopPoller`` (faults.py) the agreed stop and
time-based checkpoint, ``NonFiniteGuard`` (faults.py) what ``train.nonfinite`` asks for. A
communication failure or timeout becomes one line naming the operation, the step and the rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slowmo_train.algorithms import build_algorithm, comm
from slowmo_train.algorithms.base import Algorithm, averaged_model
from slowmo_train.checkpoint import FORMAT, Checkpointer, capture_rng, restore_rng, write_atomic
from slowmo_train.config import JobConfig, per_worker_batch
from slowmo_train.dist import DistEnv, build_topology, resolve_procs_per_node
from slowmo_train.evaluation import Evaluator
from slowmo_train.faults import (
    FaultInjector,
    NonFiniteGuard,
    StopPoller,
    StopSignals,
    is_comm_failure,
    peer_error,
    restart_attempt,
)
from slowmo_train.metrics import MetricsWriter, Progress, TrainLog
from slowmo_train.optim import build_optimizer
from slowmo_train.plan import make_plan
from slowmo_train.precision import Precision
from slowmo_train.resume import resume_trainer
from slowmo_train.tasks import TASKS, Task, TaskArgs, WorkerInfo

log = logging.getLogger("slowmo_train")


def broadcast_model_(model: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers (data plane)."""
    if comm.world_size() == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        comm.broadcast(tensor.data, src)


def task_args(job: JobConfig, worker: WorkerInfo) -> TaskArgs:
    """What a task is built from: its config sections and who this worker is."""
    return TaskArgs(
        model=job.model,
        data=job.data,
        eval=job.eval,
        batch_size=per_worker_batch(job.train, worker.world_size),
        eval_batch_size=job.train.eval_batch_size,
        seed=job.seed,
        worker=worker,
    )


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
        # first, so that a Ctrl-C while the data loads still ends in an orderly stop
        self.signals = StopSignals.install()
        self.faults = FaultInjector(env.rank)
        log.info("rank %d: process %d, launch attempt %d", env.rank, os.getpid(), restart_attempt())
        torch.manual_seed(job.seed)
        self.topology = build_topology(resolve_procs_per_node(job.algorithm.nprocs_per_node, env))
        self.task: Task = TASKS[job.task.name](
            task_args(job, WorkerInfo(env.rank, env.world_size, env.local_rank, device))
        )
        if env.rank == 0:
            keep_artifacts(self.task.artifacts, run_dir)
        broadcast_model_(self.task.model)
        self.plan = plan = make_plan(
            job.train, job.optim, self.task.steps_per_epoch, self.task.batch_size * env.world_size
        )
        self.optimizer = build_optimizer(job.optim, self.task.model, plan.peak_lr)
        self.schedule = plan.lr_schedule(job.optim)
        self.precision = Precision(job.train.precision, device)
        self.algorithm: Algorithm = build_algorithm(
            job.algorithm, job.slowmo, self.task.model, self.optimizer, self.topology, device
        )
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
        ckpt = job.checkpoint
        self.checkpointer = Checkpointer(
            run_dir,
            ckpt.keep,
            env.rank,
            env.world_size,
            self.faults,
            every_steps=ckpt.every_steps,
            at_end=ckpt.at_end,
            background=ckpt.background,
            background_min_bytes=int(ckpt.background_min_mb * 2**20),
        )
        self.poller = StopPoller(
            self.signals, ckpt.poll_every, ckpt.every_minutes, self.checkpointer.seconds_since_save, env.rank
        )
        self.guard = NonFiniteGuard(
            job.train.nonfinite, job.train.max_nonfinite_skips, lambda: self.checkpointer.last_path
        )
        self.evaluator = Evaluator(self.task.metric, plan.eval_every_steps, plan.steps_per_epoch, None)
        self.train_log = TrainLog(None, None, job.train.log_every, plan.steps_per_epoch, self.task.unit, device)
        self.step = self.start_step = 0
        self.lr = float("nan")
        self.operation = "start-up"
        self.stopped_by: str | None = None
        self.resumed_from: Path | None = None
        self._log_plan()

    def _log_plan(self) -> None:
        p, t = self.plan, self.topology
        params = sum(x.numel() for x in self.task.model.parameters())
        log.info(
            "task=%s model=%s(%.2fM params) algorithm=%s | %d processes = %d worker(s) x %d per node | "
            "batch %d/worker, %d total | peak lr %.4g | %d steps/epoch, %d steps | precision %s | torch threads %d",
            self.job.task.name,
            self.job.model.arch,
            params / 1e6,
            self.algorithm.describe(),
            self.env.world_size,
            t.workers,
            t.procs_per_node,
            self.task.batch_size,
            p.batch,
            p.peak_lr,
            p.steps_per_epoch,
            p.total_steps,
            self.precision.mode,
            torch.get_num_threads(),
        )

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's complete state after ``self.step`` steps (see slowmo_train/checkpoint.py)."""
        return {
            "format": FORMAT,
            "step": self.step,
            "rank": self.env.rank,
            "world_size": self.env.world_size,
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "precision": self.precision.state_dict(),
            "rng": capture_rng(),
            "trainer": {
                **self.evaluator.state_dict(),
                "nonfinite_skips": self.guard.skips,
                **self.train_log.state_dict(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # after the model: push-sum sets the parameters from its numerators and weight
        self.algorithm.load_state_dict(state["algorithm"])
        self.precision.load_state_dict(state["precision"])
        restore_rng(state["rng"])
        t = state["trainer"]
        self.step = int(state["step"])
        self.evaluator.load_state_dict(t)
        self.guard.skips = int(t["nonfinite_skips"])
        self.train_log.load_state_dict(t)

    def resume(self) -> Path | None:
        """Continue from ``resume=auto|PATH`` (always after a launcher restart): a step of its own,
        collective (slowmo_train/resume.py)."""
        return resume_trainer(self)

    def save_checkpoint(self, wait: bool = False) -> Path:
        """Collective: check that every rank's state is finite, then write the checkpoint (in the
        background with checkpoint.background, unless ``wait``: the process exits next)."""
        self.operation = "checkpoint save"
        self.guard.check(self.step, [self.train_log.loss_sum, *self.algorithm.parameters()])
        self.train_log.write_pending()  # a resumed run keeps the records up to its step
        meta = {"epoch": self.step // self.plan.steps_per_epoch, "algorithm": self.algorithm.describe()}
        return self.checkpointer.save(self.step, self.state_dict(), self.config_dict, meta, wait=wait)

    # --- one step ------------------------------------------------------------------------------------
    def evaluate(self, final: bool = False) -> dict[str, float]:
        with averaged_model(self.algorithm, self.task.model) as model:
            return self.task.evaluate(model, final)

    def train_step(self, batch, k: int) -> tuple[torch.Tensor, int, bool]:
        """One optimizer step through the algorithm's hooks; returns the (device) loss, the units and
        whether the update was applied (False: skipped for non-finite values, train.nonfinite=skip)."""
        algo = self.algorithm
        lr = self.schedule.apply(self.optimizer, algo.lr_schedule_step(k))
        # a skipped step must not leave its BatchNorm statistics behind either
        buffers = [b.clone() for b in self.task.model.buffers()] if self.guard.skipping else None
        algo.before_forward(k)
        with self.precision.autocast():
            loss, units = self.task.loss(algo.train_model, batch)
        loss = self.faults.corrupt_loss(k + 1, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        algo.after_backward(k)
        applied = True
        if self.guard.skipping:
            # with a gradient scaler, fp16 overflows are the scaler's to handle
            checked = [loss] if self.precision.scaler is not None else [loss] + [p.grad for p in algo.parameters()]
            applied = self.guard.agree(k + 1, checked)
            if not applied:
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, saved in zip(self.task.model.buffers(), buffers):
                        b.copy_(saved)
        if applied:
            self.precision.step(self.optimizer)
        # communication runs even after a skipped update, so every rank's collectives stay aligned
        algo.after_optimizer_step(k)
        self.lr = lr
        return loss.detach(), units, applied

    def _batches(self):
        """Training batches from the current step on, epoch after epoch."""
        epoch, skip = divmod(self.step, self.plan.steps_per_epoch)
        while True:
            yield from self.task.train_batches(epoch, skip)
            epoch, skip = epoch + 1, 0

    def _log_fields(self) -> dict:
        fields = {"fp16_skipped_steps": self.precision.skipped_steps} if self.precision.skipped_steps else {}
        return {**fields, **({"nonfinite_skips": self.guard.skips} if self.guard.skipping else {})}

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Resume (unless :meth:`resume` was called), train, write the summary; errors of
        communication become one line naming the operation, the step and the rank."""
        try:
            if self.operation == "start-up":
                self.resume()
            final = self.train()
        except Exception as err:
            if is_comm_failure(err):
                raise peer_error(
                    err,
                    self.operation,
                    self.step + (self.operation == "training step"),
                    self.env.rank,
                    self.job.launcher.timeout_s,
                ) from None
            raise
        finally:
            self.signals.restore()
        return self._write_summary(final)

    def train(self) -> dict:
        """The loop: one step, then each component acts when its cadence says so. Returns the
        final evaluation record (empty if the run stopped early)."""
        plan, algo, log_ = self.plan, self.algorithm, self.train_log
        # a resumed run, and a restart that found no checkpoint to resume, drop the records written after its step
        restarted = self.resumed_from is not None or restart_attempt() > 0
        self.metrics = MetricsWriter(self.run_dir, self.env.rank, resume_step=self.step if restarted else None)
        progress = log_.progress = Progress(self.job.train.progress, plan.total_steps, self.env.rank)
        log_.writer = self.evaluator.writer = self.metrics
        final, ok = {}, False
        try:
            if not self._may_start():
                ok = True
                return final
            algo.train_model.train()
            progress.update(self.step, "")
            for batch in self._batches():
                self.faults.before_step(self.step + 1)
                self.operation = "training step"
                loss, units, applied = self.train_step(batch, self.step)
                self.step += 1
                done = self.step == plan.total_steps
                log_.add_step(self.step, loss, units, applied, algo.comm.pop(), algo.pop_metrics())
                if log_.should_log(self.step, done):
                    self.operation = "logging"
                    self.guard.check(self.step, [log_.loss_sum, *algo.parameters()])
                    log_.write(self.step, self.lr, self._log_fields())
                else:
                    progress.update(self.step, f"lr {self.lr:.3g}")
                if self.evaluator.should_evaluate(self.step, done):
                    self.operation = "evaluation"
                    with log_.paused():
                        final = self.evaluator.record(self.step, self.evaluate(done), progress)
                self.checkpointer.poll()  # completes a background save once every rank has written it
                stop, time_due = self.poller.collect(self.step, done)
                if self.checkpointer.should_save(self.step, done, time_due or bool(stop)):
                    with log_.paused():
                        self.save_checkpoint(wait=done or bool(stop))
                if stop:
                    self.stopped_by = stop
                    log.info("stopped at step %d (%s); checkpoint %s", self.step, stop, self.checkpointer.last_path)
                    break
                self.poller.start(self.step, done)
                if done:
                    break
            self.poller.finish()  # no collective left in flight
            self.checkpointer.finish()  # nor a checkpoint: complete before the process exits
            log_.write_pending()
            if self.step == plan.total_steps:
                self._save_final_model()
            ok = True
            return final
        finally:
            progress.close()
            if ok:  # after a failure, waiting for in-flight messages could hang
                algo.close()
                algo.comm.settle()  # GPU timings not yet read: into the totals
                algo.comm.pop()
            self.metrics.close()

    def _may_start(self) -> bool:
        if self.step >= self.plan.total_steps:
            log.info(
                "nothing to train: the run is at step %d of %d (raise train.max_steps or train.epochs)",
                self.step,
                self.plan.total_steps,
            )
            return False
        self.stopped_by = self.poller.now()  # a signal during start-up: stop before the first step
        return self.stopped_by is None

    def _save_final_model(self) -> None:
        """RUN_DIR/model_final.pt: the average of the ranks' models (a state_dict, loadable with
        weights_only=True), what slowmo-translate and other consumers read."""
        self.operation = "final model average"
        with averaged_model(self.algorithm, self.task.model) as model:
            if self.env.rank == 0:
                write_atomic(self.run_dir / "model_final.pt", lambda f: torch.save(model.state_dict(), f))

    def _write_summary(self, final: dict) -> dict:
        totals = self.algorithm.comm.totals
        steps = max(1, self.step - self.start_step)  # the communication counters cover this process only
        ev = self.evaluator
        summary = {
            "steps": self.step,
            "final_eval": final,
            "metric": self.task.metric.name,
            "higher_is_better": self.task.metric.higher_is_better,
            "best": ev.best,
            "best_step": ev.best_step,
            "stopped_by": self.stopped_by,
            "checkpoint": str(self.checkpointer.last_path) if self.checkpointer.last_path else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "nonfinite_skips": self.guard.skips,
            # training time of this process (evaluation and checkpoints excluded) and its steps
            "train_s": round(self.train_log.train_seconds, 3),
            "train_steps": self.step - self.start_step,
            **{f"comm_{key}_per_step": value / steps for key, value in totals.items()},
        }
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
