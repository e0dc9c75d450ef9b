"""Device mistakes caught without a GPU: host values on the control plane, device tensors on the
training groups, checkpoints loaded onto the CPU.

    .venv/bin/python -m pytest -q tests/test_planes.py

The trick that makes a CPU machine behave like an NCCL cluster: a process group whose only backend
is registered for CUDA (``backend="cuda:gloo"``) rejects a CPU tensor with "No backend type
associated with device type cpu", as an NCCL group does. The spawned ranks here make that their
*default* group, and run the training groups on gloo (``slowmo_train.dist.set_training_world``).
Any host value sent on the default group — what crashed GPU runs at the first SlowMo outer step,
the first wmt16 evaluation, a skipped non-finite step or a checkpoint — then fails here too. A
recorder also logs every ``torch.distributed`` call of whole training runs (every algorithm, with
and without SlowMo in its exact, streamed and sharded forms, checkpoints and resume, non-finite
skip, the three tasks' evaluation) and checks which module sent what on which group.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from slowmo_train.scripting import merge_dicts as _merge
from tests.conftest import write_image_folder_cifar, write_image_folder_imagenet, write_parallel_text
from tests.distributed_helpers import run_distributed

PACKAGE = Path(__file__).resolve().parent.parent / "slowmo_train"
COMMUNICATION_MODULES = {"control.py", "algorithms/comm.py"}
#: torch.distributed functions that communicate (group creation and queries are not listed)
COMMUNICATING = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "monitored_barrier",
        "batch_isend_irecv",
        "broadcast",
        "broadcast_object_list",
        "gather",
        "gather_object",
        "irecv",
        "isend",
        "recv",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "scatter",
        "scatter_object_list",
        "send",
        "P2POp",
    }
)


# ============================================================================ the static rule
def _distributed_calls(path: Path) -> list[str]:
    """``name (line)`` of every communicating torch.distributed function ``path`` uses."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{a.name} (line {node.lineno})" for a in node.names if a.name in COMMUNICATING]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COMMUNICATING and ast.unparse(node.value) in aliases:
            found.append(f"{node.attr} (line {node.lineno})")
    return found


def test_only_the_two_communication_modules_call_torch_distributed():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in COMMUNICATION_MODULES and (calls := _distributed_calls(path)):
            offenders[rel] = calls
    assert not offenders, f"torch.distributed communication outside control.py / algorithms/comm.py: {offenders}"


def test_the_static_rule_sees_each_spelling(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch.distributed as dist\nfrom torch.distributed import barrier\n"
        "import torch\ndist.all_reduce(t)\ntorch.distributed.broadcast(t, 0)\ndist.get_rank()\n"
    )
    assert sorted(_distributed_calls(sample)) == ["all_reduce (line 4)", "barrier (line 2)", "broadcast (line 5)"]


# ============================================================================ the spawned ranks
BASE = {
    "model": {"width": 0.125},
    "train": {
        "batch_size": 16,
        "epochs": 1,
        "max_steps": 4,
        "log_every": 2,
        "eval_every_epochs": 100,
        "eval_batch_size": 50,
        "progress": "none",
    },
    "checkpoint": {"every_steps": 2, "every_minutes": 0},
    "launcher": {"threads_per_worker": 1},
}
SLOWMO = {"enabled": True, "tau": 2, "beta": 0.5}
#: every algorithm, with and without SlowMo in each form; resumed from their step-2 checkpoint
RUNS = {
    "allreduce": {"algorithm": {"name": "allreduce"}},
    "allreduce_slowmo": {"algorithm": {"name": "allreduce"}, "slowmo": SLOWMO},
    "local_sgd": {"algorithm": {"name": "local_sgd", "period": 2}},
    "local_sgd_slowmo_streamed": {
        "algorithm": {"name": "local_sgd", "period": 2},
        "slowmo": {**SLOWMO, "tau": 4, "fragments": 2, "overlap_steps": 1, "outer_dtype": "bfloat16"},
    },
    "sgp_slowmo_sharded": {"algorithm": {"name": "sgp", "consensus_every": 1}, "slowmo": {**SLOWMO, "sharded": True}},
    "osgp_slowmo_sharded_streamed": {
        "algorithm": {"name": "osgp", "synch_freq": 1, "consensus_every": 2},
        "slowmo": {**SLOWMO, "tau": 4, "sharded": True, "fragments": 2, "overlap_steps": 2},
    },
    "osgp_skip": {"algorithm": {"name": "osgp", "synch_freq": 1}, "train": {"nonfinite": "skip"}},
    "imagenet_sgp": {
        "task": {"name": "imagenet"},
        "model": {"arch": "resnet50"},
        "algorithm": {"name": "sgp"},
        "data": {"image_size": 32, "workers": 0},
        "train": {"batch_size": 4, "epochs": 2, "eval_batch_size": 8},
    },
    "wmt16_local_sgd_slowmo": {
        "task": {"name": "wmt16"},
        "model": {"arch": "transformer_small"},
        "optim": {"name": "adam", "schedule": "inverse_sqrt", "lr": 1e-3, "warmup_steps": 2},
        "algorithm": {"name": "local_sgd", "period": 2},
        "slowmo": SLOWMO,
        "data": {"max_tokens": 256, "vocab_size": 60},
        "eval": {"beam": 2, "bleu_max_sentences": 4, "bleu_every_evals": 1},
    },
}


def _job(data: dict, name: str, run_dir: Path, **extra):
    from slowmo_train.config import to_job_config

    overrides = RUNS[name]
    task = overrides.get("task", {}).get("name", "cifar10")
    return to_job_config(
        _merge(
            BASE,
            {"data": {"root": data[task], "cache_dir": data["cache"]}},
            overrides,
            {"output_dir": str(run_dir)},
            extra,
        )
    )


def _nccl_like_groups() -> None:
    """The default group is CUDA-only (cuda:gloo); the training groups run on gloo."""
    from slowmo_train.dist import set_training_world

    set_training_world(dist.new_group(backend="gloo"), "gloo")


def _train(job, run_dir: Path):
    from slowmo_train.dist import DistEnv
    from slowmo_train.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    env = DistEnv(dist.get_rank(), dist.get_world_size(), dist.get_rank(), dist.get_world_size(), True)
    return Trainer(job, env, torch.device("cpu"), run_dir).run()


class Recorder:
    """Wraps the communicating torch.distributed functions; logs (function, group kind, caller,
    tensor dtypes) for every call made from the package."""

    # (isend / irecv are seen through batch_isend_irecv: P2POp accepts only the original functions)
    WRAPPED = (
        "all_reduce",
        "all_gather",
        "broadcast",
        "barrier",
        "batch_isend_irecv",
        "send",
        "recv",
        "all_gather_object",
        "broadcast_object_list",
    )

    def __init__(self):
        self.calls: list[tuple[str, str, str, tuple]] = []
        self._saved = {}

    def __enter__(self):
        for name in self.WRAPPED:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            caller = _package_caller()
            if caller is not None:
                group = kwargs.get("group")
                tensors = [a for a in args if torch.is_tensor(a)]
                if name == "batch_isend_irecv":
                    group = args[0][0].group if args[0] else None
                    tensors = [op.tensor for op in args[0]]
                self.calls.append((name, _kind(group), caller, tuple(str(t.dtype) for t in tensors)))
            return fn(*args, **kwargs)

        return recorded


def _package_caller() -> str | None:
    """The innermost slowmo_train module on the stack (None: not called from the package)."""
    for frame in traceback.extract_stack()[-3::-1]:
        path = Path(frame.filename).resolve()
        if PACKAGE in path.parents:
            return path.relative_to(PACKAGE).as_posix()
    return None


def _kind(group) -> str:
    from slowmo_train import control

    if group is not None and group is control.group():
        return "control"
    if group is None or group is dist.group.WORLD:
        return "default"
    return "training"


def _scenarios(rank: int, world: int, data: dict, root: str) -> dict:
    """Each scenario's outcome on this rank: ``{"error": None | text, ...}``."""
    _nccl_like_groups()
    out = {}

    def attempt(name, fn):
        try:
            out[name] = {"error": None, **(fn() or {})}
        except Exception:  # noqa: BLE001 - reported to the parent, which names the scenario
            out[name] = {"error": traceback.format_exc()[-3000:]}
        dist.barrier(group=_control_group())  # resynchronise after a failure on one rank

    attempt("consensus", lambda: _consensus_scenario(rank))
    attempt("wmt16_eval", lambda: _wmt16_eval_scenario(data, Path(root) / "wmt16_eval"))
    attempt("checkpoint", lambda: _checkpoint_scenario(rank, Path(root) / "checkpoint"))
    attempt("skip", lambda: _skip_scenario(data, Path(root) / "skip"))
    return out


def _control_group():
    from slowmo_train import control

    return control.group()


def _consensus_scenario(rank: int) -> dict:
    """SlowMo's outer step and SGP's consensus metric: once a CPU float64 all-reduce on the default group."""
    from slowmo_train.algorithms import build_algorithm
    from slowmo_train.config import AlgorithmConfig, SlowMoConfig
    from slowmo_train.dist import build_topology

    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = build_algorithm(
        AlgorithmConfig(name="sgp", consensus_every=1), SlowMoConfig(enabled=True, tau=2), model, opt, build_topology(1)
    )
    metrics = []
    for k in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        algo.after_optimizer_step(k)
        metrics.append(sorted(algo.pop_metrics()))
    algo.close()
    return {"metrics": metrics}


def _wmt16_eval_scenario(data: dict, run_dir: Path) -> dict:
    """The wmt16 task's evaluation: validation totals and BLEU shards from every rank."""
    from slowmo_train.tasks import TASKS, WorkerInfo
    from slowmo_train.trainer import task_args

    job = _job(data, "wmt16_local_sgd_slowmo", run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    task = TASKS[job.task.name](task_args(job, WorkerInfo(rank, world, rank, torch.device("cpu"))))
    return {"eval": task.evaluate(task.model, True)}


def _checkpoint_scenario(rank: int, run_dir: Path) -> dict:
    """A checkpoint's statuses are gathered and its errors broadcast as objects."""
    from slowmo_train.checkpoint import Checkpointer

    path = Checkpointer(run_dir, 2, rank, dist.get_world_size()).save(3, {"x": torch.ones(2)}, {"seed": 0})
    return {"files": sorted(p.name for p in path.iterdir())}


def _skip_scenario(data: dict, run_dir: Path) -> dict:
    """train.nonfinite=skip: the ranks agree on a NaN step (injected on rank 1 at step 2)."""
    os.environ["SLOWMO_TRAIN_FAULTS"] = "nan@step=2,rank=1"
    try:
        summary = _train(_job(data, "osgp_skip", run_dir), run_dir)
    finally:
        del os.environ["SLOWMO_TRAIN_FAULTS"]
    return {"skips": summary["nonfinite_skips"], "steps": summary["steps"]}


def _whole_runs(rank: int, world: int, data: dict, root: str, names: list[str]) -> dict:
    """Every run in ``names`` for 4 steps (checkpoints at 2 and 4, final evaluation), then resumed
    from step 2 by a new Trainer, with every collective recorded."""
    _nccl_like_groups()
    out = {}
    with Recorder() as recorder:
        for name in names:
            first, second = Path(root) / name / "a", Path(root) / name / "b"
            _train(_job(data, name, first), first)
            step2 = first / "checkpoints" / "step_00000002"
            summary = _train(_job(data, name, second, resume=str(step2)), second)
            out[name] = {"steps": summary["steps"], "resumed": summary["resumed_from"] is not None}
    out["calls"] = recorder.calls
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("planes_data")
    return {
        "cifar10": str(write_image_folder_cifar(root / "cifar", n_train=128, n_test=50)),
        "imagenet": str(write_image_folder_imagenet(root / "imagenet")),
        "wmt16": str(write_parallel_text(root / "multi30k")),
        "cache": str(root / "cache"),
    }


@functools.cache
def _scenario_results(data_key: str, root: str) -> list[dict]:
    return run_distributed(_scenarios, 2, args=(json.loads(data_key), root), backend="cuda:gloo")


@pytest.fixture(scope="module")
def scenarios(data, tmp_path_factory) -> dict:
    per_rank = _scenario_results(json.dumps(data), str(tmp_path_factory.mktemp("scenarios")))
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def _ok(results: list[dict]) -> list[dict]:
    for rank, r in enumerate(results):
        assert r["error"] is None, f"rank {rank}:\n{r['error']}"
    return results


@pytest.mark.multiproc
def test_consensus_distance_travels_on_the_control_plane(scenarios):
    for r in _ok(scenarios["consensus"]):
        assert r["metrics"] == [["consensus_distance"], ["consensus_distance"]]


@pytest.mark.multiproc
def test_wmt16_evaluation_totals_travel_on_the_control_plane(scenarios):
    results = _ok(scenarios["wmt16_eval"])
    same = {k: v for k, v in results[0]["eval"].items() if k != "bleu_sentences_per_s"}  # a timing
    assert same == {k: results[1]["eval"][k] for k in same}  # every rank returns the same numbers
    assert {"loss", "nll", "ppl", "bleu"} <= set(results[0]["eval"])


@pytest.mark.multiproc
def test_checkpoint_objects_travel_on_the_control_plane(scenarios):
    for r in _ok(scenarios["checkpoint"]):
        assert r["files"] == ["manifest.json", "rank0.pt", "rank1.pt"]


@pytest.mark.multiproc
def test_nonfinite_skip_agreement_travels_on_the_control_plane(scenarios):
    for r in _ok(scenarios["skip"]):
        assert (r["skips"], r["steps"]) == (1, 4)


#: what the training groups carry: parameters, gradients, gossip and outer messages (float64: the
#: push-sum weight) and BatchNorm's step counters (int64); never pickled objects (uint8)
TRAINING_DTYPES = {"torch.float32", "torch.bfloat16", "torch.float16", "torch.float64", "torch.int64"}


def _check_calls(calls: list) -> None:
    bad = []
    for name, kind, caller, dtypes in calls:
        if kind == "default":
            bad.append(f"{caller}: {name} on the default group")
        elif kind == "control" and caller != "control.py":
            bad.append(f"{caller}: {name} on the control group, not through control.py")
        elif kind == "training" and caller != "algorithms/comm.py":
            bad.append(f"{caller}: {name} on a training group, not through algorithms/comm.py")
        elif kind == "training" and not set(dtypes) <= TRAINING_DTYPES:
            bad.append(f"{caller}: {name} of {dtypes} on a training group")
    assert not bad, sorted(set(bad))
    kinds = {(kind, caller) for _, kind, caller, _ in calls}
    assert {("control", "control.py"), ("training", "algorithms/comm.py")} <= kinds


def _run_whole(data, tmp_path, names):
    per_rank = run_distributed(_whole_runs, 2, args=(data, str(tmp_path), names), backend="cuda:gloo", timeout=900)
    for rank, r in enumerate(per_rank):
        for name in names:
            assert r[name] == {"steps": 4, "resumed": True}, (rank, name, r[name])
        _check_calls(r["calls"])


@pytest.mark.multiproc
def test_whole_runs_send_host_values_only_on_the_control_plane(data, tmp_path):
    """Every algorithm with and without SlowMo (exact, streamed, sharded), checkpoints and resume,
    non-finite skip, and the three tasks' evaluation, with every collective recorded."""
    per_rank = run_distributed(_whole_runs, 2, args=(data, str(tmp_path), list(RUNS)), backend="cuda:gloo", timeout=900)
    for rank, r in enumerate(per_rank):
        for name in RUNS:
            assert r[name] == {"steps": 4, "resumed": True}, (rank, name, r[name])
        _check_calls(r["calls"])


# ============================================================================ checkpoints onto a device
def test_resume_onto_a_non_cpu_device_restores_the_rng(tmp_path, single_process_group):
    """A checkpoint written on the CPU is resumed by a Trainer on another device (``meta`` stands in
    for a GPU): the RNG states must stay on the CPU for torch.set_rng_state, and every tensor must
    reach the device of the component that holds it."""
    from slowmo_train.checkpoint import load_rank_state
    from slowmo_train.config import to_job_config
    from slowmo_train.dist import DistEnv
    from slowmo_train.trainer import Trainer

    data = {
        "cifar10": str(write_image_folder_cifar(tmp_path / "cifar", n_train=64, n_test=20)),
        "cache": str(tmp_path / "cache"),
    }
    run = tmp_path / "run"
    run.mkdir()
    job = to_job_config(
        _merge(
            BASE,
            {
                "data": {"root": data["cifar10"], "cache_dir": data["cache"]},
                "optim": {"name": "adam", "lr": 1e-3},
                "output_dir": str(run),
                "train": {"max_steps": 2},
            },
        )
    )
    Trainer(job, DistEnv(), torch.device("cpu"), run).run()
    resumed = Trainer(to_job_config(_merge(job_dict(job), {"resume": "auto"})), DistEnv(), torch.device("meta"), run)
    assert resumed.resume() is not None and resumed.step == 2
    saved = load_rank_state(resumed.resumed_from, 0)[1]["rng"]["torch"]
    assert torch.equal(torch.get_rng_state(), saved)  # restored last, after building the model
    assert all(p.device.type == "meta" for p in resumed.task.model.parameters())
    for state in resumed.optimizer.state.values():
        assert state["exp_avg"].device.type == "meta" and state["step"].device.type == "cpu"


def job_dict(job) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)
