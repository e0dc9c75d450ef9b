"""The local launcher: ``slowmo-train launcher.nproc_per_node=N`` (not under torchrun) starts N worker
processes on this machine through PyTorch's elastic launcher API (the machinery behind torchrun),
forwards SIGTERM/SIGINT to them (they save a checkpoint at an agreed step and exit), restarts them
after a failure (``launcher.max_restarts``) and turns the outcome into one line. Also here: what ends
a job at once instead of a restart, under this launcher and under torchrun (RUN_DIR/FATAL).

    launch_local(cli.worker_main, job_dict, nproc=4, run_dir="outputs/run")
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from slowmo_train.faults import ATTEMPT_ENV, LOCAL_LAUNCHER_ENV, PeerError, RunError

# --- failures that a restart cannot fix ------------------------------------------------------------
#: a run that failed this way records it here (RUN_DIR/FATAL): the launcher, or the workers a
#: launcher restarts, read it first and end the job instead of retrying
FATAL = "FATAL"


def is_deterministic(err: BaseException) -> bool:
    """A failure that would happen again on a restart: non-finite values with ``nonfinite=stop``,
    an unusable checkpoint or a resume mismatch, a config or data error found in a worker, a device
    mismatch. Peers that died or hung (PeerError) and anything unexpected may be transient."""
    from slowmo_train.config import ConfigError

    if isinstance(err, PeerError):
        return False
    return isinstance(err, (RunError, ConfigError, ValueError)) or type(err).__name__ == "DatasetError"


def record_fatal(run_dir: Path | None, line: str) -> None:
    """Write ``line`` (what the user reads) to RUN_DIR/FATAL, atomically."""
    if run_dir is None:
        return
    path = Path(run_dir) / FATAL
    tmp = path.with_name(f".{FATAL}.{os.getpid()}")
    try:
        tmp.write_text(line + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_fatal(run_dir: Path | None) -> str | None:
    try:
        return (Path(run_dir) / FATAL).read_text().strip() if run_dir is not None else None
    except OSError:
        return None


def clear_fatal(run_dir: Path | None) -> None:
    """A new job (not a restart) starts without the last job's verdict."""
    if run_dir is not None:
        (Path(run_dir) / FATAL).unlink(missing_ok=True)


def stop_elastic_agent() -> None:
    """Under torchrun: end the elastic agent (this worker's parent) so that it does not restart the
    workers into the same failure, and prints no traceback after our line. The agent offers no way to
    say "do not retry" (it restarts a failed group while --max-restarts lasts), so it gets SIGKILL;
    torchrun then exits with status 137 and the other workers of the node end with the same error."""
    agent = os.getppid()
    if agent > 1:
        try:
            os.kill(agent, signal.SIGKILL)
        except OSError:
            pass


def report_stop(summary: dict, run_dir: str | None) -> None:
    """One line after a run that stopped early on a signal (SIGTERM/SIGINT) and saved a checkpoint."""
    where = summary.get("run_dir") or run_dir
    print(
        f"slowmo-train: stopped by {summary['stopped_by']} at step {summary['steps']}; checkpoint: "
        f"{summary.get('checkpoint') or 'none'}; continue with resume=auto output_dir={where}",
        file=sys.stderr,
        flush=True,
    )


def _worker_pids() -> list[int]:
    """This process's spawned workers (children running multiprocessing's spawn_main), from /proc."""
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and b"spawn_main" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


class _ForwardSignals:
    """In the launcher process: pass SIGTERM/SIGINT on to the workers, which save a checkpoint at an
    agreed step and exit 0, while the elastic agent keeps collecting their results. A second signal
    kills the workers outright (SIGKILL), so Ctrl-C twice never leaves a worker behind."""

    def __init__(self):
        import signal

        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        import signal

        forward = signum if self.signum is None else signal.SIGKILL
        self.signum = self.signum or signum
        pids = _worker_pids()
        if not pids:  # still in rendezvous or spawning: nothing to save yet, the agent stops everything
            raise KeyboardInterrupt
        for pid in pids:
            try:
                os.kill(pid, forward)
            except ProcessLookupError:
                pass

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _quiet_elastic() -> None:
    """The agent's own log lines (signal received, worker group restarting, child tracebacks) are
    replaced by ours, and each worker's log holds its failure."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _failure_line(err, restarts: int, run_dir: str | None) -> str:
    """One line for a failed worker group: the first failure's message (ours are self-explanatory)."""
    rank, failure = err.get_first_failure()
    msg = failure.message
    if isinstance(msg, dict):
        msg = msg.get("message")
    msg = str(msg or f"exit code {failure.exitcode}")
    for name in (
        "CheckpointError",
        "NonFiniteError",
        "PeerError",
        "RunError",
        "ConfigError",
        "DatasetError",
        "ValueError",
    ):
        msg = msg.removeprefix(f"{name}: ")
    msg = msg.removeprefix(f"rank {rank}: ")
    others = len(err.failures) - 1
    also = f" ({others} other worker(s) failed too)" if others > 0 else ""
    after = f" after {restarts} restart(s)" if restarts else ""
    where = f"; logs in {run_dir}/logs" if run_dir else ""
    return f"worker rank {rank} failed{after}: {msg}{also}{where}"


def launch_local(
    entrypoint: Callable[[dict, str | None], dict],
    job_dict: dict,
    nproc: int,
    run_dir: str | None,
    max_restarts: int = 0,
) -> None:
    """Start ``nproc`` workers ``entrypoint(job_dict, run_dir)`` (``cli.worker_main``) on this machine with
    torch's elastic launcher (what torchrun uses);
    after a worker dies, restart all of them up to ``max_restarts`` times (they resume from the
    newest checkpoint). Ctrl-C / SIGTERM reach the workers, which save and exit; one line says so."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # SIGTERM/SIGINT are ours to forward (the agent would otherwise stop the workers itself and
    # wait for them until its shutdown timeout)
    _quiet_elastic()
    clear_fatal(run_dir)
    # Restarts are ours, one elastic launch per attempt, so that a failure a restart cannot fix
    # (RUN_DIR/FATAL, written by the workers: slowmo_train/faults.py) ends the job at once
    os.environ[LOCAL_LAUNCHER_ENV] = "1"
    forward = _ForwardSignals()
    try:
        for attempt in range(max_restarts + 1):
            os.environ[ATTEMPT_ENV] = str(attempt)
            config = LaunchConfig(
                min_nodes=1,
                max_nodes=1,
                nproc_per_node=nproc,
                run_id=f"slowmo-{uuid.uuid4().hex[:8]}",
                rdzv_backend="c10d",
                rdzv_endpoint="127.0.0.1:0",
                max_restarts=0,
                monitor_interval=0.5,
                start_method="spawn",
                signals_to_handle="SIGHUP,SIGQUIT",
                # the agent stops workers itself only after a failure, when their peers are gone and
                # nothing is left to save: a hung worker need not be waited for long
                shutdown_timeout=5,
            )
            try:
                results = elastic_launch(config, entrypoint=entrypoint)(job_dict, run_dir)
                break
            except ChildFailedError as err:
                if forward.signum is not None:
                    name = signal.Signals(forward.signum).name
                    print(
                        f"slowmo-train: interrupted by {name} (workers killed before a checkpoint was complete); "
                        f"logs in {run_dir}/logs",
                        file=sys.stderr,
                        flush=True,
                    )
                    sys.exit(130 if forward.signum == signal.SIGINT else 143)
                verdict = read_fatal(run_dir)
                if verdict is not None:  # a restart would fail the same way
                    print(verdict, file=sys.stderr, flush=True)
                    sys.exit(1)
                line = _failure_line(err, attempt, run_dir)
                if attempt == max_restarts:
                    print(f"slowmo-train: error: {line}", file=sys.stderr, flush=True)
                    sys.exit(1)
                print(
                    f"slowmo-train: {line}; restarting the workers ({attempt + 1} of {max_restarts}), they resume "
                    "from the newest checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        name = signal.Signals(forward.signum or signal.SIGINT).name
        print(f"slowmo-train: interrupted by {name} before training started", file=sys.stderr, flush=True)
        sys.exit(130 if forward.signum != signal.SIGTERM else 143)
    finally:
        forward.restore()
        os.environ.pop(ATTEMPT_ENV, None)
        os.environ.pop(LOCAL_LAUNCHER_ENV, None)
    first = results.get(0) if isinstance(results, dict) else None
    if isinstance(first, dict) and first.get("stopped_by"):
        report_stop(first, run_dir)
        if forward.signum == signal.SIGINT:
            sys.exit(130)
