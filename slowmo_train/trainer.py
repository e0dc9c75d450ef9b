"""The training loop. It calls the algorithm's hooks (see algorithms/base.py) and never branches on
an algorithm's name or a task's.

    config -> task (model, data) -> optimizer -> algorithm wraps model and optimizer -> loop -> metrics
                                                                                          -> checkpoints

Reliability (slowmo_train/checkpoint.py, slowmo_train/faults.py): the trainer resumes from a
checkpoint (``resume=auto|PATH``, and always after a launcher restart), saves every
``checkpoint.every_steps`` steps / ``checkpoint.every_minutes`` minutes / at the end / when SIGTERM or
SIGINT arrives (the ranks agree on the step through a pipelined 8-byte all-reduce every
``checkpoint.poll_every`` steps), handles non-finite values (``train.nonfinite``), and turns a
communication failure or timeout into one line naming the operation, the step and the rank.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from slowmo_train.algorithms import build_algorithm
from slowmo_train.algorithms.base import Algorithm, averaged_model
from slowmo_train.checkpoint import (FORMAT, CheckpointError, Checkpointer, capture_rng, check_compatible,
                                     check_model_shapes, load_rank_state, read_manifest, resolve_resume, restore_rng,
                                     write_atomic)
from slowmo_train.config import JobConfig, per_worker_batch
from slowmo_train.dist import DistEnv, broadcast_object, build_topology, resolve_procs_per_node
from slowmo_train.faults import (FaultInjector, NonFiniteError, StopSignals, all_finite, is_comm_failure,
                                 peer_error, restart_attempt)
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


def control_group(timeout_s: float):
    """A gloo process group over all ranks for small CPU-side control collectives (None at world size 1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


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
        self.stop = StopSignals.install()
        self.faults = FaultInjector(env.rank)
        log.info("rank %d: process %d, launch attempt %d", env.rank, os.getpid(), restart_attempt())
        seed_everything(job.seed)
        self.topology = build_topology(resolve_procs_per_node(job.algorithm.nprocs_per_node, env))
        # host-side control messages (stop polls, loss means, finiteness flags) are CPU tensors: a gloo
        # group of their own works under NCCL too and never queues behind the algorithm's traffic
        self.control_group = control_group(job.launcher.timeout_s)
        self._pending_poll: tuple | None = None
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
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
        self.checkpointer = Checkpointer(run_dir, job.checkpoint.keep, env.rank, env.world_size, self.faults)
        self.step = 0
        self.evals_done = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.nonfinite_skips = 0
        # the loss since the last log line is part of the state, so a resumed run logs the same means
        self.loss_sum = torch.zeros((), device=device)
        self.loss_steps = 0
        self.lr = float("nan")
        self.operation = "start-up"
        self.stopped_by: str | None = None
        self.resumed_from = self._resume()
        self.start_step = self.step
        self.finite_at = self.step  # the last step at which every rank was checked finite
        self.metrics = MetricsWriter(run_dir, env.rank, resume_step=self.step if self.resumed_from else None)
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

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's complete state after ``self.step`` steps (see slowmo_train/checkpoint.py)."""
        return {
            "format": FORMAT, "step": self.step, "rank": self.env.rank, "world_size": self.env.world_size,
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "precision": self.precision.state_dict(),
            "rng": capture_rng(),
            "trainer": {"evals_done": self.evals_done, "best": self.best, "best_step": self.best_step,
                        "nonfinite_skips": self.nonfinite_skips, "loss_sum": self.loss_sum.detach().cpu(),
                        "loss_steps": self.loss_steps},
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
        self.evals_done, self.best, self.best_step = int(t["evals_done"]), t["best"], t["best_step"]
        self.nonfinite_skips = int(t["nonfinite_skips"])
        self.loss_sum = t["loss_sum"].to(self.device)
        self.loss_steps = int(t["loss_steps"])

    def _resume(self) -> Path | None:
        """Pick the checkpoint (rank 0 decides, every rank loads its own file) and load it. Any rank's
        problem stops every rank with the same one-line CheckpointError."""
        self.operation = "resume"
        choice = None
        if self.env.rank == 0:
            resume = self.job.resume
            # a launcher restart (a worker died) continues from the newest checkpoint of this run
            if restart_attempt() > 0:
                log.warning("restart %d of this job: resuming from the newest complete checkpoint", restart_attempt())
                resume = "auto"
            try:
                ckpt, warnings = resolve_resume(resume, self.run_dir)
                if ckpt is None and resume == "auto" and self.job.resume not in ("none", "auto"):
                    ckpt, warnings = resolve_resume(self.job.resume, self.run_dir)
                for warning in warnings:
                    log.warning(warning)
                choice = ("ok", str(ckpt) if ckpt else None)
            except CheckpointError as err:
                choice = ("error", str(err))
        status, value = broadcast_object(choice)
        if status == "error":
            raise CheckpointError(value)
        if value is None:
            return None
        ckpt = Path(value)
        self._replay_first_iteration(int(read_manifest(ckpt)["step"]))
        error = None
        try:
            manifest, state = load_rank_state(ckpt, self.env.rank, self.device)
            check_compatible(manifest, self.config_dict, self.env.world_size, ckpt)
            check_model_shapes(state["model"], self.task.model, ckpt / manifest["files"][str(self.env.rank)]["file"])
            self.load_state_dict(state)
        except CheckpointError as err:
            error = str(err)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            error = f"{ckpt}: rank {self.env.rank} cannot restore its state: {' '.join(str(err).split())[:300]}"
        errors = [e for e in _gather(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        self.checkpointer.last_path = ckpt
        log.info("resumed from %s at step %d (epoch %d, batch %d of it)", ckpt, self.step,
                 self.step // self.plan.steps_per_epoch, self.step % self.plan.steps_per_epoch)
        return ckpt

    def _replay_first_iteration(self, step: int) -> None:
        """One throwaway forward/backward before the checkpoint is loaded (which then overwrites
        every parameter, buffer, gradient-free optimizer state and RNG it touched). Whatever a run
        builds lazily during its first iteration is thus in place, as in an uninterrupted run: DDP
        re-orders its gradient buckets by gradient-ready order after one iteration, and with 3+
        ranks the bucket layout decides the order in which the all-reduce sums, i.e. the last bits."""
        self.operation = "resume (first-iteration replay)"
        spe = self.plan.steps_per_epoch
        batch = next(iter(self.task.train_batches(step // spe, step % spe)))
        self.algorithm.train_model.train()
        with self.precision.autocast():
            loss, _ = self.task.loss(self.algorithm.train_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.algorithm.after_backward(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.comm.pop()
        self.algorithm.comm.totals = {k: 0 * v for k, v in self.algorithm.comm.totals.items()}

    def save_checkpoint(self) -> Path:
        """Collective: check that every rank's state is finite, then write the checkpoint."""
        self.operation = "checkpoint save"
        bad = self._nonfinite_ranks()
        if bad:
            self._raise_nonfinite(bad)
        self.finite_at = self.step
        meta = {"epoch": self.step // self.plan.steps_per_epoch, "algorithm": self.algorithm.describe()}
        return self.checkpointer.save(self.step, self.state_dict(), self.config_dict, meta)

    # --- agreement between ranks ---------------------------------------------------------------------
    def _local_flags(self) -> torch.Tensor:
        minutes = self.job.checkpoint.every_minutes
        due = self.env.rank == 0 and minutes > 0 and \
            time.monotonic() - self.checkpointer.last_saved_at >= minutes * 60
        return torch.tensor([float(self.stop.signum or 0), float(due)])

    @staticmethod
    def _decode_flags(flags: torch.Tensor) -> tuple[str | None, bool]:
        signum = int(flags[0])
        return (signal.Signals(signum).name if signum else None), bool(flags[1])

    def _poll(self) -> tuple[str | None, bool]:
        """(the stop signal some rank received, or None; time for a time-based checkpoint), now:
        one blocking all-reduce of two values, so all ranks act at the same step (used at start-up)."""
        self.operation = "stop-signal poll"
        flags = self._local_flags()
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
        return self._decode_flags(flags)

    def _collect_poll(self) -> tuple[str | None, bool]:
        """The result of the poll started ``checkpoint.poll_every`` steps ago (None, False if none).

        Polls are pipelined: each one is a non-blocking all-reduce on a separate gloo group, started
        after a step and read ``poll_every`` steps later, when it has long completed. Every rank
        reads the same result at the same step, so they still agree where to stop, and the poll
        never waits for a step's own communication: a blocking poll queued behind OSGP's in-flight
        gossip and cancelled its overlap (measured: OSGP 27-32 % slower per step on a slow link).
        The cost is that a signal is acted on up to 2 x poll_every steps after it arrives."""
        if self._pending_poll is None:
            return None, False
        self.operation = "stop-signal poll"
        work, flags = self._pending_poll
        self._pending_poll = None
        if work is not None:
            work.wait()
        return self._decode_flags(flags)

    def _start_poll(self) -> None:
        flags = self._local_flags()
        work = None
        if dist.get_world_size() > 1:
            work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group, async_op=True)
        self._pending_poll = (work, flags)

    def _nonfinite_ranks(self) -> list[int]:
        """Ranks whose accumulated loss or parameters hold inf/NaN (collective)."""
        local = not all_finite([self.loss_sum, *self.algorithm.parameters()])
        flags = torch.zeros(self.env.world_size)
        flags[self.env.rank] = float(local)
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, group=self.control_group)
        return [r for r, f in enumerate(flags.tolist()) if f > 0]

    def _raise_nonfinite(self, ranks: list[int]) -> None:
        last = self.checkpointer.last_path
        since = f"steps {self.finite_at + 1}-{self.step}" if self.step > self.finite_at + 1 else f"step {self.step}"
        raise NonFiniteError(
            f"non-finite loss or parameters on rank {', '.join(map(str, ranks))} in {since} "
            f"(train.nonfinite={self.job.train.nonfinite}); the last good checkpoint is {last or 'none'}: "
            "lower optim.lr, check the data, or set train.nonfinite=skip")

    # --- one step ------------------------------------------------------------------------------------
    def evaluate(self, final: bool = False) -> dict[str, float]:
        with averaged_model(self.algorithm, self.task.model) as model:
            return self.task.evaluate(model, final)

    def _reduce_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_world_size() > 1:
            dist.all_reduce(t, group=self.control_group)
            t /= dist.get_world_size()
        return t.tolist()

    def train_step(self, batch, k: int) -> tuple[torch.Tensor, int, bool]:
        """One optimizer step through the algorithm's hooks; returns the (device) loss, the units and
        whether the update was applied (False: skipped for non-finite values, train.nonfinite=skip)."""
        algo = self.algorithm
        skip_mode = self.job.train.nonfinite == "skip"
        lr = self.schedule.apply(self.optimizer, algo.lr_schedule_step(k))
        # a skipped step must not leave its BatchNorm statistics behind either
        buffers = [b.clone() for b in self.task.model.buffers()] if skip_mode else None
        algo.before_forward(k)
        with self.precision.autocast():
            loss, units = self.task.loss(algo.train_model, batch)
        loss = self.faults.corrupt_loss(k + 1, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        algo.after_backward(k)
        applied = True
        if skip_mode:
            applied = self._agree_finite_step(loss, buffers)
        if applied:
            self.precision.step(self.optimizer)
        # communication runs even after a skipped update, so every rank's collectives stay aligned
        algo.after_optimizer_step(k)
        self.lr = lr
        return loss.detach(), units, applied

    def _agree_finite_step(self, loss: torch.Tensor, buffers: list[torch.Tensor]) -> bool:
        """train.nonfinite=skip: one all-reduce of a flag per rank after the backward pass; if any
        rank saw a non-finite loss (or gradient, without a gradient scaler, which handles its own
        overflows), every rank drops this step's update."""
        tensors = [loss] if self.precision.scaler is not None else [loss] + [p.grad for p in self.algorithm.parameters()]
        flags = torch.zeros(self.env.world_size)
        flags[self.env.rank] = float(not all_finite(tensors))
        if dist.get_world_size() > 1:
            dist.all_reduce(flags)
        bad = [r for r, f in enumerate(flags.tolist()) if f > 0]
        if not bad:
            return True
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(self.task.model.buffers(), buffers):
                b.copy_(saved)
        self.nonfinite_skips += 1
        limit = self.job.train.max_nonfinite_skips
        log.warning("step %d: non-finite loss/gradients on rank %s: update skipped on every rank (%d of at most %d)",
                    self.step + 1, ", ".join(map(str, bad)), self.nonfinite_skips, limit)
        if self.nonfinite_skips > limit:
            last = self.checkpointer.last_path
            raise NonFiniteError(
                f"{self.nonfinite_skips} steps skipped for non-finite values (train.max_nonfinite_skips={limit}), "
                f"the last at step {self.step + 1} on rank {', '.join(map(str, bad))}; the last good checkpoint "
                f"is {last or 'none'}: lower optim.lr or check the data")
        return False

    def _eval_and_log(self, progress: Progress, final: bool) -> dict:
        self.operation = "evaluation"
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

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict:
        progress = Progress(self.job.train.progress, self.plan.total_steps, self.env.rank)
        final: dict = {}
        ok = False
        try:
            final = self._loop(progress)
            ok = True
        except Exception as err:
            if is_comm_failure(err):
                raise peer_error(err, self.operation, self.step + (self.operation == "training step"),
                                 self.env.rank, self.job.launcher.timeout_s) from None
            raise
        finally:
            progress.close()
            if ok:  # after a failure, waiting for in-flight messages could hang
                self.algorithm.close()
            self.metrics.close()
            self.stop.restore()
        return self._write_summary(final)

    def _loop(self, progress: Progress) -> dict:
        job, plan, algo = self.job, self.plan, self.algorithm
        ckpt = job.checkpoint
        algo.train_model.train()
        unit = self.task.unit
        units_sum, comm_meters = 0, {}
        interval_start = time.perf_counter()
        final: dict = {}
        if self.step >= plan.total_steps:
            log.info("nothing to train: the run is at step %d of %d (raise train.max_steps or train.epochs)",
                     self.step, plan.total_steps)
            return final
        self.stopped_by = self._poll()[0]
        if self.stopped_by:  # a signal during start-up: stop before the first step
            return final
        epoch = self.step // plan.steps_per_epoch
        batches = self.task.train_batches(epoch, self.step % plan.steps_per_epoch)
        progress.update(self.step, "")
        while self.step < plan.total_steps:
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                batches = self.task.train_batches(epoch, 0)
                continue
            self.faults.before_step(self.step + 1)
            self.operation = "training step"
            loss, units, applied = self.train_step(batch, self.step)
            self.step += 1
            if applied:
                # accumulated on the device: reading the loss every step would synchronise with it
                self.loss_sum += loss.float()
                self.loss_steps += 1
            units_sum += units
            for key, value in algo.comm.pop().items():
                comm_meters.setdefault(key, MeanMeter()).add(value)
            extra = algo.pop_metrics()

            done = self.step == plan.total_steps
            if self.step % job.train.log_every == 0 or done:
                self.operation = "logging"
                bad = self._nonfinite_ranks()
                if bad:
                    self._raise_nonfinite(bad)
                self.finite_at = self.step
                elapsed = time.perf_counter() - interval_start
                mean_loss, total_units = self._reduce_mean([self.loss_sum.item() / max(1, self.loss_steps), units_sum])
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
                if job.train.nonfinite == "skip":
                    record["nonfinite_skips"] = self.nonfinite_skips
                self.metrics.write("train", self.step, **record)
                progress.update(self.step, f"loss {mean_loss:.3f} lr {self.lr:.3g} {rate:.0f} {unit}/s",
                                force_line=True)
                if self.step % job.train.log_every == 0:
                    # a line only because train.max_steps ends the run here keeps the interval open,
                    # so a run resumed past the cap logs the same means as one that never stopped
                    self.loss_sum, self.loss_steps = torch.zeros((), device=self.device), 0
                units_sum, comm_meters = 0, {}
                interval_start = time.perf_counter()
            elif extra:
                self.metrics.write("train", self.step, **extra)
            else:
                progress.update(self.step, f"lr {self.lr:.3g}")

            if self.step % plan.eval_every_steps == 0 or done:
                eval_start = time.perf_counter()
                final = self._eval_and_log(progress, final=done)
                interval_start += time.perf_counter() - eval_start  # evaluation is not training throughput

            stop, time_due = None, False
            poll_step = not done and self.step % ckpt.poll_every == 0
            if poll_step:
                stop, time_due = self._collect_poll()
            periodic = ckpt.every_steps > 0 and self.step % ckpt.every_steps == 0
            if periodic or time_due or stop or (done and ckpt.at_end):
                save_start = time.perf_counter()
                self.save_checkpoint()
                interval_start += time.perf_counter() - save_start
            if stop:
                self.stopped_by = stop
                log.info("stopped at step %d (%s); checkpoint %s", self.step, self.stopped_by,
                            self.checkpointer.last_path)
                break
            if poll_step:
                self._start_poll()  # after the save, so a time-based checkpoint is not asked for twice
        self._collect_poll()  # no collective left in flight
        if self.step == plan.total_steps:
            self._save_final_model()
        return final

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
        summary = {"steps": self.step, "final_eval": final, "metric": self.task.metric.name,
                   "higher_is_better": self.task.metric.higher_is_better,
                   "best": self.best, "best_step": self.best_step,
                   "stopped_by": self.stopped_by,
                   "checkpoint": str(self.checkpointer.last_path) if self.checkpointer.last_path else None,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "nonfinite_skips": self.nonfinite_skips,
                   **{f"comm_{key}_per_step": value / steps for key, value in totals.items()}}
        if self.env.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _gather(obj) -> list:
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
