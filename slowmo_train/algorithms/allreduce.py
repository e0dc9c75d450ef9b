"""AR-SGD: synchronous data-parallel SGD with a gradient all-reduce every step.

    g = (1/n) sum_i grad f_i(x);   x <- optimizer_step(x, g)        (identical on every rank)

Implemented with torch's DistributedDataParallel, which overlaps the bucketed all-reduce with the
backward pass; a communication hook counts the payload bytes and the time each bucket spends in
flight (overlapped with backward) without changing what is sent.
"""

import time
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slowmo_train.algorithms.base import Algorithm
from slowmo_train.algorithms.comm import CommStats
from slowmo_train.dist import Topology


def _counting_allreduce_hook(stats: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket like DDP's default hook, and count it."""
    tensor = bucket.buffer()
    group = dist.group.WORLD
    size = dist.get_world_size(group)
    stats.add_allreduce(tensor.numel() * tensor.element_size(), size)
    start = time.perf_counter()
    tensor.div_(size)
    work = dist.all_reduce(tensor, group=group, async_op=True)

    def finish(fut):
        stats.add_overlapped(time.perf_counter() - start)
        return fut.value()[0]

    return work.get_future().then(finish)


# 1x1 convolutions get gradients whose strides differ from DDP's bucket views although the memory
# layout is the same; the warning is harmless and would repeat every run.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class AllReduce(Algorithm):
    """Exact gradient averaging every step (DDP). Replicas stay identical."""

    name = "allreduce"
    replicas_identical = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, topology: Topology,
                 cfg=None, device=None):
        super().__init__(model, optimizer, topology)
        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        if dist.get_world_size() > 1:
            self._ddp = DistributedDataParallel(model, device_ids=device_ids)
            self._ddp.register_comm_hook(self.comm, _counting_allreduce_hook)
        else:
            self._ddp = model

    @property
    def train_model(self) -> nn.Module:
        return self._ddp
