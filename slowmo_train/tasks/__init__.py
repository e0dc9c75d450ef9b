"""Tasks: each builds a model, its data, its loss and its evaluation. A closed table, one record per task.

    task = TASKS[cfg.task.name](TaskArgs(...))      # build it (TaskSpec.build)
    TASKS[cfg.task.name].check_data(cfg.data)       # before any worker starts

Adding a task is one :class:`TaskSpec` below plus its module (and its architectures in
``slowmo_train.models.MODELS``); ``task=NAME`` is checked against this table before workers start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slowmo_train.config import DataConfig
from slowmo_train.tasks.base import HeadlineMetric, Task, TaskArgs, WorkerInfo
from slowmo_train.tasks.cifar10 import build_cifar10, check_cifar10_data, cifar10_train_size
from slowmo_train.tasks.imagenet import build_imagenet, check_imagenet_data, imagenet_train_size
from slowmo_train.tasks.wmt16 import build_wmt16, check_wmt16_data


@dataclass(frozen=True)
class TaskSpec:
    """Everything the code needs to know about one ``task=NAME``."""

    name: str
    #: TaskArgs -> Task (model, batches, loss, evaluation); calling the spec calls it
    build: Callable[[TaskArgs], Task]
    #: data_cfg -> None: a cheap check run before workers start, so a bad data path fails with one
    #: clear message (DatasetError naming data.root)
    check_data: Callable[[DataConfig], None]
    #: optional: data_cfg -> training examples data.root holds (None: unknown yet), counted cheaply, so
    #: that a train.batch_size larger than one worker's share fails before workers start (see tasks/base.py)
    train_size: Callable[[DataConfig], int | None] | None = None

    def __call__(self, args: TaskArgs) -> Task:
        return self.build(args)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cifar10", build_cifar10, check_cifar10_data, cifar10_train_size),
        TaskSpec("imagenet", build_imagenet, check_imagenet_data, imagenet_train_size),
        TaskSpec("wmt16", build_wmt16, check_wmt16_data),
    )
}

__all__ = ["TASKS", "HeadlineMetric", "Task", "TaskArgs", "TaskSpec", "WorkerInfo"]
