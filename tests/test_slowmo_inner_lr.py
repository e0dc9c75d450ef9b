"""``slowmo.inner_lr``: ``hold`` (Wang et al., ICLR 2020, arXiv:1910.00643, Alg. 1: the lr of the
first inner step held for the tau inner steps) and ``follow`` (fairscale's SlowMo: every inner step
follows the schedule, the coupled outer update uses gamma_t = the lr of the outer step, i.e. of the
iteration's last inner step).

    .venv/bin/python -m pytest -q tests/test_slowmo_inner_lr.py

The reference simulator (tests/reference.py) defines both; ``follow`` is Alg. 1 exactly when the lr
is constant within every outer iteration, differs under a warm-up, and the real implementation
reproduces it for the exact and the streamed forms (the cases of
tests/test_reference.py:inner_lr_cases, in its one gloo run per world size).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from slowmo_train.algorithms.allreduce import AllReduce
from slowmo_train.algorithms.slowmo import SlowMo
from slowmo_train.config import ConfigError, JobConfig, SlowMoConfig
from slowmo_train.config_checks import validate
from slowmo_train.dist import Topology
from tests.reference import (
    PARAM_GROUPS,
    SHAPES,
    Case,
    Worker,
    batch,
    group_lrs,
    initial_parameters,
    loss_and_statistic,
    sgd_step,
    simulate,
    with_slowmo,
)
from tests.reference_runs import TinyNet, build_optimizer
from tests.test_reference import inner_lr_cases


# --- the definition, in the reference simulator -----------------------------------------------------
def _constant_within_iteration_cases() -> list[Case]:
    """tau = 5: the schedule's drop at step 5 falls on an outer-iteration boundary, so the lr is
    constant within every outer iteration (and changes between them)."""
    bases = [
        Case("local_sgd", "local_sgd", period=5),
        Case("sgp", "sgp", graph="nonregular_exponential"),
        Case("allreduce", "allreduce"),
    ]
    forms = [
        ("coupled", dict()),
        ("decoupled_nesterov", dict(coupling="decoupled", nesterov=True, base_buffers="keep")),
        ("F5_D2", dict(fragments=5, overlap=2, base_buffers="average")),
        ("F1_D1_bf16", dict(overlap=1, outer_dtype="bfloat16")),
    ]
    return [
        with_slowmo(replace(base, steps=13), f"{base.name}_{name}", tau=5, **options)
        for base in bases
        for name, options in forms
    ]


@pytest.mark.parametrize("world_size", (2, 3))
@pytest.mark.parametrize("case", _constant_within_iteration_cases(), ids=lambda c: c.name)
def test_reference_follow_with_lr_constant_within_iterations_is_hold_bitwise(case, world_size):
    follow = replace(case, slowmo=replace(case.slowmo, inner_lr="follow"))
    assert [follow.schedule_step(k) for k in range(case.steps)] != [case.schedule_step(k) for k in range(case.steps)]
    a, b = simulate(case, world_size), simulate(follow, world_size)
    assert torch.equal(a.params, b.params) and torch.equal(a.stats, b.stats)
    assert a.consensus == b.consensus


#: warm-up over 4 steps: lr factors 1/4, 2/4, 3/4, 1 at steps 0-3 (then 1, then 1/2 from step 5)
WARMUP = 4
ALPHA, BETA = 0.7, 0.6


def test_reference_schedule_with_warmup_is_as_written():
    expected = [[0.025, 0.0125], [0.05, 0.025], [0.075, 0.0375], [0.1, 0.05], [0.1, 0.05], [0.05, 0.025]]
    for k, lrs in enumerate(expected):
        assert group_lrs(k, WARMUP) == pytest.approx(lrs), f"step {k}"


def _unrolled(inner_lrs: list[list[float]]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Alg. 1 written out for 2 workers, tau = 2, two outer iterations (steps 0-3), coupled, base
    buffers reset, with the inner steps' lrs given per step; gamma_t is the lr of step 2t + 1.
    Returns every outer iteration's d = x0 - x_avg and the de-biased params after every step."""
    x0, u = initial_parameters(), [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    ds, after = [], []
    for t in range(2):
        workers = [Worker([p.clone() for p in x0], [None] * len(SHAPES), []) for _ in range(2)]
        for k in (2 * t, 2 * t + 1):
            for rank, worker in enumerate(workers):
                params = [p.clone().requires_grad_(True) for p in worker.params]
                grads = torch.autograd.grad(loss_and_statistic(params, *batch(rank, k))[0], params)
                sgd_step(worker, list(grads), inner_lrs[k])
            after.append([torch.cat([p.reshape(-1) for p in w.params]) for w in workers])
        d = [x - (a + b) / 2 for x, a, b in zip(x0, workers[0].params, workers[1].params)]
        ds.append(d)
        for group, gamma in zip(PARAM_GROUPS, inner_lrs[2 * t + 1]):
            for i in group.indices:
                u[i] = BETA * u[i] + d[i] / gamma
                x0[i] = x0[i] - ALPHA * gamma * u[i]
        after[-1] = [torch.cat([p.reshape(-1) for p in x0])] * 2
    return ds, after


@pytest.mark.parametrize("inner_lr", ["follow", "hold"])
def test_reference_warmup_two_workers_tau2_by_hand(inner_lr):
    """follow: the inner steps run 1/4, 2/4, 3/4, 1 of the peak lr and gamma = 2/4, then 1 of it; hold:
    1/4, 1/4, 3/4, 3/4 with gamma = 1/4, then 3/4. By hand, with u = 0 at the start:
    x0_1 = x0 - alpha d_1 (gamma cancels), x0_2 = x0_1 - alpha (d_2 + beta (gamma_2 / gamma_1) d_1),
    where gamma_2 / gamma_1 is 2 for follow and 3 for hold, in both param groups."""
    peak = [g.lr for g in PARAM_GROUPS]
    factors = [0.25, 0.5, 0.75, 1.0] if inner_lr == "follow" else [0.25, 0.25, 0.75, 0.75]
    ratio = 2.0 if inner_lr == "follow" else 3.0
    inner_lrs = [[f * lr for lr in peak] for f in factors]
    case = with_slowmo(
        Case("warm", "local_sgd", period=2, steps=4, warmup=WARMUP),
        "warm",
        alpha=ALPHA,
        beta=BETA,
        tau=2,
        inner_lr=inner_lr,
    )
    ref = simulate(case, 2)
    ds, after = _unrolled(inner_lrs)
    for k in range(4):
        for w in range(2):
            torch.testing.assert_close(ref.params[k, w], after[k][w], rtol=1e-13, atol=1e-15)
    x0 = [p.reshape(-1) for p in initial_parameters()]
    d1, d2 = (torch.cat([t.reshape(-1) for t in d]) for d in ds)
    x0_1 = torch.cat(x0) - ALPHA * d1
    x0_2 = x0_1 - ALPHA * (d2 + BETA * ratio * d1)
    torch.testing.assert_close(ref.params[1, 0], x0_1, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ref.params[3, 0], x0_2, rtol=1e-13, atol=1e-15)


def test_reference_follow_differs_from_hold_under_warmup():
    case = with_slowmo(Case("w", "local_sgd", period=2, warmup=WARMUP), "w", tau=4)
    follow = replace(case, slowmo=replace(case.slowmo, inner_lr="follow"))
    hold, ours = simulate(case, 2).params, simulate(follow, 2).params
    assert torch.equal(hold[0], ours[0])  # step 0 runs at the warm-up's first lr in both forms
    assert not torch.allclose(hold[1], ours[1])  # step 1: 1/4 (hold) or 2/4 (follow) of the peak lr


# --- the implementation ---------------------------------------------------------------------------
def test_inner_lr_is_validated():
    with pytest.raises(ConfigError, match="slowmo.inner_lr"):
        validate(JobConfig(slowmo=SlowMoConfig(inner_lr="hlod")), check_paths=False)
    validate(JobConfig(slowmo=SlowMoConfig(inner_lr="follow")), check_paths=False)


def test_follow_evaluates_the_schedule_every_step():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = TinyNet()
        base = AllReduce(model, build_optimizer(model), Topology(rank=0, world_size=1, procs_per_node=1))
        follow = SlowMo(base, SlowMoConfig(enabled=True, tau=3, inner_lr="follow"))
        assert [follow.lr_schedule_step(k) for k in range(7)] == list(range(7))
        assert "inner_lr=follow" in follow.describe()
        with pytest.raises(ValueError, match="slowmo.inner_lr"):
            SlowMo(base, SlowMoConfig(enabled=True, tau=3, inner_lr="hlod"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", inner_lr_cases(), ids=lambda c: c.name)
def test_real_comparison_cases_change_the_lr_within_an_outer_iteration(case):
    """The real runs of these cases are compared to the reference with every other case, in one
    spawned run per world size: tests/test_reference.py::test_real_trajectory_matches_reference
    (ids ``ws*-inner_lr_*``). Here: ``follow`` is not ``hold`` in them."""
    assert case.slowmo.inner_lr == "follow" and case.warmup > 0
    hold = replace(case, slowmo=replace(case.slowmo, inner_lr="hold"))
    assert not torch.allclose(simulate(case, 2).params, simulate(hold, 2).params)
