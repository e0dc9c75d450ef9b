"""ImageNet classification with ResNet-50, the SlowMo paper's second task (Wang et al., ICLR 2020,
Sec. 5: 32 nodes x 8 GPUs x 32 images = 8192 per step, 90 epochs, the recipe of Goyal et al., 2017).

    slowmo-train task=imagenet data.root=/path/to/imagenet                        # train/ and val/
    slowmo-train task=imagenet data.root=../shared/data/imagenet_sample model.width=0.125 \
        data.image_size=64 train.batch_size=8 train.max_steps=4 launcher.nproc_per_node=2

Images stream from disk through DataLoader worker processes (data/imagenet.py); the headline metric
is top-1 accuracy on the validation split, with top-5 beside it, both over every rank's share.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slowmo_train.config import DataConfig
from slowmo_train.data.imagenet import ImageNetStream, check_layout, count_images
from slowmo_train.models import build_model
from slowmo_train.tasks.base import HeadlineMetric, Task, TaskArgs, channels_last
from slowmo_train.tasks.classification import classification_loss, evaluate_classifier


def build_imagenet(args: TaskArgs) -> Task:
    data_cfg, worker = args.data, args.worker
    nhwc = channels_last(args)
    stream = ImageNetStream(
        data_cfg.root,
        image_size=data_cfg.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        workers=data_cfg.workers,
        seed=args.seed,
        rank=worker.rank,
        world_size=worker.world_size,
        device=worker.device,
        train_subset=data_cfg.train_subset,
        channels_last=nhwc,
    )
    model = build_model(args.model, "imagenet", num_classes=stream.num_classes).to(worker.device)
    if nhwc:
        # NHWC activations: tensor-core convolutions (cuDNN) run without layout transposes
        model = model.to(memory_format=torch.channels_last)

    def evaluate(m: nn.Module, final: bool = False) -> dict[str, float]:
        return evaluate_classifier(m, stream.val_batches(), topk=(1, 5))

    return Task(
        model=model,
        train_batches=stream.train_batches,
        steps_per_epoch=stream.steps_per_epoch,
        loss=classification_loss,
        evaluate=evaluate,
        metric=HeadlineMetric("top1", higher_is_better=True, split="val"),
        batch_size=args.batch_size,
        train_size=stream.train_size,
        unit="samples",
    )


def check_imagenet_data(data_cfg: DataConfig) -> None:
    """Fail before any worker starts when data.root lacks train/ and val/ (ImageNet is never
    downloaded, whatever data.download says)."""
    check_layout(data_cfg.root)


def imagenet_train_size(data_cfg: DataConfig) -> int | None:
    """Training images a run will use (after data.train_subset), counted from file names, for the
    batch-size check before workers start; None when data.root has no train/ (check_data says why)."""
    train = Path(data_cfg.root).expanduser() / "train"
    if not train.is_dir():
        return None
    return count_images(train, limit=data_cfg.train_subset)
