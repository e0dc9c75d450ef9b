"""Tasks: each builds a model, its data, its loss and its evaluation. A closed table."""

from slowmo_train.tasks.base import Task, WorkerInfo
from slowmo_train.tasks.cifar10 import build_cifar10, check_cifar10_data

TASKS = {"cifar10": build_cifar10}
#: cheap checks run before workers start, so bad data paths fail with one clear message
DATA_CHECKS = {"cifar10": check_cifar10_data}

__all__ = ["DATA_CHECKS", "TASKS", "Task", "WorkerInfo"]
