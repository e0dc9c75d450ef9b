"""Command-line entry point: compose the Hydra config -> validate -> launch workers -> train.

    slowmo-train +exp=quickstart data.root=../shared/data/cifar10
    slowmo-train task=cifar10 algorithm=sgp slowmo.enabled=true launcher.nproc_per_node=4
    torchrun --standalone --nproc_per_node=2 -m slowmo_train task=cifar10 algorithm=allreduce

Under torchrun every process runs this module and reads its rank from the environment; run
directly, it starts ``launcher.nproc_per_node`` local workers itself through PyTorch's elastic
launcher API (the machinery behind torchrun), so there is no re-spawning under torchrun.
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

from slowmo_train.config import ConfigError, JobConfig, register_configs, to_job_config, validate
from slowmo_train import dist as sdist
from slowmo_train.data.cifar10 import DatasetError
from slowmo_train.tasks import DATA_CHECKS

log = logging.getLogger("slowmo_train")


def config_dir() -> str:
    """The configs: inside the installed package, or at the top of a source checkout (editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"slowmo-train's configs were not found next to {here}; reinstall the package")


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


def worker_main(job_dict: dict, run_dir: str | None) -> dict:
    """Body of every worker process (torchrun's or the local launcher's)."""
    import torch

    from slowmo_train.metrics import setup_logging
    from slowmo_train.trainer import Trainer

    env = sdist.read_env()
    job = to_job_config(job_dict)
    backend = sdist.pick_backend(job.launcher.backend)
    threads = sdist.set_cpu_threads(env, job.launcher.threads_per_worker) if backend == "gloo" else None
    sdist.init_process_group(env, backend, job.launcher.timeout_s)
    device = sdist.device_for(env, backend)
    try:
        if env.rank == 0:
            path = prepare_run_dir(job, Path(run_dir) if run_dir else None)
            OmegaConf.save(OmegaConf.structured(job), path / "config.yaml")
            run_dir = str(path.resolve())
        run_dir = sdist.broadcast_object(run_dir)
        setup_logging(Path(run_dir), env.rank)
        if env.rank == 0:
            log.info("run directory: %s", run_dir)
            log.info("backend %s, device %s, %s threads per worker", backend, device, threads or torch.get_num_threads())
        summary = Trainer(job, env, device, Path(run_dir)).run()
        if env.rank == 0:
            log.info("done: %s", summary.get("final_eval"))
        return summary
    finally:
        sdist.destroy_process_group()


def launch_local(job_dict: dict, nproc: int, run_dir: str | None) -> None:
    """Start ``nproc`` workers on this machine with torch's elastic launcher (what torchrun uses)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"slowmo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=worker_main)(job_dict, run_dir)
    except ChildFailedError as err:
        def reason(failure) -> str:
            msg = failure.message
            if isinstance(msg, dict):
                msg = msg.get("message")
            return str(msg or f"exit code {failure.exitcode}")

        failures = "; ".join(f"rank {rank}: {reason(f)}" for rank, f in err.failures.items())
        where = f" (logs in {run_dir}/logs)" if run_dir else ""
        print(f"slowmo-train: a worker failed{where}: {failures}", file=sys.stderr, flush=True)
        sys.exit(1)


def run(cfg: DictConfig) -> None:
    """Validate the composed config, then train here (torchrun / one process) or spawn workers."""
    try:
        job = to_job_config(cfg)
        env = sdist.read_env()
        world = env.world_size if env.under_launcher else job.launcher.nproc_per_node
        validate(job, world_size=world)
        DATA_CHECKS[job.task.name](job.data)
    except (ConfigError, DatasetError) as err:
        user_error(str(err))
    except Exception as err:  # OmegaConf type errors from overrides of dataclass fields
        user_error(str(err).splitlines()[0] if str(err) else repr(err))
    job_dict = OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
    hydra_dir = _hydra_run_dir()
    run_dir = str(hydra_dir) if hydra_dir else None
    if env.under_launcher or job.launcher.nproc_per_node == 1:
        worker_main(job_dict, run_dir)
    else:
        if run_dir is None:  # decide it here so the workers and the failure message agree
            run_dir = str(prepare_run_dir(job, None).resolve())
        launch_local(job_dict, job.launcher.nproc_per_node, run_dir)


def main() -> None:
    register_configs()
    # Hydra parses sys.argv; under torchrun every rank sees the same arguments.
    hydra.main(version_base=None, config_path=config_dir(), config_name="config")(run)()


if __name__ == "__main__":
    main()
