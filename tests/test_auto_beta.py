"""``slowmo.beta=auto``: the slow momentum chosen by the number of averaging workers (nodes), from
the rule ``outer_optimizer.AUTO_BETA`` measured in docs/RESULTS.md; config checks and how SlowMo
resolves it (the CLI path: test_simulated_cli.py's beta sweep, under -m slow)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from slowmo_train.algorithms import outer_optimizer
from slowmo_train.algorithms.outer_optimizer import AUTO_BETA, AUTO_BETA_ADAPTIVE, auto_beta, is_adaptive, resolve_beta
from slowmo_train.config import ConfigError, to_job_config
from slowmo_train.config_checks import validate
from slowmo_train.dist import Topology
from tests.helpers import compose_job
from tests.test_slowmo import make_slowmo


@pytest.mark.parametrize(("rule", "adaptive"), [(AUTO_BETA, False), (AUTO_BETA_ADAPTIVE, True)])
def test_the_rule_is_a_non_decreasing_table_of_betas_in_range(rule, adaptive):
    counts = [n for n, _ in rule]
    betas = [b for _, b in rule]
    assert counts[0] == 1 and counts == sorted(set(counts))
    assert betas == sorted(betas) and all(0 <= b < 1 for b in betas)
    for (n, beta), nxt in zip(rule, [*counts[1:], 4 * counts[-1]]):
        # a row holds up to the next
        assert auto_beta(n, adaptive) == beta and auto_beta(nxt - 1, adaptive) == beta
    assert auto_beta(10_000, adaptive) == betas[-1]
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


def test_adam_takes_the_adaptive_rule(process_group, monkeypatch):
    """Adam and AdamW (moment estimates: ``betas``) resolve auto by AUTO_BETA_ADAPTIVE, SGD by AUTO_BETA."""
    import torch

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert is_adaptive(torch.optim.Adam(p)) and is_adaptive(torch.optim.AdamW(p))
    assert not is_adaptive(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    monkeypatch.setattr(outer_optimizer, "AUTO_BETA_ADAPTIVE", ((1, 0.3),))  # one worker here
    adam, _, _ = make_slowmo(beta="auto", optimizer="adam")
    sgd, _, _ = make_slowmo(beta="auto")
    assert adam.outer.beta == 0.3 and "beta=0.3 (auto)" in adam.describe()
    assert sgd.outer.beta == auto_beta(1) != 0.3
