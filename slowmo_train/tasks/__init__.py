"""Tasks: each builds a model, its data, its loss and its evaluation. A closed table.

    task = TASKS[cfg.task.name](TaskArgs(...))
    DATA_CHECKS[cfg.task.name](cfg.data)      # before any worker starts
"""

from slowmo_train.tasks.base import HeadlineMetric, Task, TaskArgs, WorkerInfo
from slowmo_train.tasks.cifar10 import build_cifar10, check_cifar10_data, cifar10_train_size
from slowmo_train.tasks.imagenet import build_imagenet, check_imagenet_data, imagenet_train_size
from slowmo_train.tasks.wmt16 import build_wmt16, check_wmt16_data

TASKS = {"cifar10": build_cifar10, "imagenet": build_imagenet, "wmt16": build_wmt16}
#: cheap checks run before workers start, so bad data paths fail with one clear message
DATA_CHECKS = {"cifar10": check_cifar10_data, "imagenet": check_imagenet_data, "wmt16": check_wmt16_data}

#: optional: data_cfg -> training examples data.root holds (None: unknown yet), counted cheaply, so that
#: a train.batch_size larger than one worker's share fails before workers start (see tasks/base.py)
TRAIN_SIZES = {"cifar10": cifar10_train_size, "imagenet": imagenet_train_size}

__all__ = ["DATA_CHECKS", "TRAIN_SIZES", "HeadlineMetric", "TASKS", "Task", "TaskArgs", "WorkerInfo"]
