"""The control plane: host values between ranks, on a gloo process group of their own.

Two planes carry everything the ranks exchange (see ``slowmo_train/algorithms/comm.py`` for the
other one):

* **control plane** (this module): Python numbers and picklable objects that live on the host —
  stop polls, finiteness flags, losses to log, consensus distances, evaluation totals, checkpoint
  metadata, the run directory, the asynchronous runner's messages. Always gloo, whatever the
  training backend, so a host value never reaches NCCL (which rejects CPU tensors) and never
  queues behind the training traffic of a process group.
* **data plane** (``algorithms/comm.py``): device tensors — gradients, parameters, gossip, outer
  messages — on the training process groups (NCCL on GPUs).

Values go in as Python numbers (or CPU tensors) and come back as Python floats, so a caller cannot
hand a device tensor to the control plane by accident: a CUDA tensor is rejected with a message
naming the call. Nothing else in the package calls ``torch.distributed`` collectives.

    from slowmo_train import control
    total, count = control.all_reduce([loss_sum, steps])           # sum over ranks
    stop = control.all_reduce([signal_flag], op="max")[0]
    pending = control.all_reduce_async([flag], op="max"); ...; pending.wait()
    run_dir = control.broadcast_object(run_dir)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

_group: dist.ProcessGroup | None = None


def set_group(group: dist.ProcessGroup | None) -> None:
    """Install the gloo group the control plane uses (``slowmo_train.dist.init_process_group``
    calls it; tests may install their own). None: the default group, which must then have a CPU
    backend."""
    global _group
    _group = group


def group() -> dist.ProcessGroup | None:
    return _group


def _simulated():
    """The simulated cluster's control group (slowmo_train/simulated/world.py), or None in a real
    run. Recognised by its ``simulated`` attribute: this module imports nothing of the package."""
    return _group if getattr(_group, "simulated", False) else None


def world_size() -> int:
    if (sim := _simulated()) is not None:
        return sim.size()
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    if (sim := _simulated()) is not None:
        return sim.rank()
    return dist.get_rank() if dist.is_initialized() else 0


def _host_tensor(values, dtype: torch.dtype, what: str) -> torch.Tensor:
    if torch.is_tensor(values):
        if values.device.type != "cpu":
            raise ValueError(
                f"control.{what} carries host values, got a tensor on {values.device}: read device "
                "values at a log point (.cpu()) or send them on the data plane (algorithms/comm.py)"
            )
        return values.detach().to(dtype).reshape(-1).clone()
    return torch.tensor([float(v) for v in values], dtype=dtype)


class Pending:
    """A non-blocking control all-reduce; :meth:`wait` returns the reduced values as floats."""

    def __init__(self, work, tensor: torch.Tensor):
        self._work, self._tensor = work, tensor

    def wait(self) -> list[float]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._tensor.tolist()


def all_reduce_async(
    values: Sequence[float] | torch.Tensor, op: str = "sum", dtype: torch.dtype = torch.float64
) -> Pending:
    """Start reducing ``values`` (numbers or a CPU tensor) over all ranks; ``op`` is sum, max or min."""
    tensor = _host_tensor(values, dtype, "all_reduce")
    if world_size() == 1:
        return Pending(None, tensor)
    if (sim := _simulated()) is not None:
        return Pending(sim.all_reduce(tensor, op), tensor)
    return Pending(dist.all_reduce(tensor, op=_OPS[op], group=_group, async_op=True), tensor)


def all_reduce(
    values: Sequence[float] | torch.Tensor, op: str = "sum", dtype: torch.dtype = torch.float64
) -> list[float]:
    """``values`` reduced over all ranks (blocking), as floats. float64 keeps integers (counts,
    token totals) exact up to 2**53."""
    return all_reduce_async(values, op, dtype).wait()


def mean(values: Sequence[float] | torch.Tensor) -> list[float]:
    """The mean over ranks of each value."""
    n = world_size()
    return [v / n for v in all_reduce(values)]


def flags(local: bool) -> list[int]:
    """The ranks whose ``local`` flag is set (every rank gets the same list)."""
    values = [0.0] * world_size()
    values[rank()] = float(local)
    return [r for r, v in enumerate(all_reduce(values)) if v > 0]


def barrier() -> None:
    if (sim := _simulated()) is not None:
        sim.barrier().wait()
    elif world_size() > 1:
        dist.barrier(group=_group)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from global rank ``src`` to every rank."""
    if world_size() == 1:
        return obj
    if (sim := _simulated()) is not None:
        return sim.broadcast_object(obj, src)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, by rank."""
    if world_size() == 1:
        return [obj]
    if (sim := _simulated()) is not None:
        return sim.all_gather_object(obj)
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_group)
    return out


# --- host tensors: the asynchronous runner's parameter-server messages -------------------------------
def _check_host(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.device.type != "cpu":
        raise ValueError(f"control.{what} carries host tensors, got one on {tensor.device}")
    if _simulated() is not None:
        raise ValueError(f"control.{what}: the asynchronous algorithms have their own simulated mode")
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> None:
    """Overwrite a CPU tensor with global rank ``src``'s (in place)."""
    if world_size() > 1:
        dist.broadcast(_check_host(tensor, "broadcast_"), src=src, group=_group)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> None:
    """Reduce a CPU tensor over all ranks in place."""
    if world_size() > 1:
        dist.all_reduce(_check_host(tensor, "all_reduce_"), op=_OPS[op], group=_group)


def send(tensor: torch.Tensor, dst: int) -> None:
    dist.send(_check_host(tensor, "send"), dst=dst, group=_group)


def recv(tensor: torch.Tensor, src: int | None = None) -> int:
    """Receive into a CPU tensor, from ``src`` or (None) from any rank; returns the sender's rank."""
    return dist.recv(_check_host(tensor, "recv"), src=src, group=_group)


def isend(tensor: torch.Tensor, dst: int):
    return dist.isend(_check_host(tensor, "isend"), dst=dst, group=_group)


def irecv(tensor: torch.Tensor, src: int):
    return dist.irecv(_check_host(tensor, "irecv"), src=src, group=_group)
