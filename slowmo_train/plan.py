"""How long a run is, decided once and logged: one :class:`Plan` for the synchronous trainer and the
asynchronous loops.

A *step* is an optimizer step for the synchronous loop (trainer.py) and a master update for the
asynchronous ones (asynchronous/runner.py, asynchronous/server.py). ``batch`` is what one step
applies: the total batch over all ranks for the synchronous loop, one worker's batch for the
asynchronous ones (each master update applies one worker's gradient); the peak learning rate is
scaled for it (optim.peak_lr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slowmo_train.config import OptimConfig, TrainConfig
from slowmo_train.optim import LrSchedule, peak_lr


@dataclass(frozen=True)
class Plan:
    """The run in steps: an optimizer step (synchronous loop) or a master update (asynchronous loops)."""

    steps_per_epoch: int
    total_steps: int
    eval_every_steps: int
    batch: int
    peak_lr: float
    epochs: float

    def lr_schedule(self, optim: OptimConfig) -> LrSchedule:
        """The learning rate of each step of this run (``LrSchedule.lr``)."""
        return LrSchedule(optim, self.steps_per_epoch, self.epochs, self.peak_lr, self.total_steps)


def make_plan(train: TrainConfig, optim: OptimConfig, steps_per_epoch: int, batch: int) -> Plan:
    """``train.epochs`` of ``steps_per_epoch`` steps, capped by ``train.max_steps``; an evaluation
    every ``train.eval_every_epochs``."""
    by_epochs = math.ceil(train.epochs * steps_per_epoch)
    total = min(by_epochs, train.max_steps) if train.max_steps else by_epochs
    eval_every = max(1, round(train.eval_every_epochs * steps_per_epoch))
    return Plan(steps_per_epoch, total, eval_every, batch, peak_lr(optim, batch), train.epochs)
