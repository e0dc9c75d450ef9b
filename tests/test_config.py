"""Every config composes; every invalid value ends with one clear message naming key, value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from slowmo_train import cli, registry
from slowmo_train.config import ConfigError, JobConfig, to_job_config
from slowmo_train.config_checks import validate
from tests.helpers import EXPERIMENTS, compose_job

CONFIG_DIR = cli.config_dir()
GROUPS = {
    g: sorted(p.stem for p in (Path(CONFIG_DIR) / g).glob("*.yaml"))
    for g in ("task", "algorithm", "slowmo", "optim", "launcher", "checkpoint")
}


def test_defaults_compose_and_validate(tmp_path):
    job = to_job_config(compose_job(f"data.root={tmp_path}"))
    validate(job, world_size=1)
    assert job.algorithm.name == "allreduce" and job.task.name == "cifar10" and not job.slowmo.enabled


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option, tmp_path):
    job = to_job_config(compose_job(f"{group}={option}", f"data.root={tmp_path}"))
    # simulated asynchronous training runs all its workers in one process
    simulated = job.algorithm.name in registry.names(registry.ASYNC) and job.algorithm.mode == "simulated"
    validate(job, world_size=1 if simulated else 2)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(exp, tmp_path):
    job = to_job_config(compose_job(f"+exp={exp}", f"data.root={tmp_path}"))
    validate(job, world_size=job.launcher.nproc_per_node)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_smoke_before_or_after_the_experiment_composes_the_same(exp):
    """exp and smoke sit in config.yaml's defaults list, smoke last: the command line's order does not
    matter, the smoke always shrinks the experiment, and both spellings (+exp= and exp=) work."""
    after = OmegaConf.to_yaml(compose_job(f"+exp={exp}", "+smoke=tiny"))
    assert OmegaConf.to_yaml(compose_job("+smoke=tiny", f"+exp={exp}")) == after
    assert OmegaConf.to_yaml(compose_job("smoke=tiny", f"exp={exp}")) == after
    job = to_job_config(compose_job("+smoke=tiny", f"+exp={exp}"))
    assert (job.model.width, job.train.batch_size, job.train.max_steps, job.slowmo.tau) == (0.125, 8, 4, 2)


def test_the_plus_spelling_of_the_defaults_list_groups_is_accepted():
    assert cli.plain_group_overrides(["+exp=a", "+smoke=tiny", "exp=b", "+train.tf=1", "optim.lr=0.2"]) == [
        "exp=a",
        "smoke=tiny",
        "exp=b",
        "+train.tf=1",
        "optim.lr=0.2",
    ]


def test_slowmo_experiments_are_their_base_plus_slowmo():
    for exp in (e for e in EXPERIMENTS if e.endswith("_slowmo")):
        base = to_job_config(compose_job(f"+exp={exp.removesuffix('_slowmo')}"))
        slow = to_job_config(compose_job(f"+exp={exp}"))
        assert slow.slowmo.enabled and not base.slowmo.enabled
        base.slowmo, base.name = slow.slowmo, slow.name
        assert base == slow, exp


def test_group_files_set_only_what_differs_from_the_schema():
    """The defaults live in slowmo_train/config.py; a group option changes at most what it is about."""
    schema = OmegaConf.to_container(OmegaConf.structured(JobConfig))
    for group, options in GROUPS.items():
        for option in options:
            node = OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")
            tree = OmegaConf.to_container(node) if group in ("task", "smoke") else {group: OmegaConf.to_container(node)}
            same = [
                f"{section}.{key}"
                for section, values in (tree or {}).items()
                for key, value in values.items()
                if key != "name" and schema[section][key] == value
            ]
            assert same == [], f"{group}/{option}.yaml repeats the schema's defaults: {same}"


def test_algorithm_and_task_tables_agree():
    from slowmo_train.algorithms import ALGORITHMS
    from slowmo_train.asynchronous.rules import RULES
    from slowmo_train.tasks import TASKS

    assert set(ALGORITHMS) | set(RULES) == set(registry.ALGORITHM_SPECS)
    assert {p.stem for p in (Path(CONFIG_DIR) / "algorithm").glob("*.yaml")} == set(registry.ALGORITHM_SPECS)
    assert {p.stem for p in (Path(CONFIG_DIR) / "task").glob("*.yaml")} == set(TASKS)
    with pytest.raises(RuntimeError, match=r"missing \['allreduce'\]"):
        registry.check_table([n for n in ALGORITHMS if n != "allreduce"], registry.SYNC, "a table")


def test_user_keys_reach_the_job(tmp_path):
    job = to_job_config(
        compose_job(
            "task=cifar10",
            "algorithm=local_sgd",
            "slowmo.enabled=true",
            "slowmo.alpha=0.5",
            "slowmo.beta=0.6",
            "slowmo.tau=24",
            "optim.lr=0.2",
            "train.batch_size=32",
            "train.epochs=3",
            "train.max_steps=7",
            f"data.root={tmp_path}",
            "seed=5",
            "launcher.nproc_per_node=4",
            "model.width=0.5",
        )
    )
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
    ("slowmo.lr_coupling=loose", "slowmo.lr_coupling"),
    ("slowmo.outer_dtype=int8", "slowmo.outer_dtype"),
    ("slowmo.inner_lr=warmup", "slowmo.inner_lr"),
    ("slowmo.fragments=5", "slowmo.fragments"),  # 5 does not divide slowmo.tau=12
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
    job = to_job_config(
        compose_job(
            "algorithm=local_sgd", "algorithm.period=5", "slowmo.enabled=true", "slowmo.tau=12", f"data.root={tmp_path}"
        )
    )
    with pytest.raises(ConfigError, match="slowmo.tau=12 .*multiple of algorithm.period=5"):
        validate(job, world_size=2)


def test_gossip_bases_take_fragments_and_local_sgd_needs_them_to_divide_tau(tmp_path):
    job = to_job_config(
        compose_job(
            "algorithm=sgp", "slowmo.enabled=true", "slowmo.tau=4", "slowmo.fragments=2", f"data.root={tmp_path}"
        )
    )
    validate(job, world_size=2)
    job = to_job_config(
        compose_job(
            "algorithm=local_sgd",
            "algorithm.period=1",
            "slowmo.enabled=true",
            "slowmo.tau=4",
            "slowmo.fragments=3",
            f"data.root={tmp_path}",
        )
    )
    with pytest.raises(ConfigError, match="slowmo.fragments"):
        validate(job, world_size=2)


def test_missing_data_directory(tmp_path):
    job = to_job_config(compose_job(f"data.root={tmp_path / 'nowhere'}", "data.download=false"))
    with pytest.raises(ConfigError, match="data.root=.*does not exist"):
        validate(job, world_size=1)
    # with data.download=auto (the default) a missing directory is where the dataset will be fetched
    validate(to_job_config(compose_job(f"data.root={tmp_path / 'nowhere'}")), world_size=1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slowmo_train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


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
