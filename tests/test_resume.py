"""Exact resume: N steps straight == N/2 steps, stop, resume to N (bit-identical parameters and
algorithm state on every rank, identical logged losses), for every base algorithm with and without
SlowMo, mid-epoch, at an epoch boundary and mid-outer-iteration.

    .venv/bin/python -m pytest -q tests/test_resume.py            # fast subset
    .venv/bin/python -m pytest -q -m slow tests/test_resume.py    # every algorithm

Both halves and the straight run go through :class:`slowmo_train.trainer.Trainer` in the same
spawned gloo ranks (one spawn for many cases keeps CPU cost low); the second half is a new Trainer
that knows nothing but the run directory (``resume=auto``), so all state crosses via the files.
The CLI path (``train.max_steps=10`` then ``train.max_steps=20 resume=auto``) is tested end to end
in tests/test_faults.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slowmo_train.scripting import read_metrics
from tests.distributed_helpers import run_distributed
from tests.helpers import RESUME_BASE as BASE
from tests.helpers import RESUME_STEPS as N
from tests.helpers import merge, rank_state, run_trainer, states_equal

pytestmark = pytest.mark.multiproc

ALGORITHMS = {
    "allreduce": {"algorithm": {"name": "allreduce"}},
    "local_sgd": {"algorithm": {"name": "local_sgd", "period": 2}},
    "sgp": {"algorithm": {"name": "sgp"}},
    "osgp1": {"algorithm": {"name": "osgp", "synch_freq": 1}},
    "osgp2": {"algorithm": {"name": "osgp", "synch_freq": 2}},
}
SLOWMO = {"slowmo": {"enabled": True, "tau": 4, "beta": 0.5}}
SHARDED = {"slowmo": {"enabled": True, "tau": 4, "beta": 0.5, "sharded": True}}
#: slowmo.inner_lr=follow during the warm-up, streamed (split 5: fragment 1's message in flight)
FOLLOW = {"slowmo": {"enabled": True, "tau": 4, "beta": 0.5, "inner_lr": "follow", "fragments": 2, "overlap_steps": 1}}


def _cases() -> dict[str, tuple[dict, int]]:
    """name -> (overrides, step to stop at). Split 5: mid-epoch, mid-outer-iteration (tau 4) and
    between two log points (log_every 3); split 6: exactly at the epoch boundary."""
    cases = {}
    for name, algo in ALGORITHMS.items():
        cases[name] = (algo, 5)
        cases[f"slowmo_{name}"] = (merge(algo, SLOWMO), 5)
        cases[f"slowmo_sharded_{name}"] = (merge(algo, SHARDED), 5)
    cases["allreduce_epoch_boundary"] = (ALGORITHMS["allreduce"], 6)
    cases["slowmo_osgp2_epoch_boundary"] = (merge(ALGORITHMS["osgp2"], SLOWMO), 6)
    cases["slowmo_follow_streamed_local_sgd"] = (merge(ALGORITHMS["local_sgd"], FOLLOW), 5)
    return cases


FAST = ["allreduce", "local_sgd", "slowmo_sharded_osgp2", "allreduce_epoch_boundary"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    events = read_metrics(run_dir)
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train" and "loss" in e]


def _resume_cases(rank: int, world_size: int, root: str, data_root: str, names: list[str]) -> dict:
    torch.set_num_threads(1)
    results = {}
    cases = _cases()
    for name in names:
        overrides, split = cases[name]
        base = merge(BASE, {"data": {"root": data_root}}, overrides)
        straight_dir, split_dir = Path(root) / name / "straight", Path(root) / name / "split"
        straight = run_trainer(merge(base, {"train": {"max_steps": N}}), straight_dir)
        first = run_trainer(merge(base, {"train": {"max_steps": split}}), split_dir)
        second = run_trainer(
            merge(base, {"train": {"max_steps": N}, "resume": "auto", "output_dir": str(split_dir)}), split_dir
        )
        a, b = rank_state(straight_dir, N, rank), rank_state(split_dir, N, rank)
        results[name] = {
            "steps": (straight["step"], first["step"], second["step"]),
            "model_equal": all(torch.equal(straight["model"][k], second["model"][k]) for k in straight["model"]),
            "algorithm_equal": states_equal(a["algorithm"], b["algorithm"]),
            "optimizer_equal": states_equal(a["optimizer"]["state"], b["optimizer"]["state"]),
            "losses": (_losses(straight_dir), _losses(split_dir)) if rank == 0 else None,
        }
    return results


def _check(results: list[dict], name: str) -> None:
    for rank, per_rank in enumerate(results):
        r = per_rank[name]
        split = _cases()[name][1]
        assert r["steps"] == (N, split, N), (name, rank, r["steps"])
        assert r["model_equal"], f"{name}: rank {rank} parameters differ after resuming"
        assert r["algorithm_equal"], f"{name}: rank {rank} algorithm state differs after resuming"
        assert r["optimizer_equal"], f"{name}: rank {rank} optimizer state differs after resuming"
    straight, resumed = results[0][name]["losses"]
    assert [s for s, _ in straight] == [3, 6, 9, 10]
    # the capped first half also logged a line at its last step (the split); the rest is identical
    split = _cases()[name][1]
    assert [r for r in resumed if r[0] != split or split % 3 == 0] == straight, (
        f"{name}: logged losses differ: {straight} vs {resumed}"
    )


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
    from tests.conftest import write_torchvision_cifar

    root = tmp_path_factory.mktemp("resume")
    data = write_torchvision_cifar(root / "data")
    return run_distributed(_resume_cases, 2, args=(str(root / "runs"), str(data), FAST), timeout=600)


@pytest.mark.parametrize("name", FAST)
def test_exact_resume(fast_results, name):
    _check(fast_results, name)


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    from tests.conftest import write_torchvision_cifar

    root = tmp_path_factory.mktemp("resume_all")
    data = write_torchvision_cifar(root / "data")
    names = [n for n in _cases() if n not in FAST]
    return run_distributed(_resume_cases, 2, args=(str(root / "runs"), str(data), names), timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in _cases() if n not in FAST])
def test_exact_resume_every_algorithm(all_results, name):
    _check(all_results, name)


@pytest.mark.slow
def test_exact_resume_three_ranks(tmp_path):
    """With 3+ ranks the order in which an all-reduce sums depends on DDP's bucket layout, which DDP
    rebuilds after the first iteration; the resumed run replays that iteration, so it stays exact."""
    from tests.conftest import write_torchvision_cifar

    data = write_torchvision_cifar(tmp_path / "data", n_train=300)  # 100 per rank: 6 steps per epoch
    names = ["allreduce", "slowmo_sgp"]
    results = run_distributed(_resume_cases, 3, args=(str(tmp_path / "runs"), str(data), names), timeout=1200)
    for name in names:
        _check(results, name)
