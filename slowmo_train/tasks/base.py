"""What a task gives the trainer: a model, batches, a loss and an evaluation.

The trainer never looks inside a batch and never names a task or a metric: it asks the task for the
loss of a batch (and how many samples or tokens the batch held, for throughput), and for an
evaluation whose headline metric the task names. So an image batch ``(images, labels)`` and a
translation batch of padded token tensors go through the same loop.

A task is built by ``TASKS[name](TaskArgs(...))``, from its ``TaskSpec`` in ``tasks/__init__.py``; the
spec also names ``check_data(data_cfg)``, a cheap check run before any worker starts.

A task whose batches count samples may also give its spec a ``train_size(data_cfg) -> int | None``
(``TaskSpec.train_size``): the number of training examples in ``data.root`` (after
``data.train_subset``), counted without decoding (file names, label lists), or None if the data is
not there yet. The CLI then rejects a ``train.batch_size`` larger than one worker's share before any
worker starts (``tasks/cifar10.py::cifar10_train_size`` is the example). Checkpoints and resume need
nothing from a task beyond the determinism of ``train_batches(epoch, skip)`` stated below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slowmo_train.config import DataConfig, EvalConfig, ModelConfig


@dataclass(frozen=True)
class WorkerInfo:
    """Where this process sits; tasks use it to shard data."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclass(frozen=True)
class TaskArgs:
    """Everything a task builder receives: its own configs plus the batch sizes the trainer decided."""

    model: ModelConfig
    data: DataConfig
    eval: EvalConfig
    #: per-worker batch (samples for image tasks; tasks that batch by tokens may ignore it)
    batch_size: int
    eval_batch_size: int
    seed: int
    worker: WorkerInfo


def channels_last(args: TaskArgs) -> bool:
    """``model.channels_last`` resolved: ``auto`` means on CUDA devices, where cuDNN's tensor-core
    convolutions run on NHWC activations without layout transposes (on the CPU it is slower)."""
    if args.model.channels_last == "auto":
        return args.worker.device.type == "cuda"
    return bool(args.model.channels_last)


@dataclass(frozen=True)
class HeadlineMetric:
    """The evaluation number a user watches: ``name`` is a key of ``Task.evaluate``'s result."""

    name: str
    higher_is_better: bool = True
    #: evaluation split the metric is reported on (shown in progress lines and TensorBoard)
    split: str = "test"

    def better(self, a: float, b: float | None) -> bool:
        """Is ``a`` better than the best so far ``b`` (None: nothing yet)?"""
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b


@dataclass
class Task:
    model: nn.Module
    #: (epoch, skip) -> this rank's batches of ``epoch`` after its first ``skip``; deterministic
    #: given the seed, so a resumed run sees the same batches as an uninterrupted one
    train_batches: Callable[[int, int], Iterator[Any]]
    #: batches per epoch; the same on every rank (collectives must stay aligned)
    steps_per_epoch: int
    #: (model, batch) -> (mean loss tensor, units in the batch); must not synchronise with the device
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
    #: (model, final) -> metrics dict containing ``metric.name``; collective (every rank calls it).
    #: ``final`` is True at the end of training (a task may run costlier evaluations then, e.g. BLEU).
    evaluate: Callable[[nn.Module, bool], dict[str, float]]
    metric: HeadlineMetric
    #: per-worker samples in one step (nominal, for the lr scaling and the plan)
    batch_size: int
    #: number of training examples (all ranks)
    train_size: int
    #: what ``loss`` counts, for throughput: "samples" or "tokens"
    unit: str = "samples"
    #: files a run directory should keep to use the model later (e.g. the subword vocabulary)
    artifacts: dict[str, str] = field(default_factory=dict)
