"""The algorithm table: every algorithm name, written once, with what the rest of the code asks about it.

Config validation (``config_checks.validate``), the CLI's checks before workers start (``cli.check_topology``)
and the choice of training loop (``cli.worker_main``: the synchronous ``Trainer`` or the asynchronous
``AsyncRunner``) all read this table; it imports nothing, so the config can use it without torch.

    python -c "from slowmo_train.registry import ALGORITHM_SPECS; print(ALGORITHM_SPECS['sgp'])"

The classes stay in the closed table of their kind, which checks its keys against this one when it is
imported: ``slowmo_train.algorithms.ALGORITHMS`` (kind ``sync``: a base algorithm the trainer runs,
which SlowMo may wrap) and ``slowmo_train.asynchronous.rules.RULES`` (kind ``async``: a master update
rule). Adding an algorithm is one record below plus its module and its class in that table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SYNC, ASYNC = "sync", "async"


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an ``algorithm=NAME`` is, without importing it."""

    name: str
    #: sync: slowmo_train.trainer.Trainer runs it, SlowMo may wrap it (class in algorithms.ALGORITHMS);
    #: async: slowmo_train.asynchronous.runner.AsyncRunner runs it (rule in asynchronous.rules.RULES)
    kind: str
    #: gossips over a peer graph (algorithm.graph, algorithm.peers_per_itr are checked before launch)
    gossip: bool = False


ALGORITHM_SPECS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec("allreduce", SYNC),  # AR-SGD: gradient all-reduce every step
        AlgorithmSpec("local_sgd", SYNC),  # exact average every algorithm.period steps
        AlgorithmSpec("sgp", SYNC, gossip=True),  # Stochastic Gradient Push (Assran et al., 2019)
        AlgorithmSpec("osgp", SYNC, gossip=True),  # SGP with gossip overlapped with computation
        AlgorithmSpec("asgd", ASYNC),  # asynchronous SGD (Hakimi et al., arXiv 1907.11612)
        AlgorithmSpec("nag_asgd", ASYNC),  # one momentum buffer on the master
        AlgorithmSpec("dana", ASYNC),  # DANA-Zero: per-worker momentum, look-ahead reads
        AlgorithmSpec("dana_slim", ASYNC),  # DANA-Slim: the momentum on the workers
    )
}


def names(kind: str | None = None) -> tuple[str, ...]:
    """Algorithm names in table order, all or of one kind (``"sync"`` | ``"async"``)."""
    return tuple(name for name, spec in ALGORITHM_SPECS.items() if kind is None or spec.kind == kind)


def check_table(table: Iterable[str], kind: str, where: str) -> None:
    """Raise if the closed table ``where`` of ``kind`` does not hold exactly this table's names of that kind."""
    have, want = set(table), set(names(kind))
    if have != want:
        raise RuntimeError(
            f"{where} and slowmo_train.registry.ALGORITHM_SPECS disagree on the {kind} algorithms: "
            f"missing {sorted(want - have)}, unknown {sorted(have - want)}"
        )
