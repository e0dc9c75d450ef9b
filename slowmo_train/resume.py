"""Resuming a synchronous run: which checkpoint, the first-iteration replay, loading every rank's state.

    trainer = Trainer(job, env, device, run_dir)
    resume_trainer(trainer)        # Trainer.resume(); then trainer.train()

``trainer`` is a :class:`slowmo_train.trainer.Trainer` (not imported here: the trainer imports this
module). A resume is its own step, not a side effect of building the trainer: ``resume=auto|PATH`` (and
``auto`` after a launcher restart) picks a complete checkpoint (slowmo_train/checkpoint_files.py),
every rank loads its own file onto the CPU and each component moves its part to its device; any
rank's problem stops every rank with the same one-line CheckpointError.
"""

from __future__ import annotations

import logging
from pathlib import Path

from slowmo_train import control
from slowmo_train.checkpoint_files import (
    CheckpointError,
    check_compatible,
    check_model_shapes,
    load_rank_state,
    read_manifest,
    resolve_resume,
)
from slowmo_train.faults import restart_attempt

log = logging.getLogger("slowmo_train")


def resume_trainer(trainer) -> Path | None:
    """Pick the checkpoint (rank 0 decides, every rank loads its own file) and load it (collective).
    Any rank's problem stops every rank with the same one-line CheckpointError."""
    trainer.operation = "resume"
    choice = None
    if trainer.env.rank == 0:
        resume = trainer.job.resume
        # a launcher restart (a worker died) continues from the newest checkpoint of this run
        if restart_attempt() > 0:
            log.warning("restart %d of this job: resuming from the newest complete checkpoint", restart_attempt())
            resume = "auto"
        try:
            ckpt, warnings = resolve_resume(resume, trainer.run_dir)
            if ckpt is None and resume == "auto" and trainer.job.resume not in ("none", "auto"):
                ckpt, warnings = resolve_resume(trainer.job.resume, trainer.run_dir)
            for warning in warnings:
                log.warning(warning)
            choice = ("ok", str(ckpt) if ckpt else None)
        except CheckpointError as err:
            choice = ("error", str(err))
    status, value = control.broadcast_object(choice)
    if status == "error":
        raise CheckpointError(value)
    if value is None:
        return None
    ckpt = Path(value)
    replay_first_iteration(trainer, int(read_manifest(ckpt)["step"]))
    error = None
    try:
        manifest, state = load_rank_state(ckpt, trainer.env.rank)
        check_compatible(manifest, trainer.config_dict, trainer.env.world_size, ckpt)
        check_model_shapes(state["model"], trainer.task.model, ckpt / manifest["files"][str(trainer.env.rank)]["file"])
        trainer.load_state_dict(state)
    except CheckpointError as err:
        error = str(err)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        error = f"{ckpt}: rank {trainer.env.rank} cannot restore its state: {' '.join(str(err).split())[:300]}"
    errors = [e for e in control.all_gather_object(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    trainer.checkpointer.last_path = trainer.resumed_from = ckpt
    trainer.start_step = trainer.guard.finite_at = trainer.step
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d of it)",
        ckpt,
        trainer.step,
        trainer.step // trainer.plan.steps_per_epoch,
        trainer.step % trainer.plan.steps_per_epoch,
    )
    return ckpt


def replay_first_iteration(trainer, step: int) -> None:
    """One throwaway forward/backward before the checkpoint is loaded (which then overwrites
    every parameter, buffer, gradient-free optimizer state and RNG it touched). Whatever a run
    builds lazily during its first iteration is thus in place, as in an uninterrupted run: DDP
    re-orders its gradient buckets by gradient-ready order after one iteration, and with 3+
    ranks the bucket layout decides the order in which the all-reduce sums, i.e. the last bits."""
    trainer.operation = "resume (first-iteration replay)"
    spe = trainer.plan.steps_per_epoch
    batch = next(iter(trainer.task.train_batches(step // spe, step % spe)))
    trainer.algorithm.train_model.train()
    with trainer.precision.autocast():
        loss, _ = trainer.task.loss(trainer.algorithm.train_model, batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.algorithm.after_backward(step)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.algorithm.comm.settle()
    trainer.algorithm.comm.pop()
    trainer.algorithm.comm.totals = {k: 0 * v for k, v in trainer.algorithm.comm.totals.items()}
