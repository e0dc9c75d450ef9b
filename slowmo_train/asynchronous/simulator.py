"""Event order of N asynchronous workers with random compute times, reproducible from a seed.

    .venv/bin/python -m pytest -q tests/test_async_simulator.py

The DANA paper (Hakimi et al., arXiv 1907.11612) studies many asynchronous workers by simulating them,
drawing each worker's time per gradient from a gamma distribution (as this project's specification of
the feature describes the paper's simulations; not checked against the paper's text); the distribution
is configurable here (gamma, exponential, uniform, constant). The default gamma(shape 2, scale 1) is this project's
choice (coefficient of variation 0.71): the shape and scale the paper used could not be confirmed
(the paper was not reachable from this machine). Only the *order* of master updates matters for the
trajectory: a worker's gradient depends on the parameters it read and its batch, so the simulator can
compute the gradient at read time and hold it until its arrival event. Ties (equal finish times, e.g.
constant times) are broken by the order in which the work was issued, so the order is a pure function
of the seed and the draws.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

DISTRIBUTIONS = ("gamma", "exponential", "uniform", "constant")


@dataclass(frozen=True)
class ComputeTimes:
    """Time one worker needs for one gradient: ``gamma(shape, scale)`` (mean shape*scale),
    ``exponential`` (mean ``scale``), ``uniform`` on [0, 2 scale] (mean ``scale``) or ``constant``
    (``scale``). ``speeds`` optionally divides worker i's times by ``speeds[i]`` (heterogeneous
    workers); by default all workers have the same distribution."""

    dist: str = "gamma"
    shape: float = 2.0
    scale: float = 1.0
    speeds: tuple[float, ...] = ()

    def __post_init__(self):
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(
                f"algorithm.compute_time_dist={self.dist!r} is unknown; choose one of {', '.join(DISTRIBUTIONS)}"
            )
        if self.shape <= 0 or self.scale <= 0:
            raise ValueError(f"compute-time shape and scale must be > 0, got {self.shape}, {self.scale}")
        if any(s <= 0 for s in self.speeds):
            raise ValueError(f"worker speeds must be > 0, got {list(self.speeds)}")

    def draw(self, worker: int, rng: np.random.Generator) -> float:
        if self.dist == "constant":
            t = self.scale
        elif self.dist == "uniform":
            t = rng.uniform(0.0, 2 * self.scale)
        elif self.dist == "exponential":
            t = rng.exponential(self.scale)
        else:
            t = rng.gamma(self.shape, self.scale)
        return float(t) / self.speeds[worker] if self.speeds else float(t)


class EventSimulator:
    """A priority queue of (finish time, issue number, worker): ``issue`` starts a worker's next
    gradient at the current time, ``pop`` returns the next worker whose gradient arrives at the
    master and advances the clock. Staleness is counted by the caller (master updates between a
    worker's read and its write)."""

    def __init__(self, workers: int, times: ComputeTimes, seed: int):
        if workers < 1:
            raise ValueError(f"algorithm.sim_workers must be >= 1, got {workers}")
        if times.speeds and len(times.speeds) != workers:
            raise ValueError(f"{len(times.speeds)} worker speeds given for {workers} workers")
        self.workers, self.times = workers, times
        # numpy's PCG64 stream: reproducible across platforms and versions for a given seed
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, int]] = []
        self._issued = 0

    def issue(self, worker: int) -> float:
        """Worker ``worker`` starts a gradient now; returns when it will arrive."""
        finish = self.now + self.times.draw(worker, self.rng)
        heapq.heappush(self._queue, (finish, self._issued, worker))
        self._issued += 1
        return finish

    def pop(self) -> int:
        finish, _, worker = heapq.heappop(self._queue)
        self.now = finish
        return worker

    def __len__(self) -> int:
        return len(self._queue)

    def state_dict(self) -> dict:
        return {
            "now": self.now,
            "queue": list(self._queue),
            "issued": self._issued,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.now, self._issued = state["now"], state["issued"]
        self._queue = [tuple(e) for e in state["queue"]]
        heapq.heapify(self._queue)
        self.rng.bit_generator.state = state["rng"]
