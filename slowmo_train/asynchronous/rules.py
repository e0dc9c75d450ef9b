"""Master update rules of asynchronous SGD with momentum: pure tensor math on flat parameter vectors.

    .venv/bin/python -m pytest -q tests/test_async_rules.py

Source: Hakimi, Barkai, Gabel, Schuster, "Taming Momentum in a Distributed Asynchronous Environment",
arXiv 1907.11612 (v3, 2020). A master holds the parameters; each worker repeatedly reads parameters,
computes a gradient on its own batch and sends it back without waiting for the others, so the gradient
it sends was computed ``tau`` master updates ago (the staleness). Notation: ``theta`` the master's
parameters, ``g`` a worker's gradient (weight decay included, computed at the point the worker read),
``eta`` the learning rate of this master update, ``gamma`` the momentum.

* :class:`ASGD` -- theta <- theta - eta g.
* :class:`NagASGD` -- one momentum buffer on the master shared by all workers (the paper's naive
  baseline "NAG-ASGD"): v <- gamma v + g, then theta <- theta - eta v (heavy ball) or, with
  ``nesterov=True``, theta <- theta - eta (g + gamma v) (Nesterov momentum in the reformulation of
  Bengio et al., 2013, which is also what ``torch.optim.SGD(nesterov=True)`` computes).
* :class:`DanaZero` -- one momentum buffer per worker on the master. On a gradient from worker i:
  v_i <- gamma v_i + g; theta <- theta - eta v_i; worker i is then sent the estimate of where the
  parameters will be when its next gradient arrives, theta_hat = theta - eta gamma sum_j v_j.
* :class:`DanaSlim` -- the same algorithm with the momentum moved to the workers (Bengio-NAG form), so
  the master is a plain ASGD master: worker i keeps v_i, sends d = g + gamma v_i after
  v_i <- gamma v_i + g, and the master applies Theta <- Theta - eta d and sends Theta itself.
  The master's Theta equals DANA-Zero's theta_hat while eta is constant (proof: substitute
  Theta = theta - eta gamma sum_j v_j into DANA-Zero's update: Theta' = Theta - eta (gamma v_i' + g));
  at a learning-rate change the two differ by (eta' - eta) gamma sum_j v_j.

What could and could not be checked against the paper: the paper is not reachable from this machine.
Public descriptions of it confirm the names DANA-Zero (per-worker momentum on the master and the
look-ahead theta - eta gamma sum_j v_j sent to the worker), DANA-Slim (the Bengio-NAG reformulation:
the worker sends gamma v_i + g, the master keeps no momentum; presented as the practical,
equivalent variant) and NAG-ASGD (a single shared momentum on the master), and a DANA-DC variant with
delay compensation that is not implemented here. The equation and algorithm numbers of these updates
in v3 could not be confirmed, so none are cited; the equivalences stated above are derived here and
tested in tests/test_async_rules.py (one worker: ASGD == SGD, NAG-ASGD == momentum / Nesterov SGD,
DANA-Zero's look-ahead and DANA-Slim's parameters == Nesterov SGD).

Each rule has a master half (``master_update``, ``params_for``, ``eval_params``) and a worker half
(``worker_side(numel)`` returns the object that turns a gradient into the message a worker sends), so
the same class runs in the one-process simulator and split across processes in real mode (where a
parameter server holds a shard of the flat vector: every master rule is element-wise, so sharding
the vector shards the rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slowmo_train.registry import ASYNC, check_table


class WorkerSide:
    """What a worker sends for a gradient: the gradient itself (ASGD, NAG-ASGD, DANA-Zero)."""

    def message(self, grad: Tensor) -> Tensor:
        return grad

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MomentumWorker(WorkerSide):
    """DANA-Slim's worker: its own momentum, Bengio-NAG message g + gamma v after v <- gamma v + g."""

    def __init__(self, numel: int, momentum: float, dtype=torch.float32):
        self.momentum = momentum
        self.v = torch.zeros(numel, dtype=dtype)

    def message(self, grad: Tensor) -> Tensor:
        self.v.mul_(self.momentum).add_(grad)
        return grad.add(self.v, alpha=self.momentum)

    def state_dict(self) -> dict:
        return {"v": self.v.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.v.copy_(state["v"])


def _check_momentum(momentum: float, name: str) -> None:
    if not 0 <= momentum < 1:
        raise ValueError(f"optim.momentum must be in [0, 1) for {name}, got {momentum}")


class AsyncRule:
    """Base: the master holds ``theta`` (flat, a private copy) for ``workers`` workers."""

    name = "asgd"

    def __init__(self, theta: Tensor, workers: int, momentum: float = 0.0):
        if theta.dim() != 1:
            raise ValueError(f"the master's parameters must be one flat vector, got shape {tuple(theta.shape)}")
        if workers < 1:
            raise ValueError(f"the number of asynchronous workers must be >= 1, got {workers}")
        self.theta = theta.detach().clone()
        self.workers = workers
        self.momentum = momentum

    def worker_side(self, numel: int) -> WorkerSide:
        return WorkerSide()

    def master_update(self, worker: int, message: Tensor, lr: float) -> None:
        raise NotImplementedError

    def params_for(self, worker: int, lr: float) -> Tensor:
        """The parameters the master sends worker ``worker`` after an update (``lr``: the rate of the
        next update, used by DANA-Zero's look-ahead)."""
        return self.theta

    def eval_params(self) -> Tensor:
        """The parameters evaluated and checkpointed as "the model"."""
        return self.theta

    def state_dict(self) -> dict:
        return {"theta": self.theta.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.theta.copy_(state["theta"])


class ASGD(AsyncRule):
    """Asynchronous SGD: theta <- theta - eta g(theta_{t - tau})."""

    name = "asgd"

    def master_update(self, worker: int, message: Tensor, lr: float) -> None:
        self.theta.add_(message, alpha=-lr)


class NagASGD(AsyncRule):
    """NAG-ASGD: a single momentum buffer on the master, fed by every worker's (stale) gradient.

    v <- gamma v + g; theta <- theta - eta v (``nesterov=False``) or theta <- theta - eta (g + gamma v)
    (``nesterov=True``, Bengio-NAG form, as ``torch.optim.SGD(nesterov=True)``). With one worker this is
    exactly synchronous momentum / Nesterov SGD; with N workers the shared buffer mixes gradients of
    different staleness, which is what the paper shows amplifies the gap between read and write."""

    name = "nag_asgd"

    def __init__(self, theta: Tensor, workers: int, momentum: float, nesterov: bool = True):
        super().__init__(theta, workers, momentum)
        _check_momentum(momentum, self.name)
        self.nesterov = nesterov
        self.v = torch.zeros_like(self.theta)

    def master_update(self, worker: int, message: Tensor, lr: float) -> None:
        self.v.mul_(self.momentum).add_(message)
        step = message.add(self.v, alpha=self.momentum) if self.nesterov else self.v
        self.theta.add_(step, alpha=-lr)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "v": self.v.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.v.copy_(state["v"])


class DanaZero(AsyncRule):
    """DANA-Zero: per-worker momentum on the master and a look-ahead read.

    On g from worker i: v_i <- gamma v_i + g; theta <- theta - eta v_i. Worker i then reads
    theta_hat = theta - eta gamma sum_j v_j: every other worker's momentum will be applied roughly once
    more before i's next gradient arrives, so the gradient is computed near where it will be used.
    The sum is kept incrementally (``v_sum``) so a read costs one vector operation, not N."""

    name = "dana"

    def __init__(self, theta: Tensor, workers: int, momentum: float):
        super().__init__(theta, workers, momentum)
        _check_momentum(momentum, self.name)
        self.v = torch.zeros(workers, self.theta.numel(), dtype=self.theta.dtype)
        self.v_sum = torch.zeros_like(self.theta)

    def master_update(self, worker: int, message: Tensor, lr: float) -> None:
        v = self.v[worker]
        # v_sum tracks sum_j v_j: remove v_i's old value, add its new one
        self.v_sum.sub_(v)
        v.mul_(self.momentum).add_(message)
        self.v_sum.add_(v)
        self.theta.add_(v, alpha=-lr)

    def params_for(self, worker: int, lr: float) -> Tensor:
        return self.theta.add(self.v_sum, alpha=-lr * self.momentum)

    def state_dict(self) -> dict:
        # v_sum as kept incrementally, not recomputed: its last bits are part of the trajectory
        return {**super().state_dict(), "v": self.v.clone(), "v_sum": self.v_sum.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.v.copy_(state["v"])
        self.v_sum.copy_(state["v_sum"] if "v_sum" in state else self.v.sum(0))


class DanaSlim(ASGD):
    """DANA-Slim: DANA with the momentum on the workers; the master is an ASGD master over Theta.

    Worker i: v_i <- gamma v_i + g(Theta_read); sends g + gamma v_i. Master: Theta <- Theta - eta d.
    Same trajectory as DANA-Zero's look-ahead while the learning rate is constant (module docstring),
    with no per-worker state on the master."""

    name = "dana_slim"

    def __init__(self, theta: Tensor, workers: int, momentum: float):
        super().__init__(theta, workers, momentum)
        _check_momentum(momentum, self.name)

    def worker_side(self, numel: int) -> WorkerSide:
        return MomentumWorker(numel, self.momentum, self.theta.dtype)


#: algorithm name -> master rule: the classes of the asynchronous algorithms (kind "async" in
#: slowmo_train/registry.py, which names them all)
RULES: dict[str, type[AsyncRule]] = {cls.name: cls for cls in (ASGD, NagASGD, DanaZero, DanaSlim)}
check_table(RULES, ASYNC, "slowmo_train.asynchronous.rules.RULES")


def build_rule(name: str, theta: Tensor, workers: int, momentum: float, nesterov: bool = True) -> AsyncRule:
    """The rule named ``name`` (ASGD ignores ``momentum``; only NAG-ASGD reads ``nesterov``)."""
    if name not in RULES:
        raise ValueError(f"algorithm={name!r} is not asynchronous; choose one of {', '.join(RULES)}")
    cls = RULES[name]
    if cls is ASGD:
        return ASGD(theta, workers)
    if cls is NagASGD:
        return NagASGD(theta, workers, momentum, nesterov)
    return cls(theta, workers, momentum)
