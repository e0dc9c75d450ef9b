"""Mixed precision on CPU: bf16 autocast trains; an fp16 step with a non-finite gradient is skipped
by the gradient scaler, and the skip leaves every algorithm consistent across 2 gloo ranks.

    .venv/bin/python -m pytest -q tests/test_precision.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slowmo_train.precision import Precision
from tests.distributed_helpers import run_distributed

CPU = torch.device("cpu")


class InfGradient(torch.autograd.Function):
    """Identity forward; backward turns the incoming gradient into inf: an fp16 overflow injected
    in the backward pass, with the forward loss (and BatchNorm statistics) left finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    # class-dependent mean so there is something to learn
    return torch.randn(n, 3, 6, 6, generator=g) + labels[:, None, None, None].float(), labels


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        Precision("fp8", CPU)


def test_bf16_autocast_trains_on_cpu():
    model, precision = make_model(), Precision("bf16", CPU)
    assert precision.scaler is None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(0, 32)
    losses = []
    for _ in range(30):
        with precision.autocast():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        assert logits.dtype == torch.bfloat16  # the linear layer ran in bf16
        optimizer.zero_grad()
        precision.backward(loss)
        assert precision.step(optimizer)
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[-1] < 0.5 * losses[0]


def test_fp16_scaler_skips_a_step_with_an_inf_gradient_and_recovers():
    model, precision = make_model(), Precision("fp16", CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(1)
    scale = precision.scaler.get_scale()
    before = params(model)
    with precision.autocast():
        loss = InfGradient.apply(nn.functional.cross_entropy(model(x), y))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    optimizer.zero_grad()
    precision.backward(loss)
    assert not precision.step(optimizer)
    assert torch.equal(params(model), before)  # no update
    assert not optimizer.state  # no momentum buffer was created either
    assert precision.skipped_steps == 1 and precision.scaler.get_scale() == scale / 2

    with precision.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    precision.backward(loss)
    assert precision.step(optimizer)
    assert not torch.equal(params(model), before)
    state = precision.state_dict()
    restored = Precision("fp16", CPU)
    restored.load_state_dict(state)
    assert restored.skipped_steps == 1 and restored.scaler.get_scale() == precision.scaler.get_scale()


# --- 2 ranks: a skip on one rank must not desynchronise any algorithm ----------------------------------
INJECT_STEP, INJECT_RANK, STEPS = 2, 1, 8


def _train_fp16(rank: int, world_size: int, algorithm: str, slowmo: bool) -> dict:
    """The trainer's step (trainer.Trainer.train_step: before_forward, autocast loss, scaled
    backward, after_backward, scaler step, after_optimizer_step) with an inf gradient injected on
    one rank at one step. Written out rather than tests/helpers.hook_step: it corrupts the loss and
    inspects the parameters between the hooks."""
    from slowmo_train.algorithms import build_algorithm
    from slowmo_train.config import AlgorithmConfig, SlowMoConfig
    from slowmo_train.dist import build_topology

    model = make_model(seed=0)  # same initial parameters on every rank
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = build_algorithm(
        AlgorithmConfig(name=algorithm, period=2),
        SlowMoConfig(enabled=slowmo, tau=4),
        model,
        optimizer,
        build_topology(1),
        CPU,
    )
    precision = Precision("fp16", CPU)
    stepped, unchanged_when_skipped, snapshots = [], [], []
    for k in range(STEPS):
        x, y = batch(100 * rank + k)
        algo.before_forward(k)
        with precision.autocast():
            loss = nn.functional.cross_entropy(algo.train_model(x), y)
        if rank == INJECT_RANK and k == INJECT_STEP:
            loss = InfGradient.apply(loss)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        algo.after_backward(k)
        before = params(model)
        ok = precision.step(optimizer)
        stepped.append(ok)
        unchanged_when_skipped.append(ok or torch.equal(params(model), before))
        algo.after_optimizer_step(k)
        snapshots.append(params(model))
    algo.close()
    totals = algo.comm.totals
    return {
        "stepped": stepped,
        "unchanged_when_skipped": unchanged_when_skipped,
        "params": snapshots,
        "finite": all(torch.isfinite(s).all() for s in snapshots),
        "comm": (totals["bytes_sent"], totals["bytes_received"]),
    }


CASES = [("allreduce", False), ("local_sgd", True), ("sgp", True)]


def _train_all(rank: int, world_size: int) -> list[dict]:
    # one spawn for every case: starting gloo processes costs more than the training here
    return [_train_fp16(rank, world_size, algorithm, slowmo) for algorithm, slowmo in CASES]


@pytest.mark.multiproc
def test_fp16_skip_on_one_rank_keeps_algorithms_consistent():
    for (algorithm, _), r0, r1 in zip(CASES, *run_distributed(_train_all, 2)):
        assert not r1["stepped"][INJECT_STEP], algorithm
        for r in (r0, r1):
            assert r["finite"] and all(r["unchanged_when_skipped"]), algorithm
        if algorithm == "allreduce":
            # the gradient all-reduce spreads the inf, so both ranks skip together and stay replicas
            assert r0["stepped"] == r1["stepped"]
            assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
        else:
            # only the injected rank skipped; the exact averages (SlowMo's outer step every 4 steps)
            # still ran on both ranks and made them identical again
            assert r0["stepped"][INJECT_STEP], algorithm
            for k in (3, 7):
                torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=1e-6)
        if algorithm == "local_sgd":  # step 2 is not an averaging step (period 2): the skip shows
            assert not torch.equal(r0["params"][INJECT_STEP], r1["params"][INJECT_STEP])
        # both ranks took part in the same collectives (a missed one would have hung or timed out)
        assert r0["comm"] == r1["comm"], algorithm
