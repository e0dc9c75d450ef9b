"""The interface every distributed algorithm implements, and the trainer's only view of them.

The trainer calls, once per optimizer step ``k`` (0-based, counted from the start of training)::

    lr = schedule(algorithm.lr_schedule_step(k))     # SlowMo (inner_lr=hold) holds gamma_t in an outer iteration
    algorithm.before_forward(k)
    loss = loss_fn(algorithm.train_model(batch))     # forward + backward on the (possibly wrapped) model
    algorithm.after_backward(k)                       # gradient communication that DDP does not do
                                                      # (all of it without DDP: a simulated cluster)
    optimizer.step()
    algorithm.after_optimizer_step(k)                 # parameter communication (averaging, gossip, SlowMo)
    algorithm.comm.pop()                              # bytes / seconds of this step, for metrics

Averaging and SlowMo see every base algorithm through push-sum's lens (Kempe et al., 2003; Assran
et al., ICML 2019): worker i holds numerators ``num_i`` and a weight ``w_i`` and the exact average of
the workers is ``sum_i num_i / sum_i w_i``. For algorithms without push-sum the numerators are the
parameters and the weight is 1.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from slowmo_train.algorithms import comm
from slowmo_train.algorithms.comm import CommStats, floating_buffers
from slowmo_train.algorithms.grad_average import GradientAverage
from slowmo_train.dist import Topology


class Algorithm:
    """Base class with no-op hooks. Subclasses override the hooks they need."""

    name = "base"
    #: True when all ranks hold identical parameters after every step (AR-SGD); lets evaluation
    #: skip averaging.
    replicas_identical = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        topology: Topology,
        cfg=None,
        device: torch.device | None = None,
    ):
        """``cfg`` (the ``algorithm`` config section) and ``device`` are what ``build_algorithm`` passes
        every algorithm; this base needs neither."""
        self.model = model
        self.optimizer = optimizer
        self.topology = topology
        self.comm = comm.new_stats(model)

    # --- the training step -------------------------------------------------------------------
    @property
    def train_model(self) -> nn.Module:
        """The module the trainer runs forward/backward through (e.g. a DDP wrapper)."""
        return self.model

    def lr_schedule_step(self, step: int) -> int:
        """The step at which the learning-rate schedule is evaluated for optimizer step ``step``."""
        return step

    def before_forward(self, step: int) -> None:
        """Without DDP (a simulated cluster's groups), its buffer broadcast runs here."""
        if isinstance(self.train_model, GradientAverage):
            self.train_model.before_forward()

    def after_backward(self, step: int) -> None:
        """Without DDP (a simulated cluster's groups), its gradient average runs here."""
        if isinstance(self.train_model, GradientAverage):
            self.train_model.average()

    def after_optimizer_step(
        self, step: int, exact_average_follows: bool = False, outer_sync_follows: bool = False
    ) -> None:
        """Parameter communication after the optimizer step. Hints set by SlowMo, so that a base
        algorithm may skip communication whose result SlowMo overwrites anyway:

        * ``exact_average_follows``: the whole model is replaced by an exact average of all workers
          taken right after this step (applied now, or D steps later with the local progress
          re-applied). Push-sum skips its gossip: the exact average is invariant under mixing.
        * ``outer_sync_follows``: SlowMo synchronises at the end of this outer iteration (the
          whole model, or fragment 0 with the others staggered); Local SGD skips its own average."""

    # --- the averaging view used by SlowMo and evaluation -----------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def flush(self) -> None:
        """Complete all in-flight communication so that :meth:`mixing_state` holds all the mass."""

    def mixing_state(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Numerators and push-sum weight (None means 1) of this worker."""
        return [p.data for p in self.parameters()], None

    def load_consensus(self, values: list[torch.Tensor]) -> None:
        """Set every rank's parameters to ``values`` (identical on all ranks) and reset mixing state
        (push-sum weight 1, nothing in flight)."""
        with torch.no_grad():
            for p, v in zip(self.parameters(), values):
                p.data.copy_(v)

    def write_slices(self, slices: list[tuple[int, int, int, torch.Tensor]]) -> None:
        """Set parts of this rank's parameters: ``(index into parameters(), start, stop, values)``
        in the parameter's flattened order, leaving the rest of the mixing state as it is (SlowMo's
        fragment updates). Push-sum bases keep their weight and scale the numerators."""
        params = self.parameters()
        with torch.no_grad():
            for index, start, stop, values in slices:
                write_slice(params[index].data, start, stop, values)

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """Extra per-rank scalars measured since the last call (e.g. ``consensus_distance``), as
        device tensors: the trainer reads them at its next log point and logs their mean over ranks,
        so that measuring them adds no host synchronisation to the step."""
        out, self.extra_metrics = getattr(self, "extra_metrics", {}), {}
        return out

    # --- lifecycle ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Finish outstanding communication before the process group goes away."""
        self.flush()

    def describe(self) -> str:
        return self.name


def exact_average(algorithm: Algorithm, stats: CommStats | None = None, group=None) -> list[torch.Tensor]:
    """The exact average of all workers' models, ``sum_i num_i / sum_i w_i``, via one all-reduce
    over every rank (ranks of one node hold identical copies, so they do not bias it).

    Collective. Returns new tensors shaped like the parameters; the algorithm's state is untouched
    except for :meth:`Algorithm.flush`."""
    algorithm.flush()
    numerators, weight = algorithm.mixing_state()
    ref = numerators[0]
    w = weight.reshape(1).to(ref.dtype) if weight is not None else torch.ones(1, dtype=ref.dtype, device=ref.device)
    flat = torch.cat([n.reshape(-1) for n in numerators] + [w])
    world = comm.world_size(group)
    if world > 1:
        if stats is not None:
            stats.add_allreduce(flat.numel() * flat.element_size(), world)
            with stats.blocking():
                comm.all_reduce(flat, group)
        else:
            comm.all_reduce(flat, group)
    total_weight = flat[-1]
    out, offset = [], 0
    for n in numerators:
        out.append((flat[offset : offset + n.numel()] / total_weight).view_as(n))
        offset += n.numel()
    return out


def local_distance(local: list[torch.Tensor], average: list[torch.Tensor]) -> torch.Tensor:
    """``||x_i - x_avg||`` of this rank, a float64 scalar on the parameters' device (no host sync;
    the consensus distance the trainer logs is its mean over ranks, taken on the control plane)."""
    sq = None
    for a, b in zip(local, average):
        term = (a - b).double().pow(2).sum()
        sq = term if sq is None else sq + term
    return sq.sqrt()


@contextmanager
def averaged_model(algorithm: Algorithm, model: nn.Module):
    """Temporarily load the average of all ranks' current parameters and floating buffers (BatchNorm
    statistics) into ``model``, e.g. for evaluation; restore the local values afterwards.

    The average is of the de-biased parameters the ranks hold now; in-flight gossip is not waited
    for, so evaluating does not change the training trajectory."""
    world = comm.world_size()
    if algorithm.replicas_identical or world == 1:
        yield model
        return
    tensors = [p.data for p in model.parameters()] + floating_buffers(model)
    saved = [t.clone() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    comm.all_reduce(flat)
    flat.div_(world)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


def write_slice(param: torch.Tensor, start: int, stop: int, value: torch.Tensor) -> None:
    """param.reshape(-1)[start:stop] = value, also for non-contiguous (channels_last) tensors, where
    reshape would copy."""
    if param.is_contiguous():
        param.view(-1)[start:stop].copy_(value)
    else:
        flat = param.reshape(-1).clone()
        flat[start:stop].copy_(value)
        param.copy_(flat.view_as(param))
