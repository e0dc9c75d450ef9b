"""Single-process algebra of SlowMo (Wang et al., ICLR 2020, Alg. 1) and its validation, state and
base-optimizer buffer handling, on a world-size-1 gloo group. Multi-rank behaviour (sharding,
exact averaging, bit-identical ranks) is checked against the simulator in test_reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from slowmo_train.algorithms.allreduce import AllReduce
from slowmo_train.algorithms.local_sgd import LocalSGD
from slowmo_train.algorithms.outer_layout import build_slow_groups
from slowmo_train.algorithms.slowmo import SlowMo
from slowmo_train.config import AlgorithmConfig, SlowMoConfig
from slowmo_train.dist import Topology

LRS = (0.1, 0.05)
DTYPE = torch.float64


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, dtype=DTYPE), nn.BatchNorm1d(4, dtype=DTYPE), nn.Linear(4, 2, dtype=DTYPE))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return model


def group_params(model: nn.Module) -> list[list[nn.Parameter]]:
    """Two param groups: the first Linear (lr 0.1), BatchNorm and the second Linear (lr 0.05)."""
    return [list(model[0].parameters()), list(model[1].parameters()) + list(model[2].parameters())]


def make_slowmo(model=None, optimizer="sgd", base="allreduce", period=1, **options):
    model = model if model is not None else make_model()
    groups = group_params(model)
    if optimizer == "sgd":
        opt = torch.optim.SGD([{"params": g, "lr": lr} for g, lr in zip(groups, LRS)], momentum=0.9)
    else:
        opt = torch.optim.Adam([{"params": g, "lr": lr} for g, lr in zip(groups, LRS)])
    topology = Topology(rank=0, world_size=1, procs_per_node=1)
    if base == "local_sgd":
        algo = LocalSGD(model, opt, topology, AlgorithmConfig(name="local_sgd", period=period))
    else:
        algo = AllReduce(model, opt, topology)
    cfg = SlowMoConfig(enabled=True, **{"alpha": 0.7, "beta": 0.6, "tau": 2, **options})
    return SlowMo(algo, cfg), model, opt


def flat(model: nn.Module, group: int) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in group_params(model)[group]])


def move(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """Stand-in for tau inner steps: add a fixed random displacement to every parameter."""
    gen = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in model.parameters()]
    with torch.no_grad():
        for p, d in zip(model.parameters(), deltas):
            p.add_(d)
    return deltas


def outer_iteration(slowmo: SlowMo, model: nn.Module, seed: int, start: int = 0) -> None:
    move(model, seed)
    for k in range(start, start + slowmo.tau):
        slowmo.after_optimizer_step(k)


def set_lr(opt, group: int, lr: float) -> None:
    opt.param_groups[group]["lr"] = lr


def sgd_step(model, opt, seed=0) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(5, 3, generator=gen, dtype=DTYPE)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


# --- the outer update ---------------------------------------------------------------------------
def test_two_coupled_outer_steps_match_the_closed_form(process_group):
    slowmo, model, opt = make_slowmo()
    alpha, beta = 0.7, 0.6
    x0 = [flat(model, g) for g in range(2)]
    outer_iteration(slowmo, model, seed=1)
    x1 = [flat(model, g) for g in range(2)]  # not what the workers hold: they restart from x0'
    # the first step: u = (x0 - x_avg) / gamma, x0' = x0 - alpha gamma u
    expected_u = [(x0[g] - avg) / LRS[g] for g, avg in enumerate(_averages_after(seed=1, start=x0))]
    expected_x = [x0[g] - alpha * LRS[g] * expected_u[g] for g in range(2)]
    for g in range(2):
        torch.testing.assert_close(x1[g], expected_x[g], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(slowmo.u[g], expected_u[g], rtol=1e-14, atol=1e-14)
    # the second with another gamma in group 0 (the schedule moved): u = beta u + d / gamma_t
    set_lr(opt, 0, 0.02)
    before = [flat(model, g) for g in range(2)]
    avg = [b + d for b, d in zip(before, _group_deltas(seed=2))]
    outer_iteration(slowmo, model, seed=2, start=2)
    gammas = (0.02, LRS[1])
    for g in range(2):
        u = beta * expected_u[g] + (before[g] - avg[g]) / gammas[g]
        torch.testing.assert_close(slowmo.u[g], u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flat(model, g), before[g] - alpha * gammas[g] * u, rtol=1e-12, atol=1e-12)


def _group_deltas(seed: int) -> list[torch.Tensor]:
    """The displacements move(seed) applies, flattened per param group."""
    model = make_model()
    deltas = dict(zip(map(id, model.parameters()), _raw_deltas(model, seed)))
    return [torch.cat([deltas[id(p)].reshape(-1) for p in group]) for group in group_params(model)]


def _raw_deltas(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in model.parameters()]


def _averages_after(seed: int, start: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s + d for s, d in zip(start, _group_deltas(seed))]


def test_decoupled_nesterov_matches_the_closed_form(process_group):
    slowmo, model, _ = make_slowmo(lr_coupling="decoupled", nesterov=True, alpha=0.5, beta=0.8)
    u = [torch.zeros_like(flat(model, g)) for g in range(2)]
    for t, seed in enumerate((3, 4, 5)):
        before = [flat(model, g) for g in range(2)]
        d = [-delta for delta in _group_deltas(seed)]  # x0 - x_avg
        outer_iteration(slowmo, model, seed, start=2 * t)
        for g in range(2):
            u[g] = 0.8 * u[g] + d[g]
            torch.testing.assert_close(flat(model, g), before[g] - 0.5 * (d[g] + 0.8 * u[g]), rtol=1e-12, atol=1e-12)


def test_only_every_tau_th_step_is_an_outer_step(process_group):
    slowmo, model, _ = make_slowmo(tau=3, inner_lr="hold")
    assert [slowmo.lr_schedule_step(k) for k in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    move(model, seed=1)
    moved = [p.detach().clone() for p in model.parameters()]
    slowmo.after_optimizer_step(0)
    slowmo.after_optimizer_step(1)
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), moved))
    assert slowmo.pop_metrics() == {}
    slowmo.after_optimizer_step(2)
    assert not torch.equal(next(model.parameters()), moved[0])
    assert "consensus_distance" in slowmo.pop_metrics()  # 0 with one worker, but reported


def test_gamma_zero_keeps_u_and_restarts_from_the_average(process_group):
    slowmo, model, opt = make_slowmo()
    outer_iteration(slowmo, model, seed=1)
    u_before = [u.clone() for u in slowmo.u]
    set_lr(opt, 0, 0.0)
    before = flat(model, 0)
    outer_iteration(slowmo, model, seed=2, start=2)
    avg = before + _group_deltas(seed=2)[0]
    assert torch.equal(slowmo.u[0], u_before[0])
    torch.testing.assert_close(flat(model, 0), avg, rtol=0, atol=0)
    assert torch.isfinite(flat(model, 0)).all() and torch.isfinite(slowmo.u[0]).all()
    assert not torch.equal(slowmo.u[1], u_before[1])  # the other group still took its step


def test_coupled_equals_decoupled_with_a_constant_lr(process_group):
    coupled, model_c, _ = make_slowmo(lr_coupling="coupled")
    decoupled, model_d, _ = make_slowmo(lr_coupling="decoupled")
    for t, seed in enumerate((1, 2, 3)):
        outer_iteration(coupled, model_c, seed, start=2 * t)
        outer_iteration(decoupled, model_d, seed, start=2 * t)
        for p, q in zip(model_c.parameters(), model_d.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        for g in range(2):  # u_decoupled = gamma u_coupled
            torch.testing.assert_close(decoupled.u[g], LRS[g] * coupled.u[g], rtol=1e-12, atol=1e-13)


def test_alpha_one_beta_zero_is_the_exact_average(process_group):
    slowmo, model, _ = make_slowmo(alpha=1.0, beta=0.0)
    before = [flat(model, g) for g in range(2)]
    outer_iteration(slowmo, model, seed=7)
    for g, delta in enumerate(_group_deltas(seed=7)):
        torch.testing.assert_close(flat(model, g), before[g] + delta, rtol=1e-13, atol=1e-13)


# --- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,message",
    [
        ({"alpha": 0.0}, "slowmo.alpha must be > 0, got 0.0"),
        ({"alpha": -1.0}, "slowmo.alpha must be > 0, got -1.0"),
        ({"beta": 1.0}, r"slowmo.beta must be in \[0, 1\) or auto, got 1.0"),
        ({"beta": 1.2}, r"slowmo.beta must be in \[0, 1\) or auto, got 1.2"),
        ({"beta": -0.1}, r"slowmo.beta must be in \[0, 1\) or auto, got -0.1"),
        ({"tau": 0}, "slowmo.tau must be an integer >= 1, got 0"),
        ({"tau": 2.5}, "slowmo.tau must be an integer >= 1, got 2.5"),
        ({"base_buffers": "zero"}, "slowmo.base_buffers must be one of reset, keep, average, got 'zero'"),
        ({"lr_coupling": "loose"}, "slowmo.lr_coupling must be one of coupled, decoupled, got 'loose'"),
        ({"nesterov": True}, "slowmo.nesterov=True needs slowmo.lr_coupling='decoupled'"),
    ],
)
def test_bad_hyper_parameters_name_the_key(process_group, options, message):
    with pytest.raises(ValueError, match=message):
        make_slowmo(**options)


def test_tau_must_be_a_multiple_of_the_local_sgd_period(process_group):
    with pytest.raises(ValueError, match=r"slowmo.tau must be a multiple of algorithm.period=3 .*got 4"):
        make_slowmo(base="local_sgd", period=3, tau=4)
    make_slowmo(base="local_sgd", period=3, tau=6)


def test_local_sgd_period_is_validated(process_group):
    with pytest.raises(ValueError, match="algorithm.period must be an integer >= 1, got 0"):
        make_slowmo(base="local_sgd", period=0)


def test_a_trained_parameter_outside_the_optimizer_is_rejected(process_group):
    model = make_model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    base = AllReduce(model, opt, Topology(rank=0, world_size=1, procs_per_node=1))
    with pytest.raises(ValueError, match="in no optimizer param group"):
        SlowMo(base, SlowMoConfig(enabled=True))


# --- base-optimizer buffers -----------------------------------------------------------------------
def test_reset_clears_the_optimizer_state(process_group):
    slowmo, model, opt = make_slowmo(base_buffers="reset")
    sgd_step(model, opt)
    assert opt.state
    slowmo.after_optimizer_step(0)
    assert opt.state  # not an outer step
    slowmo.after_optimizer_step(1)
    assert not opt.state  # SGD's momentum restarts from zero
    adam_slowmo, adam_model, adam = make_slowmo(optimizer="adam", base_buffers="reset")
    sgd_step(adam_model, adam)
    adam_slowmo.after_optimizer_step(0)
    adam_slowmo.after_optimizer_step(1)
    sgd_step(adam_model, adam)
    assert all(float(s["step"]) == 1 for s in adam.state.values())  # Adam's step count restarts too


@pytest.mark.parametrize("mode", ["keep", "average"])
def test_keep_and_average_leave_single_worker_state_untouched(process_group, mode):
    slowmo, model, opt = make_slowmo(optimizer="adam", base_buffers=mode)
    sgd_step(model, opt)
    saved = copy.deepcopy(opt.state_dict()["state"])
    slowmo.after_optimizer_step(0)
    slowmo.after_optimizer_step(1)
    after = opt.state_dict()["state"]
    assert after.keys() == saved.keys()
    for index, state in saved.items():
        for key, value in state.items():
            assert torch.equal(after[index][key], value), (index, key)


def test_average_touches_statistics_but_not_step_counters(process_group):
    slowmo, model, opt = make_slowmo(optimizer="adam", base_buffers="average")
    sgd_step(model, opt)
    averaged = slowmo._optimizer_statistics()
    expected = [
        s[key]
        for p in opt.param_groups
        for q in p["params"]
        for s in [opt.state[q]]
        for key in ("exp_avg", "exp_avg_sq")
    ]
    assert len(averaged) == len(expected) and all(a is b for a, b in zip(averaged, expected))


def test_batchnorm_statistics_survive_the_outer_step(process_group):
    slowmo, model, opt = make_slowmo()
    sgd_step(model, opt)
    stats = model[1].running_mean.clone()
    assert stats.abs().sum() > 0
    slowmo.after_optimizer_step(0)
    slowmo.after_optimizer_step(1)
    assert torch.equal(model[1].running_mean, stats)  # the mean over one worker is itself


# --- sharding, composition, checkpoints -------------------------------------------------------------
def test_shards_are_contiguous_and_cover_each_group():
    params = [nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    ranges = [[(g.start, g.stop) for g in build_slow_groups(params, opt, r, 4, sharded=True)] for r in range(4)]
    assert [r[0] for r in ranges] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [r[1] for r in ranges] == [(0, 1), (1, 2), (2, 2), (2, 2)]  # more ranks than entries
    unsharded = build_slow_groups(params, opt, 2, 4, sharded=False)
    assert [(g.start, g.stop) for g in unsharded] == [(0, 10), (0, 2)]


def test_slowmo_shares_the_base_comm_stats_and_delegates(process_group):
    slowmo, model, _ = make_slowmo(base="local_sgd", period=2, tau=4)
    assert slowmo.comm is slowmo.base.comm
    assert all(a is b for a, b in zip(slowmo.parameters(), model.parameters()))
    assert slowmo.train_model is model
    assert slowmo.replicas_identical is False
    assert "over local_sgd(H=2)" in slowmo.describe()


def test_state_dict_round_trip_resumes_bit_exactly(process_group):
    slowmo, model, opt = make_slowmo(lr_coupling="decoupled", nesterov=True)
    for t in range(2):
        outer_iteration(slowmo, model, seed=10 + t, start=2 * t)
    checkpoint = copy.deepcopy({"slowmo": slowmo.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})

    resumed, model2, opt2 = make_slowmo(lr_coupling="decoupled", nesterov=True)
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    resumed.load_state_dict(checkpoint["slowmo"])
    for t in range(2, 4):
        outer_iteration(slowmo, model, seed=10 + t, start=2 * t)
        outer_iteration(resumed, model2, seed=10 + t, start=2 * t)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(slowmo.u + slowmo.x0, resumed.u + resumed.x0))


def test_state_dict_from_another_layout_is_rejected(process_group):
    slowmo, _, _ = make_slowmo()
    state = slowmo.state_dict()
    state["layout"] = [(n, 0, n // 2) for n, _, _ in state["layout"]]
    with pytest.raises(ValueError, match="slowmo.sharded"):
        slowmo.load_state_dict(state)
