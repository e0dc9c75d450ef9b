"""Plain nn.Modules, without distributed code, and the closed table that picks one per task.

build_model(cfg.model, task="cifar10", num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from slowmo_train.config import ModelConfig
from slowmo_train.models.resnet import cifar_resnet18, resnet18, resnet50
from slowmo_train.models.transformer import transformer

#: task -> architecture -> builder(model_cfg, **task facts such as num_classes)
MODELS: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "cifar10": {"resnet18": lambda cfg, num_classes: cifar_resnet18(num_classes=num_classes, width=cfg.width)},
    "imagenet": {
        "resnet50": lambda cfg, num_classes: resnet50(num_classes=num_classes, width=cfg.width),
        "resnet18": lambda cfg, num_classes: resnet18(num_classes=num_classes, width=cfg.width),
    },
    "wmt16": {
        arch: (lambda cfg, vocab_size, arch=arch: transformer(arch, vocab_size, cfg.width, cfg.dropout))
        for arch in ("transformer_small", "transformer_base", "transformer_big")
    },
}


def build_model(cfg: ModelConfig, task: str, **facts) -> nn.Module:
    """The ``cfg.arch`` model of ``task``; a ValueError lists the architectures the task has."""
    archs = MODELS.get(task, {})
    if cfg.arch not in archs:
        raise ValueError(
            f"model.arch={cfg.arch!r} is not an architecture of task {task}; "
            f"choose one of {', '.join(archs) or '(none)'}"
        )
    return archs[cfg.arch](cfg, **facts)


__all__ = ["MODELS", "build_model", "cifar_resnet18"]
