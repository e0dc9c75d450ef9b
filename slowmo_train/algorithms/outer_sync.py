"""The pieces of streamed / overlapped SlowMo (see slowmo_train/algorithms/slowmo.py): how the
parameters are cut into fragments, when each fragment is synchronised, and the outer message of one
fragment while its all-reduce is in flight.

    .venv/bin/python -m pytest -q tests/test_slowmo_streaming.py

Fragments follow Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping
communication", 2025, arXiv:2501.18512): F contiguous pieces of the model, in layer order,
synchronised in turn so that the peak outer bandwidth falls by F.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

WIRE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that lies in one fragment."""

    param: int    # index into ``base.parameters()``
    start: int    # range in the parameter's flattened (logical) order
    stop: int
    group: int    # index into SlowMo's slow groups (its x0 / u vectors)
    offset: int   # where ``start`` sits in that group's flat vector


def fragment_bounds(numel: int, fragments: int) -> list[int]:
    """Fragment f is ``[bounds[f], bounds[f+1])`` of the flattened parameter vector (parameters in
    ``model.parameters()`` order, i.e. layer order). Cutting at elements rather than at whole
    tensors keeps the sizes equal to within one element, so no outer step is larger than needed;
    a tensor may thus straddle two fragments."""
    return [f * numel // fragments for f in range(fragments + 1)]


def build_fragments(sizes: list[int], group_indices: list[tuple[int, ...]], fragments: int) -> list[list[Piece]]:
    """The pieces of every fragment. ``sizes[i]`` is parameter i's numel; ``group_indices[g]`` lists
    the parameters of slow group g in the order of its flat vector."""
    where = {}
    for g, indices in enumerate(group_indices):
        offset = 0
        for i in indices:
            where[i] = (g, offset)
            offset += sizes[i]
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += n
    bounds = fragment_bounds(total, fragments)
    out = []
    for f in range(fragments):
        lo, hi = bounds[f], bounds[f + 1]
        pieces = []
        for i, (s, n) in enumerate(zip(starts, sizes)):
            a, b = max(lo, s), min(hi, s + n)
            if a < b:
                g, offset = where[i]
                pieces.append(Piece(i, a - s, b - s, g, offset + a - s))
        out.append(pieces)
    return out


@dataclass(frozen=True)
class OwnedRange:
    """A part of one piece of a fragment whose slow state (x0, u) one rank keeps when sharded."""

    piece: int    # index into the fragment's pieces
    lo: int       # range within the piece, 0 <= lo < hi <= piece.stop - piece.start
    hi: int


def owned_ranges(pieces: list[Piece], world_size: int) -> list[list[OwnedRange]]:
    """For every rank, the parts of a fragment's pieces whose slow state it keeps when sharded by
    fragment: rank r owns ``[r c, (r + 1) c)`` of the fragment's flat vector (``c = ceil(len / n)``),
    so every rank contributes an equal share to the all-gather of the new x0."""
    total = sum(p.stop - p.start for p in pieces)
    size = -(-total // world_size)
    out: list[list[OwnedRange]] = [[] for _ in range(world_size)]
    start = 0
    for i, p in enumerate(pieces):
        stop = start + p.stop - p.start
        for r in range(world_size):
            a, b = max(start, r * size), min(stop, (r + 1) * size)
            if a < b:
                out[r].append(OwnedRange(i, a - start, b - start))
        start = stop
    return out


def fragment_due(step: int, fragment: int, tau: int, fragments: int) -> bool:
    """Fragment f is sent after inner step k when ``(k + 1 + f tau / F) % tau == 0``: fragment 0 at
    the end of every outer iteration (as in Alg. 1), the others staggered by tau / F steps."""
    return (step + 1 + fragment * (tau // fragments)) % tau == 0


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
    consensus: float | None = None
    works: list = field(default_factory=list)
    #: sharded: every rank's padded slice of the new x0 while the all-gather is in flight
    gathered: list | None = None
    posted_at: float = field(default_factory=time.perf_counter)

    def state(self) -> dict:
        return {"fragment": self.fragment, "send_step": self.send_step, "payload": self.payload.clone(),
                "weight": None if self.weight is None else self.weight.clone(),
                "theta_send": self.theta_send.clone(), "gammas": list(self.gammas),
                "resolved": self.resolved, "consensus": self.consensus}

    @classmethod
    def from_state(cls, state: dict, device) -> "OuterMessage":
        weight, consensus = state["weight"], state.get("consensus")
        return cls(int(state["fragment"]), int(state["send_step"]), state["payload"].to(device),
                   None if weight is None else weight.to(device), state["theta_send"].to(device),
                   [float(g) for g in state["gammas"]], bool(state.get("resolved", False)),
                   None if consensus is None else float(consensus))
