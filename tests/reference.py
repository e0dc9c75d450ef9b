"""A single-process reference simulator of every training algorithm, written from the definitions
and independently of ``slowmo_train.algorithms`` (no torch.distributed): N workers are plain tensors.

Algorithms simulated:
  * AR-SGD: the gradient is averaged over all workers every step.
  * Local SGD (Stich, ICLR 2019): local steps, exact parameter average every ``H`` steps.
  * SGP / OSGP (Assran et al., ICML 2019), push-sum (Kempe et al., FOCS 2003) with the time-varying
    exponential graphs: worker i sends at step k to (i + 2^((k p + j) mod L)) mod n, j = 0..p-1
    (``nonregular_exponential`` adds ``+ i`` to the exponent); it keeps and sends 1/(p+1) of its
    numerator and weight; SGP adds the messages of step k, OSGP those sent at step k - s.
  * Node hierarchy: a node of P processes is one worker whose gradient is the mean of its processes'
    gradients; BatchNorm-like statistics stay per process.
  * SlowMo (Wang et al., ICLR 2020, Alg. 1) over each base, coupled (the paper) or decoupled (outer
    SGD with optional Nesterov, Douillard et al., 2023), lr evaluated at (k // tau) * tau
    (``inner_lr="hold"``, Alg. 1) or at k (``"follow"``, fairscale's SlowMo), gamma per param
    group the lr of the step after which the average is taken, base-optimizer buffers reset / kept
    / averaged. At a step after which the whole model is averaged exactly, push-sum skips its gossip
    (the average is invariant under mixing) and Local SGD its own average.
  * Streamed SlowMo (Streaming DiLoCo, Douillard et al., 2025, arXiv:2501.18512): the flattened
    parameters cut into F equal contiguous fragments, fragment f averaged after step k when
    (k + 1 + f tau / F) % tau == 0; its outer update applied D steps later as
    theta <- x0_new + (theta_now - theta_at_send); optionally the per-worker pseudo-gradient
    x0 - x_i rounded to bfloat16/float16 (and, for two workers, their sum rounded once more, as a
    16-bit all-reduce adds). Over push-sum, a fragment update (F > 1 or D > 0) flushes the gossip
    and sets the fragment's numerators to value * w, keeping each worker's weight. Kept as flat
    vectors here, independently of the per-group layout of the implementation.

The model is y = W2 relu(W1 x + b1) with a running mean of the pre-activation (a stand-in for the
BatchNorm statistics averaging must touch), trained by hand-written SGD with the semantics of
``torch.optim.SGD`` (weight decay, heavy-ball or Nesterov momentum whose buffer starts as the first
update), two parameter groups with different lrs and a learning-rate change mid-run (after an
optional linear warm-up). Everything is
float64 so that comparisons can use tight tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

DTYPE = torch.float64
IN, HIDDEN, OUT, BATCH = 3, 4, 2, 5
SHAPES = [(HIDDEN, IN), (HIDDEN,), (OUT, HIDDEN)]  # W1, b1, W2: the order of model.parameters()
STAT_MOMENTUM = 0.1  # running_mean <- (1 - m) running_mean + m batch_mean, as in BatchNorm


@dataclass(frozen=True)
class ParamGroupSpec:
    indices: tuple[int, ...]
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool


PARAM_GROUPS = (
    ParamGroupSpec((0, 1), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=False),
    ParamGroupSpec((2,), lr=0.05, momentum=0.5, weight_decay=0.0, nesterov=True),
)
LR_DROP_STEP, LR_DROP_FACTOR = 5, 0.5


def lr_factor(schedule_step: int, warmup: int = 0) -> float:
    """The schedule: (s + 1) / warmup for s < warmup, full lr, then halved from step 5 on."""
    ramp = min(1.0, (schedule_step + 1) / warmup) if warmup else 1.0
    return ramp * (1.0 if schedule_step < LR_DROP_STEP else LR_DROP_FACTOR)


def group_lrs(schedule_step: int, warmup: int = 0) -> list[float]:
    return [g.lr * lr_factor(schedule_step, warmup) for g in PARAM_GROUPS]


def initial_parameters() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [0.5 * torch.randn(shape, generator=gen, dtype=DTYPE) for shape in SHAPES]


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data of process ``rank`` at optimizer step ``step``."""
    gen = torch.Generator().manual_seed(10_000 + 1_000 * step + rank)
    return torch.randn(BATCH, IN, generator=gen, dtype=DTYPE), torch.randn(BATCH, OUT, generator=gen, dtype=DTYPE)


def loss_and_statistic(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """Mean squared error of y = W2 relu(W1 x + b1), and the batch mean of the pre-activation."""
    w1, b1, w2 = params
    h = x @ w1.T + b1
    out = torch.relu(h) @ w2.T
    return ((out - y) ** 2).mean(), h.detach().mean(0)


# --- cases ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlowMoSpec:
    alpha: float = 0.7
    beta: float = 0.6
    tau: int = 4
    coupling: str = "coupled"
    nesterov: bool = False
    sharded: bool = False  # no effect on the mathematics; the implementation must agree either way
    base_buffers: str = "reset"
    fragments: int = 1
    overlap: int = 0  # D: steps between an outer all-reduce and its update
    outer_dtype: str = "float32"  # float32 (no cast) | bfloat16 | float16
    inner_lr: str = "hold"  # hold: lr at (k // tau) * tau | follow: lr at k

    @property
    def streamed(self) -> bool:
        return self.fragments > 1 or self.overlap > 0 or self.outer_dtype != "float32"


@dataclass(frozen=True)
class Case:
    """One training configuration, shared by the simulator and the distributed test."""

    name: str
    algorithm: str  # allreduce | local_sgd | sgp | osgp
    period: int = 2  # Local SGD H
    graph: str = "exponential"
    peers: int = 1
    synch_freq: int = 1  # OSGP staleness s
    procs_per_node: int = 1
    slowmo: SlowMoSpec | None = None
    #: reference only: an exact average (params, statistics; optimizer state kept) every N steps
    average_every: int = 0
    #: evaluate the lr schedule at (k // lr_hold) * lr_hold (SlowMo holds it for tau steps)
    lr_hold: int = 1
    steps: int = 12
    warmup: int = 0  # linear lr warm-up steps of the schedule (lr_factor)

    def schedule_step(self, k: int) -> int:
        hold = self.lr_hold if self.slowmo is None else 1 if self.slowmo.inner_lr == "follow" else self.slowmo.tau
        return (k // hold) * hold


@dataclass
class Trajectory:
    #: [steps, workers, numel]: de-biased parameters of every worker after every step
    params: torch.Tensor
    #: [steps, processes, HIDDEN]: every process's running statistic after every step
    stats: torch.Tensor
    #: {step: mean over workers of ||x_i - x_avg||} at SlowMo outer steps
    consensus: dict[int, float] = field(default_factory=dict)


# --- the simulator -------------------------------------------------------------------------------
@dataclass
class Worker:
    params: list[torch.Tensor]
    momentum: list[torch.Tensor | None]
    numerator: list[torch.Tensor]
    weight: float = 1.0


def sgd_step(worker: Worker, grads: list[torch.Tensor], lrs: list[float]) -> None:
    """torch.optim.SGD with dampening 0: d = g + wd p; b = d (first) or mu b + d;
    d = d + mu b (Nesterov) or b; p <- p - lr d."""
    for spec, lr in zip(PARAM_GROUPS, lrs):
        for i in spec.indices:
            p = worker.params[i]
            d = grads[i] + spec.weight_decay * p
            if spec.momentum != 0:
                buf = worker.momentum[i]
                buf = d.clone() if buf is None else spec.momentum * buf + d
                worker.momentum[i] = buf
                d = d + spec.momentum * buf if spec.nesterov else buf
            worker.params[i] = p - lr * d


def out_peers(case: Case, n: int, i: int, k: int) -> list[int]:
    offsets = 0
    while (1 << offsets) < n:
        offsets += 1
    if offsets == 0:
        return []
    extra = i if case.graph == "nonregular_exponential" else 0
    return [(i + 2 ** ((k * case.peers + j + extra) % offsets)) % n for j in range(case.peers)]


class Simulator:
    def __init__(self, case: Case, world_size: int):
        assert world_size % case.procs_per_node == 0
        self.case = case
        self.procs = world_size
        self.n = world_size // case.procs_per_node
        init = initial_parameters()
        self.workers = [
            Worker([p.clone() for p in init], [None] * len(init), [p.clone() for p in init]) for _ in range(self.n)
        ]
        self.stats = [torch.zeros(HIDDEN, dtype=DTYPE) for _ in range(self.procs)]
        self.in_flight: list[tuple[int, int, list[torch.Tensor], float]] = []  # (sent at, dst, num, w)
        self.x0 = [p.clone() for p in init]
        self.u = [torch.zeros_like(p) for p in init]
        self.consensus: dict[int, float] = {}
        self.pending: list[dict] = []  # streamed SlowMo: posted outer averages, applied D steps later

    # --- one step ----------------------------------------------------------------------------
    def node_gradient(self, node: int, k: int) -> list[torch.Tensor]:
        worker, ppn = self.workers[node], self.case.procs_per_node
        total = None
        for rank in range(node * ppn, (node + 1) * ppn):
            params = [p.clone().requires_grad_(True) for p in worker.params]
            loss, stat = loss_and_statistic(params, *batch(rank, k))
            grads = torch.autograd.grad(loss, params)
            self.stats[rank] = (1 - STAT_MOMENTUM) * self.stats[rank] + STAT_MOMENTUM * stat
            total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
        return [t / ppn for t in total]

    def step(self, k: int) -> None:
        case = self.case
        lrs = group_lrs(case.schedule_step(k), case.warmup)
        grads = [self.node_gradient(i, k) for i in range(self.n)]
        if case.algorithm == "allreduce":
            mean = [sum(g[j] for g in grads) / self.n for j in range(len(SHAPES))]
            grads = [mean] * self.n
        streamed = case.slowmo is not None and case.slowmo.streamed
        outer = case.slowmo is not None and not streamed and (k + 1) % case.slowmo.tau == 0
        # a streamed outer synchronisation replaces Local SGD's own average at the end of an outer iteration
        outer_boundary = streamed and (k + 1) % case.slowmo.tau == 0
        gossip = case.algorithm in ("sgp", "osgp")
        for worker, g in zip(self.workers, grads):
            before = list(worker.params)
            sgd_step(worker, g, lrs)
            if gossip:  # push-sum: the numerator takes the optimizer's change of z
                worker.numerator = [n + (a - b) for n, a, b in zip(worker.numerator, worker.params, before)]
            else:  # weight 1: the numerator is the parameter
                worker.numerator = list(worker.params)
        # an exact average of the whole model follows: gossip, which conserves the push-sum sums, is skipped
        whole_average = outer or (outer_boundary and case.slowmo.fragments == 1)
        if gossip and not whole_average:
            self.gossip(k)
        elif gossip:
            for worker in self.workers:
                worker.params = [x / worker.weight for x in worker.numerator]
        if case.algorithm == "local_sgd" and (k + 1) % case.period == 0 and not outer and not outer_boundary:
            self.restart_all_from(self.exact_average())
            self.average_stats()
        if case.average_every and (k + 1) % case.average_every == 0:
            self.restart_all_from(self.exact_average())
            self.average_stats()
        if outer:
            self.slowmo_outer_step(k, lrs)
        if streamed:
            self.streamed_outer_step(k, lrs)

    def gossip(self, k: int) -> None:
        for i, worker in enumerate(self.workers):
            peers = out_peers(self.case, self.n, i, k)
            share = 1.0 / (len(peers) + 1)
            worker.numerator = [x * share for x in worker.numerator]
            worker.weight *= share
            for dst in peers:
                self.in_flight.append((k, dst, list(worker.numerator), worker.weight))
        delay = 0 if self.case.algorithm == "sgp" else self.case.synch_freq
        self.deliver(lambda sent: sent == k - delay)
        for worker in self.workers:
            worker.params = [x / worker.weight for x in worker.numerator]

    def deliver(self, due) -> None:
        keep = []
        for sent, dst, num, w in self.in_flight:
            if due(sent):
                target = self.workers[dst]
                target.numerator = [a + b for a, b in zip(target.numerator, num)]
                target.weight += w
            else:
                keep.append((sent, dst, num, w))
        self.in_flight = keep

    # --- averaging ---------------------------------------------------------------------------
    def flush(self) -> None:
        self.deliver(lambda sent: True)
        if self.case.algorithm in ("sgp", "osgp"):  # the parameters follow, as the real flush de-biases
            for worker in self.workers:
                worker.params = [x / worker.weight for x in worker.numerator]

    def exact_average(self) -> list[torch.Tensor]:
        self.flush()
        total_weight = sum(w.weight for w in self.workers)
        return [sum(w.numerator[j] for w in self.workers) / total_weight for j in range(len(SHAPES))]

    def restart_all_from(self, values: list[torch.Tensor]) -> None:
        for worker in self.workers:
            worker.params = [v.clone() for v in values]
            worker.numerator = [v.clone() for v in values]
            worker.weight = 1.0
        self.in_flight = []

    def average_stats(self) -> None:
        mean = sum(self.stats) / self.procs
        self.stats = [mean.clone() for _ in range(self.procs)]

    def slowmo_outer_step(self, k: int, lrs: list[float]) -> None:
        spec = self.case.slowmo
        avg = self.exact_average()
        self.consensus[k] = (
            sum(
                float(sum(((x / w.weight - a) ** 2).sum() for x, a in zip(w.numerator, avg)) ** 0.5)
                for w in self.workers
            )
            / self.n
        )
        for group, gamma in zip(PARAM_GROUPS, lrs):
            for i in group.indices:
                d = self.x0[i] - avg[i]
                if spec.coupling == "coupled":
                    if gamma == 0:
                        self.x0[i] = avg[i].clone()
                        continue
                    self.u[i] = spec.beta * self.u[i] + d / gamma
                    self.x0[i] = self.x0[i] - spec.alpha * gamma * self.u[i]
                else:
                    self.u[i] = spec.beta * self.u[i] + d
                    step = d + spec.beta * self.u[i] if spec.nesterov else self.u[i]
                    self.x0[i] = self.x0[i] - spec.alpha * step
        self.restart_all_from(self.x0)
        self.synchronize_buffers()

    def synchronize_buffers(self) -> None:
        spec = self.case.slowmo
        self.average_stats()
        if spec.base_buffers == "reset":
            for worker in self.workers:
                worker.momentum = [None] * len(SHAPES)
        elif spec.base_buffers == "average":
            for j in range(len(SHAPES)):
                bufs = [w.momentum[j] for w in self.workers]
                if all(b is not None for b in bufs):
                    mean = sum(bufs) / self.n
                    for w in self.workers:
                        w.momentum[j] = mean.clone()

    def streamed_outer_step(self, k: int, lrs: list[float]) -> None:
        spec = self.case.slowmo
        tau, frags, delay = spec.tau, spec.fragments, spec.overlap
        numel = sum(int(torch.Size(s).numel()) for s in SHAPES)
        gossip = self.case.algorithm in ("sgp", "osgp")
        for f in range(frags):
            if (k + 1 + f * tau // frags) % tau != 0:
                continue
            lo, hi = f * numel // frags, (f + 1) * numel // frags
            x0 = flat(self.x0)[lo:hi]
            if gossip:
                self.flush()
            # push-sum: sum_i (w_i x0 - num_i) / sum_i w_i = x0 - x_avg (weights are 1 without push-sum)
            thetas = [flat(w.numerator)[lo:hi] / w.weight for w in self.workers]
            deltas = [to_wire(w.weight * x0 - flat(w.numerator)[lo:hi], spec.outer_dtype) for w in self.workers]
            total = sum(deltas)
            if self.n == 2:  # a 16-bit all-reduce of two values adds once in 16 bits
                total = to_wire(total, spec.outer_dtype)
            d = total / sum(w.weight for w in self.workers)
            self.pending.append(
                {"apply": k + delay, "lo": lo, "hi": hi, "d": d, "thetas": thetas, "lrs": element_lrs(lrs)[lo:hi]}
            )
        for message in [m for m in self.pending if m["apply"] == k]:
            self.pending.remove(message)
            lo, hi, d, gamma = message["lo"], message["hi"], message["d"], message["lrs"]
            x0, u = flat(self.x0), flat(self.u)
            avg = x0[lo:hi] - d
            self.consensus[k] = sum(float(((t - avg) ** 2).sum() ** 0.5) for t in message["thetas"]) / self.n
            if spec.coupling == "coupled":
                zero = gamma == 0
                safe = torch.where(zero, torch.ones_like(gamma), gamma)
                new_u = torch.where(zero, u[lo:hi], spec.beta * u[lo:hi] + d / safe)
                new_x0 = torch.where(zero, avg, x0[lo:hi] - spec.alpha * gamma * new_u)
            else:
                new_u = spec.beta * u[lo:hi] + d
                step = d + spec.beta * new_u if spec.nesterov else new_u
                new_x0 = x0[lo:hi] - spec.alpha * step
            x0[lo:hi], u[lo:hi] = new_x0, new_u
            self.x0, self.u = unflat(x0), unflat(u)
            if gossip and frags == 1 and delay == 0:  # Alg. 1: every worker restarts from x0 with weight 1
                self.restart_all_from(self.x0)
                continue
            if gossip:
                self.flush()  # all mass at the workers, then the slice's numerators become value * w
            for worker, theta in zip(self.workers, message["thetas"]):
                params = flat(worker.numerator) / worker.weight
                params[lo:hi] = new_x0 + (params[lo:hi] - theta)
                numerator = params * worker.weight
                worker.numerator = unflat(numerator)
                worker.params = unflat(numerator / worker.weight)
        if (k + 1 - delay) % tau == 0 and k + 1 > delay:
            self.synchronize_buffers()

    # --- driver ------------------------------------------------------------------------------
    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = torch.stack([torch.cat([p.reshape(-1) for p in w.params]) for w in self.workers])
        return params, torch.stack(self.stats)


def simulate(case: Case, world_size: int) -> Trajectory:
    sim = Simulator(case, world_size)
    params, stats = [], []
    for k in range(case.steps):
        sim.step(k)
        p, s = sim.snapshot()
        params.append(p)
        stats.append(s)
    return Trajectory(torch.stack(params), torch.stack(stats), dict(sim.consensus))


def with_slowmo(case: Case, name: str, **slowmo) -> Case:
    return replace(case, name=name, slowmo=SlowMoSpec(**slowmo))


# --- streamed SlowMo ---------------------------------------------------------------------------------
def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in SHAPES:
        n = int(torch.Size(shape).numel())
        out.append(vector[offset : offset + n].reshape(shape).clone())
        offset += n
    return out


def element_lrs(lrs: list[float]) -> torch.Tensor:
    """The lr of every element of the flattened parameter vector."""
    per_param = {i: lr for group, lr in zip(PARAM_GROUPS, lrs) for i in group.indices}
    return torch.cat(
        [torch.full((int(torch.Size(s).numel()),), per_param[i], dtype=DTYPE) for i, s in enumerate(SHAPES)]
    )


def to_wire(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round to the wire dtype and back (float32 means no cast)."""
    return x if dtype == "float32" else x.to(getattr(torch, dtype)).to(DTYPE)
