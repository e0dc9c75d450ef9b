"""Local SGD: workers take ``H`` optimizer steps on their own gradients, then average exactly.

    x_i <- optimizer_step(x_i, grad f_i(x_i))            every step, on each worker i
    x_i <- (1/n) sum_j x_j    after step k if (k+1) % H == 0  (parameters and BatchNorm statistics)

Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019; Lin et al., "Don't Use Large
Mini-Batches, Use Local SGD", ICLR 2020. It is the base algorithm of BMUF when SlowMo wraps it
(Wang et al., "SlowMo: Improving Communication-Efficient Distributed SGD with Slow Momentum",
ICLR 2020, Sec. 3).
"""

from __future__ import annotations

import torch
from torch import nn

from slowmo_train.algorithms.allreduce import node_data_parallel
from slowmo_train.algorithms.base import Algorithm
from slowmo_train.algorithms.comm import all_reduce_mean_, floating_buffers
from slowmo_train.config import AlgorithmConfig
from slowmo_train.dist import Topology


class LocalSGD(Algorithm):
    """Local SGD with period ``H`` (Stich, ICLR 2019; Lin et al., ICLR 2020).

    x_i^{k+1} = x_i^k - lr * d_i^k;  if (k+1) % H == 0: x_i^{k+1} <- mean_j x_j^{k+1}

    With several processes per node the processes of a node average their gradients every step
    (DDP on the node group, overlapped with the backward pass), so they hold identical parameters
    and act as one worker of the algorithm."""

    name = "local_sgd"
    replicas_identical = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        topology: Topology,
        cfg: AlgorithmConfig | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(model, optimizer, topology)
        period = (cfg or AlgorithmConfig()).period
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"algorithm.period must be an integer >= 1, got {period!r}")
        self.period = period
        self._train_model = node_data_parallel(model, topology, self.comm, device)

    @property
    def train_model(self) -> nn.Module:
        return self._train_model

    def after_optimizer_step(
        self, step: int, exact_average_follows: bool = False, outer_sync_follows: bool = False
    ) -> None:
        if (step + 1) % self.period != 0 or exact_average_follows or outer_sync_follows:
            return
        # One all-reduce over every rank rather than leaders-then-broadcast: the processes of a node
        # hold identical parameters, so the mean over ranks is the mean over nodes. BatchNorm
        # statistics do differ inside a node (each process saw its own batch) and are averaged too.
        tensors = [p.data for p in self.parameters()] + floating_buffers(self.model)
        all_reduce_mean_(tensors, group=None, stats=self.comm)

    def describe(self) -> str:
        return f"local_sgd(H={self.period})"
