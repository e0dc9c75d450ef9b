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

from slowmo_train import control
from slowmo_train.faults import RunError
from slowmo_train.simulated import world as simulated

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
    """Read the launcher's environment variables; a plain process is rank 0 of 1. A rank of the
    simulated cluster (slowmo_train/simulated) is its own node of one process, on the one device."""
    if (sim := simulated.world()) is not None and (rank := simulated.current_rank()) is not None:
        return DistEnv(rank=rank, world_size=sim.size, local_rank=0, local_world_size=1, under_launcher=True)
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


class DeviceError(RunError):
    """The processes and the GPUs of a node do not match; ``str()`` is one line."""


def device_for(env: DistEnv, backend: str) -> torch.device:
    """One device per local rank: cuda:LOCAL_RANK with NCCL, else the CPU. Two local ranks never
    share a GPU: NCCL would deadlock or fail in its first collective, long after start-up."""
    if backend != "nccl":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(
            "launcher.backend=nccl needs CUDA GPUs and this machine has none: use launcher.backend=gloo (or auto)"
        )
    if env.local_world_size > count:
        raise DeviceError(
            f"{env.local_world_size} processes on this node but {count} GPU(s): local ranks "
            f"{count} and 0 would share cuda:0; start at most {count} per node "
            "(torchrun --nproc_per_node, launcher.nproc_per_node) or use launcher.backend=gloo"
        )
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def default_group_backend(backend: str) -> str:
    """The default group's backend: under NCCL it also gets gloo for CPU tensors, so that a stray
    host collective (a bug: host values belong on the control plane) cannot crash a run."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def init_process_group(
    env: DistEnv, backend: str, timeout_s: float = 1800.0, device: torch.device | None = None
) -> None:
    """Join the default process group and create the control plane's gloo group
    (slowmo_train/control.py). A single process gets a private in-memory group so that every
    algorithm can use the same collectives at world size 1."""
    global _timeout
    if dist.is_initialized() or simulated.world() is not None:  # the simulated launcher installed its groups
        return
    timeout = _timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"backend": default_group_backend(backend), "timeout": timeout}
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device  # NCCL binds its communicator to this GPU at once
    if env.under_launcher and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The elastic agent's store outlives a restart (torchrun --max-restarts, launcher.max_restarts):
        # without a per-attempt prefix, restarted workers can read the dead workers' Gloo addresses.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"slowmo-train/attempt{attempt}", agent_store)
        dist.init_process_group(store=store, rank=env.rank, world_size=env.world_size, **kwargs)
    elif env.under_launcher:
        dist.init_process_group(**kwargs)
    else:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    init_control_plane(timeout_s)


def init_control_plane(timeout_s: float = 1800.0) -> None:
    """Give the control plane a gloo group over all ranks (collective; none at world size 1).
    A group of its own, even under gloo, so that a host message never waits behind training traffic."""
    group = None
    if dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    control.set_group(group)


# --- the training process groups (the data plane's; slowmo_train/algorithms/comm.py) ------------------
_training_world: dist.ProcessGroup | None = None
_training_backend: str | None = None
#: every group's timeout (launcher.timeout_s): a hung peer must fail any collective, not only the default group's
_timeout: datetime.timedelta | None = None


def set_training_world(group: dist.ProcessGroup | None, backend: str | None = None) -> None:
    """Use ``group`` instead of the default group for the training traffic over all ranks, and
    ``backend`` for the training groups created later (node, leader, gossip, outer groups). Tests
    use it to run real training on gloo groups while the default group accepts no CPU tensor, so
    that any host value sent on the default group fails as it would under NCCL."""
    global _training_world, _training_backend
    _training_world, _training_backend = group, backend


def training_world() -> dist.ProcessGroup:
    """The process group of all ranks that carries device tensors (the default group)."""
    return _training_world if _training_world is not None else dist.group.WORLD


def new_training_group(ranks: list[int] | None = None) -> dist.ProcessGroup:
    """A training process group over ``ranks`` (all ranks when None). Collective over ALL ranks,
    members or not, in the same order on every rank. Work that must overlap other traffic (gossip,
    SlowMo's outer messages) gets a group of its own: NCCL runs one group's collectives in order
    on one stream, so traffic sharing a group queues behind DDP's gradient buckets."""
    if (sim := simulated.world()) is not None:
        return sim.new_group(ranks)
    return dist.new_group(ranks, backend=_training_backend, timeout=_timeout)


def destroy_process_group() -> None:
    if simulated.world() is not None:  # the simulated launcher removes its groups after the last rank
        return
    control.set_group(None)
    set_training_world(None)
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
    rank = control.rank() if rank is None else rank
    world_size = control.world_size() if world_size is None else world_size
    if procs_per_node < 1 or world_size % procs_per_node != 0:
        raise ValueError(
            f"algorithm.nprocs_per_node must be >= 1 and divide the world size {world_size}, got {procs_per_node}"
        )
    topo = Topology(rank=rank, world_size=world_size, procs_per_node=procs_per_node)
    if procs_per_node == 1:
        topo.leader_group = training_world()
        return topo
    node_ranks = [list(range(n * procs_per_node, (n + 1) * procs_per_node)) for n in range(topo.workers)]
    if simulated.world() is not None:
        topo.node_group = [new_training_group(ranks) for ranks in node_ranks][topo.node_index]
    else:
        topo.node_group, _ = dist.new_subgroups_by_enumeration(node_ranks, backend=_training_backend, timeout=_timeout)
    leaders = [topo.leader_rank(n) for n in range(topo.workers)]
    leader_group = new_training_group(leaders)
    topo.leader_group = leader_group if topo.is_leader else None
    return topo
