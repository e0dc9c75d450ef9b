"""Tasks: each builds a model, its data, its loss and its evaluation. A closed table.

    task = TASKS[cfg.task.name](TaskArgs(...))
    DATA_CHECKS[cfg.task.name](cfg.data)      # before any worker starts
"""

from slowmo_train.tasks.base import HeadlineMetric, Task, TaskArgs, WorkerInfo
from slowmo_train.tasks.cifar10 import build_cifar10, check_cifar10_data

TASKS = {"cifar10": build_cifar10}
#: cheap checks run before workers start, so bad data paths fail with one clear message
DATA_CHECKS = {"cifar10": check_cifar10_data}

__all__ = ["DATA_CHECKS", "HeadlineMetric", "TASKS", "Task", "TaskArgs", "WorkerInfo"]
