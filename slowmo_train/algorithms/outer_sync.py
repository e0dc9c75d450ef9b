"""SlowMo's outer synchronisation units: the part of the model that is averaged and takes an outer step
together, with the slow state (x0, u) this rank keeps for it. Every unit answers the same four calls,
made by :class:`slowmo_train.algorithms.slowmo.SlowMo` after an inner step::

    message = unit.post(step)       # when unit.due(step): start the exact average
    unit.resolve(message)           # when unit.resolve_due(...): outer step of this rank's slow state
    unit.merge(message)             # delay steps after the post: new values into the base algorithm
    unit.complete(message)          # wait for whatever is in flight (checkpoints, close)

* :class:`WholeModelSync`: Alg. 1 of Wang et al. (ICLR 2020) as written, the default (float32
  messages, one fragment, no overlap): one blocking all-reduce of the whole model, applied at once.
* :class:`FragmentSync`: one of F fragments, each sent on its own schedule, optionally in 16 bits and
  applied D steps after its non-blocking all-reduce (Streaming DiLoCo, Douillard et al. 2025,
  arXiv:2501.18512). With F = 1, D = 0 and float32 its arithmetic is Alg. 1 up to rounding.

Sharding is a property of a unit: which slice of its x0 / u this rank keeps and updates (a slice of
every param group's vector for WholeModelSync, of the fragment's for FragmentSync, as :class:`Slab`
views), all of it when unsharded; a sharded unit all-gathers the new x0.
The options and their costs are described in the README ("Algorithms"); what differs from Alg. 1 is
listed in slowmo.py.

    .venv/bin/python -m pytest -q tests/test_slowmo_streaming.py
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from slowmo_train.algorithms import comm
from slowmo_train.algorithms.base import Algorithm, exact_average, local_distance
from slowmo_train.algorithms.comm import CommStats
from slowmo_train.algorithms.outer_layout import (
    Piece,
    SlowGroup,
    build_fragments,
    flat_group,
    fragment_due,
    group_lrs,
    owned_ranges,
    rank_slice,
)
from slowmo_train.algorithms.outer_optimizer import OuterOptimizer

WIRE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, eq=False)
class OuterSetup:
    """What every unit of one SlowMo shares."""

    base: Algorithm
    outer: OuterOptimizer
    groups: list[SlowGroup]
    stats: CommStats  # the base's counters, so the trainer sees the outer bytes too
    group: object  # the outer messages' own process group (None with one rank)
    rank: int
    world_size: int
    tau: int
    fragments: int
    delay: int  # slowmo.overlap_steps
    wire_dtype: torch.dtype | None
    sharded: bool

    def gammas(self) -> list[float]:
        return group_lrs(self.base.optimizer, self.groups)


@dataclass
class OuterMessage:
    """One fragment's outer all-reduce, from the step that posts it to the step that applies it.

    ``payload`` holds this rank's ``w x0 - num`` (the outer pseudo-gradient, weight 1 for
    non-push-sum bases) in the wire dtype until the all-reduce completes, then the sum over ranks.
    Sharded (float32 only): the payload is this rank's numerators ``num``, then their sum; once
    ``resolved`` (this rank's slice of x0 and u updated, the new x0 all-gathered) it is the new x0
    of the whole fragment, and ``consensus`` the distance measured then."""

    fragment: int
    send_step: int
    payload: torch.Tensor
    #: the summed push-sum weight (1 element, float64), None for bases without push-sum
    weight: torch.Tensor | None
    #: this rank's (de-biased) fragment values when the message was posted
    theta_send: torch.Tensor
    #: the lr of every slow group at the send step (the gamma of the outer update)
    gammas: list[float]
    resolved: bool = False
    #: this rank's distance to the average, measured when resolved (a device scalar)
    consensus: torch.Tensor | None = None
    works: list = field(default_factory=list)
    #: sharded: every rank's padded slice of the new x0 while the all-gather is in flight
    gathered: list | None = None
    #: when the collective was posted (CommStats.mark: a host time or a CUDA event)
    posted_at: object = None

    def state(self) -> dict:
        return {
            "fragment": self.fragment,
            "send_step": self.send_step,
            "payload": self.payload.clone(),
            "weight": None if self.weight is None else self.weight.clone(),
            "theta_send": self.theta_send.clone(),
            "gammas": list(self.gammas),
            "resolved": self.resolved,
            "consensus": None if self.consensus is None else self.consensus.clone(),
        }

    @classmethod
    def from_state(cls, state: dict, device, posted_at=None) -> OuterMessage:
        weight, consensus = state["weight"], state.get("consensus")
        if consensus is not None:
            consensus = torch.as_tensor(consensus, dtype=torch.float64).to(device)
        return cls(
            int(state["fragment"]),
            int(state["send_step"]),
            state["payload"].to(device),
            None if weight is None else weight.to(device),
            state["theta_send"].to(device),
            [float(g) for g in state["gammas"]],
            bool(state.get("resolved", False)),
            consensus,
            posted_at=posted_at,
        )


@dataclass
class ExactAverage:
    """The whole model's exact average, taken by :meth:`WholeModelSync.post` and applied in the same
    step (so it is never in flight at a checkpoint)."""

    send_step: int
    average: list[torch.Tensor]
    gammas: list[float]
    consensus: torch.Tensor
    fragment: int = 0
    resolved: bool = True


def gather_slices(setup: OuterSetup, part: torch.Tensor, size: int, async_op: bool):
    """All-gather every rank's slice of a new x0, each padded to ``size``; returns the padded
    slices and the work (None when blocking or with one rank)."""
    padded = part.new_zeros(size)
    padded[: part.numel()].copy_(part)
    if setup.world_size == 1:
        return [padded], None
    gathered = [torch.empty_like(padded) for _ in range(setup.world_size)]
    moved = (setup.world_size - 1) * padded.numel() * padded.element_size()
    setup.stats.add_bytes(moved, moved, setup.world_size - 1)  # a ring all-gather
    if async_op:
        return gathered, comm.all_gather(gathered, padded, setup.group, async_op=True)
    with setup.stats.blocking():
        comm.all_gather(gathered, padded, setup.group)
    return gathered, None


class WholeModelSync:
    """Alg. 1, lines 6-9: at the end of every outer iteration the whole model is averaged exactly by
    one blocking all-reduce (in-flight gossip flushed first, push-sum averages as
    ``sum num_i / sum w_i``), x0 and u take one outer step per param group, and every rank restarts
    from x0 with push-sum weight 1.

    Sharded, this rank keeps the :func:`rank_slice` of every param group's flat vector and the new
    x0 is all-gathered (blocking). The average stays a full all-reduce, not a reduce-scatter: the
    consensus distance needs the whole average on every rank (and Gloo has no reduce-scatter)."""

    fragment = 0

    def __init__(self, setup: OuterSetup, params: list[torch.Tensor]):
        self.setup = setup
        self.x0 = [flat_group(params, g)[g.start : g.stop].clone() for g in setup.groups]
        self.u = [torch.zeros_like(x) for x in self.x0]

    def layout(self) -> list[tuple]:
        return [(g.numel, g.start, g.stop) for g in self.setup.groups]

    def due(self, step: int) -> bool:
        return (step + 1) % self.setup.tau == 0

    def resolve_due(self, message: ExactAverage, step: int) -> bool:
        return False

    def post(self, step: int) -> ExactAverage:
        base = self.setup.base
        x_avg = exact_average(base, stats=self.setup.stats, group=self.setup.group)
        numerators, weight = base.mixing_state()
        local = [n / weight if weight is not None else n for n in numerators]
        return ExactAverage(step, x_avg, self.setup.gammas(), local_distance(local, x_avg))

    def complete(self, message: ExactAverage) -> None:
        pass

    def merge(self, message: ExactAverage) -> None:
        x_avg, new_params = message.average, [None] * len(message.average)
        for group, x0, u, gamma in zip(self.setup.groups, self.x0, self.u, message.gammas):
            self.setup.outer.step_towards(x0, u, flat_group(x_avg, group)[group.start : group.stop], gamma)
            if self.setup.sharded:
                gathered, _ = gather_slices(self.setup, x0, group.shard_size, async_op=False)
                full = torch.cat(gathered)[: group.numel]
            else:
                full = x0.clone()  # the base loads these values and must not alias the slow state
            offset = 0
            for i in group.indices:
                n = x_avg[i].numel()
                new_params[i] = full[offset : offset + n].view_as(x_avg[i])
                offset += n
        self.setup.base.load_consensus(new_params)


@dataclass
class Slab:
    """A contiguous range ``[lo, hi)`` of a fragment's flat vector whose slow state this rank keeps
    and updates in one call (views into the slow-state storage), in slow group ``group``."""

    x0: torch.Tensor
    u: torch.Tensor
    lo: int
    hi: int
    group: int


class FragmentSync:
    """One fragment, synchronised after the steps where :func:`fragment_due` holds.

    Unsharded, the message is ``w_i x0 - num_i`` (cast to the wire dtype: the 16-bit rounding falls
    on the small progress, not on the weights) and the fragment's x0 / u are views into per-group
    vectors. Sharded (float32 only), no rank holds the fragment's whole x0, so it sends ``num_i``,
    updates its :func:`rank_slice` of the fragment once the all-reduce is in (``ceil(D / 2)`` steps
    after the post) and all-gathers the new x0 (waited for at the merge, D steps after the post).

    The merge is Streaming DiLoCo's (arXiv:2501.18512, Sec. 2.2, without its mixing factor):
    ``theta <- x0_new + (theta_now - theta_at_send)``. A push-sum base keeps its weight: its gossip
    is flushed and the fragment's numerators become ``value * w`` (base.write_slices)."""

    def __init__(
        self,
        setup: OuterSetup,
        fragment: int,
        pieces: list[Piece],
        params: list[torch.Tensor],
        group_x0: list[torch.Tensor],
        group_u: list[torch.Tensor],
    ):
        self.setup, self.fragment, self.pieces = setup, fragment, pieces
        lengths = [p.stop - p.start for p in pieces]
        #: where each piece starts in the fragment's flat vector
        self.starts = list(itertools.accumulate(lengths[:-1], initial=0))
        self.size = sum(lengths)
        if not setup.sharded:  # every piece, as a view into its param group's x0 / u
            self.part = slice(0, self.size)
            self.slabs = [
                Slab(
                    group_x0[p.group][p.offset : p.offset + n],
                    group_u[p.group][p.offset : p.offset + n],
                    start,
                    start + n,
                    p.group,
                )
                for p, start, n in zip(pieces, self.starts, lengths)
            ]
            return
        self.part = rank_slice(self.size, setup.rank, setup.world_size)
        self.x0 = self.values(params)[self.part].clone()
        self.u = torch.zeros_like(self.x0)
        self.slabs, at = [], 0
        for o in owned_ranges(pieces, setup.world_size)[setup.rank]:
            n, lo = o.hi - o.lo, self.starts[o.piece] + o.lo
            self.slabs.append(Slab(self.x0[at : at + n], self.u[at : at + n], lo, lo + n, pieces[o.piece].group))
            at += n

    def values(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One tensor per parameter -> the fragment's flat vector."""
        return torch.cat([tensors[p.param].reshape(-1)[p.start : p.stop] for p in self.pieces])

    def layout(self) -> tuple:
        return ("fragment", self.size, self.part.start, self.part.stop)

    def due(self, step: int) -> bool:
        return fragment_due(step, self.fragment, self.setup.tau, self.setup.fragments)

    def resolve_due(self, message: OuterMessage, step: int) -> bool:
        # sharded: the all-reduce gets the larger share of the D steps, the all-gather the rest;
        # unsharded: the outer step waits for the merge, so the all-reduce has all D steps
        lead = (self.setup.delay + 1) // 2
        return self.setup.sharded and not message.resolved and message.send_step + lead <= step

    def post(self, step: int) -> OuterMessage:
        """Post the all-reduce of this rank's message (and of its push-sum weight, in float64)."""
        s = self.setup
        s.base.flush()
        numerators, weight = s.base.mixing_state()
        nums = self.values(numerators)
        theta = nums.clone() if weight is None else nums / weight
        if s.sharded:
            payload = nums
        else:
            x0 = torch.cat([slab.x0 for slab in self.slabs])
            delta = x0 - nums if weight is None else x0 * weight - nums
            payload = delta.to(s.wire_dtype) if s.wire_dtype is not None else delta
        total_weight = None if weight is None else weight.detach().reshape(1).to(torch.float64).clone()
        message = OuterMessage(self.fragment, step, payload, total_weight, theta, s.gammas())
        if s.world_size > 1:
            s.stats.add_allreduce(payload.numel() * payload.element_size(), s.world_size)
            message.works.append(comm.all_reduce(payload, s.group, async_op=True))
            if total_weight is not None:
                s.stats.add_allreduce(8, s.world_size)
                message.works.append(comm.all_reduce(total_weight, s.group, async_op=True))
        message.posted_at = s.stats.mark()
        return message

    def complete(self, message: OuterMessage) -> None:
        """Wait for the message's collective: time in flight is overlapped, the wait blocking. An
        all-gathered new x0 is then put together."""
        if message.works:
            self.setup.stats.wait(message.works, message.posted_at, overlapped=self.setup.delay > 0)
            message.works = []
        if message.gathered is not None:  # rank r's slice is [r c, (r + 1) c) of the fragment
            message.payload = torch.cat(message.gathered)[: message.theta_send.numel()]
            message.gathered = None

    def _divisor(self, message: OuterMessage, dtype: torch.dtype):
        return float(self.setup.world_size) if message.weight is None else message.weight.to(dtype)

    def resolve(self, message: OuterMessage) -> None:
        """The outer step of this rank's slabs from the summed payload; afterwards the payload is (or,
        sharded, is being all-gathered into) the fragment's new x0."""
        self.complete(message)
        if self.setup.sharded:  # the summed numerators
            average = message.payload / self._divisor(message, message.payload.dtype)
            d = None
        else:  # the summed w x0 - num
            dtype = self.slabs[0].x0.dtype
            d = message.payload.to(dtype) / self._divisor(message, dtype)
            average = torch.cat([slab.x0 for slab in self.slabs]) - d
        message.consensus = local_distance([message.theta_send], [average])
        for slab in self.slabs:
            avg, gamma = average[slab.lo : slab.hi], message.gammas[slab.group]
            if d is None:
                self.setup.outer.step_towards(slab.x0, slab.u, avg, gamma)
            else:
                self.setup.outer.step(slab.x0, slab.u, d[slab.lo : slab.hi], gamma, avg)
        message.resolved = True
        if not self.setup.sharded:
            message.payload = torch.cat([slab.x0 for slab in self.slabs])
            return
        size = -(-self.size // self.setup.world_size)
        message.gathered, work = gather_slices(self.setup, self.x0, size, async_op=True)
        if work is not None:
            message.works.append(work)
            message.posted_at = self.setup.stats.mark()

    def merge(self, message: OuterMessage) -> None:
        """Write the fragment's new values into the base, keeping the local progress made since the
        post (D > 0)."""
        s = self.setup
        self.complete(message)
        push_sum = s.base.mixing_state()[1] is not None
        if push_sum:
            s.base.flush()  # all gossip mass back at the workers before a slice of it is replaced
        if not message.resolved:
            self.resolve(message)
        self.complete(message)
        x0_new = message.payload
        params = [q.data for q in s.base.parameters()]
        new_values = []
        for p, start in zip(self.pieces, self.starts):
            n = p.stop - p.start
            value = x0_new[start : start + n].clone()
            if s.delay > 0:
                now = params[p.param].reshape(-1)[p.start : p.stop]
                value.add_(now - message.theta_send[start : start + n])
            new_values.append(value)
        if push_sum and s.fragments == 1 and s.delay == 0:
            # the whole model at consensus, as Alg. 1: every rank restarts with push-sum weight 1
            full = [None] * len(params)
            for p, v in zip(self.pieces, new_values):
                full[p.param] = v.view_as(params[p.param])
            s.base.load_consensus(full)
            return
        s.base.write_slices([(p.param, p.start, p.stop, v) for p, v in zip(self.pieces, new_values)])


def build_units(setup: OuterSetup, params: list[torch.Tensor], streamed: bool):
    """The units of one SlowMo and the slow state they keep, in the checkpoint's form: ``x0`` and
    ``u`` (lists of flat tensors) and ``layout`` (what each holds, checked on resume)."""
    if not streamed:
        unit = WholeModelSync(setup, params)
        return [unit], unit.x0, unit.u, unit.layout()
    pieces = build_fragments([p.numel() for p in params], [g.indices for g in setup.groups], setup.fragments)
    if setup.sharded:
        units = [FragmentSync(setup, f, pieces[f], params, [], []) for f in range(setup.fragments)]
        return units, [unit.x0 for unit in units], [unit.u for unit in units], [unit.layout() for unit in units]
    # unsharded: x0 / u per param group (the checkpoint's layout), each fragment a view of its pieces
    x0 = [flat_group(params, g).clone() for g in setup.groups]
    u = [torch.zeros_like(x) for x in x0]
    units = [FragmentSync(setup, f, pieces[f], params, x0, u) for f in range(setup.fragments)]
    return units, x0, u, [(g.numel, g.start, g.stop) for g in setup.groups]
