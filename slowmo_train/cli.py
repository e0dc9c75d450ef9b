"""Command-line entry point: compose the Hydra config -> validate -> launch workers -> train.

    slowmo-train +exp=quickstart data.root=../shared/data/cifar10
    slowmo-train task=cifar10 algorithm=sgp slowmo.enabled=true launcher.nproc_per_node=4
    torchrun --standalone --nproc_per_node=2 -m slowmo_train task=cifar10 algorithm=allreduce

Under torchrun every process runs this module and reads its rank from the environment; run
directly, it starts ``launcher.nproc_per_node`` local workers itself through PyTorch's elastic
launcher API (the machinery behind torchrun; slowmo_train/launch.py), so there is no re-spawning under
torchrun.

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
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from slowmo_train import control
from slowmo_train import dist as sdist
from slowmo_train.config import ConfigError, JobConfig, per_worker_batch, register_configs, to_job_config
from slowmo_train.config_checks import validate
from slowmo_train.data.cifar10 import DatasetError
from slowmo_train.faults import RecordedFailure, RunError, restart_attempt, under_elastic_agent
from slowmo_train.launch import (
    clear_fatal,
    is_deterministic,
    launch_local,
    read_fatal,
    record_fatal,
    report_stop,
    stop_elastic_agent,
)
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
        raise ConfigError(
            "model.arch",
            job.model.arch,
            f"not an architecture of task {job.task.name}; choose one of {', '.join(archs) or '(none)'}",
        )


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
        raise ConfigError(
            "algorithm.peers_per_itr",
            job.algorithm.peers_per_itr,
            f"{err} (each of the {workers} workers needs that many other workers)",
        ) from None


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
        raise ConfigError(
            key,
            value,
            f"a batch of {batch} per worker is larger than the {share} training examples "
            f"each of the {world} workers gets ({n} in {job.data.root}); lower it",
        )


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
        raise ConfigError(
            "output_dir", job.output_dir, f"cannot write there ({err.strerror or err}); choose a writable directory"
        ) from None


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
                raise ConfigError(
                    "resume",
                    job.resume,
                    f"output_dir={job.output_dir} already holds checkpoints "
                    f"(newest: {newest.name}); continue that run with resume=auto, or choose another "
                    "output_dir",
                )
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
        raise ConfigError(
            "output_dir",
            None,
            "torchrun --max-restarts needs output_dir=DIR, so that restarted workers find the run's checkpoints",
        )
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

    from slowmo_train.asynchronous.runner import AsyncRunner
    from slowmo_train.metrics import setup_logging
    from slowmo_train.precision import configure_device_math
    from slowmo_train.trainer import Trainer

    env = sdist.read_env()
    job = to_job_config(job_dict)
    fatal_dir = run_dir or job.output_dir
    try:
        if restart_attempt() > 0 and (verdict := read_fatal(fatal_dir)):
            raise RecordedFailure(verdict.removeprefix("slowmo-train: error: "))  # a restart cannot help
        if restart_attempt() == 0 and env.rank == 0:
            clear_fatal(fatal_dir)  # a new job starts without the last one's verdict
        backend = sdist.pick_backend(job.launcher.backend)
        threads = sdist.set_cpu_threads(env, job.launcher.threads_per_worker) if backend == "gloo" else None
        device = sdist.device_for(env, backend)
        sdist.init_process_group(env, backend, job.launcher.timeout_s, device)
        if env.rank == 0:
            path = prepare_run_dir(job, Path(run_dir) if run_dir else None)
            OmegaConf.save(OmegaConf.structured(job), path / "config.yaml")
            run_dir = str(path.resolve())
        run_dir = control.broadcast_object(run_dir)
        setup_logging(Path(run_dir), env.rank)
        math = configure_device_math(device, job.train.tf32)
        if env.rank == 0:
            log.info("run directory: %s", run_dir)
            log.info(
                "backend %s, device %s (%s), %s threads per worker",
                backend,
                device,
                math,
                threads or torch.get_num_threads(),
            )
        # the loop comes from the algorithm table: the synchronous Trainer or the asynchronous runner
        loop = {"sync": Trainer, "async": AsyncRunner}[ALGORITHM_SPECS[job.algorithm.name].kind]
        summary = loop(job, env, device, Path(run_dir)).run()
        if env.rank == 0 and not summary.get("stopped_by"):  # a stop is reported by the launcher
            log.info("done: %s", summary.get("final_eval"))
        summary["run_dir"] = run_dir
        return summary
    except WORKER_USER_ERRORS as err:
        log.error("%s", one_line(err))
        if is_deterministic(err):
            # the launcher (ours, or the workers torchrun restarts) reads it and ends the job
            record_fatal(fatal_dir, f"slowmo-train: error: {one_line(err)}")
        raise
    finally:
        sdist.destroy_process_group()


def run(cfg: DictConfig) -> None:
    """Validate the composed config, then train here (torchrun / one process) or spawn workers."""
    try:
        job = to_job_config(cfg)
        env = sdist.read_env()
        world = env.world_size if env.under_launcher else (job.launcher.simulate or job.launcher.nproc_per_node)
        if env.under_launcher and job.launcher.simulate:
            raise ConfigError(
                "launcher.simulate",
                job.launcher.simulate,
                "plays all workers in one process; start it without torchrun, or set launcher.simulate=0",
            )
        preflight(job, env, world)
        job_dict = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
        check_resume(job, job_dict, world)
    except (ConfigError, DatasetError) as err:
        user_error(str(err))
    except Exception as err:  # OmegaConf type errors from overrides of dataclass fields
        user_error(str(err).splitlines()[0] if str(err) else repr(err))
    hydra_dir = _hydra_run_dir()
    run_dir = str(hydra_dir) if hydra_dir else None
    if job.launcher.simulate:
        _run_simulated(job_dict, job.launcher.simulate, run_dir)
    elif env.under_launcher or job.launcher.nproc_per_node == 1:
        # this process is the worker: its errors end in one line too (torchrun adds its own summary)
        try:
            summary = worker_main(job_dict, run_dir)
        except WORKER_USER_ERRORS as err:
            msg = one_line(err)
            recorded = isinstance(err, RecordedFailure) or msg.startswith("rank ")
            print(f"slowmo-train: error: {'' if recorded else f'rank {env.rank}: '}{msg}", file=sys.stderr, flush=True)
            if is_deterministic(err) and under_elastic_agent():
                stop_elastic_agent()  # torchrun would restart into the same failure, then print its traceback
            sys.exit(1)
        if summary.get("stopped_by") and env.rank == 0:
            report_stop(summary, run_dir)
    else:
        if run_dir is None:  # decide it here so the workers and the failure message agree
            run_dir = str(prepare_run_dir(job, None).resolve())
        launch_local(worker_main, job_dict, job.launcher.nproc_per_node, run_dir, job.launcher.max_restarts)


def _run_simulated(job_dict: dict, size: int, run_dir: str | None) -> None:
    """All workers as the ranks of a simulated cluster in this process; errors end in one line."""
    from slowmo_train.simulated.launcher import launch_simulated

    try:
        summary = launch_simulated(worker_main, job_dict, size, run_dir)
    except WORKER_USER_ERRORS as err:
        msg = one_line(err)
        rank = getattr(err, "failed_rank", None)
        where = "" if rank is None or msg.startswith("rank ") else f"rank {rank}: "
        print(f"slowmo-train: error: {where}{msg}", file=sys.stderr, flush=True)
        sys.exit(1)
    if summary.get("stopped_by"):
        report_stop(summary, summary.get("run_dir"))


def main() -> None:
    register_configs()
    # Hydra parses sys.argv; under torchrun every rank sees the same arguments.
    sys.argv[1:] = plain_group_overrides(sys.argv[1:])
    hydra.main(version_base=None, config_path=config_dir(), config_name="config")(run)()


if __name__ == "__main__":
    main()
