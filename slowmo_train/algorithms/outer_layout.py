"""Where SlowMo's slow state lives: the parameters grouped by optimizer param group (each its own
``gamma``), cut into fragments (Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512), and the
slice of each that a rank keeps when the slow state is sharded. Pure bookkeeping, no communication.

    .venv/bin/python -m pytest -q tests/test_slowmo.py tests/test_slowmo_streaming.py -k "shard or fragment"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ceil_div(n: int, k: int) -> int:
    return -(-n // k)


def rank_slice(numel: int, rank: int, world_size: int) -> slice:
    """Rank ``r`` of ``n`` keeps ``[r c, (r + 1) c)`` with ``c = ceil(numel / n)`` (clipped): every rank
    contributes the same padded share ``c`` to the all-gather of the new x0."""
    c = ceil_div(numel, world_size)
    return slice(min(rank * c, numel), min((rank + 1) * c, numel))


# --- param groups ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlowGroup:
    """The parameters of one optimizer param group, laid out as one flat vector of ``numel``
    entries, of which this rank keeps ``[start, stop)`` (everything when unsharded)."""

    indices: tuple[int, ...]  # positions in ``base.parameters()``
    optimizer_group: int | None  # index into ``optimizer.param_groups``; None: frozen parameters
    numel: int
    start: int
    stop: int
    shard_size: int  # padded length every rank contributes to the all-gather


def build_slow_groups(
    params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, rank: int, world_size: int, sharded: bool
) -> list[SlowGroup]:
    """Group the parameters by optimizer param group and, when ``sharded``, give this rank its
    :func:`rank_slice` of each group's flat vector."""
    group_of = {}  # by identity of the Parameter objects the optimizer holds (not their .data)
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = g
    members: dict[int | None, list[int]] = {}
    for i, p in enumerate(params):
        if p.requires_grad and id(p) not in group_of:
            # A trained parameter the optimizer does not know would have no gamma; most likely the
            # optimizer was built on other Parameter objects than the model's.
            raise ValueError(
                f"parameter {i} of shape {tuple(p.shape)} requires grad but is in no optimizer "
                "param group; build the optimizer on the model's parameters before SlowMo"
            )
        members.setdefault(group_of.get(id(p)), []).append(i)
    groups = []
    for g, indices in members.items():
        kinds = {(params[i].dtype, params[i].device) for i in indices}
        if len(kinds) != 1:
            raise ValueError(
                f"SlowMo needs the parameters of one optimizer param group to share dtype and device, "
                f"param group {g} has {sorted(map(str, kinds))}"
            )
        numel = sum(params[i].numel() for i in indices)
        if sharded:
            size, part = ceil_div(numel, world_size), rank_slice(numel, rank, world_size)
            start, stop = part.start, part.stop
        else:
            size, start, stop = numel, 0, numel
        groups.append(SlowGroup(tuple(indices), g, numel, start, stop, size))
    return groups


def flat_group(tensors: list[torch.Tensor], group: SlowGroup) -> torch.Tensor:
    """One tensor per parameter -> the group's flat vector."""
    return torch.cat([tensors[i].reshape(-1) for i in group.indices])


def group_lrs(optimizer: torch.optim.Optimizer, groups: list[SlowGroup]) -> list[float]:
    """Every slow group's ``gamma``: the lr its param group uses now (0 for frozen parameters, which
    the outer step then sets to the average as is)."""
    return [
        0.0 if g.optimizer_group is None else float(optimizer.param_groups[g.optimizer_group]["lr"]) for g in groups
    ]


# --- fragments -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """The part of one parameter that lies in one fragment."""

    param: int  # index into ``base.parameters()``
    start: int  # range in the parameter's flattened (logical) order
    stop: int
    group: int  # index into the slow groups
    offset: int  # where ``start`` sits in that group's flat vector


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


def fragment_due(step: int, fragment: int, tau: int, fragments: int) -> bool:
    """Fragment f is sent after inner step k when ``(k + 1 + f tau / F) % tau == 0``: fragment 0 at
    the end of every outer iteration (as in Alg. 1), the others staggered by tau / F steps, so each
    parameter is still averaged once every tau steps."""
    return (step + 1 + fragment * (tau // fragments)) % tau == 0


@dataclass(frozen=True)
class OwnedRange:
    """A part of one piece of a fragment whose slow state (x0, u) one rank keeps when sharded."""

    piece: int  # index into the fragment's pieces
    lo: int  # range within the piece, 0 <= lo < hi <= piece.stop - piece.start
    hi: int


def owned_ranges(pieces: list[Piece], world_size: int) -> list[list[OwnedRange]]:
    """For every rank, the parts of a fragment's pieces that fall in its :func:`rank_slice` of the
    fragment's flat vector."""
    total = sum(p.stop - p.start for p in pieces)
    size = ceil_div(total, world_size)
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
