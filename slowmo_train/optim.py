"""Base optimizers and learning-rate schedules.

The peak learning rate scales linearly with the total batch (Goyal et al., 2017):
``peak = optim.lr * total_batch / optim.reference_batch``. The ``step`` schedule is the paper's
CIFAR-10 one: linear warm-up over the first 5 epochs, then the rate is divided by 10 at epochs 100,
150 and 175 of 200; every epoch number is scaled by ``train.epochs / optim.milestone_epochs_of`` so a
shorter run keeps the same shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slowmo_train.config import OptimConfig


def peak_lr(cfg: OptimConfig, total_batch: int) -> float:
    if not cfg.scale_lr:
        return cfg.lr
    return cfg.lr * total_batch / cfg.reference_batch


#: layers whose affine weights are scale/shift coefficients rather than features
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def _param_groups(cfg: OptimConfig, model: nn.Module) -> list:
    """All trainable parameters in one group, or (``optim.no_decay_bn_bias``) two: decayed weights
    and undecayed normalisation coefficients and biases (Goyal et al., 2017, Sec. 5.1). Model order
    is kept, so every rank builds identical groups."""
    if not cfg.no_decay_bn_bias:
        return [p for p in model.parameters() if p.requires_grad]
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # a tied parameter joins one group only
                seen.add(id(p))
                (no_decay if isinstance(module, _NORM_LAYERS) or name == "bias" else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = _param_groups(cfg, model)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is unknown; choose one of sgd, adam")


class LrSchedule:
    """The learning rate as a function of the step: ``peak * factor(step)``. ``total_steps`` (if
    given) is the run's length; a step past its end gets the last step's rate (an asynchronous
    worker reads the parameters once more after the final update)."""

    def __init__(
        self, cfg: OptimConfig, steps_per_epoch: int, epochs: float, peak: float = 1.0, total_steps: int | None = None
    ):
        self.kind = cfg.schedule
        self.peak, self.total_steps = peak, total_steps
        scale = epochs / cfg.milestone_epochs_of
        if cfg.warmup_steps is not None:
            self.warmup_steps = cfg.warmup_steps
        else:
            self.warmup_steps = max(0, round(cfg.warmup_epochs * scale * steps_per_epoch))
        self.milestones = sorted(round(m * scale * steps_per_epoch) for m in cfg.milestones)
        self.decay = cfg.decay

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            # Vaswani et al. (2017) / fairseq's inverse_sqrt: linear warm-up to the peak, then
            # peak * sqrt(warmup / step).
            warm = max(1, self.warmup_steps)
            return min((step + 1) / warm, math.sqrt(warm / (step + 1)))
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.decay ** sum(step >= m for m in self.milestones)

    def lr(self, step: int, base: float | None = None) -> float:
        """The learning rate of ``step`` for a base (peak) rate ``base``, by default ``peak``."""
        if self.total_steps is not None:
            step = min(step, self.total_steps - 1)
        return (self.peak if base is None else base) * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for ``step`` (each group keeps its own base rate); returns the first
        group's lr."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(step, group.setdefault("base_lr", group["lr"]))
        return optimizer.param_groups[0]["lr"]
