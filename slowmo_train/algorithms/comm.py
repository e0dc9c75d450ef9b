"""The data plane: device tensors between ranks (gradients, parameters, gossip, outer messages) on the
training process groups, plus the byte/time accounting and flat parameter buffers the algorithms share.

Every ``torch.distributed`` call that moves a training tensor goes through the functions here; host
values (flags, losses to log, evaluation totals, metadata) go through ``slowmo_train/control.py`` on
a gloo group instead. ``group=None`` means the training group of all ranks
(:func:`slowmo_train.dist.training_world`, the default group in a real run). Under NCCL a tensor
that is not on the GPU is rejected here with a message naming the call, instead of NCCL's error in
the middle of a run.

Byte accounting counts *payload*: the tensor bytes an algorithm asks the network to move for this
rank. Point-to-point messages count their size; an all-reduce of ``B`` bytes over ``n`` ranks counts
the ring algorithm's ``2 (n - 1) / n * B`` sent and as many received (what NCCL and Gloo's ring
implementation move per rank), so figures are comparable across algorithms.

Timing: on the CPU (gloo) the host clock measures communication; on a GPU the host only enqueues
work, so :class:`CommStats` records CUDA events instead and reads them once they have completed
(``Event.query``, no host sync), which gives ``blocking_s`` / ``overlapped_s`` the same meaning on
both backends: time the training stream waited on communication, and time communication spent in
flight behind compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from slowmo_train.dist import training_world
from slowmo_train.simulated.world import Group as SimulatedGroup

COUNTERS = (
    "bytes_sent",
    "bytes_received",
    "messages_sent",
    "blocking_s",
    "overlapped_s",
    "outer_bytes_sent",
    "outer_blocking_s",
    "outer_overlapped_s",
)


@dataclass
class CommStats:
    """Per-rank communication counters, reset every step by :meth:`pop`.

    The ``outer_*`` counters repeat the part of the others spent inside :meth:`outer` regions
    (SlowMo's outer step), so SlowMo's own stall is measured directly rather than as a difference
    between two noisy runs.

    ``cuda=True`` times with CUDA events on the current stream (module docstring): an interval is
    counted by the first :meth:`pop` after its end event has completed, so a step's time may show
    up one step late, never lost; :meth:`settle` waits for all of them (at the end of a run)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    blocking_s: float = 0.0
    overlapped_s: float = 0.0
    outer_bytes_sent: int = 0
    outer_blocking_s: float = 0.0
    outer_overlapped_s: float = 0.0
    totals: dict = field(default_factory=lambda: {key: 0 for key in COUNTERS})
    cuda: bool = False
    #: the host clock; a simulated rank's own clock (slowmo_train/simulated), which stands still
    #: while its peers compute
    clock: Callable[[], float] = time.perf_counter
    _outer_depth: int = 0
    #: CUDA intervals not yet read: (counter, start event, end event, inside an outer region)
    _intervals: list = field(default_factory=list)

    @contextmanager
    def outer(self):
        """Attribute the communication inside this region to SlowMo's outer step as well."""
        self._outer_depth += 1
        try:
            yield
        finally:
            self._outer_depth -= 1

    def add_bytes(self, sent: int, received: int, messages: int | None = None) -> None:
        """Count payload bytes, and the messages the sent bytes travel in (default: one)."""
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        self.messages_sent += (1 if sent else 0) if messages is None else int(messages)
        if self._outer_depth:
            self.outer_bytes_sent += int(sent)

    def add_allreduce(self, nbytes: int, group_size: int) -> None:
        """Count a ring all-reduce of ``nbytes`` over ``group_size`` ranks: reduce-scatter then
        all-gather, ``n - 1`` messages of ``nbytes / n`` each."""
        if group_size <= 1:
            return
        moved = 2 * (group_size - 1) * nbytes // group_size
        self.add_bytes(moved, moved, 2 * (group_size - 1))

    # --- time ----------------------------------------------------------------------------------
    def mark(self):
        """Now: the host clock on the CPU, a CUDA event recorded on the current stream on a GPU."""
        if not self.cuda:
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _add_interval(self, counter: str, start, end) -> None:
        if self.cuda:
            self._intervals.append((counter, start, end, self._outer_depth > 0))
        else:
            self._add_seconds(counter, end - start, self._outer_depth > 0)

    def _add_seconds(self, counter: str, seconds: float, outer: bool) -> None:
        setattr(self, counter, getattr(self, counter) + seconds)
        if outer:
            setattr(self, f"outer_{counter}", getattr(self, f"outer_{counter}") + seconds)

    def add_overlapped_since(self, posted) -> None:
        """Count the time from ``posted`` (a :meth:`mark`) until now as overlapped."""
        self._add_interval("overlapped_s", posted, self.mark())

    def wait(self, works, posted_at, overlapped: bool) -> None:
        """Wait for non-blocking operations posted at ``posted_at`` (a :meth:`mark`): their time in
        flight so far counts as overlapped (when ``overlapped``), the wait as blocking."""
        if overlapped:
            self.add_overlapped_since(posted_at)
        with self.blocking():
            for work in works:
                work.wait()

    @contextmanager
    def blocking(self):
        """Time a region during which this rank waits on communication."""
        start = self.mark()
        try:
            yield
        finally:
            self._add_interval("blocking_s", start, self.mark())

    def _read_intervals(self, block: bool) -> None:
        waiting = []
        for counter, start, end, outer in self._intervals:
            if block:
                end.synchronize()
            if end.query():
                self._add_seconds(counter, start.elapsed_time(end) / 1000.0, outer)
            else:
                waiting.append((counter, start, end, outer))
        self._intervals = waiting

    def settle(self) -> None:
        """Count every recorded interval (waits for the GPU; call outside the step, e.g. at the end)."""
        self._read_intervals(block=True)

    def pop(self) -> dict:
        """Return this step's counters (and add them to the running totals), then reset them."""
        if self._intervals:
            self._read_intervals(block=False)
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


# --- collectives on the training groups ------------------------------------------------------------
def _group(group):
    return training_world() if group is None else group


def simulated(group=None) -> bool:
    """True when ``group`` belongs to a simulated cluster (slowmo_train/simulated)."""
    return isinstance(_group(group), SimulatedGroup)


def new_stats(model: nn.Module) -> CommStats:
    """Counters for an algorithm training ``model``: CUDA-event timing on a GPU, except in a
    simulated cluster, whose ranks time on their own clocks (they share the GPU's stream)."""
    group = _group(None)
    if isinstance(group, SimulatedGroup):
        return CommStats(clock=group.world.clock)
    return CommStats(cuda=any(p.is_cuda for p in model.parameters()))


def _on_plane(tensor: torch.Tensor, group, what: str) -> torch.Tensor:
    """Reject a tensor the group's backend cannot move (a host tensor under NCCL)."""
    backend = group.backend if isinstance(group, SimulatedGroup) else dist.get_backend(group)
    if tensor.device.type == "cpu" and "nccl" in str(backend):
        raise ValueError(
            f"comm.{what}: a CPU tensor {tuple(tensor.shape)} {tensor.dtype} on an NCCL training group; "
            "host values belong on the control plane (slowmo_train/control.py)"
        )
    return tensor


def world_size(group=None) -> int:
    group = _group(group)
    return group.size() if isinstance(group, SimulatedGroup) else dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum", async_op: bool = False):
    """Sum (or max) a device tensor over ``group`` in place; returns the work when ``async_op``."""
    group = _group(group)
    _on_plane(tensor, group, "all_reduce")
    if isinstance(group, SimulatedGroup):
        return _simulated_work(group.all_reduce(tensor, op), async_op)
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    return dist.all_reduce(tensor, op=reduce_op, group=group, async_op=async_op)


def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, group=None, async_op: bool = False):
    """Every rank's ``tensor`` into ``out`` (by group rank); returns the work when ``async_op``."""
    group = _group(group)
    _on_plane(tensor, group, "all_gather")
    if isinstance(group, SimulatedGroup):
        return _simulated_work(group.all_gather(out, tensor), async_op)
    return dist.all_gather(out, tensor, group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> None:
    """Overwrite ``tensor`` with global rank ``src``'s copy (blocking)."""
    group = _group(group)
    _on_plane(tensor, group, "broadcast")
    if isinstance(group, SimulatedGroup):
        group.broadcast(tensor, src).wait()
    else:
        dist.broadcast(tensor, src=src, group=group)


def exchange(
    sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]], tag: int, group=None
) -> list:
    """Post point-to-point sends ``(tensor, global dst)`` and receives ``(buffer, global src)`` as one
    batch (no ordering deadlock); returns the works to wait on. The tensors must stay alive until
    then: the caller keeps them (e.g. in its in-flight message)."""
    group = _group(group)
    if isinstance(group, SimulatedGroup):
        for t, _ in [*sends, *receives]:
            _on_plane(t, group, "exchange")
        return group.exchange(sends, receives, tag)
    ops = [
        dist.P2POp(dist.irecv, _on_plane(buf, group, "exchange"), src, group=group, tag=tag) for buf, src in receives
    ]
    ops += [dist.P2POp(dist.isend, _on_plane(t, group, "exchange"), dst, group=group, tag=tag) for t, dst in sends]
    return [w for w in dist.batch_isend_irecv(ops) if w is not None] if ops else []


def _simulated_work(work, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


def all_reduce_mean_(tensors: list[torch.Tensor], group, stats: CommStats | None = None) -> None:
    """Average ``tensors`` in place over ``group`` with one flat all-reduce (blocking, counted)."""
    size = world_size(group)
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()
    if stats is not None:
        stats.add_allreduce(flat.numel() * flat.element_size(), size)
        with stats.blocking():
            all_reduce(flat, group)
    else:
        all_reduce(flat, group)
    flat.div_(size)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_(tensors: list[torch.Tensor], src: int, group) -> None:
    """Copy ``tensors`` from global rank ``src`` to every rank of ``group`` (in-node mirror)."""
    if group is None or world_size(group) == 1:
        return
    for t in tensors:
        broadcast(t, src, group)
