"""Push-sum gossip: Stochastic Gradient Push (SGP) and its overlapping variant (OSGP).

Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient Push for Distributed Deep Learning", ICML 2019
(Alg. 1 for SGP, Sec. 4 / App. for the overlap variant), built on push-sum averaging (Kempe, Dobra,
Gehrke, FOCS 2003).

Worker i holds numerators ``x_i`` (all parameters in one flat tensor) and a weight ``w_i``; the
model's parameters always hold the de-biased value ``z_i = x_i / w_i``. At step k, after the
optimizer moved the parameters from ``z`` to ``z'``::

    x_i <- x_i + (z' - z)                                    # = x_i - gamma * grad f_i(z_i) for SGD
    (x_i, w_i) <- (x_i, w_i) / (p + 1)                       # keep one share, send one to each peer
    (x_i, w_i) <- (x_i, w_i) + sum of messages sent at step k - s, ascending sender order
    z_i <- x_i / w_i

SGP uses s = 0 (blocking exchange); OSGP uses s = ``algorithm.synch_freq`` >= 1: messages are posted
non-blockingly at step k and waited on and added at step k + s, so communication overlaps the next
s forward/backward passes, staleness is bounded by s, and the result is deterministic.

Node hierarchy: with ``procs_per_node`` > 1, gradients are averaged inside the node every step (DDP
on the node group, during the backward pass), only the node's leader gossips with the other
leaders, then broadcasts its (x, w) to the node.

Gossip travels on a process group of its own (the leaders): NCCL runs the collectives of one group
in order on one stream, so OSGP's in-flight messages would otherwise queue behind and in front of
other training traffic and lose their overlap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from slowmo_train.algorithms import comm
from slowmo_train.algorithms.allreduce import node_data_parallel
from slowmo_train.algorithms.base import Algorithm, local_distance
from slowmo_train.algorithms.comm import FlatParameters
from slowmo_train.algorithms.graphs import build_graph
from slowmo_train.config import AlgorithmConfig
from slowmo_train.dist import Topology, new_training_group

#: Point-to-point tags cycle with this period; a pair never has more than ``synch_freq + 1``
#: messages in flight, so tags stay unambiguous on backends that match by tag (Gloo).
TAG_PERIOD = 1 << 15


@dataclass
class _StepMessages:
    """The gossip messages of one step: posted at ``post_step``, added at ``post_step + s``."""

    post_step: int
    #: requests still to wait on (empty once completed)
    works: list = field(default_factory=list)
    #: kept alive until the sends complete
    send_buffer: torch.Tensor | None = None
    #: one (x, w) message per in-peer, in ascending sender order
    received: list[torch.Tensor] = field(default_factory=list)
    #: when they were posted (CommStats.mark: a host time or a CUDA event)
    posted_at: object = None


class PushSumGossip(Algorithm):
    """Push-sum gossip with bounded staleness ``s`` (Assran et al., ICML 2019).

    x_i <- (x_i + z_i' - z_i) / (p+1) + sum_{j in in_k-s(i)} m_j,   w_i likewise;   z_i = x_i / w_i
    """

    name = "push_sum"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        topology: Topology,
        cfg: AlgorithmConfig | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(model, optimizer, topology)
        cfg = cfg if cfg is not None else AlgorithmConfig(name=self.name)
        self.staleness = self._staleness(cfg)
        if cfg.consensus_every < 0:
            raise ValueError(f"algorithm.consensus_every must be an integer >= 0, got {cfg.consensus_every}")
        self.consensus_every = cfg.consensus_every
        self.graph = build_graph(cfg.graph, topology.workers, cfg.peers_per_itr)
        self.worker = topology.node_index
        # only leaders exchange messages; their node mates copy the leader's (x, w) afterwards
        self._gossips = topology.is_leader and self.graph.n > 1
        self._mirrors_leader = topology.hierarchical and self.graph.n > 1

        self._params = self.parameters()
        self._buffer = FlatParameters(self._params).buffer
        numel = self._buffer.numel()
        self._slices, offset = [], 0
        for p in self._params:
            self._slices.append((offset, offset + p.numel()))
            offset += p.numel()
        # numerators and weight share one tensor so that each message is a single send
        self._state = torch.empty(numel + 1, dtype=self._buffer.dtype, device=self._buffer.device)
        self._state[:-1].copy_(self._buffer)
        self._state[-1] = 1.0
        self._in_flight: deque[_StepMessages] = deque()
        # True on every rank of a node while its leader may hold un-added OSGP messages, so that
        # flush() knows (without communicating) whether the node must re-mirror the leader
        self._unflushed = False
        self._steps_done = 0
        self.extra_metrics: dict[str, torch.Tensor] = {}
        self._train_model = node_data_parallel(model, topology, self.comm, device)

        self._group = None
        if comm.world_size() > 1 and self.graph.n > 1:
            # created by every rank (a collective), used by the leaders only
            self._group = new_training_group([topology.leader_rank(n) for n in range(topology.workers)])
            if self._gossips:
                # NCCL creates a group's communicator at its first collective, which every member
                # must join: make it a collective rather than the first batch of point-to-point ops
                comm.all_reduce(torch.zeros(1, device=self._buffer.device), self._group)

    @staticmethod
    def _staleness(cfg: AlgorithmConfig) -> int:
        raise NotImplementedError

    # --- push-sum state ----------------------------------------------------------------------
    @property
    def numerators(self) -> torch.Tensor:
        return self._state[:-1]

    @property
    def weight(self) -> torch.Tensor:
        """The push-sum weight as a 1-element tensor (a view into the state)."""
        return self._state[-1:]

    def _param_buffer(self) -> torch.Tensor:
        """The flat tensor the parameters are views of. If another component re-laid the
        parameters out (e.g. its own FlatParameters), follow its buffer rather than fight it."""
        if not self._aliases(self._buffer):
            adopted = _contiguous_view(self._params)
            if adopted is None or not self._aliases(adopted):
                adopted = FlatParameters(self._params).buffer
            self._buffer = adopted
        return self._buffer

    def _aliases(self, buffer: torch.Tensor) -> bool:
        base, size = buffer.data_ptr(), buffer.element_size()
        for p, (start, _) in zip(self._params, self._slices):
            if p.data.data_ptr() != base + start * size or not p.data.is_contiguous():
                return False
        return True

    def _debias(self) -> None:
        torch.div(self.numerators, self.weight, out=self._param_buffer())

    # --- the training step -------------------------------------------------------------------
    @property
    def train_model(self) -> nn.Module:
        return self._train_model

    def after_optimizer_step(
        self, step: int, exact_average_follows: bool = False, outer_sync_follows: bool = False
    ) -> None:
        self._absorb_local_update()
        if exact_average_follows:
            # SlowMo's exact average sum_i x_i / sum_i w_i comes next, and gossip conserves both
            # sums, so this step's exchange would change nothing it keeps: skip it (the average's
            # flush adds whatever OSGP still has in flight)
            self._debias()
            self._steps_done = step + 1
            return
        if self._gossips:
            self._post(step)
            self._add_due(step)
        if self.graph.n > 1 and self.staleness > 0:
            self._unflushed = True
        if self._mirrors_leader:
            self._mirror_leader()
        self._debias()
        self._steps_done = step + 1
        if self.consensus_every > 0 and (step + 1) % self.consensus_every == 0:
            self.extra_metrics["consensus_distance"] = self.local_consensus_distance()

    def _absorb_local_update(self) -> None:
        """x <- x + (z' - z); z = x / w is recomputed with the very division that set the
        parameters, so it is bitwise what they held before the optimizer step."""
        delta = self._param_buffer() - self.numerators / self.weight
        self.numerators.add_(delta)

    def _post(self, step: int) -> None:
        """Keep 1/(p+1) of (x, w) and post the same share to every out-peer; post receives from
        every in-peer. All operations of a step go out as one batch, so no ordering deadlocks."""
        peers = self.graph.out_peers(self.worker, step)
        senders = self.graph.in_peers(self.worker, step)
        self._state.div_(len(peers) + 1)
        # OSGP keeps updating the state while the sends are in flight, so they need their own copy
        send = self._state.clone() if self.staleness > 0 else self._state
        received = [torch.empty_like(send) for _ in senders]
        leader = self.topology.leader_rank
        nbytes = send.numel() * send.element_size()
        self.comm.add_bytes(len(peers) * nbytes, len(senders) * nbytes, len(peers))
        posted = self.comm.mark()
        works = comm.exchange(
            [(send, leader(dst)) for dst in peers],
            [(buf, leader(src)) for src, buf in zip(senders, received)],
            step % TAG_PERIOD,
            self._group,
        )
        # send and receive buffers live in the message until its works are waited for
        self._in_flight.append(_StepMessages(step, works, send, received, posted))

    def _add_due(self, step: int) -> None:
        while self._in_flight and self._in_flight[0].post_step + self.staleness <= step:
            self._add(self._in_flight.popleft())

    def _complete(self, messages: _StepMessages) -> None:
        """Wait for one step's messages: in-flight time is overlapped, waiting time blocking."""
        if not messages.works:
            return
        self.comm.wait(messages.works, messages.posted_at, overlapped=self.staleness > 0)
        messages.works = []
        messages.send_buffer = None

    def _add(self, messages: _StepMessages) -> None:
        self._complete(messages)
        for message in messages.received:
            self._state.add_(message)

    def _drain(self) -> None:
        """Complete all in-flight messages and discard them (their mass is being replaced)."""
        while self._in_flight:
            self._complete(self._in_flight.popleft())
        self._unflushed = False

    def _mirror_leader(self) -> None:
        src = self.topology.node_leader_rank
        nbytes = self._state.numel() * self._state.element_size()
        # counted like a pipelined broadcast: the leader sends one copy, every mate receives one
        if self.topology.is_leader:
            self.comm.add_bytes(nbytes, 0)
        else:
            self.comm.add_bytes(0, nbytes)
        with self.comm.blocking():
            comm.broadcast(self._state, src, self.topology.node_group)

    # --- the averaging view ------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for and add every in-flight message (collective within a node when hierarchical).
        Afterwards the workers' (x, w) hold all the mass: sum_i w_i = n."""
        while self._in_flight:
            self._add(self._in_flight.popleft())
        if self._mirrors_leader and self._unflushed:
            self._mirror_leader()
        self._unflushed = False
        self._debias()

    def mixing_state(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        nums = self.numerators
        return [nums[a:b].view_as(p) for p, (a, b) in zip(self._params, self._slices)], self.weight

    def load_consensus(self, values: list[torch.Tensor]) -> None:
        self._drain()
        with torch.no_grad():
            for (a, b), v in zip(self._slices, values):
                self.numerators[a:b].copy_(v.reshape(-1))
            self.weight.fill_(1.0)
            self._debias()  # x / 1 is x bitwise, so the parameters equal ``values`` exactly

    def write_slices(self, slices: list[tuple[int, int, int, torch.Tensor]]) -> None:
        """Set parts of the de-biased parameters to ``values`` while keeping the weight:
        ``x[slice] = values * w``. Applied after :meth:`flush` (all mass at the workers), this
        replaces the slice's contribution to the network average ``sum_i x_i / sum_i w_i`` by the
        ``w``-weighted mean of the new values and leaves every other parameter's untouched."""
        self.flush()
        with torch.no_grad():
            for index, start, stop, values in slices:
                offset = self._slices[index][0]
                self.numerators[offset + start : offset + stop].copy_(values.reshape(-1) * self.weight)
            self._debias()

    def local_consensus_distance(self) -> torch.Tensor:
        """This rank's ||z_i - mean_j z_j|| as a device scalar (collective: one all-reduce of the
        model; the trainer logs the mean over ranks). A diagnostic: it neither waits for in-flight
        messages nor counts towards CommStats, so it does not change training."""
        params = self._param_buffer()
        average = params.clone()
        world = comm.world_size()
        if world > 1:
            comm.all_reduce(average)
            average.div_(world)
        return local_distance([params], [average])

    # --- lifecycle ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's push-sum state. In-flight OSGP messages are waited for (not added) and saved
        with the step that posted them, so a resumed run adds them at the same step as an
        uninterrupted one and continues bit-exactly. Local to the rank (no collective)."""
        for messages in self._in_flight:
            self._complete(messages)
        return {
            "numerators": self.numerators.clone(),
            "weight": self.weight.clone(),
            "steps_done": self._steps_done,
            "staleness": self.staleness,
            "unflushed": self._unflushed,
            "in_flight": [
                {"post_step": m.post_step, "received": [t.clone() for t in m.received]} for m in self._in_flight
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        numerators = state["numerators"]
        if numerators.numel() != self.numerators.numel():
            raise ValueError(
                f"gossip checkpoint holds {numerators.numel()} numerators, the model has "
                f"{self.numerators.numel()} parameters"
            )
        if state["in_flight"] and state["staleness"] != self.staleness:
            raise ValueError(
                f"algorithm.synch_freq must match the checkpoint's ({state['staleness']}) to "
                f"resume with messages in flight, got {self.staleness}"
            )
        self._drain()
        device = self._state.device
        with torch.no_grad():
            self.numerators.copy_(numerators.to(device))
            self.weight.copy_(state["weight"].reshape(1).to(device))
        self._steps_done = int(state["steps_done"])
        self._unflushed = bool(state["unflushed"])
        now = self.comm.mark()
        self._in_flight = deque(
            _StepMessages(int(m["post_step"]), received=[t.to(device) for t in m["received"]], posted_at=now)
            for m in state["in_flight"]
        )
        self._debias()

    def describe(self) -> str:
        extra = f", synch_freq={self.staleness}" if self.staleness > 0 else ""
        return (
            f"{self.name}(graph={self.graph.name}, peers_per_itr={self.graph.peers_per_itr}, "
            f"workers={self.graph.n}{extra})"
        )


class SGP(PushSumGossip):
    """Stochastic Gradient Push (Assran et al., ICML 2019, Alg. 1): blocking push-sum exchange.

    x_i <- (x_i - gamma g_i(z_i)) / (p+1) + sum_{j -> i at k} m_j;   z_i = x_i / w_i
    """

    name = "sgp"

    @staticmethod
    def _staleness(cfg: AlgorithmConfig) -> int:
        return 0


class OSGP(PushSumGossip):
    """Overlap SGP (Assran et al., ICML 2019, overlap variant): messages posted at step k are added
    at step k + s (s = ``algorithm.synch_freq``), overlapping communication with s steps of compute.

        x_i <- (x_i - gamma g_i(z_i)) / (p+1) + sum_{j -> i at k-s} m_j;   z_i = x_i / w_i
    """

    name = "osgp"

    @staticmethod
    def _staleness(cfg: AlgorithmConfig) -> int:
        if not 1 <= cfg.synch_freq < TAG_PERIOD:
            raise ValueError(
                f"algorithm.synch_freq must be an integer in [1, {TAG_PERIOD}) for OSGP, got {cfg.synch_freq}"
            )
        return cfg.synch_freq


def _contiguous_view(params: list[nn.Parameter]) -> torch.Tensor | None:
    """A flat view over the storage of ``params`` if they lie back to back in it, else None."""
    first = params[0].data
    total = sum(p.numel() for p in params)
    storage = first.untyped_storage()
    if (first.storage_offset() + total) * first.element_size() > storage.nbytes():
        return None
    return first.new_empty(0).set_(storage, first.storage_offset(), (total,), (1,))
