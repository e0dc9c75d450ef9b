"""The real side of the reference comparison: the cases of tests/reference.py trained by the real
algorithms (``build_algorithm``, the trainer's hook order) on gloo ranks, one trajectory per case.

    results = run_distributed(run_all_cases, world_size, args=(cases,))   # per rank: {case name: ...}

Used by tests/test_reference.py and tests/test_slowmo_streaming.py.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
from torch import nn

from slowmo_train.algorithms import build_algorithm
from slowmo_train.config import AlgorithmConfig, SlowMoConfig
from slowmo_train.dist import build_topology
from tests.distributed_helpers import mean_over_ranks
from tests.helpers import hook_step
from tests.reference import (
    DTYPE,
    HIDDEN,
    IN,
    OUT,
    PARAM_GROUPS,
    STAT_MOMENTUM,
    Case,
    batch,
    group_lrs,
    initial_parameters,
)

#: how close a real trajectory must be to the float64 reference
ATOL, RTOL = 1e-10, 1e-8


class RunningMean(nn.Module):
    """Tracks the batch mean of its input like BatchNorm's running_mean; passes the input through."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features, dtype=DTYPE))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(1 - STAT_MOMENTUM).add_(h.mean(0), alpha=STAT_MOMENTUM)
        return h


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN, dtype=DTYPE)
        self.stat = RunningMean(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT, bias=False, dtype=DTYPE)
        with torch.no_grad():
            for p, init in zip(self.parameters(), initial_parameters()):
                p.copy_(init)

    def forward(self, x):
        return self.fc2(torch.relu(self.stat(self.fc1(x))))


def build_optimizer(model: TinyNet) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.SGD(
        [
            {
                "params": [params[i] for i in g.indices],
                "lr": g.lr,
                "momentum": g.momentum,
                "weight_decay": g.weight_decay,
                "nesterov": g.nesterov,
            }
            for g in PARAM_GROUPS
        ]
    )


def configs_for(case: Case) -> tuple[AlgorithmConfig, SlowMoConfig]:
    algo = AlgorithmConfig(
        name=case.algorithm,
        period=case.period,
        peers_per_itr=case.peers,
        graph=case.graph,
        synch_freq=case.synch_freq,
        nprocs_per_node=case.procs_per_node,
        consensus_every=0,
    )
    s = case.slowmo
    slowmo = (
        SlowMoConfig(enabled=False)
        if s is None
        else SlowMoConfig(
            enabled=True,
            alpha=s.alpha,
            beta=s.beta,
            tau=s.tau,
            base_buffers=s.base_buffers,
            lr_coupling=s.coupling,
            nesterov=s.nesterov,
            sharded=s.sharded,
            fragments=s.fragments,
            overlap_steps=s.overlap,
            outer_dtype=s.outer_dtype,
            inner_lr=s.inner_lr,
        )
    )
    return algo, slowmo


def squared_error(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = xy
    return ((model(x) - y) ** 2).mean()


def train_case(case: Case, topology, rank: int) -> dict:
    """The trainer's loop (hook_step: slowmo_train/trainer.py's hook order) on the tiny model."""
    model = TinyNet()
    optimizer = build_optimizer(model)
    algorithm = build_algorithm(*configs_for(case), model, optimizer, topology)
    algorithm.train_model.train()

    def set_lr(schedule_step: int) -> None:
        held = (schedule_step // case.lr_hold) * case.lr_hold
        for group, lr in zip(optimizer.param_groups, group_lrs(held, case.warmup)):
            group["lr"] = lr

    params, stats, sent, consensus = [], [], [], {}
    for k in range(case.steps):
        hook_step(algorithm, optimizer, k, squared_error, batch(rank, k), set_lr)
        sent.append(algorithm.comm.pop()["bytes_sent"])
        metrics = algorithm.pop_metrics()
        if "consensus_distance" in metrics:  # SlowMo reports it whenever it applies an outer update
            consensus[k] = metrics["consensus_distance"]
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        stats.append(model.stat.running_mean.detach().clone())
    algorithm.close()
    consensus = mean_over_ranks(consensus)  # each rank reports its own distance; the metric is their mean
    return {
        "params": torch.stack(params),
        "stats": torch.stack(stats),
        "sent": sent,
        "consensus": consensus,
        "error": None,
    }


def run_all_cases(rank: int, world_size: int, cases: list[Case]) -> dict[str, dict]:
    topologies = {ppn: build_topology(ppn) for ppn in sorted({c.procs_per_node for c in cases})}
    out = {}
    for case in cases:
        try:
            out[case.name] = train_case(case, topologies[case.procs_per_node], rank)
        except Exception:  # e.g. NotImplementedError in a constructor: the same on every rank
            out[case.name] = {"error": traceback.format_exc()}
        dist.barrier()
    return out


def first_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str:
    close = torch.isclose(actual, expected, rtol=RTOL, atol=ATOL).reshape(len(actual), -1).all(1)
    k = int((~close).nonzero()[0])
    err = float((actual[k] - expected[k]).abs().max())
    return f"first differs after step {k} (max abs error {err:.3g}):\n  real {actual[k]}\n  ref  {expected[k]}"
