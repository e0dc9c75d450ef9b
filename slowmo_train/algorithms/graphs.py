"""Time-varying directed communication graphs for push-sum gossip (SGP / OSGP).

Every rank computes the same graph from ``(n, p, step)`` alone, so no coordination is needed.
Worker ``i`` at step ``k`` sends to ``p`` distinct peers at power-of-two offsets; there are
``L = ceil(log2 n)`` such offsets ``1, 2, 4, ..., 2^(L-1) < n`` (``L = 0`` for ``n = 1``), which is
the 1-peer exponential graph of Assran et al., "Stochastic Gradient Push for Distributed Deep
Learning", ICML 2019, Sec. 5, generalised to ``p`` peers per step.

Mixing is uniform: a sender with ``p`` peers keeps ``1/(p+1)`` of its (numerator, weight) and sends
``1/(p+1)`` to each peer, so the mixing matrix ``W[dst, src]`` is column-stochastic (Kempe et al.,
"Gossip-based computation of aggregate information", FOCS 2003).
"""

from __future__ import annotations

import torch


def num_offsets(n: int) -> int:
    """L: how many powers of two are below ``n`` (0 for a single worker)."""
    return (n - 1).bit_length() if n > 1 else 0


class ExponentialGraph:
    """Regular time-varying exponential graph (Assran et al., ICML 2019, Sec. 5).

    out_peers(i, k) = { (i + 2^((k p + j) mod L)) mod n : j = 0..p-1 }

    Every worker receives exactly ``p`` messages per step, so push-sum weights stay 1.
    """

    name = "exponential"

    def __init__(self, n: int, peers_per_itr: int):
        if n < 1:
            raise ValueError(f"the number of gossip workers must be >= 1, got {n}")
        if peers_per_itr < 1:
            raise ValueError(f"algorithm.peers_per_itr must be an integer >= 1, got {peers_per_itr}")
        self.n = n
        self.peers_per_itr = peers_per_itr
        self.num_offsets = num_offsets(n)
        if n > 1 and peers_per_itr > self.num_offsets:
            offsets = ", ".join(str(1 << e) for e in range(self.num_offsets))
            raise ValueError(
                f"algorithm.peers_per_itr must be <= {self.num_offsets} with {n} gossip workers "
                f"(the exponential graph has only the peer offsets {offsets}; more peers would repeat), "
                f"got {peers_per_itr}"
            )

    def _exponent(self, worker: int, step: int, j: int) -> int:
        return (step * self.peers_per_itr + j) % self.num_offsets

    def out_peers(self, worker: int, step: int) -> list[int]:
        """Workers that ``worker`` sends to at ``step``, in send order (j = 0..p-1)."""
        if self.n == 1:
            return []
        return [(worker + (1 << self._exponent(worker, step, j))) % self.n for j in range(self.peers_per_itr)]

    def in_peers(self, worker: int, step: int) -> list[int]:
        """Workers that send to ``worker`` at ``step``, in ascending worker order (the order in
        which their messages are added)."""
        return [src for src in range(self.n) if worker in self.out_peers(src, step)]

    def mixing_weight(self, worker: int, step: int) -> float:
        """The fraction a sender keeps and sends to each peer: 1 / (out-degree + 1)."""
        return 1.0 / (len(self.out_peers(worker, step)) + 1)

    def mixing_matrix(self, step: int) -> torch.Tensor:
        """W[dst, src] (float64, n x n): column ``src`` says how ``src`` splits its mass."""
        w = torch.zeros(self.n, self.n, dtype=torch.float64)
        for src in range(self.n):
            share = self.mixing_weight(src, step)
            w[src, src] = share
            for dst in self.out_peers(src, step):
                w[dst, src] = share
        return w

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, peers_per_itr={self.peers_per_itr})"


class NonregularExponentialGraph(ExponentialGraph):
    """Exponential graph whose offset also depends on the sender, so in-degrees vary.

    out_peers(i, k) = { (i + 2^((k p + j + i) mod L)) mod n : j = 0..p-1 }

    Some workers receive 0 or 2+ messages in a step and the push-sum weights drift away from 1,
    which is where push-sum's de-biasing z = x / w matters (Assran et al., ICML 2019, Alg. 1).
    """

    name = "nonregular_exponential"

    def _exponent(self, worker: int, step: int, j: int) -> int:
        return (step * self.peers_per_itr + j + worker) % self.num_offsets


GRAPHS: dict[str, type[ExponentialGraph]] = {
    ExponentialGraph.name: ExponentialGraph,
    NonregularExponentialGraph.name: NonregularExponentialGraph,
}


def build_graph(name: str, n: int, peers_per_itr: int) -> ExponentialGraph:
    try:
        cls = GRAPHS[name]
    except KeyError:
        raise ValueError(f"algorithm.graph must be one of {', '.join(GRAPHS)}, got {name!r}") from None
    return cls(n, peers_per_itr)
