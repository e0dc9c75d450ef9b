"""DDP's job done between the backward pass and the optimizer step, for process groups that cannot
host torch's DistributedDataParallel (the simulated cluster's, slowmo_train/simulated).

What reaches the optimizer is what DDP gives it: before each training forward, the buffers of group
rank 0 (DDP's ``broadcast_buffers``, in the algorithm's ``before_forward``); after the backward pass,
every gradient divided by the group size and summed over the group (DDP's default communication
hook; bytes and messages counted as for DDP's buckets).
The average runs after the backward pass returns rather than bucket by bucket inside it: one
simulated process has no network to overlap, and on a GPU the autograd engine's device thread
must never wait for another rank's backward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from slowmo_train.algorithms import comm
from slowmo_train.algorithms.comm import CommStats

#: DDP's default bucket caps: a small first bucket (so the first all-reduce starts early), then 25 MiB
FIRST_BUCKET_BYTES, BUCKET_BYTES = 1024 * 1024, 25 * 1024 * 1024


def ddp_buckets(sizes: list[int]) -> list[int]:
    """The bytes of each bucket DDP's default assignment makes of gradients of ``sizes`` bytes (in
    parameter order): filled in reverse order, a bucket closes once it reaches its cap."""
    buckets, current, cap = [], 0, FIRST_BUCKET_BYTES
    for nbytes in reversed(sizes):
        current += nbytes
        if current >= cap:
            buckets.append(current)
            current, cap = 0, BUCKET_BYTES
    return buckets + ([current] if current else [])


class GradientAverage(nn.Module):
    """``model`` (as ``.module``, like DDP) whose gradients :meth:`average` sums over ``group``."""

    def __init__(self, model: nn.Module, group, stats: CommStats, broadcast_buffers: bool = True):
        super().__init__()
        self.module, self.group, self.stats, self.broadcast_buffers = model, group, stats, broadcast_buffers
        self._sync(list(model.parameters()) + list(model.buffers()))  # DDP's start-up broadcast

    def _sync(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with group rank 0's, one flat broadcast per dtype (DDP coalesces too)."""
        src = self.group.ranks[0]
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in same])
            comm.broadcast(flat, src, self.group)
            offset = 0
            with torch.no_grad():
                for t in same:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def before_forward(self) -> None:
        """DDP's buffer broadcast, which DDP runs at the start of a training forward; here just
        before it, outside the autocast region (a simulated rank must not wait inside one)."""
        buffers = list(self.module.buffers())
        if self.broadcast_buffers and self.training and buffers:
            self._sync(buffers)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def average(self) -> None:
        """Every gradient := sum over the group of (gradient / group size)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        size = comm.world_size(self.group)
        if not grads or size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(size)
        for nbytes in ddp_buckets([g.numel() * g.element_size() for g in grads]):
            self.stats.add_allreduce(nbytes, size)  # counted as DDP's buckets are
        with self.stats.blocking():
            comm.all_reduce(flat, self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
