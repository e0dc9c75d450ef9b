"""What a task gives the trainer: a model, batches, a loss and an evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class WorkerInfo:
    """Where this process sits; tasks use it to shard data."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclass
class Task:
    model: nn.Module
    #: epoch, skip -> iterator of (inputs, targets) for this rank
    train_batches: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    steps_per_epoch: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: model -> {"top1": ..., "loss": ...}; collective (every rank calls it)
    evaluate: Callable[[nn.Module], dict[str, float]]
    #: per-worker samples in one step
    batch_size: int
    #: number of training examples (all ranks)
    train_size: int
