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
from slowmo_train.registry import SYNC, check_table

#: the synchronous algorithms' classes (kind "sync" in slowmo_train/registry.py, which names them all
#: and routes the asynchronous ones to slowmo_train/asynchronous)
ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (AllReduce, LocalSGD, SGP, OSGP)}
check_table(ALGORITHMS, SYNC, "slowmo_train.algorithms.ALGORITHMS")


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


__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm"]
