"""The paper's CIFAR-10 schedule, scaled to the run length, and linear lr scaling."""

from __future__ import annotations

import pytest
import torch

from slowmo_train.config import OptimConfig
from slowmo_train.optim import LrSchedule, build_optimizer, peak_lr


def test_lr_scales_linearly_with_total_batch():
    assert peak_lr(OptimConfig(lr=0.1, reference_batch=256), 4096) == pytest.approx(1.6)


def test_step_schedule_at_200_epochs():
    s = LrSchedule(OptimConfig(), steps_per_epoch=10, epochs=200)
    assert s.factor(0) == pytest.approx(1 / 50)  # warm-up over 5 epochs = 50 steps
    assert s.factor(49) == 1.0 and s.factor(999) == 1.0
    assert s.factor(1000) == pytest.approx(0.1)  # epoch 100
    assert s.factor(1500) == pytest.approx(0.01)  # epoch 150
    assert s.factor(1750) == pytest.approx(0.001)  # epoch 175


def test_milestones_scale_with_train_epochs():
    s = LrSchedule(OptimConfig(), steps_per_epoch=10, epochs=20)
    assert s.warmup_steps == 5 and s.milestones == [100, 150, 175]


def test_apply_keeps_each_groups_base_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], lr=1.0)
    s = LrSchedule(
        OptimConfig(schedule="step", warmup_epochs=0, milestones=[1], milestone_epochs_of=2),
        steps_per_epoch=1,
        epochs=2,
    )
    s.apply(opt, 5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
    s.apply(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.5])


def test_inverse_sqrt_and_adam():
    s = LrSchedule(OptimConfig(schedule="inverse_sqrt", warmup_epochs=1), steps_per_epoch=100, epochs=200)
    assert s.factor(99) == pytest.approx(1.0) and s.factor(399) == pytest.approx(0.5)
    opt = build_optimizer(OptimConfig(name="adam"), torch.nn.Linear(2, 2), lr=1e-3)
    assert isinstance(opt, torch.optim.Adam)
