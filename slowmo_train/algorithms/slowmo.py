"""SlowMo: slow momentum over any base algorithm (Wang, Tantia, Ballas, Rabbat, "SlowMo: Improving
Communication-Efficient Distributed SGD with Slow Momentum", ICLR 2020, arXiv:1910.00643, Alg. 1).

Every worker runs ``tau`` inner steps of the base algorithm (AR-SGD, Local SGD, SGP, OSGP) from the
slow iterate ``x0``; then all workers average exactly and take one outer (slow) momentum step. With
``d_t = x0_t - x_avg_t`` (the progress of the outer iteration, pointing backwards like a gradient)
the two outer updates are, side by side:

    coupled (the paper, Alg. 1)               decoupled (outer SGD with momentum, DiLoCo-style:
                                              Douillard et al., arXiv:2311.08105, 2023)
    u   <- beta u + d_t / gamma_t             u    <- beta u + d_t
    x0  <- x0 - alpha gamma_t u               step  = d_t + beta u   (nesterov)   or   u
                                              x0   <- x0 - alpha step

``gamma_t`` is the base learning rate of the outer iteration, taken per optimizer parameter group.
With a constant ``gamma`` the two coincide (decoupled without Nesterov): substituting
``u_dec = gamma u_coupled`` turns the coupled recursion into the decoupled one. They differ when the
schedule changes ``gamma``: the coupled momentum, measured in gradient units, is rescaled by the new
``gamma`` while the decoupled momentum is in parameter units and is not.

``gamma_t = 0`` (e.g. a warm-up that starts at zero) would divide by zero in the coupled update; it is
handled as "no outer momentum step": ``u`` is left unchanged and ``x0 <- x_avg``. Every optimizer
update is scaled by the lr, so the inner steps moved nothing and ``x_avg`` equals ``x0`` up to
rounding; taking the average keeps the ranks consistent, and there is no progress to measure.

Learning-rate schedule: the trainer evaluates the schedule at :meth:`SlowMo.lr_schedule_step`,
``(k // tau) * tau``, i.e. once at the first inner step of every outer iteration, and holds that
value for the ``tau`` inner steps. So ``gamma_t`` (read from ``optimizer.param_groups[g]["lr"]`` at
the outer step) is exactly the learning rate every inner step of that outer iteration used.

Streamed and overlapped outer steps (opt-in; Streaming DiLoCo, Douillard et al., 2025,
arXiv:2501.18512). Three options change *how* the exact average travels:

* ``outer_dtype`` (bfloat16 | float16): each rank sends its outer pseudo-gradient
  ``Delta_i = w_i x0 - num_i`` (``x0 - x_i`` without push-sum) cast to the wire dtype, and
  ``d = sum_i Delta_i / sum_i w_i`` replaces ``x0 - x_avg``. Sending the difference rather than the
  parameters puts the 16-bit rounding on the (small) progress of the outer iteration, not on the
  weights. What is lost: every Delta_i is rounded to 8 (bf16) or 11 (fp16) significant bits, and
  the all-reduce adds in the wire dtype, so the sum is rounded again at each of the n - 1 additions
  (order set by the collective; bit-identical on every rank, but not the exact sum of the cast
  values for n > 2). fp16 also overflows above 65504 and flushes below 6e-8. x0 and u keep the
  parameters' dtype; the push-sum weight travels in float64 (its own 8-byte all-reduce).
  ``float32`` means "no cast" (the parameters' own dtype).
* ``fragments = F``: the flattened parameters (layer order) are cut into F contiguous fragments of
  equal size (outer_sync.fragment_bounds); fragment f is sent after inner step k when
  ``(k + 1 + f tau / F) % tau == 0``, so each parameter is still averaged once every tau steps and
  an outer step moves 1/F of the model. x0 and u are the same per-group vectors; a fragment's
  update touches only its slices, with the gamma of each slice's param group at the send step.
* ``overlap_steps = D``: the all-reduce is posted with ``async_op=True`` at the send step k and the
  outer update is applied after step k + D, merged with the local progress made meanwhile by
  Streaming DiLoCo's rule (arXiv:2501.18512, Sec. 2.2, without its mixing factor):

      theta_f <- x0_f(new) + (theta_f(now) - theta_f(at send))

  The wait is counted as blocking time, the time in flight before it as overlapped time. A
  checkpoint waits for in-flight messages and saves their summed payloads (not applied), so a
  resumed run applies them at the same step; messages still in flight when training ends (sent in
  its last D steps) are waited for and dropped, as the run stops before their step.

What equals Algorithm 1: with the defaults (float32, F = 1, D = 0) the original blocking code path
runs unchanged (bit for bit). Any other setting takes the streamed path, which with F = 1, D = 0
and float32 equals Alg. 1 up to rounding only (d is computed as the mean of ``x0 - x_i`` instead of
``x0 - mean x_i``). With D >= 1 the result differs from Alg. 1 by design: the outer update uses
the average of the models at step k and the D later local steps are re-applied on top of it
(each rank its own), the gamma is the lr at the send step, and Local SGD does not average at the
end of an outer iteration (the outer all-reduce does, D steps later). Fragments with F > 1 differ
too: fragment f's outer iteration spans steps that cross the lr-holding window, and Local SGD's
average at the end of an outer iteration is replaced by the staggered fragment synchronisations
(with ``algorithm.period = tau`` the base then never averages on its own: Streaming DiLoCo's
inner loop, and the peak bandwidth of an outer step falls by F). BatchNorm statistics
and the base-optimizer buffers (``base_buffers``) are synchronised once per tau steps, when
fragment 0 is applied.

Push-sum bases (SGP, OSGP). The outer message is ``w_i x0 - num_i`` with the weights summed
alongside, so ``d = x0 - sum_i num_i / sum_i w_i`` is the exact (push-sum) average, as in Alg. 1.
With F = 1 and D = 0 every worker restarts from x0 with weight 1 (Alg. 1). Otherwise one weight
w_i is shared by all parameters, so a fragment cannot restart with weight 1 alone; instead the
gossip is flushed (every in-flight message waited for and added: all mass at the workers) and the
fragment's numerators become ``value_i * w_i``, where ``value_i`` is the merged value above. The
de-biased fragment then equals ``value_i``, the network average ``sum_i num_i / sum_i w_i`` of
that fragment becomes the w-weighted mean of the values (x0_new exactly when D = 0), and the other
parameters and the weights are untouched. Costs: for OSGP, the flush at a merge waits for the
gossip of the last ``synch_freq`` steps (messages otherwise added later), which is blocking time;
SGP has nothing in flight between steps.

Sharded slow state with fragments or overlap (``sharded`` and float32): x0 and u are kept per
fragment, and each rank keeps an equal slice ``[r c, (r + 1) c)`` of every fragment (1/n of the
slow state, and balanced all-gathers whatever the param groups), so no rank can form ``x0 - x_i``
over a whole fragment. Each rank sends its numerators instead (weights alongside, as above); after
the all-reduce it updates its slice of the fragment's x0 and u from ``x0 - sum_i num_i / sum_i w_i``,
and the new x0 of the fragment is all-gathered (non-blocking too). The all-reduce is waited for
``ceil(D / 2)`` steps after the send and the all-gather at the merge, D steps after it, so both
travel behind compute when D >= 2 (D = 1: the all-gather, half the all-reduce's bytes, blocks). The mathematics are those of the
unsharded streamed form up to rounding (``x0 - mean x_i`` rather than ``mean(x0 - x_i)``); the
cost is the all-gather, (n - 1) / n of the fragment per rank on top of the all-reduce.

Restrictions (validated): ``sharded`` does not take 16-bit outer messages: they carry ``x0 - x_i``,
which needs the whole x0 on every rank, while casting the parameters themselves to 16 bits would
round the weights, not the progress.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slowmo_train.algorithms.base import Algorithm, consensus_distance, exact_average
from slowmo_train.algorithms.comm import all_reduce_mean_, floating_buffers
from slowmo_train.algorithms.local_sgd import LocalSGD
from slowmo_train.algorithms.outer_sync import (
    WIRE_DTYPES, OuterMessage, build_fragments, fragment_due, owned_ranges,
)
from slowmo_train.config import SlowMoConfig

BASE_BUFFER_MODES = ("reset", "keep", "average")
LR_COUPLINGS = ("coupled", "decoupled")
#: optimizer-state entries that count steps rather than hold a statistic (Adam keeps ``step`` as a
#: float tensor); averaging must leave them alone.
STEP_COUNTER_KEYS = frozenset({"step"})


def validate_slowmo_config(cfg: SlowMoConfig, base: Algorithm) -> None:
    """Raise ValueError naming the key for hyper-parameters outside their domain."""
    alpha, beta, tau = cfg.alpha, cfg.beta, cfg.tau
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"slowmo.alpha must be > 0, got {alpha!r}")
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"slowmo.beta must be in [0, 1), got {beta!r}")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"slowmo.tau must be an integer >= 1, got {tau!r}")
    if cfg.base_buffers not in BASE_BUFFER_MODES:
        raise ValueError(f"slowmo.base_buffers must be one of {', '.join(BASE_BUFFER_MODES)}, got {cfg.base_buffers!r}")
    if cfg.lr_coupling not in LR_COUPLINGS:
        raise ValueError(f"slowmo.lr_coupling must be one of {', '.join(LR_COUPLINGS)}, got {cfg.lr_coupling!r}")
    if cfg.nesterov and cfg.lr_coupling != "decoupled":
        raise ValueError(f"slowmo.nesterov=True needs slowmo.lr_coupling='decoupled', got {cfg.lr_coupling!r}")
    if isinstance(base, LocalSGD) and tau % base.period != 0:
        raise ValueError(
            f"slowmo.tau must be a multiple of algorithm.period={base.period} when SlowMo wraps Local SGD, got {tau}"
        )
    if cfg.outer_dtype not in WIRE_DTYPES:
        raise ValueError(f"slowmo.outer_dtype must be one of {', '.join(WIRE_DTYPES)}, got {cfg.outer_dtype!r}")
    frags, delay = cfg.fragments, cfg.overlap_steps
    if isinstance(frags, bool) or not isinstance(frags, int) or frags < 1 or tau % frags != 0:
        raise ValueError(f"slowmo.fragments must be an integer >= 1 dividing slowmo.tau={tau}, got {frags!r}")
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < tau:
        raise ValueError(f"slowmo.overlap_steps must be an integer in [0, slowmo.tau={tau}), got {delay!r}")
    if cfg.sharded and cfg.outer_dtype != "float32":
        raise ValueError("slowmo.sharded=true works only with slowmo.outer_dtype=float32 (16-bit outer messages "
                         "carry x0 - x_i, which needs the whole x0 on every rank); set slowmo.sharded=false or "
                         "slowmo.outer_dtype=float32")


@dataclass(frozen=True)
class SlowGroup:
    """The parameters of one optimizer param group, laid out as one flat vector of ``numel``
    entries, of which this rank keeps ``[start, stop)`` (everything when unsharded)."""

    indices: tuple[int, ...]      # positions in ``base.parameters()``
    optimizer_group: int | None   # index into ``optimizer.param_groups``; None: frozen parameters
    numel: int
    start: int
    stop: int
    shard_size: int               # padded length every rank contributes to the all-gather


def build_slow_groups(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                      rank: int, world_size: int, sharded: bool) -> list[SlowGroup]:
    """Group the parameters by optimizer param group (each has its own ``gamma``) and assign shards:
    rank ``r`` of ``n`` owns the contiguous range ``[r c, (r+1) c)`` with ``c = ceil(numel / n)``."""
    group_of = {}  # by identity of the Parameter objects the optimizer holds (not their .data)
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = g
    members: dict[int | None, list[int]] = {}
    for i, p in enumerate(params):
        if p.requires_grad and id(p) not in group_of:
            # A trained parameter the optimizer does not know would have no gamma; most likely the
            # optimizer was built on other Parameter objects than the model's.
            raise ValueError(f"parameter {i} of shape {tuple(p.shape)} requires grad but is in no optimizer "
                             "param group; build the optimizer on the model's parameters before SlowMo")
        members.setdefault(group_of.get(id(p)), []).append(i)
    groups = []
    for g, indices in members.items():
        kinds = {(params[i].dtype, params[i].device) for i in indices}
        if len(kinds) != 1:
            raise ValueError(f"SlowMo needs the parameters of one optimizer param group to share dtype and device, "
                             f"param group {g} has {sorted(map(str, kinds))}")
        numel = sum(params[i].numel() for i in indices)
        if sharded:
            size = -(-numel // world_size)
            start, stop = min(rank * size, numel), min((rank + 1) * size, numel)
        else:
            size, start, stop = numel, 0, numel
        groups.append(SlowGroup(tuple(indices), g, numel, start, stop, size))
    return groups


class SlowMo(Algorithm):
    """Slow momentum around a base algorithm (Wang et al., ICLR 2020, Alg. 1), by composition.

    Every ``tau`` steps: x_avg = exact average;  u <- beta u + (x0 - x_avg) / gamma;
    x0 <- x0 - alpha gamma u  (coupled; see the module docstring for the decoupled form); all
    workers restart from x0.

    With ``sharded`` the slow state (``x0``, ``u``) is split across ranks: rank ``r`` keeps shard ``r``
    of each param group's flat vector, updates it after the exact all-reduce, and the new ``x0`` is
    all-gathered. Every rank does identical arithmetic on the same all-reduced values, so all ranks
    hold bit-identical parameters after an outer step, sharded or not.

    The exact average stays the base's full all-reduce when sharded, not a reduce-scatter: the
    consensus distance reported at every outer step needs the whole average on every rank (and Gloo
    has no reduce-scatter). Sharding thus cuts the slow state (x0, u) to 1/n per rank at the price
    of one extra all-gather of x0 per outer step."""

    name = "slowmo"

    def __init__(self, base: Algorithm, cfg: SlowMoConfig):
        validate_slowmo_config(cfg, base)
        super().__init__(base.model, base.optimizer, base.topology)
        self.base = base
        self.comm = base.comm  # one CommStats object, so the trainer sees the outer step's bytes too
        self.alpha, self.beta, self.tau = float(cfg.alpha), float(cfg.beta), int(cfg.tau)
        self.base_buffers, self.lr_coupling = cfg.base_buffers, cfg.lr_coupling
        self.nesterov, self.sharded = bool(cfg.nesterov), bool(cfg.sharded)
        self.extra_metrics: dict[str, float] = {}
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.outer_dtype, self.fragments, self.delay = cfg.outer_dtype, int(cfg.fragments), int(cfg.overlap_steps)
        self.wire_dtype = WIRE_DTYPES[cfg.outer_dtype]
        #: False: the original blocking Alg. 1 code path (bit for bit); True: the streamed path
        self.streamed = self.fragments > 1 or self.delay > 0 or self.wire_dtype is not None
        #: sharded streamed form: x0 and u are kept per fragment, each rank an equal slice of each
        #: (so every all-gather is balanced), instead of per param group
        self.by_fragment = self.sharded and self.streamed
        params = base.parameters()
        self.groups = build_slow_groups(params, base.optimizer, self.rank, self.world_size,
                                        self.sharded and not self.by_fragment)
        params = [p.data for p in params]
        self.pieces = build_fragments([p.numel() for p in params], [g.indices for g in self.groups], self.fragments)
        #: length of each fragment's flat vector, and where each of its pieces starts in it
        self.fragment_sizes = [sum(p.stop - p.start for p in pieces) for pieces in self.pieces]
        self.piece_starts = [list(itertools.accumulate((p.stop - p.start for p in pieces[:-1]), initial=0))
                             for pieces in self.pieces]
        #: by_fragment: per fragment, per rank, the parts of the pieces whose x0 / u that rank keeps
        self.owned = [owned_ranges(pieces, self.world_size) for pieces in self.pieces] if self.by_fragment else []
        # The trainer broadcasts the initial parameters before building the algorithm, so x0 is
        # the same on every rank without communication.
        if self.by_fragment:
            self.x0 = [self._fragment_values(params, f)[self._slice(f)].clone() for f in range(self.fragments)]
        else:
            self.x0 = [self._flat(params, g)[g.start:g.stop].clone() for g in self.groups]
        self.u = [torch.zeros_like(x) for x in self.x0]
        self.pending: deque[OuterMessage] = deque()

    # --- delegation to the base algorithm -------------------------------------------------------
    @property
    def replicas_identical(self) -> bool:
        return self.base.replicas_identical

    @property
    def train_model(self):
        return self.base.train_model

    def before_forward(self, step: int) -> None:
        self.base.before_forward(step)

    def after_backward(self, step: int) -> None:
        self.base.after_backward(step)

    def parameters(self):
        return self.base.parameters()

    def flush(self) -> None:
        self.base.flush()

    def mixing_state(self):
        return self.base.mixing_state()

    def load_consensus(self, values: list[torch.Tensor]) -> None:
        self.base.load_consensus(values)

    def close(self) -> None:
        for message in self.pending:
            self._complete(message)
        self.base.close()

    def pop_metrics(self) -> dict[str, float]:
        out = self.base.pop_metrics()
        out.update(self.extra_metrics)
        self.extra_metrics = {}
        return out

    def describe(self) -> str:
        options = [f"alpha={self.alpha:g}", f"beta={self.beta:g}", f"tau={self.tau}", self.lr_coupling,
                   f"buffers={self.base_buffers}"]
        if self.nesterov:
            options.append("nesterov")
        if self.sharded:
            options.append("sharded")
        if self.streamed:
            options += [f"outer_dtype={self.outer_dtype}", f"fragments={self.fragments}",
                        f"overlap_steps={self.delay}"]
        return f"slowmo({', '.join(options)}) over {self.base.describe()}"

    # --- the training step -------------------------------------------------------------------
    def lr_schedule_step(self, step: int) -> int:
        """Hold the schedule's value for the ``tau`` inner steps of an outer iteration, so that the
        outer step's ``gamma_t`` is the learning rate the inner steps used."""
        return (step // self.tau) * self.tau

    def after_optimizer_step(self, step: int, exact_average_follows: bool = False,
                             outer_sync_follows: bool = False) -> None:
        if self.streamed:
            self._streamed_step(step)
            return
        outer = (step + 1) % self.tau == 0
        self.base.after_optimizer_step(step, exact_average_follows=outer, outer_sync_follows=outer)
        if outer:
            with self.comm.outer():
                self.outer_step()

    def outer_step(self) -> None:
        """Alg. 1, lines 7-9 of the paper, plus the bookkeeping a real model needs (collective)."""
        x_avg = exact_average(self.base, stats=self.comm)
        numerators, weight = self.base.mixing_state()
        local = [n / weight if weight is not None else n for n in numerators]
        self.extra_metrics["consensus_distance"] = consensus_distance(local, x_avg)
        self.base.load_consensus(self._slow_momentum_step(x_avg))
        self._synchronize_buffers()

    # --- the streamed / overlapped outer step (module docstring) ------------------------------
    def _streamed_step(self, step: int) -> None:
        sends = [f for f in range(self.fragments) if fragment_due(step, f, self.tau, self.fragments)]
        # At the end of an outer iteration SlowMo's synchronisation takes the place of Local SGD's own
        # average (the whole model when F = 1, fragment 0 now and the others staggered when F > 1), so
        # with algorithm.period = tau the outer steps are the only averaging and move 1/F of the model.
        # Gossip is skipped only when the whole model is sent (F = 1): with F > 1 the other fragments
        # still need this step's mixing.
        boundary = (step + 1) % self.tau == 0
        self.base.after_optimizer_step(step, exact_average_follows=boundary and self.fragments == 1,
                                       outer_sync_follows=boundary)
        with self.comm.outer():
            self._send_and_merge(step, sends)

    def _send_and_merge(self, step: int, sends: list[int]) -> None:
        for f in sends:
            self._send(f, step)
        if self.by_fragment:
            lead = (self.delay + 1) // 2  # the all-reduce gets the larger share of the D steps
            for message in self.pending:
                if not message.resolved and message.send_step + lead <= step:
                    self._resolve_shard(message)
        while self.pending and self.pending[0].send_step + self.delay <= step:
            self._merge(self.pending.popleft())
        if (step + 1 - self.delay) % self.tau == 0 and step + 1 > self.delay:
            self._synchronize_buffers()  # once per tau steps, when fragment 0 is applied

    def _send(self, f: int, step: int) -> None:
        """Post fragment f's outer all-reduce of ``w x0 - num`` (cast to the wire dtype)."""
        self.base.flush()
        numerators, weight = self.base.mixing_state()
        pieces = self.pieces[f]
        nums = torch.cat([numerators[p.param].reshape(-1)[p.start:p.stop] for p in pieces])
        theta = nums.clone() if weight is None else nums / weight
        if self.by_fragment:
            payload = nums  # this rank holds only its slice of x0 (module docstring)
        else:
            x0 = torch.cat([self.x0[p.group][p.offset:p.offset + p.stop - p.start] for p in pieces])
            delta = x0 - nums if weight is None else x0 * weight - nums
            payload = delta.to(self.wire_dtype) if self.wire_dtype is not None else delta
        total_weight = None if weight is None else weight.detach().reshape(1).to(torch.float64).clone()
        message = OuterMessage(f, step, payload, total_weight, theta, [self._gamma(g) for g in self.groups])
        if self.world_size > 1:
            self.comm.add_allreduce(payload.numel() * payload.element_size(), self.world_size)
            message.works.append(dist.all_reduce(payload, async_op=True))
            if total_weight is not None:
                self.comm.add_allreduce(8, self.world_size)
                message.works.append(dist.all_reduce(total_weight, async_op=True))
        message.posted_at = time.perf_counter()
        self.pending.append(message)

    def _complete(self, message: OuterMessage) -> None:
        """Wait for a message's collective: time in flight is overlapped, the wait blocking. A
        sharded message's all-gathered slices are then put together into the fragment's new x0."""
        if message.works:
            self.comm.wait(message.works, message.posted_at, overlapped=self.delay > 0)
            message.works = []
        if message.gathered is not None:  # rank r's slice is [r c, (r + 1) c) of the fragment
            message.payload = torch.cat(message.gathered)[:message.theta_send.numel()]
            message.gathered = None

    def _divisor(self, message: OuterMessage, dtype: torch.dtype):
        return float(self.world_size) if message.weight is None else message.weight.to(dtype)

    def _resolve_shard(self, message: OuterMessage) -> None:
        """Sharded: update this rank's slice of the fragment's x0 and u from the summed numerators,
        then post the all-gather of the new x0 (put together by :meth:`_complete`)."""
        self._complete(message)
        f, pieces = message.fragment, self.pieces[message.fragment]
        average = message.payload / self._divisor(message, message.payload.dtype)
        message.consensus = consensus_distance([message.theta_send], [average])
        starts, x0, u, at = self.piece_starts[f], self.x0[f], self.u[f], 0
        for o in self.owned[f][self.rank]:  # this rank's slice, piece by piece (each its group's gamma)
            n, start = o.hi - o.lo, starts[o.piece] + o.lo
            self._update(x0[at:at + n], u[at:at + n], average[start:start + n], message.gammas[pieces[o.piece].group])
            at += n
        padded = average.new_zeros(self._slice_size(f))
        padded[:x0.numel()].copy_(x0)
        message.resolved = True
        if self.world_size == 1:
            message.gathered = [padded]
            return
        message.gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        moved = (self.world_size - 1) * padded.numel() * padded.element_size()
        self.comm.add_bytes(moved, moved)
        message.works.append(dist.all_gather(message.gathered, padded, async_op=True))
        message.posted_at = time.perf_counter()

    def _outer_update(self, message: OuterMessage) -> torch.Tensor:
        """Unsharded: one fragment's outer update of x0 and u in place; returns the new x0 of the
        fragment (a copy)."""
        pieces = self.pieces[message.fragment]
        dtype = self.x0[pieces[0].group].dtype
        d = message.payload.to(dtype) / self._divisor(message, dtype)  # = x0 - x_avg of this fragment
        x0_old = torch.cat([self.x0[p.group][p.offset:p.offset + p.stop - p.start] for p in pieces])
        average = x0_old - d
        self.extra_metrics["consensus_distance"] = consensus_distance([message.theta_send], [average])
        offset, new_x0 = 0, []
        for p in pieces:
            n = p.stop - p.start
            x0 = self.x0[p.group][p.offset:p.offset + n]
            u = self.u[p.group][p.offset:p.offset + n]
            self._step(x0, u, d[offset:offset + n], message.gammas[p.group], average[offset:offset + n])
            new_x0.append(x0)
            offset += n
        return torch.cat(new_x0)

    def _merge(self, message: OuterMessage) -> None:
        """Apply one fragment's outer update and re-apply the local progress made since its send."""
        self._complete(message)
        push_sum = self.base.mixing_state()[1] is not None
        if push_sum:
            # all gossip mass back at the workers before a slice of it is replaced (module docstring)
            self.base.flush()
        if self.by_fragment:
            if not message.resolved:
                self._resolve_shard(message)
            self._complete(message)
            x0_new = message.payload
            self.extra_metrics["consensus_distance"] = message.consensus
        else:
            x0_new = self._outer_update(message)
        pieces = self.pieces[message.fragment]
        params = [q.data for q in self.base.parameters()]
        new_values = []
        for p, start in zip(pieces, self.piece_starts[message.fragment]):
            n = p.stop - p.start
            value = x0_new[start:start + n].clone()
            if self.delay > 0:  # Streaming DiLoCo's merge: keep what the D later local steps added
                now = params[p.param].reshape(-1)[p.start:p.stop]
                value.add_(now - message.theta_send[start:start + n])
            new_values.append(value)
        if push_sum and self.fragments == 1 and self.delay == 0:
            # the whole model at consensus, as Alg. 1: every rank restarts with push-sum weight 1
            full = [None] * len(params)
            for p, v in zip(pieces, new_values):
                full[p.param] = v.view_as(params[p.param])
            self.base.load_consensus(full)
            return
        self.base.write_slices([(p.param, p.start, p.stop, v) for p, v in zip(pieces, new_values)])

    # --- the outer update --------------------------------------------------------------------
    def _flat(self, tensors: list[torch.Tensor], group: SlowGroup) -> torch.Tensor:
        return torch.cat([tensors[i].reshape(-1) for i in group.indices])

    def _fragment_values(self, tensors: list[torch.Tensor], f: int) -> torch.Tensor:
        return torch.cat([tensors[p.param].reshape(-1)[p.start:p.stop] for p in self.pieces[f]])

    def _slice_size(self, f: int) -> int:
        """by_fragment: every rank's (padded) share c of fragment f."""
        return -(-self.fragment_sizes[f] // self.world_size)

    def _slice(self, f: int) -> slice:
        """by_fragment: this rank's part ``[r c, (r + 1) c)`` of fragment f's flat vector."""
        c, n = self._slice_size(f), self.fragment_sizes[f]
        return slice(min(self.rank * c, n), min((self.rank + 1) * c, n))

    def _layout(self) -> list[tuple]:
        """What this rank's x0 / u hold: ranges of param groups, or (by_fragment) of fragments."""
        if self.by_fragment:
            return [("fragment", self.fragment_sizes[f], self._slice(f).start, self._slice(f).stop)
                    for f in range(self.fragments)]
        return [(g.numel, g.start, g.stop) for g in self.groups]

    def _gamma(self, group: SlowGroup) -> float:
        if group.optimizer_group is None:
            return 0.0  # frozen (requires_grad=False): no lr, so take the average as is
        return float(self.optimizer.param_groups[group.optimizer_group]["lr"])

    def _slow_momentum_step(self, x_avg: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update this rank's (shard of) x0 and u in place; return the full new x0 per parameter."""
        new_params: list[torch.Tensor | None] = [None] * len(x_avg)
        for group, x0, u in zip(self.groups, self.x0, self.u):
            avg = self._flat(x_avg, group)[group.start:group.stop]
            self._update(x0, u, avg, self._gamma(group))
            # A copy when unsharded: the base loads these values and must not alias the slow state.
            full = self._all_gather(x0, group) if self.sharded else x0.clone()
            offset = 0
            for i in group.indices:
                n = x_avg[i].numel()
                new_params[i] = full[offset:offset + n].view_as(x_avg[i])
                offset += n
        return new_params

    def _update(self, x0: torch.Tensor, u: torch.Tensor, avg: torch.Tensor, gamma: float) -> None:
        self._step(x0, u, x0 - avg, gamma, avg)

    def _step(self, x0: torch.Tensor, u: torch.Tensor, d: torch.Tensor, gamma: float, avg: torch.Tensor) -> None:
        """The outer update in place, given ``d = x0 - avg`` (``avg`` only for gamma = 0)."""
        if self.lr_coupling == "coupled":
            if gamma == 0.0:
                x0.copy_(avg)  # no lr to undo: keep u, restart from the average (module docstring)
                return
            u.mul_(self.beta).add_(d / gamma)
            x0.sub_(u, alpha=self.alpha * gamma)
        else:
            u.mul_(self.beta).add_(d)
            step = d.add(u, alpha=self.beta) if self.nesterov else u
            x0.sub_(step, alpha=self.alpha)

    def _all_gather(self, shard: torch.Tensor, group: SlowGroup) -> torch.Tensor:
        """Concatenate every rank's shard of x0 (padded to equal length for the collective)."""
        if self.world_size == 1:
            return shard.clone()  # the base must not alias the slow state
        padded = torch.zeros(group.shard_size, dtype=shard.dtype, device=shard.device)
        padded[: shard.numel()].copy_(shard)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        moved = (self.world_size - 1) * padded.numel() * padded.element_size()
        self.comm.add_bytes(moved, moved)
        with self.comm.blocking():
            dist.all_gather(pieces, padded)
        return torch.cat(pieces)[: group.numel]

    def _synchronize_buffers(self) -> None:
        """BatchNorm statistics are averaged exactly like the parameters; base-optimizer buffers
        are reset, kept or averaged (``slowmo.base_buffers``)."""
        tensors = floating_buffers(self.base.model)
        if self.base_buffers == "average":
            tensors += self._optimizer_statistics()
        all_reduce_mean_(tensors, group=None, stats=self.comm)
        if self.base_buffers == "reset":
            # A fresh state: SGD restarts its momentum from zero, Adam also restarts its step count.
            self.optimizer.state.clear()

    def _optimizer_statistics(self) -> list[torch.Tensor]:
        """Floating optimizer-state tensors in a rank-independent order (param groups, params,
        sorted keys), without step counters."""
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                for key in sorted(state):
                    value = state[key]
                    if key not in STEP_COUNTER_KEYS and torch.is_tensor(value) and value.is_floating_point():
                        out.append(value)
        return out

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """x0 and u (this rank's shards when sharded: every rank must save its own) and the base's
        state."""
        return {
            "x0": [x.clone() for x in self.x0],
            "u": [u.clone() for u in self.u],
            "layout": self._layout(),
            "base": self.base.state_dict(),
            # in-flight outer messages, waited for (not applied): a resumed run applies them at the
            # same step as an uninterrupted one
            "pending": [m.state() for m in self._completed_pending()],
        }

    def _completed_pending(self) -> list[OuterMessage]:
        for message in self.pending:
            self._complete(message)
        return list(self.pending)

    def load_state_dict(self, state: dict) -> None:
        layout = self._layout()
        if [tuple(x) for x in state["layout"]] != layout:
            raise ValueError(
                f"the SlowMo checkpoint holds slow-state ranges {state['layout']} but this rank needs {layout}: "
                "a sharded checkpoint resumes only with the same world size, rank, slowmo.sharded and (when "
                "streamed) slowmo.fragments"
            )
        with torch.no_grad():
            for mine, saved in zip(self.x0 + self.u, list(state["x0"]) + list(state["u"])):
                mine.copy_(saved)
        self.base.load_state_dict(state["base"])
        for message in self.pending:
            self._complete(message)
        device = self.x0[0].device if self.x0 else None
        self.pending = deque(OuterMessage.from_state(m, device) for m in state.get("pending", []))
        if any(m.fragment >= self.fragments for m in self.pending):
            raise ValueError(f"the SlowMo checkpoint has outer messages of more fragments than slowmo.fragments="
                             f"{self.fragments}: resume with the checkpoint's slowmo settings")
