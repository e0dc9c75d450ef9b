"""One process playing N workers: the ranks are greenlets that take turns on the main thread, and
every collective is computed in memory from the members' own tensors.

The ranks run the real worker (``cli.worker_main``: the same Trainer, algorithms, checkpoints and
metrics as a real run), **one at a time**: a rank runs until it waits on a collective that a peer
has not posted yet, then the scheduler hands the turn to the next rank that can go on (round
robin). The order of everything a rank computes is therefore fixed by the program alone, never by
timing. Each rank keeps its own global RNG streams (torch, CUDA, Python, NumPy) and grad mode,
swapped at every hand over, so worker i draws exactly what rank i draws in a real run. Greenlets,
not threads: all ranks share the main thread and so one pool of intra-op threads (one OpenMP team
per OS thread made N teams compete for the cores, 35 % slower on 2 cores), and the main thread
keeps the signal handlers.

Collectives are matched per group by their order, as in torch.distributed: a rank's k-th collective
on a group meets every member's k-th one. The last member to post completes it at once: all-reduce
sums the members' tensors in group-rank order (bit-identical to a real 2-rank all-reduce, whose sum
has two terms; with more ranks a real ring adds in another order), all-gather and broadcast copy,
and point-to-point messages are queues matched in posting order per (source, destination, tag), so
push-sum mixes exactly as the real graph does and OSGP's delayed messages wait in the queue.

The module is installed by :mod:`slowmo_train.simulated.launcher`; the planes
(``control.py``, ``algorithms/comm.py``) and ``dist.py`` dispatch to it when a group is a
:class:`Group`. Time: :meth:`World.clock` is a rank's own clock, advancing only while it holds the
turn, so the communication timers of a rank measure its own work, not its peers' compute.
"""

from __future__ import annotations

import copy
import pickle
import time
from collections import defaultdict, deque
from collections.abc import Callable

import greenlet
import torch

from slowmo_train.faults import PeerError

_world: World | None = None


def world() -> World | None:
    """The simulated cluster this process runs, or None in a real run."""
    return _world


def install(w: World | None) -> None:
    global _world
    _world = w


def shared(key, build):
    """``build()`` in a real run; in a simulated cluster, built once for all ranks (a dataset every
    rank loads alike), each rank getting a shallow copy (World.shared)."""
    return build() if _world is None else _world.shared(key, build)


def current_rank() -> int | None:
    """The rank the running code plays (None outside the simulated ranks, e.g. in a thread)."""
    return None if _world is None else _world.rank_of(greenlet.getcurrent())


class Deadlock(PeerError):
    """No simulated rank can go on: every one waits for a collective no peer will post."""


class Work:
    """A posted operation; :meth:`wait` gives the turn away until it has completed."""

    def __init__(self, world: World, op: _Op):
        self.world, self.op = world, op

    def is_completed(self) -> bool:
        return self.op.done

    def wait(self) -> bool:
        self.world.block(lambda: self.op.done, self.op.kind)
        return True


class _Op:
    def __init__(self, kind: str):
        self.kind, self.parts, self.done, self.result = kind, {}, False, {}


def _roundtrip(obj):
    """What a peer would unpickle: a copy, never the sender's own object."""
    return pickle.loads(pickle.dumps(obj))


class Group:
    """A process group of the simulated cluster over global ``ranks`` (a training group or the
    control plane's). ``backend`` is what the real group would be: "nccl" when the replicas live on
    a GPU, so the data plane rejects host tensors exactly as under NCCL."""

    simulated = True

    def __init__(self, world: World, ranks: list[int], backend: str):
        self.world, self.ranks, self.backend = world, list(ranks), backend
        self._index = {r: i for i, r in enumerate(self.ranks)}
        self._ops: dict[int, _Op] = {}
        self._posted = defaultdict(int)
        self._mail: dict[tuple, deque] = defaultdict(deque)
        self._receivers: dict[tuple, deque] = defaultdict(deque)

    def size(self) -> int:
        return len(self.ranks)

    def rank(self) -> int:
        """This thread's rank in the group."""
        return self._index[self.world.me()]

    def __repr__(self) -> str:
        return f"simulated group {self.ranks}"

    # --- collectives ---------------------------------------------------------------------------------
    def _post(self, kind: str, part, finish) -> Work:
        me = self.world.me()
        if me not in self._index:
            raise RuntimeError(f"rank {me} posted {kind} on {self!r}, which it is not a member of")
        seq = self._posted[me]
        self._posted[me] += 1
        op = self._ops.setdefault(seq, _Op(kind))
        if op.kind != kind:
            raise RuntimeError(f"collective mismatch on {self!r}: rank {me} posted {kind}, a peer {op.kind}")
        op.parts[me] = part
        if len(op.parts) == len(self.ranks):
            finish(op)
            op.done = True
            del self._ops[seq]
        return Work(self.world, op)

    def _finish_reduce(self, reduce: str):
        def finish(op: _Op) -> None:
            tensors = [op.parts[r] for r in self.ranks]
            acc = tensors[0].clone()
            for t in tensors[1:]:
                if reduce == "sum":
                    acc.add_(t)
                elif reduce == "max":
                    torch.maximum(acc, t, out=acc)
                else:
                    torch.minimum(acc, t, out=acc)
            for t in tensors:
                t.copy_(acc)

        return finish

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> Work:
        return self._post("all_reduce", tensor, self._finish_reduce(op))

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        def finish(op: _Op) -> None:
            for r in self.ranks:
                for buf, src in zip(op.parts[r][0], self.ranks):
                    buf.copy_(op.parts[src][1])

        return self._post("all_gather", (out, tensor), finish)

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        def finish(op: _Op) -> None:
            source = op.parts[src]
            for r in self.ranks:
                if r != src:
                    op.parts[r].copy_(source)

        return self._post(f"broadcast from {src}", tensor, finish)

    def barrier(self) -> Work:
        return self._post("barrier", None, lambda op: None)

    def broadcast_object(self, obj, src: int):
        def finish(op: _Op) -> None:
            op.result = {r: _roundtrip(op.parts[src]) for r in self.ranks}

        work = self._post(f"broadcast_object from {src}", obj, finish)
        work.wait()
        return work.op.result[self.world.me()]

    def all_gather_object(self, obj) -> list:
        def finish(op: _Op) -> None:
            op.result = {r: [_roundtrip(op.parts[s]) for s in self.ranks] for r in self.ranks}

        work = self._post("all_gather_object", obj, finish)
        work.wait()
        return work.op.result[self.world.me()]

    # --- point to point: queues matched in posting order --------------------------------------------------
    def exchange(self, sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]], tag: int):
        me = self.world.me()
        works = []
        for buf, src in receives:
            op = _Op("receive")
            self._receivers[(src, me, tag)].append((op, buf))
            works.append(Work(self.world, op))
            self._match((src, me, tag))
        for tensor, dst in sends:
            self._mail[(me, dst, tag)].append(tensor.detach().clone())
            self._match((me, dst, tag))
        return works

    def _match(self, key: tuple) -> None:
        mail, receivers = self._mail[key], self._receivers[key]
        while mail and receivers:
            op, buf = receivers.popleft()
            buf.copy_(mail.popleft())
            op.done = True


class World:
    """N simulated ranks and their turns. ``backend``: what the real cluster's training groups would
    use (nccl: the data plane accepts GPU tensors only)."""

    def __init__(self, size: int, backend: str = "gloo"):
        self.size, self.backend = size, backend
        self.everyone = Group(self, list(range(size)), self.backend)
        self.control = Group(self, list(range(size)), "gloo")
        self.failure: BaseException | None = None
        self.failed_rank: int | None = None
        self.results: dict[int, object] = {}
        self._greenlets: list[greenlet.greenlet] = []
        self._scheduler: greenlet.greenlet | None = None
        self._waiting: list = [None] * size
        self._alive = [True] * size
        self._state: list[dict | None] = [None] * size
        self._clock = [0.0] * size
        self._turn: int | None = None
        self._turn_started = 0.0
        self._groups: list[Group] = []
        self._created = [0] * size
        self._shared: dict = {}
        #: (parameter bytes, floating buffer bytes) of one replica, for the cluster time model
        self.model_bytes: tuple[int, int] | None = None
        self._initial_state = _capture_state()

    # --- who runs ------------------------------------------------------------------------------------
    def rank_of(self, g: greenlet.greenlet) -> int | None:
        turn = self._turn
        return turn if turn is not None and self._greenlets and self._greenlets[turn] is g else None

    def me(self) -> int:
        rank = current_rank()
        if rank is None:
            raise RuntimeError("a simulated collective was called outside the rank that holds the turn")
        return rank

    def run(self, body: Callable[[int], object]) -> None:
        """Run ``body(rank)`` for every rank, taking turns, until all have returned or raised (the
        first exception is ``failure``, raised in every rank still waiting; results: ``results``)."""
        self._scheduler = greenlet.getcurrent()
        self._greenlets = [greenlet.greenlet(lambda r=r: self._rank_main(r, body)) for r in range(self.size)]
        caller = _capture_state()
        rank = self.size - 1
        try:
            while (rank := self._next(rank)) is not None:
                self._resume(rank)
                try:
                    self._greenlets[rank].switch()
                finally:
                    self._suspend(rank)
        finally:
            _restore_state(caller)

    def _rank_main(self, rank: int, body) -> None:
        try:
            self.results[rank] = body(rank)
        except BaseException as err:  # noqa: BLE001 - the first failure is the cluster's
            if self.failure is None:
                self.failure, self.failed_rank = err, rank
        finally:
            self._alive[rank] = False

    def block(self, ready, what: str = "a collective") -> None:
        """Give the turn away until ``ready()``; raises if a peer failed meanwhile."""
        rank = self.me()
        if not ready():
            if torch.is_autocast_enabled("cpu") or (torch.cuda.is_available() and torch.is_autocast_enabled("cuda")):
                raise RuntimeError(f"simulated rank {rank} waited on {what} inside an autocast region")
            self._waiting[rank] = ready
            self._scheduler.switch()
            self._waiting[rank] = None
        if self.failure is not None and not ready():
            if isinstance(self.failure, Deadlock):
                raise self.failure
            raise PeerError(f"rank {self.failed_rank} failed while rank {rank} waited on {what}")

    def _runnable(self, r: int) -> bool:
        if not self._alive[r]:
            return False
        ready = self._waiting[r]
        return ready is None or self.failure is not None or ready()

    def _next(self, rank: int) -> int | None:
        """The next rank after ``rank`` that can go on; None when all have finished. Everyone alive
        waiting on collectives no rank will post is a deadlock: they all get the error."""
        for k in range(1, self.size + 1):
            r = (rank + k) % self.size
            if self._runnable(r):
                return r
        waiting = [r for r in range(self.size) if self._alive[r]]
        if not waiting:
            return None
        self.failure = Deadlock(
            f"the simulated ranks {waiting} all wait on collectives that no rank will post (a bug: "
            "the ranks called different collectives)"
        )
        self.failed_rank = rank
        return waiting[0]

    def _suspend(self, rank: int) -> None:
        self._clock[rank] += time.perf_counter() - self._turn_started
        if self._alive[rank]:
            self._state[rank] = _capture_state()
        self._turn = None

    def _resume(self, rank: int) -> None:
        self._turn = rank
        _restore_state(self._state[rank] if self._state[rank] is not None else self._initial_state)
        self._turn_started = time.perf_counter()

    def clock(self) -> float:
        """Seconds the calling rank has held the turn: its own compute, not its peers'."""
        rank = current_rank()
        if rank is None:
            return time.perf_counter()
        return self._clock[rank] + time.perf_counter() - self._turn_started

    # --- groups ----------------------------------------------------------------------------------------
    def new_group(self, ranks: list[int] | None) -> Group:
        """Every rank's k-th group creation returns the same group (created by the first caller), as
        torch.distributed's new_group, which all ranks call in the same order."""
        rank = self.me()
        k = self._created[rank]
        self._created[rank] += 1
        if k == len(self._groups):
            self._groups.append(Group(self, list(range(self.size)) if ranks is None else ranks, self.backend))
        group = self._groups[k]
        wanted = list(range(self.size)) if ranks is None else list(ranks)
        if group.ranks != wanted:
            raise RuntimeError(f"rank {rank} created group {wanted} where a peer created {group.ranks}")
        return group

    def shared(self, key, build):
        """Read-only data every rank loads alike (a dataset), built once: each rank gets a shallow
        copy, so that replacing an attribute (a subset) stays private to the rank."""
        if key not in self._shared:
            self._shared[key] = build()
        return copy.copy(self._shared[key])


def _capture_state() -> dict:
    """What a rank keeps to itself across a hand over: its RNG streams and grad mode. Autocast is
    per thread too; a rank never waits inside an autocast region (the trainer's collectives run
    outside it), and one that did would share its peers' state, so :meth:`World.block` refuses it."""
    from slowmo_train.checkpoint_files import capture_rng

    return {"rng": capture_rng(), "grad": torch.is_grad_enabled()}


def _restore_state(state: dict) -> None:
    from slowmo_train.checkpoint_files import restore_rng

    restore_rng(state["rng"])
    torch.set_grad_enabled(state["grad"])
