"""What can go wrong during a run, and how a worker notices it: stop signals, non-finite values,
peers that time out, and injected faults for testing all of these.

    stop = StopSignals.install()          # SIGTERM/SIGINT only set a flag; the trainer polls it
    SLOWMO_TRAIN_FAULTS="kill@step=7,rank=1" slowmo-train ...      # inject a fault (tests, drills)

Errors meant for the user (:class:`RunError` and its subclasses) carry a one-line message; the CLI
prints it as is, without a traceback.

Fault injection (``SLOWMO_TRAIN_FAULTS``, ``;``-separated ``KIND@step=N[,rank=R][,seconds=S][,attempt=A]``)
exists to test and rehearse the recovery paths on a real run. A fault fires once, on rank ``R``
(default 0), at optimizer step ``N`` (1-based: while step N runs), and only in launch attempt ``A``
(default 0: the first; later attempts are restarts). Kinds:

- ``kill``: SIGKILL this worker before the step (a dead node);
- ``sigterm``: send SIGTERM to this worker (preemption reaching one rank);
- ``hang``: sleep ``seconds`` before the step (a stuck peer);
- ``nan``: make this rank's loss NaN at that step;
- ``kill_in_save``: SIGKILL this worker after it wrote its checkpoint file of step N to a temporary
  name, before the checkpoint is complete;
- ``disk_full``: writing the checkpoint of step N fails with ENOSPC on this rank.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slowmo_train import control

log = logging.getLogger("slowmo_train")

FAULTS_ENV = "SLOWMO_TRAIN_FAULTS"
FAULT_KINDS = ("kill", "sigterm", "hang", "nan", "kill_in_save", "disk_full")


class RunError(RuntimeError):
    """A failure the user must act on; ``str()`` is one line naming what and where."""


class NonFiniteError(RunError):
    pass


class RecordedFailure(RunError):
    """A restarted worker found the verdict of an earlier attempt (RUN_DIR/FATAL): nothing to retry."""


class PeerError(RunError):
    """A collective or point-to-point operation failed or timed out: a peer hung or died."""


#: set by slowmo-train's own launcher (slowmo_train/launch.py) for its workers: the launch attempt,
#: and that the parent is ours (not torchrun's agent)
ATTEMPT_ENV = "SLOWMO_TRAIN_ATTEMPT"
LOCAL_LAUNCHER_ENV = "SLOWMO_TRAIN_LOCAL_LAUNCHER"


def restart_attempt() -> int:
    """How many times the launcher (torchrun --max-restarts, launcher.max_restarts) restarted us."""
    return max(int(os.environ.get(name, "0") or 0) for name in ("TORCHELASTIC_RESTART_COUNT", ATTEMPT_ENV))


def under_elastic_agent() -> bool:
    """True in a worker that torchrun's elastic agent started (not slowmo-train's own launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and LOCAL_LAUNCHER_ENV not in os.environ


# --- stop signals ---------------------------------------------------------------------------------
#: installed by a launcher that runs all ranks in this process (slowmo_train/simulated): its handler
#: is the process's, and every rank's StopSignals reads its flag
_process_signals: StopSignals | None = None


def share_signals(signals: StopSignals | None) -> None:
    global _process_signals
    _process_signals = signals


class StopSignals:
    """SIGTERM (what Slurm sends before it kills a job) and SIGINT (Ctrl-C) set a flag instead of
    killing the process mid-collective. The trainer polls the flag every ``checkpoint.poll_every``
    steps with one all-reduce, so all ranks stop after the same step, save, and exit 0."""

    def __init__(self):
        self._signum: int | None = None
        self._source: StopSignals | None = None
        self._previous: dict[int, object] = {}

    @property
    def signum(self) -> int | None:
        return self._source.signum if self._source is not None else self._signum

    @signum.setter
    def signum(self, value: int | None) -> None:
        self._signum = value

    @classmethod
    def install(cls) -> StopSignals:
        stop = cls()
        if _process_signals is not None:
            stop._source = _process_signals  # a simulated rank: the launcher's handler sets the flag
        elif threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                stop._previous[sig] = signal.signal(sig, stop._handle)
        return stop

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.info(
                "received %s: stopping after the current step and saving a checkpoint", signal.Signals(signum).name
            )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# --- peers ------------------------------------------------------------------------------------------
_COMM_HINTS = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "broken pipe",
    "gloo",
    "nccl",
    "socket",
    "peer",
)


def is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, RunError):
        return False
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(h in text for h in _COMM_HINTS)


def peer_error(err: BaseException, operation: str, step: int, rank: int, timeout_s: float) -> PeerError:
    """One line naming the operation, the step and this rank for a failed/timed-out communication."""
    # drop the C++ source locations ("[.../gloo/transport/tcp/pair.cc:545]") gloo puts in front
    detail = re.sub(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", " ".join(str(err).split()))
    if len(detail) > 200:
        detail = detail[:200] + "..."
    timed_out = "timed out" in detail.lower() or "timeout" in detail.lower()
    what = f"timed out after launcher.timeout_s={timeout_s:g}s" if timed_out else "failed"
    return PeerError(
        f"rank {rank}: {operation} {what} at step {step}: a peer is hung or dead "
        f"(see logs/rank*.log in the run directory) [{detail}]"
    )


# --- non-finite values ------------------------------------------------------------------------------
def all_finite(tensors) -> bool:
    """True if every element of every tensor is finite (a sum is inf/NaN if any element is; one
    device sync per device)."""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None and t.is_floating_point():
            sums.setdefault(t.device, []).append(t.detach().double().sum())
    return all(bool(torch.isfinite(torch.stack(s).sum())) for s in sums.values())


class NonFiniteGuard:
    """What ``train.nonfinite`` asks for, agreed by all ranks on the control plane.

    ``check`` (at log points and before a checkpoint, where a host read costs nothing extra) stops
    the run with one line if any rank's loss or parameters hold inf/NaN, naming the last good
    checkpoint. ``agree`` (every step, ``nonfinite=skip`` only: whether to apply the update must be
    known at once) tells every rank to drop the step's update when any rank saw a non-finite loss or
    gradient, and stops once more than ``max_skips`` steps were dropped."""

    def __init__(self, mode: str, max_skips: int, last_checkpoint):
        self.mode, self.max_skips, self.last_checkpoint = mode, max_skips, last_checkpoint
        self.skips = 0
        self.finite_at = 0  # the last step at which every rank was checked finite

    @property
    def skipping(self) -> bool:
        return self.mode == "skip"

    def check(self, step: int, tensors) -> None:
        bad = control.flags(not all_finite(tensors))
        if bad:
            since = f"steps {self.finite_at + 1}-{step}" if step > self.finite_at + 1 else f"step {step}"
            raise NonFiniteError(
                f"non-finite loss or parameters on rank {', '.join(map(str, bad))} in {since} "
                f"(train.nonfinite={self.mode}); the last good checkpoint is {self.last_checkpoint() or 'none'}: "
                "lower optim.lr, check the data, or set train.nonfinite=skip"
            )
        self.finite_at = step

    def agree(self, step: int, tensors) -> bool:
        """True if every rank's ``tensors`` are finite (apply the update); False: skip it everywhere."""
        bad = control.flags(not all_finite(tensors))
        if not bad:
            return True
        self.skips += 1
        ranks = ", ".join(map(str, bad))
        log.warning(
            "step %d: non-finite loss/gradients on rank %s: update skipped on every rank (%d of at most %d)",
            step,
            ranks,
            self.skips,
            self.max_skips,
        )
        if self.skips > self.max_skips:
            raise NonFiniteError(
                f"{self.skips} steps skipped for non-finite values (train.max_nonfinite_skips={self.max_skips}), "
                f"the last at step {step} on rank {ranks}; the last good checkpoint is "
                f"{self.last_checkpoint() or 'none'}: lower optim.lr or check the data"
            )
        return False


# --- stop polls -------------------------------------------------------------------------------------
class StopPoller:
    """Whether to stop (a signal reached some rank) and whether a time-based checkpoint is due
    (rank 0's clock), agreed by every rank at the same step through the control plane.

    Polls are pipelined: each one is a non-blocking all-reduce of two numbers, started after a poll
    step and read ``every`` steps later, when it has long completed. Every rank reads the same result
    at the same step, so they still agree where to stop, and the poll never waits for a step's own
    communication: a blocking poll queued behind OSGP's in-flight gossip and cancelled its overlap
    (measured: OSGP 27-32 % slower per step on a slow link). The cost is that a signal is acted on
    up to 2 x ``every`` steps after it arrives."""

    def __init__(self, signals: StopSignals, every: int, checkpoint_minutes: float, seconds_since_save, rank: int):
        self.signals, self.every, self.rank = signals, every, rank
        self.checkpoint_minutes, self.seconds_since_save = checkpoint_minutes, seconds_since_save
        self._pending: control.Pending | None = None

    def _local(self) -> list[float]:
        due = (
            self.rank == 0 and self.checkpoint_minutes > 0 and self.seconds_since_save() >= self.checkpoint_minutes * 60
        )
        return [float(self.signals.signum or 0), float(due)]

    @staticmethod
    def _decode(flags: list[float]) -> tuple[str | None, bool]:
        signum = int(flags[0])
        return (signal.Signals(signum).name if signum else None), bool(flags[1])

    def now(self) -> str | None:
        """The stop signal any rank has received, by one blocking poll (at start-up)."""
        return self._decode(control.all_reduce(self._local(), op="max"))[0]

    def _poll_step(self, step: int, done: bool) -> bool:
        return not done and step % self.every == 0

    def collect(self, step: int, done: bool) -> tuple[str | None, bool]:
        """At a poll step: the result of the previous poll (stop signal, checkpoint due)."""
        if not self._poll_step(step, done):
            return None, False
        return self.finish()

    def start(self, step: int, done: bool) -> None:
        """At a poll step (after its checkpoint, so a time-based one is not asked for twice)."""
        if self._poll_step(step, done):
            self._pending = control.all_reduce_async(self._local(), op="max")

    def finish(self) -> tuple[str | None, bool]:
        """Read the poll in flight, if any (no collective is left behind)."""
        pending, self._pending = self._pending, None
        return self._decode(pending.wait()) if pending is not None else (None, False)


# --- fault injection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0
    seconds: float = 60.0
    attempt: int = 0


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, rest = item.partition("@")
        fields = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv)
        if kind not in FAULT_KINDS or "step" not in fields:
            raise ValueError(
                f"{FAULTS_ENV}: cannot parse {item!r}; expected KIND@step=N[,rank=R][,seconds=S]"
                f"[,attempt=A] with KIND one of {', '.join(FAULT_KINDS)}"
            )
        faults.append(
            Fault(
                kind,
                int(fields["step"]),
                int(fields.get("rank", 0)),
                float(fields.get("seconds", 60.0)),
                int(fields.get("attempt", 0)),
            )
        )
    return faults


class FaultInjector:
    """The faults of ``SLOWMO_TRAIN_FAULTS`` that concern this rank in this launch attempt."""

    def __init__(self, rank: int, text: str | None = None):
        text = os.environ.get(FAULTS_ENV, "") if text is None else text
        attempt = restart_attempt()
        self.faults = [f for f in parse_faults(text) if f.rank == rank and f.attempt == attempt]
        if self.faults:
            log.warning("fault injection armed on rank %d: %s", rank, self.faults)

    def _take(self, kind: str, step: int) -> Fault | None:
        for f in self.faults:
            if f.kind == kind and f.step == step:
                self.faults.remove(f)
                return f
        return None

    def before_step(self, step: int) -> None:
        """``step`` is the 1-based number of the step about to run."""
        if not self.faults:
            return
        if self._take("kill", step):
            log.warning("fault injection: SIGKILL at step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._take("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        fault = self._take("hang", step)
        if fault:
            log.warning("fault injection: sleeping %gs at step %d", fault.seconds, step)
            time.sleep(fault.seconds)

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.faults and self._take("nan", step):
            log.warning("fault injection: NaN loss at step %d", step)
            return loss * float("nan")
        return loss

    def on_checkpoint_write(self, step: int) -> None:
        """Called while the rank file of the checkpoint of ``step`` is being written."""
        if self.faults and self._take("disk_full", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def after_checkpoint_write(self, step: int) -> None:
        """Called after the rank file is written under its temporary name."""
        if self.faults and self._take("kill_in_save", step):
            log.warning("fault injection: SIGKILL while saving the checkpoint of step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
