"""AR-SGD: synchronous data-parallel SGD with a gradient all-reduce every step.

    g = (1/n) sum_i grad f_i(x);   x <- optimizer_step(x, g)        (identical on every rank)

Implemented with torch's DistributedDataParallel, which overlaps the bucketed all-reduce with the
backward pass; a communication hook counts the payload bytes and the time each bucket spends in
flight (overlapped with backward) without changing what is sent.
"""

import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slowmo_train.algorithms import comm
from slowmo_train.algorithms.base import Algorithm
from slowmo_train.algorithms.comm import CommStats
from slowmo_train.algorithms.grad_average import GradientAverage
from slowmo_train.dist import Topology, training_world


@dataclass
class HookState:
    stats: CommStats
    group: object


def counting_allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average a gradient bucket like DDP's default hook (on the DDP
    module's process group), and count its bytes and its time in flight (overlapped with the
    backward pass)."""
    tensor = bucket.buffer()
    size = comm.world_size(state.group)
    state.stats.add_allreduce(tensor.numel() * tensor.element_size(), size)
    start = state.stats.mark()
    tensor.div_(size)
    work = comm.all_reduce(tensor, state.group, async_op=True)

    def finish(fut):
        state.stats.add_overlapped_since(start)
        return fut.value()[0]

    return work.get_future().then(finish)


#: DDP's option that stops it from broadcasting BatchNorm buffers at every forward (renamed in
#: recent torch releases, which warn about the old name)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def data_parallel(
    model: nn.Module, group, stats: CommStats, device: torch.device | None, broadcast_buffers: bool = True
) -> nn.Module:
    """``model`` wrapped in DDP over ``group`` (all ranks: None), with the counting hook: the
    gradient average overlaps the backward pass (bucket by bucket) instead of following it. A
    simulated cluster's group gets the same average after the backward pass (``GradientAverage``)."""
    group = training_world() if group is None else group
    if comm.simulated(group):
        return GradientAverage(model, group, stats, broadcast_buffers)
    device_ids = [device.index] if device is not None and device.type == "cuda" else None
    options = {} if broadcast_buffers else _NO_BUFFER_SYNC
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=group, **options)
    ddp.register_comm_hook(HookState(stats, group), counting_allreduce_hook)
    return ddp


def node_data_parallel(
    model: nn.Module, topology: Topology, stats: CommStats, device: torch.device | None
) -> nn.Module:
    """For Local SGD and gossip with several processes per node: DDP on the node group, so the
    processes of a node average their gradients during the backward pass and act as one worker.
    BatchNorm statistics stay per process (no buffer broadcast), as each saw its own batch; the
    algorithm averages them with the parameters. Without a hierarchy: the model itself."""
    if not topology.hierarchical:
        return model
    return data_parallel(model, topology.node_group, stats, device, broadcast_buffers=False)


# 1x1 convolutions get gradients whose strides differ from DDP's bucket views although the memory
# layout is the same; the warning is harmless and would repeat every run.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class AllReduce(Algorithm):
    """Exact gradient averaging every step (DDP). Replicas stay identical."""

    name = "allreduce"
    replicas_identical = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, topology: Topology, cfg=None, device=None):
        super().__init__(model, optimizer, topology)
        if comm.world_size() > 1:
            self._ddp = data_parallel(model, None, self.comm, device)
        else:
            self._ddp = model

    @property
    def train_model(self) -> nn.Module:
        return self._ddp
