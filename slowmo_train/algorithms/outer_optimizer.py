"""SlowMo's outer update: the slow momentum step that follows every exact average (Wang, Tantia,
Ballas, Rabbat, "SlowMo", ICLR 2020, arXiv:1910.00643, Alg. 1 lines 8-9), and its decoupled form
(outer SGD with momentum as in DiLoCo, Douillard et al. 2023, arXiv:2311.08105).

    .venv/bin/python -m pytest -q tests/test_slowmo.py

The rule is one function of the slow iterate ``x0``, the slow momentum ``u``, the progress of the
outer iteration ``d = x0 - x_avg`` and the base learning rate ``gamma``; everything about *where*
``d`` comes from (blocking or streamed, whole model or fragment, sharded or not) lives in
outer_sync.py. The README's "Algorithms" section compares the two forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def slow_momentum_step(
    x0: torch.Tensor,
    u: torch.Tensor,
    d: torch.Tensor,
    gamma: float,
    *,
    alpha: float,
    beta: float,
    coupling: str = "coupled",
    nesterov: bool = False,
    average: torch.Tensor | None = None,
) -> None:
    """One outer step, in place on ``x0`` and ``u``, given ``d = x0 - x_avg``::

        coupled (Alg. 1):  u <- beta u + d / gamma;  x0 <- x0 - alpha gamma u
        decoupled:         u <- beta u + d;          x0 <- x0 - alpha (d + beta u  if nesterov  else u)

    Coupled divides by ``gamma`` because ``d`` is roughly ``gamma`` times the sum of the tau
    gradients: ``u`` is then a momentum of gradients, and a schedule that changes ``gamma`` rescales
    the next outer step, as the inner steps are rescaled. Decoupled keeps ``u`` in parameter units,
    so the two coincide (with ``u_dec = gamma u_coupled``) only while ``gamma`` is constant.

    ``gamma`` is the base lr of the outer step (Wang et al., ICLR 2020, arXiv:1910.00643: gamma_t).
    With ``slowmo.inner_lr=hold`` (Alg. 1) it is the lr of all tau inner steps; with ``follow`` the
    inner steps follow the schedule and ``gamma`` is the lr of the last one, which is Alg. 1 whenever
    the lr is constant within the outer iteration.

    ``gamma = 0`` (coupled) cannot be divided by: ``x0`` restarts from ``average`` and ``u`` is kept.
    With ``hold`` the inner steps then moved nothing (every optimizer update is scaled by the lr);
    with ``follow`` (a schedule that reaches 0) the average keeps the progress of the earlier steps."""
    if coupling == "coupled":
        if gamma == 0.0:
            x0.copy_(average)
            return
        u.mul_(beta).add_(d / gamma)
        x0.sub_(u, alpha=alpha * gamma)
    else:
        u.mul_(beta).add_(d)
        step = d.add(u, alpha=beta) if nesterov else u
        x0.sub_(step, alpha=alpha)


#: ``slowmo.beta=auto``: the slow momentum for a number of averaging workers (nodes), as rows
#: (fewest workers, beta) in increasing order; the last row whose count is reached applies. The betas
#: measured best (docs/RESULTS.md, "Beta against the number of workers" and "Beta with 2 workers";
#: CIFAR-10, Local SGD and SGP with SlowMo, one total batch): 0.2 at 2 workers (both bases, two
#: seeds), 0.6 at 4, 8 and 32 workers and 0.4 at 16. One worker averages nothing: 0, not measured.
AUTO_BETA = ((1, 0.0), (2, 0.2), (4, 0.6))
#: the same for an adaptive base optimizer (Adam, AdamW: one with ``betas``): the authors' guidance for
#: WMT16 with Adam (fairscale's SlowMo documentation: 0 below 4 nodes, 0.2 at 4, 0.5 at 8, 0.6 at 16).
#: Measured here at 4 workers (Multi30k, SGP + SlowMo, three seeds): 0.2 beat SGP alone by 0.6 BLEU in
#: every seed, while the SGD rule's 0.6 lost 2.7 BLEU to it; the other rows are not measured here.
AUTO_BETA_ADAPTIVE = ((1, 0.0), (4, 0.2), (8, 0.5), (16, 0.6))


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the base optimizer keeps Adam-style moment estimates (its defaults have ``betas``)."""
    return "betas" in optimizer.defaults


def auto_beta(workers: int, adaptive: bool = False) -> float:
    """``slowmo.beta=auto`` for ``workers`` averaging workers (nodes): the row of :data:`AUTO_BETA`
    (:data:`AUTO_BETA_ADAPTIVE` for an ``adaptive`` base optimizer).

    The authors' guidance for their later implementation (fairscale's SlowMo documentation, WMT16:
    0 below 4 nodes, 0.2 at 4, 0.5 at 8, 0.6 at 16) grows beta with the nodes. The curve measured
    here (CIFAR-10, 2 to 32 workers at one total batch) grew from 2 to 4 workers and then stopped:
    0.2 was best at 2 workers (0 and 0.6-0.8 worse), and from 4 workers 0.4 or 0.6 was best, or
    within 0.1 points of the best, at every count, 0 and 0.8 worse, so from 4 workers the rule is
    one value."""
    if workers < 1:
        raise ValueError(f"the number of averaging workers must be >= 1, got {workers}")
    rule = AUTO_BETA_ADAPTIVE if adaptive else AUTO_BETA
    return next(beta for fewest, beta in reversed(rule) if workers >= fewest)


def resolve_beta(beta: float | str, workers: int, adaptive: bool = False) -> float:
    """``slowmo.beta`` as a number: itself, or :func:`auto_beta` of the workers for ``auto``."""
    return auto_beta(workers, adaptive) if beta == "auto" else float(beta)


@dataclass(frozen=True)
class OuterOptimizer:
    """The outer optimizer's hyper-parameters (validated by slowmo.validate_slowmo_config). It
    holds no state: ``x0`` and ``u`` belong to the synchronisation unit that keeps them."""

    alpha: float
    beta: float
    coupling: str = "coupled"
    nesterov: bool = False

    def step(self, x0: torch.Tensor, u: torch.Tensor, d: torch.Tensor, gamma: float, average: torch.Tensor) -> None:
        """:func:`slow_momentum_step` with these hyper-parameters (``average`` only for gamma = 0)."""
        slow_momentum_step(
            x0,
            u,
            d,
            gamma,
            alpha=self.alpha,
            beta=self.beta,
            coupling=self.coupling,
            nesterov=self.nesterov,
            average=average,
        )

    def step_towards(self, x0: torch.Tensor, u: torch.Tensor, average: torch.Tensor, gamma: float) -> None:
        """The step when the average itself is known: ``d = x0 - average``."""
        self.step(x0, u, x0 - average, gamma, average)
