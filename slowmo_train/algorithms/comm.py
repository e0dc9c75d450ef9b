"""Communication helpers shared by the algorithms: byte/time accounting, flat parameter buffers and
exact averaging.

Byte accounting counts *payload*: the tensor bytes an algorithm asks the network to move for this
rank. Point-to-point messages count their size; an all-reduce of ``B`` bytes over ``n`` ranks counts
the ring algorithm's ``2 (n - 1) / n * B`` sent and as many received (what NCCL and Gloo's ring
implementation move per rank), so figures are comparable across algorithms.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


COUNTERS = ("bytes_sent", "bytes_received", "blocking_s", "overlapped_s",
            "outer_bytes_sent", "outer_blocking_s", "outer_overlapped_s")


@dataclass
class CommStats:
    """Per-rank communication counters, reset every step by :meth:`pop`.

    The ``outer_*`` counters repeat the part of the others spent inside :meth:`outer` regions
    (SlowMo's outer step), so SlowMo's own stall is measured directly rather than as a difference
    between two noisy runs."""

    bytes_sent: int = 0
    bytes_received: int = 0
    blocking_s: float = 0.0
    overlapped_s: float = 0.0
    outer_bytes_sent: int = 0
    outer_blocking_s: float = 0.0
    outer_overlapped_s: float = 0.0
    totals: dict = field(default_factory=lambda: {key: 0 for key in COUNTERS})
    _outer_depth: int = 0

    @contextmanager
    def outer(self):
        """Attribute the communication inside this region to SlowMo's outer step as well."""
        self._outer_depth += 1
        try:
            yield
        finally:
            self._outer_depth -= 1

    def add_bytes(self, sent: int, received: int) -> None:
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        if self._outer_depth:
            self.outer_bytes_sent += int(sent)

    def add_allreduce(self, nbytes: int, group_size: int) -> None:
        """Count a ring all-reduce of ``nbytes`` over ``group_size`` ranks."""
        if group_size <= 1:
            return
        moved = 2 * (group_size - 1) * nbytes // group_size
        self.add_bytes(moved, moved)

    def wait(self, works, posted_at: float, overlapped: bool) -> None:
        """Wait for non-blocking operations posted at ``posted_at`` (a ``time.perf_counter()``):
        their time in flight so far counts as overlapped (when ``overlapped``), the wait as blocking."""
        if overlapped:
            self.add_overlapped(time.perf_counter() - posted_at)
        with self.blocking():
            for work in works:
                work.wait()

    @contextmanager
    def blocking(self):
        """Time a region during which this rank waits on communication."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.blocking_s += seconds
            if self._outer_depth:
                self.outer_blocking_s += seconds

    def add_overlapped(self, seconds: float) -> None:
        self.overlapped_s += seconds
        if self._outer_depth:
            self.outer_overlapped_s += seconds

    def pop(self) -> dict:
        """Return this step's counters (and add them to the running totals), then reset them."""
        step = {key: getattr(self, key) for key in COUNTERS}
        for key, value in step.items():
            self.totals[key] = self.totals.get(key, 0) + value
            setattr(self, key, type(value)(0))
        return step


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def floating_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Buffers that averaging should touch (BatchNorm running statistics), not integer counters."""
    return [b for b in model.buffers() if b.is_floating_point()]


class FlatParameters:
    """Lay a model's parameters out in one contiguous buffer per dtype/device, with every
    ``Parameter.data`` a view into it, so that gossip and averaging move a single tensor.

    Parameter identity is kept (optimizers built before keep working)."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = list(params)
        if not self.params:
            raise ValueError("the model has no parameters to communicate")
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype and device, found {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in self.params)
        first = self.params[0]
        self.buffer = torch.empty(total, dtype=first.dtype, device=first.device)
        offset = 0
        self.slices = []
        for p in self.params:
            n = p.numel()
            self.buffer[offset : offset + n].copy_(p.data.reshape(-1))
            p.data = self.buffer[offset : offset + n].view_as(p)
            self.slices.append((offset, offset + n))
            offset += n

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def all_reduce_mean_(tensors: list[torch.Tensor], group, stats: CommStats | None = None) -> None:
    """Average ``tensors`` in place over ``group`` with one flat all-reduce (blocking, counted)."""
    size = dist.get_world_size(group)
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()
    if stats is not None:
        stats.add_allreduce(flat.numel() * flat.element_size(), size)
        with stats.blocking():
            dist.all_reduce(flat, group=group)
    else:
        dist.all_reduce(flat, group=group)
    flat.div_(size)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_(tensors: list[torch.Tensor], src: int, group) -> None:
    """Copy ``tensors`` from global rank ``src`` to every rank of ``group`` (in-node mirror)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
