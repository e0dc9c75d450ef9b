"""Every config composes; every invalid value ends with one clear message naming key, value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from slowmo_train import cli
from slowmo_train.config import ASYNC_ALGORITHM_NAMES, ConfigError, register_configs, to_job_config, validate

CONFIG_DIR = cli.config_dir()
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "exp").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml"))
          for g in ("task", "algorithm", "slowmo", "optim", "launcher")}


def compose_job(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_compose_and_validate(tmp_path):
    job = to_job_config(compose_job(f"data.root={tmp_path}"))
    validate(job, world_size=1)
    assert job.algorithm.name == "allreduce" and job.task.name == "cifar10" and not job.slowmo.enabled


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option, tmp_path):
    job = to_job_config(compose_job(f"{group}={option}", f"data.root={tmp_path}"))
    # simulated asynchronous training runs all its workers in one process
    simulated = job.algorithm.name in ASYNC_ALGORITHM_NAMES and job.algorithm.mode == "simulated"
    validate(job, world_size=1 if simulated else 2)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(exp, tmp_path):
    job = to_job_config(compose_job(f"+exp={exp}", f"data.root={tmp_path}"))
    validate(job, world_size=job.launcher.nproc_per_node)


def test_user_keys_reach_the_job(tmp_path):
    job = to_job_config(compose_job(
        "task=cifar10", "algorithm=local_sgd", "slowmo.enabled=true", "slowmo.alpha=0.5", "slowmo.beta=0.6",
        "slowmo.tau=24", "optim.lr=0.2", "train.batch_size=32", "train.epochs=3", "train.max_steps=7",
        f"data.root={tmp_path}", "seed=5", "launcher.nproc_per_node=4", "model.width=0.5",
    ))
    assert (job.slowmo.alpha, job.slowmo.beta, job.slowmo.tau) == (0.5, 0.6, 24)
    assert (job.optim.lr, job.train.batch_size, job.train.epochs, job.train.max_steps) == (0.2, 32, 3, 7)
    assert (job.seed, job.launcher.nproc_per_node, job.model.width) == (5, 4, 0.5)


INVALID = [
    ("optim.lr=-0.1", "optim.lr"),
    ("slowmo.beta=1.2", "slowmo.beta"),
    ("slowmo.beta=1.0", "slowmo.beta"),
    ("slowmo.tau=0", "slowmo.tau"),
    ("slowmo.alpha=0", "slowmo.alpha"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.total_batch=100", "train.total_batch"),  # 100 does not divide over 3 workers
    ("launcher.nproc_per_node=0", "launcher.nproc_per_node"),
    ("algorithm.peers_per_itr=0", "algorithm.peers_per_itr"),
    ("slowmo.base_buffers=forget", "slowmo.base_buffers"),
    ("algorithm.nprocs_per_node=2", "algorithm.nprocs_per_node"),  # 2 does not divide 3
]


@pytest.mark.parametrize("override,key", INVALID)
def test_invalid_values_name_key_value_and_rule(override, key, tmp_path):
    job = to_job_config(compose_job(override, f"data.root={tmp_path}"))
    with pytest.raises(ConfigError) as err:
        validate(job, world_size=3)
    message = str(err.value)
    assert err.value.key == key and key in message
    assert override.split("=", 1)[1] in message  # the value
    assert "must" in message or "choose" in message  # what is allowed


def test_tau_must_be_a_multiple_of_the_local_sgd_period(tmp_path):
    job = to_job_config(compose_job("algorithm=local_sgd", "algorithm.period=5", "slowmo.enabled=true",
                                    "slowmo.tau=12", f"data.root={tmp_path}"))
    with pytest.raises(ConfigError, match="slowmo.tau=12 .*multiple of algorithm.period=5"):
        validate(job, world_size=2)


def test_missing_data_directory(tmp_path):
    job = to_job_config(compose_job(f"data.root={tmp_path / 'nowhere'}", "data.download=false"))
    with pytest.raises(ConfigError, match="data.root=.*does not exist"):
        validate(job, world_size=1)
    # with data.download=auto (the default) a missing directory is where the dataset will be fetched
    validate(to_job_config(compose_job(f"data.root={tmp_path / 'nowhere'}")), world_size=1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slowmo_train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_user_errors_have_no_stack_trace(tmp_path):
    cases = [
        (["optim.lr=-1", f"data.root={tmp_path}"], "optim.lr=-1.0 is invalid: must be > 0"),
        (["algorithm=foo"], "algorithm"),  # Hydra lists the available options
        ([f"data.root={tmp_path}", "data.download=false"], "holds no CIFAR-10"),  # exists but empty
        (["optim.lr=abc"], "optim.lr"),
    ]
    for args, expected in cases:
        result = _cli(*args, cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert expected in output, output
        assert "Traceback" not in output, output
    unknown = _cli("algorithm=foo", cwd=tmp_path)
    assert "sgp" in unknown.stderr + unknown.stdout  # the valid names are listed


def test_resolved_config_round_trips(tmp_path):
    cfg = compose_job("+exp=quickstart", f"data.root={tmp_path}")
    job = to_job_config(cfg)
    again = to_job_config(OmegaConf.to_container(OmegaConf.structured(job)))
    assert again == job
