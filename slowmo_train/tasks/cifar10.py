"""CIFAR-10 image classification with a (width-scaled) ResNet-18, the SlowMo paper's first task
(Wang et al., ICLR 2020, Sec. 5: 32 workers x 128 images, Nesterov SGD, 200 epochs).

    slowmo-train task=cifar10 data.root=/path/to/cifar10 model.width=0.25
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from slowmo_train.config import DataConfig, ModelConfig
from slowmo_train.data.batches import TrainBatches, eval_batches
from slowmo_train.data.cifar10 import detect_layout, load_cifar10
from slowmo_train.models import MODELS
from slowmo_train.tasks.base import Task, WorkerInfo

# Per-channel statistics of the CIFAR-10 training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _load_split(data_cfg: DataConfig, train: bool, worker: WorkerInfo):
    # One process per node decodes (and caches) first; the others then read the cache.
    if worker.local_rank == 0:
        data = load_cifar10(data_cfg.root, train=train, download=data_cfg.download, cache_dir=data_cfg.cache_dir)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if worker.local_rank != 0:
        data = load_cifar10(data_cfg.root, train=train, download=False, cache_dir=data_cfg.cache_dir)
    return data


def _subset(data, n: int | None, seed: int):
    if n is None or n >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    data.images, data.labels = data.images[keep].contiguous(), data.labels[keep].contiguous()
    return data


def evaluate_classifier(model: nn.Module, batches, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over every rank's share of a split (collective)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # correct, count, loss sum
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            totals[0] += (logits.argmax(1) == y).sum().item()
            totals[1] += y.numel()
            totals[2] += nn.functional.cross_entropy(logits, y, reduction="sum").item()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    correct, count, loss = totals.tolist()
    return {"top1": 100.0 * correct / max(count, 1), "loss": loss / max(count, 1)}


def build_cifar10(model_cfg: ModelConfig, data_cfg: DataConfig, batch_size: int, eval_batch_size: int,
                  seed: int, worker: WorkerInfo) -> Task:
    train = _subset(_load_split(data_cfg, True, worker), data_cfg.train_subset, seed)
    test = _load_split(data_cfg, False, worker)
    try:
        build_model = MODELS[model_cfg.arch]
    except KeyError:
        raise ValueError(f"model.arch={model_cfg.arch!r} is unknown; choose one of {', '.join(MODELS)}") from None
    model = build_model(num_classes=len(train.classes), width=model_cfg.width).to(worker.device)
    batches = TrainBatches(train, batch_size, worker.rank, worker.world_size, seed, CIFAR10_MEAN, CIFAR10_STD,
                           worker.device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        split = eval_batches(test, eval_batch_size, worker.rank, worker.world_size, CIFAR10_MEAN, CIFAR10_STD,
                             worker.device)
        return evaluate_classifier(m, split, worker.device)

    return Task(
        model=model,
        train_batches=batches.epoch,
        steps_per_epoch=batches.steps_per_epoch,
        loss_fn=nn.functional.cross_entropy,
        evaluate=evaluate,
        batch_size=batch_size,
        train_size=len(train),
    )


def check_cifar10_data(data_cfg: DataConfig) -> None:
    """Fail before any worker starts when data.root holds no CIFAR-10 (DatasetError says why)."""
    if not data_cfg.download:
        detect_layout(data_cfg.root)
