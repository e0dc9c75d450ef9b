"""Command-line entry point: compose the Hydra config -> validate -> launch workers -> train.

    slowmo-train +exp=quickstart data.root=../shared/data/cifar10
    slowmo-train task=cifar10 algorithm=sgp slowmo.enabled=true launcher.nproc_per_node=4
    torchrun --standalone --nproc_per_node=2 -m slowmo_train task=cifar10 algorithm=allreduce

Under torchrun every process runs this module and reads its rank from the environment; run
directly, it starts ``launcher.nproc_per_node`` local workers itself through PyTorch's elastic
launcher API (the machinery behind torchrun), so there is no re-spawning under torchrun.

Everything the config and the data directory can reveal (a bad value, an unknown architecture, too
many gossip peers, a batch larger than a worker's data, an unwritable run directory, a checkpoint
that does not fit this run) is found here before any worker starts and printed as one
``slowmo-train: error:`` line (exit 2). A worker's failure, an interrupt (Ctrl-C) and a preemption
(SIGTERM) also end in one line each.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import uuid
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from slowmo_train import control
from slowmo_train import dist as sdist
from slowmo_train.config import ConfigError, JobConfig, per_worker_batch, register_configs, to_job_config, validate
from slowmo_train.data.cifar10 import DatasetError
from slowmo_train.faults import RunError, restart_attempt
from slowmo_train.registry import ALGORITHM_SPECS
from slowmo_train.tasks import TASKS

log = logging.getLogger("slowmo_train")


def config_dir() -> str:
    """The configs: inside the installed package, or at the top of a source checkout (editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"slowmo-train's configs were not found next to {here}; reinstall the package")


#: config groups declared in config.yaml's defaults list (value null), so that their place there, not
#: the order of the command line, decides which wins (the smoke always shrinks the experiment)
DEFAULTS_LIST_GROUPS = ("exp", "smoke")


def plain_group_overrides(overrides: list[str]) -> list[str]:
    """``+exp=NAME`` / ``+smoke=tiny`` as ``exp=NAME`` / ``smoke=tiny``. Both spellings are accepted: Hydra
    refuses to add (``+``) a group that the defaults list already holds, and the docs use ``+``."""
    prefixes = tuple(f"+{group}=" for group in DEFAULTS_LIST_GROUPS)
    return [o[1:] if o.startswith(prefixes) else o for o in overrides]


def user_error(message: str) -> None:
    print(f"slowmo-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def default_run_dir(job: JobConfig) -> Path:
    now = datetime.datetime.now()
    return Path("outputs") / now.strftime("%Y-%m-%d") / f"{now.strftime('%H-%M-%S')}_{job.name}"


def _hydra_run_dir() -> Path | None:
    """In a Hydra multirun (-m) each job gets Hydra's own sweep sub-directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.runtime.output_dir)
    except Exception:
        return None
    return None


def prepare_run_dir(job: JobConfig, proposed: Path | None) -> Path:
    run_dir = Path(job.output_dir) if job.output_dir else (proposed or default_run_dir(job))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# --- checks before any worker starts ---------------------------------------------------------------
def check_task(job: JobConfig) -> None:
    """task.name must be a task of the table (slowmo_train/tasks/__init__.py)."""
    if job.task.name not in TASKS:
        raise ConfigError("task", job.task.name, "choose one of " + ", ".join(TASKS))


def check_model(job: JobConfig) -> None:
    from slowmo_train.models import MODELS

    archs = MODELS.get(job.task.name, {})
    if job.model.arch not in archs:
        raise ConfigError("model.arch", job.model.arch,
                          f"not an architecture of task {job.task.name}; choose one of {', '.join(archs) or '(none)'}")


def check_topology(job: JobConfig, env: sdist.DistEnv, world: int) -> None:
    """Gossip peers per step must exist among the workers (one per node)."""
    if not ALGORITHM_SPECS[job.algorithm.name].gossip:
        return
    from slowmo_train.algorithms.graphs import build_graph

    launcher_env = env if env.under_launcher else sdist.DistEnv(world_size=world, local_world_size=world)
    workers = world // sdist.resolve_procs_per_node(job.algorithm.nprocs_per_node, launcher_env)
    try:
        build_graph(job.algorithm.graph, workers, job.algorithm.peers_per_itr)
    except ValueError as err:
        raise ConfigError("algorithm.peers_per_itr", job.algorithm.peers_per_itr,
                          f"{err} (each of the {workers} workers needs that many other workers)") from None


def check_batch_size(job: JobConfig, world: int) -> None:
    """A per-worker batch larger than a worker's share of the training data (tasks that count it)."""
    size_fn = TASKS[job.task.name].train_size
    n = size_fn(job.data) if size_fn is not None else None
    if n is None:
        return
    batch, share = per_worker_batch(job.train, world), n // world
    if batch > share:
        key = "train.total_batch" if job.train.total_batch is not None else "train.batch_size"
        value = job.train.total_batch if job.train.total_batch is not None else batch
        raise ConfigError(key, value, f"a batch of {batch} per worker is larger than the {share} training examples "
                                      f"each of the {world} workers gets ({n} in {job.data.root}); lower it")


def check_run_dir(job: JobConfig) -> None:
    """The run directory must be creatable and writable (checkpoints, metrics, logs go there)."""
    if not job.output_dir:
        return
    path = Path(job.output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError("output_dir", job.output_dir,
                          f"cannot write there ({err.strerror or err}); choose a writable directory") from None


def check_resume(job: JobConfig, job_dict: dict, world: int) -> None:
    """The checkpoint to resume from exists, is complete and fits this run; a fresh run does not
    silently mix with an old one's files."""
    from slowmo_train import checkpoint as ckpt

    run_dir = Path(job.output_dir) if job.output_dir else None
    if restart_attempt() > 0:
        return  # a launcher restart: the workers resume from the newest checkpoint themselves
    if job.resume == "none":
        if run_dir is not None:
            newest, _ = ckpt.newest_complete(ckpt.checkpoint_root(run_dir))
            if newest is not None:
                raise ConfigError("resume", job.resume, f"output_dir={job.output_dir} already holds checkpoints "
                                  f"(newest: {newest.name}); continue that run with resume=auto, or choose another "
                                  "output_dir")
        return
    try:
        path, warnings = ckpt.resolve_resume(job.resume, run_dir)
        for warning in warnings:
            print(f"slowmo-train: warning: {warning}", file=sys.stderr, flush=True)
        if path is not None:
            ckpt.check_compatible(ckpt.check_complete(path), job_dict, world, path)
    except ckpt.CheckpointError as err:
        user_error(str(err))


def preflight(job: JobConfig, env: sdist.DistEnv, world: int) -> None:
    """All checks that need no worker; ConfigError/DatasetError/CheckpointError on failure."""
    validate(job, world_size=world)
    check_task(job)
    check_model(job)
    check_topology(job, env, world)
    TASKS[job.task.name].check_data(job.data)
    check_batch_size(job, world)
    if env.under_launcher and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and not job.output_dir:
        raise ConfigError("output_dir", None, "torchrun --max-restarts needs output_dir=DIR, so that restarted "
                                              "workers find the run's checkpoints")
    check_run_dir(job)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


#: errors a worker reports as one line (anything else is a bug and keeps its traceback); components
#: reject bad values with a ValueError naming the key, e.g. a batch larger than the data
WORKER_USER_ERRORS = (RunError, ConfigError, DatasetError, ValueError)


def worker_main(job_dict: dict, run_dir: str | None) -> dict:
    """Body of every worker process (torchrun's or the local launcher's)."""
    import torch

    from slowmo_train.metrics import setup_logging
    from slowmo_train.precision import configure_device_math
    from slowmo_train.trainer import Trainer
    from slowmo_train.asynchronous.runner import AsyncRunner

    env = sdist.read_env()
    job = to_job_config(job_dict)
    backend = sdist.pick_backend(job.launcher.backend)
    threads = sdist.set_cpu_threads(env, job.launcher.threads_per_worker) if backend == "gloo" else None
    device = sdist.device_for(env, backend)
    sdist.init_process_group(env, backend, job.launcher.timeout_s, device)
    try:
        if env.rank == 0:
            path = prepare_run_dir(job, Path(run_dir) if run_dir else None)
            OmegaConf.save(OmegaConf.structured(job), path / "config.yaml")
            run_dir = str(path.resolve())
        run_dir = control.broadcast_object(run_dir)
        setup_logging(Path(run_dir), env.rank)
        math = configure_device_math(device, job.train.tf32)
        if env.rank == 0:
            log.info("run directory: %s", run_dir)
            log.info("backend %s, device %s (%s), %s threads per worker", backend, device, math,
                     threads or torch.get_num_threads())
        # the loop comes from the algorithm table: the synchronous Trainer or the asynchronous runner
        loop = {"sync": Trainer, "async": AsyncRunner}[ALGORITHM_SPECS[job.algorithm.name].kind]
        summary = loop(job, env, device, Path(run_dir)).run()
        if env.rank == 0 and not summary.get("stopped_by"):  # a stop is reported by the launcher
            log.info("done: %s", summary.get("final_eval"))
        summary["run_dir"] = run_dir
        return summary
    except WORKER_USER_ERRORS as err:
        log.error("%s", one_line(err))
        raise
    finally:
        sdist.destroy_process_group()


def report_stop(summary: dict, run_dir: str | None) -> None:
    """One line after a run that stopped early on a signal (SIGTERM/SIGINT) and saved a checkpoint."""
    where = summary.get("run_dir") or run_dir
    print(f"slowmo-train: stopped by {summary['stopped_by']} at step {summary['steps']}; checkpoint: "
          f"{summary.get('checkpoint') or 'none'}; continue with resume=auto output_dir={where}",
          file=sys.stderr, flush=True)


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


def launch_local(job_dict: dict, nproc: int, run_dir: str | None, max_restarts: int = 0) -> None:
    """Start ``nproc`` workers on this machine with torch's elastic launcher (what torchrun uses);
    after a worker dies, restart all of them up to ``max_restarts`` times (they resume from the
    newest checkpoint). Ctrl-C / SIGTERM reach the workers, which save and exit; one line says so."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # SIGTERM/SIGINT are ours to forward (the agent would otherwise stop the workers itself and
    # wait for them until its shutdown timeout)
    _quiet_elastic()
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"slowmo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts, monitor_interval=0.5,
        start_method="spawn", signals_to_handle="SIGHUP,SIGQUIT",
        # the agent stops workers itself only after a failure (a restart or the end), when their peers
        # are gone and nothing is left to save: a hung worker need not be waited for long
        shutdown_timeout=5,
    )
    forward = _ForwardSignals()
    try:
        results = elastic_launch(config, entrypoint=worker_main)(job_dict, run_dir)
    except KeyboardInterrupt:
        name = signal.Signals(forward.signum or signal.SIGINT).name
        print(f"slowmo-train: interrupted by {name} before training started", file=sys.stderr, flush=True)
        sys.exit(130 if forward.signum != signal.SIGTERM else 143)
    except ChildFailedError as err:
        if forward.signum is not None:
            name = signal.Signals(forward.signum).name
            print(f"slowmo-train: interrupted by {name} (workers killed before a checkpoint was complete); "
                  f"logs in {run_dir}/logs", file=sys.stderr, flush=True)
            sys.exit(130 if forward.signum == signal.SIGINT else 143)
        rank, failure = err.get_first_failure()
        msg = failure.message
        if isinstance(msg, dict):
            msg = msg.get("message")
        msg = str(msg or f"exit code {failure.exitcode}")
        for name in ("CheckpointError", "NonFiniteError", "PeerError", "RunError", "ConfigError", "DatasetError",
                     "ValueError"):
            msg = msg.removeprefix(f"{name}: ")  # our messages are self-explanatory without it
        msg = msg.removeprefix(f"rank {rank}: ")
        others = len(err.failures) - 1
        also = f" ({others} other worker(s) failed too)" if others > 0 else ""
        restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
        where = f"; logs in {run_dir}/logs" if run_dir else ""
        print(f"slowmo-train: error: worker rank {rank} failed{restarts}: {msg}{also}{where}", file=sys.stderr,
              flush=True)
        sys.exit(1)
    finally:
        forward.restore()
    first = results.get(0) if isinstance(results, dict) else None
    if isinstance(first, dict) and first.get("stopped_by"):
        report_stop(first, run_dir)
        if forward.signum == signal.SIGINT:
            sys.exit(130)


def run(cfg: DictConfig) -> None:
    """Validate the composed config, then train here (torchrun / one process) or spawn workers."""
    try:
        job = to_job_config(cfg)
        env = sdist.read_env()
        world = env.world_size if env.under_launcher else job.launcher.nproc_per_node
        preflight(job, env, world)
        job_dict = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
        check_resume(job, job_dict, world)
    except (ConfigError, DatasetError) as err:
        user_error(str(err))
    except Exception as err:  # OmegaConf type errors from overrides of dataclass fields
        user_error(str(err).splitlines()[0] if str(err) else repr(err))
    hydra_dir = _hydra_run_dir()
    run_dir = str(hydra_dir) if hydra_dir else None
    if env.under_launcher or job.launcher.nproc_per_node == 1:
        # this process is the worker: its errors end in one line too (torchrun adds its own summary)
        try:
            summary = worker_main(job_dict, run_dir)
        except WORKER_USER_ERRORS as err:
            msg = one_line(err)
            where = "" if msg.startswith(f"rank {env.rank}: ") else f"rank {env.rank}: "
            print(f"slowmo-train: error: {where}{msg}", file=sys.stderr, flush=True)
            sys.exit(1)
        if summary.get("stopped_by") and env.rank == 0:
            report_stop(summary, run_dir)
    else:
        if run_dir is None:  # decide it here so the workers and the failure message agree
            run_dir = str(prepare_run_dir(job, None).resolve())
        launch_local(job_dict, job.launcher.nproc_per_node, run_dir, job.launcher.max_restarts)


def main() -> None:
    register_configs()
    # Hydra parses sys.argv; under torchrun every rank sees the same arguments.
    sys.argv[1:] = plain_group_overrides(sys.argv[1:])
    hydra.main(version_base=None, config_path=config_dir(), config_name="config")(run)()


if __name__ == "__main__":
    main()
