"""Distributed training algorithms: a closed table of base algorithms, optionally wrapped by SlowMo.

    build_algorithm(cfg.algorithm, cfg.slowmo, model, optimizer, topology, device)
"""

from __future__ import annotations

import torch
from torch import nn

from slowmo_train.algorithms.allreduce import AllReduce
from slowmo_train.algorithms.base import Algorithm
from slowmo_train.algorithms.gossip import OSGP, SGP
from slowmo_train.algorithms.local_sgd import LocalSGD
from slowmo_train.algorithms.slowmo import SlowMo
from slowmo_train.config import AlgorithmConfig, SlowMoConfig
from slowmo_train.dist import Topology

ALGORITHMS: dict[str, type[Algorithm]] = {
    "allreduce": AllReduce,
    "local_sgd": LocalSGD,
    "sgp": SGP,
    "osgp": OSGP,
}

#: algorithm name -> the loop that runs it: "sync" (slowmo_train.trainer.Trainer, with an algorithm
#: from ALGORITHMS) or "async" (slowmo_train.asynchronous.runner.AsyncRunner, with a master rule from
#: slowmo_train.asynchronous.rules.RULES). cli.worker_main picks the loop from this table.
RUNNERS: dict[str, str] = {
    "allreduce": "sync",
    "local_sgd": "sync",
    "sgp": "sync",
    "osgp": "sync",
    "asgd": "async",
    "nag_asgd": "async",
    "dana": "async",
    "dana_slim": "async",
}


def build_algorithm(
    algo_cfg: AlgorithmConfig,
    slowmo_cfg: SlowMoConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    topology: Topology,
    device: torch.device | None = None,
) -> Algorithm:
    """The base algorithm named by ``algo_cfg.name``, wrapped by SlowMo when ``slowmo_cfg.enabled``.

    Call after building the optimizer on ``model``'s parameters and after all ranks hold the same
    initial parameters."""
    try:
        cls = ALGORITHMS[algo_cfg.name]
    except KeyError:
        raise ValueError(f"algorithm={algo_cfg.name!r} is unknown; choose one of {', '.join(ALGORITHMS)}") from None
    base = cls(model, optimizer, topology, algo_cfg, device)
    if slowmo_cfg.enabled:
        return SlowMo(base, slowmo_cfg)
    return base


__all__ = ["ALGORITHMS", "RUNNERS", "Algorithm", "build_algorithm"]
