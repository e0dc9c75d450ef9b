"""CIFAR-10 image classification with a (width-scaled) ResNet-18, the SlowMo paper's first task
(Wang et al., ICLR 2020, Sec. 5: 32 workers x 128 images, Nesterov SGD, 200 epochs).

    slowmo-train task=cifar10 data.root=/path/to/cifar10 model.width=0.25
"""

from __future__ import annotations

import torch
from torch import nn

from slowmo_train import control
from slowmo_train.config import DataConfig, download_mode
from slowmo_train.data.batches import TrainBatches, eval_batches
from slowmo_train.data.cifar10 import detect_layout, load_cifar10
from slowmo_train.models import build_model
from slowmo_train.simulated import world as simulated
from slowmo_train.tasks.base import HeadlineMetric, Task, TaskArgs, WorkerInfo, channels_last
from slowmo_train.tasks.classification import classification_loss, evaluate_classifier

# Per-channel statistics of the CIFAR-10 training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _load_split(data_cfg: DataConfig, train: bool, worker: WorkerInfo):
    # One process per node decodes (and caches) first; the others then read the cache.
    # A simulated cluster's ranks share one copy (slowmo_train/simulated).
    key = ("cifar10", data_cfg.root, train, data_cfg.cache_dir)
    if worker.local_rank == 0:
        download = download_mode(data_cfg) != "false"
        data = simulated.shared(
            key, lambda: load_cifar10(data_cfg.root, train=train, download=download, cache_dir=data_cfg.cache_dir)
        )
    control.barrier()
    if worker.local_rank != 0:
        data = load_cifar10(data_cfg.root, train=train, download=False, cache_dir=data_cfg.cache_dir)
    return data


def _subset(data, n: int | None, seed: int):
    if n is None or n >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    data.images, data.labels = data.images[keep].contiguous(), data.labels[keep].contiguous()
    return data


def build_cifar10(args: TaskArgs) -> Task:
    data_cfg, worker = args.data, args.worker
    train = _subset(_load_split(data_cfg, True, worker), data_cfg.train_subset, args.seed)
    test = _load_split(data_cfg, False, worker)
    nhwc = channels_last(args)
    model = build_model(args.model, "cifar10", num_classes=len(train.classes)).to(worker.device)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    batches = TrainBatches(
        train,
        args.batch_size,
        worker.rank,
        worker.world_size,
        args.seed,
        CIFAR10_MEAN,
        CIFAR10_STD,
        worker.device,
        channels_last=nhwc,
    )

    def evaluate(m: nn.Module, final: bool = False) -> dict[str, float]:
        split = eval_batches(
            test, args.eval_batch_size, worker.rank, worker.world_size, CIFAR10_MEAN, CIFAR10_STD, worker.device, nhwc
        )
        return evaluate_classifier(m, split)

    return Task(
        model=model,
        train_batches=batches.epoch,
        steps_per_epoch=batches.steps_per_epoch,
        loss=classification_loss,
        evaluate=evaluate,
        metric=HeadlineMetric("top1", higher_is_better=True, split="test"),
        batch_size=args.batch_size,
        train_size=len(train),
        unit="samples",
    )


def check_cifar10_data(data_cfg: DataConfig) -> None:
    """Fail before any worker starts when data.root holds no CIFAR-10 (DatasetError says why)."""
    if download_mode(data_cfg) == "false":
        detect_layout(data_cfg.root)


def cifar10_train_size(data_cfg: DataConfig) -> int | None:
    """Training images a run will use (after data.train_subset), counted without decoding them, for
    the batch-size check before workers start; None when data.root holds no copy yet (download)."""
    import os
    import pickle
    from pathlib import Path

    from slowmo_train.data.cifar10 import IMAGE_SUFFIXES, TORCHVISION_FOLDER, DatasetError

    root = Path(data_cfg.root).expanduser()
    try:
        layout = detect_layout(root)
    except DatasetError:
        return None
    if layout == "imagefolder":
        n = sum(
            1
            for cls in os.scandir(root / "train")
            if cls.is_dir()
            for entry in os.scandir(cls.path)
            if entry.name.lower().endswith(IMAGE_SUFFIXES)
        )
    else:
        folder = root if (root / "data_batch_1").exists() else root / TORCHVISION_FOLDER
        n = 0
        for i in range(1, 6):
            try:
                with open(folder / f"data_batch_{i}", "rb") as f:
                    blob = pickle.load(f, encoding="latin1")
                n += len(blob.get("labels", blob.get(b"labels", [])))
            except (OSError, KeyError, pickle.UnpicklingError, EOFError):
                return None  # unreadable: the loader reports it with its own message
    return min(n, data_cfg.train_subset) if data_cfg.train_subset else n
