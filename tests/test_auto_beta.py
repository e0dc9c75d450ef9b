"""``slowmo.beta=auto``: the slow momentum chosen by the number of averaging workers (nodes), from
the rule ``outer_optimizer.AUTO_BETA`` measured in docs/RESULTS.md; config checks and how SlowMo
resolves it (the CLI path: test_simulated_cli.py's beta sweep, under -m slow)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from slowmo_train.algorithms.outer_optimizer import AUTO_BETA, auto_beta, resolve_beta
from slowmo_train.config import ConfigError, to_job_config
from slowmo_train.config_checks import validate
from slowmo_train.dist import Topology
from tests.helpers import compose_job
from tests.test_slowmo import make_slowmo


def test_the_rule_is_a_non_decreasing_table_of_betas_in_range():
    counts = [n for n, _ in AUTO_BETA]
    betas = [b for _, b in AUTO_BETA]
    assert counts[0] == 1 and counts == sorted(set(counts))
    assert betas == sorted(betas) and all(0 <= b < 1 for b in betas)
    for (n, beta), nxt in zip(AUTO_BETA, [*counts[1:], 4 * counts[-1]]):
        assert auto_beta(n) == beta and auto_beta(nxt - 1) == beta  # a row holds up to the next
    assert auto_beta(10_000) == betas[-1]
    with pytest.raises(ValueError, match="averaging workers must be >= 1"):
        auto_beta(0)


def test_auto_counts_nodes_not_processes():
    """8 processes per node average inside the node first: SlowMo sees 4 workers, not 32."""
    nodes = Topology(rank=0, world_size=32, procs_per_node=8).workers
    assert nodes == 4 and resolve_beta("auto", nodes) == auto_beta(4)
    assert resolve_beta(0.35, nodes) == 0.35


@pytest.mark.parametrize("value", ["auto", "0", "0.7"])
def test_config_accepts_auto_and_numbers(value, tmp_path):
    job = to_job_config(compose_job("+exp=cifar10_sgp_slowmo", f"slowmo.beta={value}", f"data.root={tmp_path}"))
    validate(job, world_size=4, check_paths=False)
    assert job.slowmo.beta == (value if value == "auto" else float(value))


@pytest.mark.parametrize("value", ["fast", "1.0", "-0.2", "true"])
def test_config_rejects_other_values_in_one_line(value, tmp_path):
    job = to_job_config(compose_job("+exp=cifar10_sgp_slowmo", f"slowmo.beta={value}", f"data.root={tmp_path}"))
    with pytest.raises(ConfigError) as err:
        validate(job, world_size=4, check_paths=False)
    message = str(err.value)
    assert err.value.key == "slowmo.beta" and "\n" not in message and "auto" in message


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_slowmo_resolves_auto_by_its_topology_and_says_so(process_group):
    slowmo, _, _ = make_slowmo(beta="auto")
    assert slowmo.outer.beta == auto_beta(1)
    assert f"beta={auto_beta(1):g} (auto)" in slowmo.describe()
    explicit, _, _ = make_slowmo(beta=0.6)
    assert explicit.outer.beta == 0.6 and "(auto)" not in explicit.describe()
