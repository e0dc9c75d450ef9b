"""SlowMo: slow momentum over any base algorithm (Wang, Tantia, Ballas, Rabbat, "SlowMo: Improving
Communication-Efficient Distributed SGD with Slow Momentum", ICLR 2020, arXiv:1910.00643, Alg. 1).

    .venv/bin/python -m pytest -q tests/test_slowmo.py tests/test_slowmo_streaming.py tests/test_reference.py

Every worker runs ``tau`` inner steps of the base algorithm (AR-SGD, Local SGD, SGP, OSGP) from the
slow iterate ``x0``; then the workers average exactly and take one outer step,
``u <- beta u + (x0 - x_avg) / gamma;  x0 <- x0 - alpha gamma u``. The README's "Algorithms"
section explains the options; the code is split by concern:

* outer_optimizer.py: the rule (:func:`slow_momentum_step`: coupled as in Alg. 1, or decoupled /
  Nesterov as DiLoCo's outer SGD, Douillard et al. 2023, arXiv:2311.08105; gamma = 0);
* outer_sync.py: the units that post, wait for and merge the outer messages (whole model or fragment,
  sharded or not), outer_layout.py the bookkeeping of param groups, fragments and shards;
* here: the wrapper, which delegates the inner step to the base, tells the units when to send and
  merge, synchronises buffers, and checkpoints the slow state.

``gamma`` is the base lr of the outer step, per param group (the lr of the step that sends, read
from the optimizer). ``slowmo.inner_lr`` says which lr the inner steps use:

* ``hold`` (Alg. 1): :meth:`SlowMo.lr_schedule_step` holds the schedule at its value
  of the first inner step for all ``tau`` steps, so ``gamma`` is exactly the lr the inner steps used.
* ``follow`` (the default; the authors' later fairscale SlowMo): every inner step follows the per-step schedule
  and ``gamma`` is the lr of the outer step, i.e. of the last inner step of the iteration (for
  fragment f with F > 1, of the step that sends fragment f). The decoupled update has no ``gamma``;
  there ``follow`` changes only the inner steps. When the lr is constant within an outer iteration,
  ``follow`` runs the same lrs and the same ``gamma`` as ``hold``: exactly Alg. 1
  (tests/test_slowmo_inner_lr.py). Under a warm-up, ``follow`` does not run the first ``tau``
  steps at the warm-up's first value. The lr is a function of the step: no checkpoint state. The
  default is ``follow`` because it trained better where the two differ (docs/RESULTS.md).

What equals Algorithm 1 (with ``slowmo.inner_lr=hold``, or any lr constant within each outer
iteration). The defaults (float32 messages, F = 1 fragment, D = 0 overlap steps) run
:class:`WholeModelSync`, Alg. 1 bit for bit. Any other setting runs :class:`FragmentSync`, whose
arithmetic with F = 1, D = 0 and float32 would be Alg. 1 up to rounding (its ``d`` is the mean of
``x0 - x_i``, or sharded ``x0 - mean x_i`` per slice); each option departs from it by design:

* D >= 1: the outer step uses the average of the models at the send step k, with the lr of step k,
  and the D later local steps are re-applied on top of it (each rank its own); Local SGD does not
  average at the end of an outer iteration (the outer all-reduce does, D steps later).
* F > 1: fragment f's outer iteration crosses the window in which ``hold`` holds the lr; Local SGD's
  average is replaced by the staggered fragment synchronisations (with ``algorithm.period = tau``
  the base never averages on its own: the inner loop of Streaming DiLoCo, arXiv:2501.18512, with
  the peak outer bandwidth divided by F).
* 16-bit messages round every ``w_i x0 - num_i`` to 8 (bf16) or 11 (fp16) significant bits, and the
  all-reduce adds in that dtype (fp16 also overflows above 65504); x0, u and the push-sum weight
  (its own float64 all-reduce) keep full precision.
* Push-sum bases keep their weight unless the whole model is averaged at once (F = 1, D = 0): a
  fragment update flushes the gossip (for OSGP a wait on the last ``synch_freq`` steps' messages,
  counted as blocking) and sets the fragment's numerators to ``value * w``, so the network average
  of that fragment becomes the w-weighted mean of the merged values (x0_new exactly when D = 0).
* BatchNorm statistics and base-optimizer buffers are synchronised once per tau steps, when
  fragment 0 is merged. A checkpoint waits for in-flight messages and saves their summed payloads,
  so a resumed run merges them at the same step; those still in flight at the end are dropped.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from slowmo_train.algorithms import comm
from slowmo_train.algorithms.base import Algorithm
from slowmo_train.algorithms.comm import all_reduce_mean_, floating_buffers
from slowmo_train.algorithms.local_sgd import LocalSGD
from slowmo_train.algorithms.outer_layout import build_slow_groups
from slowmo_train.algorithms.outer_optimizer import OuterOptimizer, is_adaptive, resolve_beta
from slowmo_train.algorithms.outer_sync import WIRE_DTYPES, OuterMessage, OuterSetup, build_units
from slowmo_train.config import BASE_BUFFER_MODES, INNER_LR_MODES, LR_COUPLINGS, SlowMoConfig
from slowmo_train.dist import new_training_group

#: optimizer-state entries that count steps rather than hold a statistic (Adam keeps ``step`` as a
#: float tensor); averaging must leave them alone.
STEP_COUNTER_KEYS = frozenset({"step"})


def validate_slowmo_config(cfg: SlowMoConfig, base: Algorithm) -> None:
    """Raise ValueError naming the key for hyper-parameters outside their domain."""
    alpha, beta, tau = cfg.alpha, cfg.beta, cfg.tau
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"slowmo.alpha must be > 0, got {alpha!r}")
    if beta != "auto" and not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"slowmo.beta must be in [0, 1) or auto, got {beta!r}")
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"slowmo.tau must be an integer >= 1, got {tau!r}")
    if cfg.base_buffers not in BASE_BUFFER_MODES:
        raise ValueError(f"slowmo.base_buffers must be one of {', '.join(BASE_BUFFER_MODES)}, got {cfg.base_buffers!r}")
    if cfg.lr_coupling not in LR_COUPLINGS:
        raise ValueError(f"slowmo.lr_coupling must be one of {', '.join(LR_COUPLINGS)}, got {cfg.lr_coupling!r}")
    if cfg.inner_lr not in INNER_LR_MODES:
        raise ValueError(f"slowmo.inner_lr must be one of {', '.join(INNER_LR_MODES)}, got {cfg.inner_lr!r}")
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
        raise ValueError(
            "slowmo.sharded=true works only with slowmo.outer_dtype=float32 (16-bit outer messages "
            "carry x0 - x_i, which needs the whole x0 on every rank); set slowmo.sharded=false or "
            "slowmo.outer_dtype=float32"
        )


class SlowMo(Algorithm):
    """Slow momentum around a base algorithm, by composition: the hooks go to the base, and after
    each inner step the outer synchronisation units (outer_sync.py) post, resolve and merge.

    ``x0`` / ``u`` are this rank's slow state as flat tensors (per param group, or per fragment when
    sharded and streamed); every rank does identical arithmetic on the same all-reduced values, so
    all ranks hold bit-identical parameters after an outer step, sharded or not."""

    name = "slowmo"

    def __init__(self, base: Algorithm, cfg: SlowMoConfig):
        validate_slowmo_config(cfg, base)
        super().__init__(base.model, base.optimizer, base.topology)
        self.base = base
        self.comm = base.comm  # one CommStats object, so the trainer sees the outer step's bytes too
        self.tau, self.base_buffers, self.inner_lr = int(cfg.tau), cfg.base_buffers, cfg.inner_lr
        self.beta_auto = cfg.beta == "auto"
        beta = resolve_beta(cfg.beta, base.topology.workers, is_adaptive(base.optimizer))
        self.outer = OuterOptimizer(float(cfg.alpha), beta, cfg.lr_coupling, bool(cfg.nesterov))
        self.sharded, self.outer_dtype = bool(cfg.sharded), cfg.outer_dtype
        self.fragments, self.delay = int(cfg.fragments), int(cfg.overlap_steps)
        self.extra_metrics: dict[str, torch.Tensor] = {}
        self.rank, self.world_size = base.topology.rank, comm.world_size()
        # Outer messages get a process group of their own, so that an overlapped all-reduce does
        # not queue behind DDP's gradient buckets or gossip on NCCL's per-group stream.
        self.group = new_training_group() if self.world_size > 1 else None
        wire_dtype = WIRE_DTYPES[cfg.outer_dtype]
        #: False: Alg. 1 as written (WholeModelSync); True: streamed fragments (FragmentSync)
        self.streamed = self.fragments > 1 or self.delay > 0 or wire_dtype is not None
        params = base.parameters()
        # streamed + sharded shards each fragment, not each param group (outer_sync.FragmentSync)
        groups = build_slow_groups(
            params, base.optimizer, self.rank, self.world_size, self.sharded and not self.streamed
        )
        setup = OuterSetup(
            base,
            self.outer,
            groups,
            self.comm,
            self.group,
            self.rank,
            self.world_size,
            self.tau,
            self.fragments,
            self.delay,
            wire_dtype,
            self.sharded,
        )
        # The trainer broadcasts the initial parameters before building the algorithm, so x0 is
        # the same on every rank without communication.
        self.units, self.x0, self.u, self.layout = build_units(setup, [p.data for p in params], self.streamed)
        self.pending: deque = deque()

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
            self.units[message.fragment].complete(message)
        self.base.close()

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        out = self.base.pop_metrics()
        out.update(self.extra_metrics)
        self.extra_metrics = {}
        return out

    def describe(self) -> str:
        o = self.outer
        options = [
            f"alpha={o.alpha:g}",
            f"beta={o.beta:g}" + (" (auto)" if self.beta_auto else ""),
            f"tau={self.tau}",
            o.coupling,
            f"buffers={self.base_buffers}",
        ]
        if o.nesterov:
            options.append("nesterov")
        options.append(f"inner_lr={self.inner_lr}")
        if self.sharded:
            options.append("sharded")
        if self.streamed:
            options += [f"outer_dtype={self.outer_dtype}", f"fragments={self.fragments}", f"overlap_steps={self.delay}"]
        return f"slowmo({', '.join(options)}) over {self.base.describe()}"

    # --- the training step -------------------------------------------------------------------
    def lr_schedule_step(self, step: int) -> int:
        """``hold`` (Alg. 1): the schedule's value at the first inner step, held for the ``tau`` inner
        steps of an outer iteration, so that the outer step's ``gamma`` is the learning rate the inner
        steps used. ``follow``: the per-step schedule; the outer step's ``gamma`` (read from the
        optimizer after the step that sends) is then the lr of the iteration's last inner step."""
        if self.inner_lr == "follow":
            return step
        return (step // self.tau) * self.tau

    def after_optimizer_step(
        self, step: int, exact_average_follows: bool = False, outer_sync_follows: bool = False
    ) -> None:
        # At the end of an outer iteration SlowMo's synchronisation takes the place of Local SGD's own
        # average (the whole model when F = 1, fragment 0 now and the others staggered when F > 1).
        # Gossip is skipped only when the whole model is sent: with F > 1 the other fragments still
        # need this step's mixing.
        boundary = (step + 1) % self.tau == 0
        self.base.after_optimizer_step(
            step, exact_average_follows=boundary and len(self.units) == 1, outer_sync_follows=boundary
        )
        with self.comm.outer():
            for unit in self.units:
                if unit.due(step):
                    self.pending.append(unit.post(step))
            for message in self.pending:
                unit = self.units[message.fragment]
                if unit.resolve_due(message, step):
                    unit.resolve(message)
            while self.pending and self.pending[0].send_step + self.delay <= step:
                message = self.pending.popleft()
                self.units[message.fragment].merge(message)
                self.extra_metrics["consensus_distance"] = message.consensus
            if (step + 1 - self.delay) % self.tau == 0 and step + 1 > self.delay:
                self._synchronize_buffers()  # once per tau steps, when fragment 0 is merged

    def _synchronize_buffers(self) -> None:
        """BatchNorm statistics are averaged exactly like the parameters; base-optimizer buffers
        are reset, kept or averaged (``slowmo.base_buffers``)."""
        tensors = floating_buffers(self.base.model)
        if self.base_buffers == "average":
            tensors += self._optimizer_statistics()
        all_reduce_mean_(tensors, group=self.group, stats=self.comm)
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
        """x0 and u (this rank's shards when sharded: every rank must save its own), the base's
        state, and the in-flight outer messages, waited for but not merged."""
        for message in self.pending:
            self.units[message.fragment].complete(message)
        return {
            "x0": [x.clone() for x in self.x0],
            "u": [u.clone() for u in self.u],
            "layout": list(self.layout),
            "base": self.base.state_dict(),
            "pending": [m.state() for m in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        if [tuple(x) for x in state["layout"]] != self.layout:
            raise ValueError(
                f"the SlowMo checkpoint holds slow-state ranges {state['layout']} but this rank needs {self.layout}: "
                "a sharded checkpoint resumes only with the same world size, rank, slowmo.sharded and (when "
                "streamed) slowmo.fragments"
            )
        with torch.no_grad():
            for mine, saved in zip(self.x0 + self.u, list(state["x0"]) + list(state["u"])):
                mine.copy_(saved)
        self.base.load_state_dict(state["base"])
        for message in self.pending:
            self.units[message.fragment].complete(message)
        device = self.x0[0].device if self.x0 else None
        self.pending = deque(OuterMessage.from_state(m, device, self.comm.mark()) for m in state.get("pending", []))
        if any(m.fragment >= self.fragments for m in self.pending):
            raise ValueError(
                f"the SlowMo checkpoint has outer messages of more fragments than slowmo.fragments="
                f"{self.fragments}: resume with the checkpoint's slowmo settings"
            )
