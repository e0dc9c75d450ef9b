"""Algebra of the asynchronous master rules (slowmo_train/asynchronous/rules.py), one process.

At staleness 0 (one worker) each rule must reduce to its synchronous counterpart, compared with
torch.optim.SGD trajectories on a tiny model: ASGD -> SGD, NAG-ASGD -> momentum SGD (heavy ball or
Nesterov), DANA-Zero's look-ahead and DANA-Slim's parameters -> Nesterov SGD.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slowmo_train.asynchronous.rules import ASGD, DanaSlim, DanaZero, NagASGD, build_rule
from slowmo_train.config import ConfigError, JobConfig
from slowmo_train.config_checks import validate

LR, MOM, WD, STEPS = 0.05, 0.9, 1e-3, 25


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    xs = [torch.randn(8, 6, dtype=torch.float64) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (8,)) for _ in range(STEPS)]
    return model, xs, ys


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _load(model, flat):
    torch.nn.utils.vector_to_parameters(flat, model.parameters())


def _grad_at(model, flat, x, y):
    _load(model, flat)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]) + WD * flat


def _torch_trajectory(momentum: float, nesterov: bool):
    model, xs, ys = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, nesterov=nesterov, weight_decay=WD)
    out = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        out.append(_flat(model))
    return out


def _rule_trajectory(rule_of, observe):
    """One worker: read, compute the gradient there, send, update; ``observe(rule)`` after each update."""
    model, xs, ys = _problem()
    rule = rule_of(_flat(model))
    side = rule.worker_side(rule.theta.numel())
    out = []
    for x, y in zip(xs, ys):
        g = _grad_at(model, rule.params_for(0, LR).clone(), x, y)
        rule.master_update(0, side.message(g), LR)
        out.append(observe(rule).clone())
    return out


def _assert_same(a, b):
    for k, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12, msg=lambda m, k=k: f"step {k}: {m}")


def test_asgd_one_worker_is_sgd():
    _assert_same(_rule_trajectory(lambda t: ASGD(t, 1), lambda r: r.theta), _torch_trajectory(0.0, False))


@pytest.mark.parametrize("nesterov", [False, True])
def test_nag_asgd_one_worker_is_momentum_sgd(nesterov):
    ours = _rule_trajectory(lambda t: NagASGD(t, 1, MOM, nesterov), lambda r: r.theta)
    _assert_same(ours, _torch_trajectory(MOM, nesterov))


def test_dana_zero_one_worker_look_ahead_is_nesterov_sgd():
    # torch's Nesterov SGD stores the look-ahead point (Bengio et al. 2013's reformulation), which is
    # what DANA-Zero sends its one worker: theta - lr gamma v.
    ours = _rule_trajectory(lambda t: DanaZero(t, 1, MOM), lambda r: r.params_for(0, LR))
    _assert_same(ours, _torch_trajectory(MOM, True))


def test_dana_slim_one_worker_is_nesterov_sgd():
    ours = _rule_trajectory(lambda t: DanaSlim(t, 1, MOM), lambda r: r.theta)
    _assert_same(ours, _torch_trajectory(MOM, True))


def test_dana_zero_and_slim_agree_with_many_stale_workers():
    """With 4 workers, a random arrival order and a constant lr, DANA-Slim's master parameters equal
    DANA-Zero's look-ahead: the two are one algorithm with the momentum stored in different places."""
    workers = 4
    model, xs, ys = _problem(1)
    theta0 = _flat(model)
    zero, slim = DanaZero(theta0, workers, MOM), DanaSlim(theta0, workers, MOM)
    sides = [slim.worker_side(theta0.numel()) for _ in range(workers)]
    order = torch.randint(0, workers, (STEPS,), generator=torch.Generator().manual_seed(3)).tolist()
    # every worker holds the gradient it computed at what it last read (initially theta0)
    pending_zero = {w: _grad_at(model, zero.params_for(w, LR).clone(), xs[w], ys[w]) for w in range(workers)}
    pending_slim = {
        w: sides[w].message(_grad_at(model, slim.params_for(w, LR).clone(), xs[w], ys[w])) for w in range(workers)
    }
    for k, w in enumerate(order):
        zero.master_update(w, pending_zero[w], LR)
        slim.master_update(w, pending_slim[w], LR)
        torch.testing.assert_close(slim.theta, zero.params_for(w, LR), rtol=0, atol=1e-12)
        x, y = xs[k], ys[k]
        pending_zero[w] = _grad_at(model, zero.params_for(w, LR).clone(), x, y)
        pending_slim[w] = sides[w].message(_grad_at(model, slim.params_for(w, LR).clone(), x, y))


def test_nag_asgd_with_stale_gradients_differs_from_dana():
    """The shared buffer of NAG-ASGD is not DANA: with two workers the trajectories separate."""
    model, xs, ys = _problem(2)
    theta0 = _flat(model)
    nag, dana = NagASGD(theta0, 2, MOM, True), DanaZero(theta0, 2, MOM)
    for rule in (nag, dana):
        pending = {w: _grad_at(model, rule.params_for(w, LR).clone(), xs[w], ys[w]) for w in range(2)}
        for k in range(10):
            w = k % 2
            rule.master_update(w, pending[w], LR)
            pending[w] = _grad_at(model, rule.params_for(w, LR).clone(), xs[k], ys[k])
    assert (nag.theta - dana.theta).abs().max() > 1e-6


def test_state_dict_round_trip():
    theta = torch.randn(7, dtype=torch.float64)
    a = DanaZero(theta, 3, MOM)
    a.master_update(1, torch.ones(7, dtype=torch.float64), LR)
    b = DanaZero(torch.zeros(7, dtype=torch.float64), 3, MOM)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.params_for(0, LR), a.params_for(0, LR))


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="optim.momentum"):
        DanaZero(torch.zeros(3), 2, 1.0)
    with pytest.raises(ValueError, match="not asynchronous"):
        build_rule("sgp", torch.zeros(3), 2, 0.9)
    with pytest.raises(ValueError, match="workers"):
        ASGD(torch.zeros(3), 0)


def test_validation_rejects_slowmo_and_multi_process_simulation():
    job = JobConfig()
    job.algorithm.name = "dana"
    job.slowmo.enabled = True
    with pytest.raises(ConfigError, match="slowmo.enabled"):
        validate(job, world_size=1, check_paths=False)
    job.slowmo.enabled = False
    validate(job, world_size=1, check_paths=False)
    with pytest.raises(ConfigError, match="nproc_per_node"):
        validate(job, world_size=4, check_paths=False)
    job.algorithm.mode = "real"
    validate(job, world_size=3, check_paths=False)
    job.algorithm.servers = 3
    with pytest.raises(ConfigError, match="servers"):
        validate(job, world_size=3, check_paths=False)
