"""AR-SGD (DDP) on 2 gloo ranks equals single-process SGD on the combined batch."""

from __future__ import annotations

import torch
from torch import nn

from slowmo_train.algorithms import build_algorithm
from slowmo_train.config import AlgorithmConfig, SlowMoConfig
from slowmo_train.dist import build_topology
from tests.distributed_helpers import run_distributed
from tests.helpers import hook_step

STEPS, BATCH = 5, 8


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-3)


def cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _allreduce_worker(rank, world_size):
    model = make_model()
    opt = make_optimizer(model)
    algo = build_algorithm(AlgorithmConfig(name="allreduce"), SlowMoConfig(), model, opt, build_topology(1))
    per = BATCH // world_size
    for k, (x, y) in enumerate(batches()):
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        hook_step(algo, opt, k, cross_entropy, (xs, ys))
    stats = algo.comm.pop()
    return [p.detach().clone() for p in model.parameters()], stats


def test_allreduce_matches_large_batch_sgd():
    results = run_distributed(_allreduce_worker, 2)
    model = make_model()
    opt = make_optimizer(model)
    for x, y in batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    expected = [p.detach() for p in model.parameters()]
    for params, _ in results:
        for got, want in zip(params, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ranks are bit-identical; the ring all-reduce of the gradients is counted (2(n-1)/n = 1 model per step)
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    model_bytes = sum(p.numel() * 4 for p in expected)
    assert results[0][1]["bytes_sent"] == STEPS * model_bytes
