"""Process-group setup: the only module that reads RANK / LOCAL_RANK / WORLD_SIZE.

A worker learns who it is from the torchrun (torch.distributed.elastic) environment, or runs as a
single process when that environment is absent. ``Topology`` then describes the node hierarchy the
algorithms use: with several processes per node, gradients are all-reduced inside the node every
step and only one "leader" process per node gossips or averages with the other nodes, as on the
DGX-1 nodes of the SlowMo paper (Wang et al., ICLR 2020, Sec. 5).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistEnv:
    """What torchrun told this process (or a single-process default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    under_launcher: bool = False

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def read_env() -> DistEnv:
    """Read the launcher's environment variables; a plain process is rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    world = int(os.environ["WORLD_SIZE"])
    return DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        under_launcher=True,
    )


def pick_backend(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(env: DistEnv, backend: str) -> torch.device:
    """One device per local rank: cuda:LOCAL_RANK with NCCL, else the CPU."""
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(env: DistEnv, backend: str, timeout_s: float = 1800.0) -> None:
    """Join the default process group. A single process gets a private in-memory group so that
    every algorithm can use the same collectives at world size 1."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.under_launcher and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The elastic agent's store outlives a restart (torchrun --max-restarts, launcher.max_restarts):
        # without a per-attempt prefix, restarted workers can read the dead workers' Gloo addresses.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                                    is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"slowmo-train/attempt{attempt}", agent_store)
        dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    elif env.under_launcher:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def set_cpu_threads(env: DistEnv, threads: int | None) -> int:
    """Give each local worker its share of the cores so that workers do not oversubscribe them."""
    if threads is None or threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, env.local_world_size))
    torch.set_num_threads(threads)
    return threads


@dataclass
class Topology:
    """Ranks grouped into nodes of ``procs_per_node`` consecutive ranks.

    ``workers`` is the number of gossip/averaging workers (one per node). ``node_group`` contains the
    ranks of this node (None when every process is its own node); ``leader_group`` contains one rank
    per node (the one with ``local_index == 0``) and is None on non-leaders.
    """

    rank: int
    world_size: int
    procs_per_node: int
    node_group: dist.ProcessGroup | None = field(default=None, repr=False)
    leader_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def workers(self) -> int:
        return self.world_size // self.procs_per_node

    @property
    def node_index(self) -> int:
        return self.rank // self.procs_per_node

    @property
    def local_index(self) -> int:
        return self.rank % self.procs_per_node

    @property
    def is_leader(self) -> bool:
        return self.local_index == 0

    @property
    def hierarchical(self) -> bool:
        return self.procs_per_node > 1

    def leader_rank(self, node: int) -> int:
        """Global rank of the leader of ``node``."""
        return node * self.procs_per_node

    @property
    def node_leader_rank(self) -> int:
        return self.leader_rank(self.node_index)


def resolve_procs_per_node(requested: int | None, env: DistEnv) -> int:
    """The hierarchy in one visible place: an explicit ``algorithm.nprocs_per_node`` wins; otherwise
    the launcher's LOCAL_WORLD_SIZE when there are several nodes, and 1 (every process is a worker)
    on a single machine, where a one-node hierarchy would leave nothing to gossip with."""
    if requested is not None:
        return requested
    return env.local_world_size if env.nnodes > 1 else 1


def build_topology(procs_per_node: int, rank: int | None = None, world_size: int | None = None) -> Topology:
    """Create the node and leader process groups. Collective: every rank must call it."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if procs_per_node < 1 or world_size % procs_per_node != 0:
        raise ValueError(
            f"algorithm.nprocs_per_node must be >= 1 and divide the world size {world_size}, got {procs_per_node}"
        )
    topo = Topology(rank=rank, world_size=world_size, procs_per_node=procs_per_node)
    if procs_per_node == 1:
        topo.leader_group = dist.group.WORLD
        return topo
    node_ranks = [list(range(n * procs_per_node, (n + 1) * procs_per_node)) for n in range(topo.workers)]
    topo.node_group, _ = dist.new_subgroups_by_enumeration(node_ranks)
    leaders = [topo.leader_rank(n) for n in range(topo.workers)]
    leader_group = dist.new_group(leaders)
    topo.leader_group = leader_group if topo.is_leader else None
    return topo


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (e.g. the run directory)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
