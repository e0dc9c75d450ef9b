"""Streamed / overlapped SlowMo and low-precision outer messages (slowmo_train/algorithms/slowmo.py,
outer_sync.py, outer_layout.py) against the float64 reference simulator (tests/reference.py), on world sizes 1-4.

    .venv/bin/python -m pytest -q tests/test_slowmo_streaming.py      # ~3 min on 2 busy cores

One spawned run per world size trains every case (as in tests/test_reference.py).
"""

from __future__ import annotations

import functools
import io
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from slowmo_train.algorithms import build_algorithm
from slowmo_train.algorithms.outer_layout import build_fragments, fragment_bounds, fragment_due, owned_ranges
from slowmo_train.algorithms.slowmo import SlowMo
from slowmo_train.config import AlgorithmConfig, SlowMoConfig
from slowmo_train.dist import build_topology
from tests.distributed_helpers import run_distributed
from tests.reference import Case, batch, group_lrs, simulate, with_slowmo
from tests.reference_runs import ATOL, RTOL, TinyNet, build_optimizer, configs_for, first_mismatch, run_all_cases

pytestmark = pytest.mark.multiproc

WORLD_SIZES = (1, 2, 3, 4)
TAU, STEPS = 4, 14
BASES = (Case("allreduce", "allreduce"), Case("local_sgd", "local_sgd", period=2))


def streaming_cases(world_size: int) -> list[Case]:
    cases = []
    for base in BASES:
        for frags in (1, 2, 4):
            for delay in (0, 1, 2):
                if frags == 1 and delay == 0:
                    continue  # the default: Alg. 1's own code path, covered by test_reference.py
                cases.append(
                    with_slowmo(
                        replace(base, steps=STEPS),
                        f"stream_{base.name}_F{frags}_D{delay}",
                        tau=TAU,
                        fragments=frags,
                        overlap=delay,
                    )
                )
        cases.append(
            with_slowmo(
                replace(base, steps=STEPS),
                f"stream_{base.name}_F2_D1_decoupled_nesterov",
                tau=TAU,
                fragments=2,
                overlap=1,
                coupling="decoupled",
                nesterov=True,
                base_buffers="average",
            )
        )
        cases.append(
            with_slowmo(
                replace(base, steps=STEPS),
                f"stream_{base.name}_F2_D1_bf16",
                tau=TAU,
                fragments=2,
                overlap=1,
                outer_dtype="bfloat16",
            )
        )
    gossip = [Case("sgp", "sgp", graph="nonregular_exponential"), Case("osgp", "osgp", synch_freq=2)]
    # push-sum bases: fragments keep each worker's weight, overlap flushes the gossip at the merge
    for base in gossip:
        for frags, delay in ((1, 1), (2, 0), (2, 1), (4, 2)):
            cases.append(
                with_slowmo(
                    replace(base, steps=STEPS),
                    f"stream_{base.name}_F{frags}_D{delay}",
                    tau=TAU,
                    fragments=frags,
                    overlap=delay,
                )
            )
        cases.append(
            with_slowmo(
                replace(base, steps=STEPS),
                f"stream_{base.name}_F2_D1_bf16",
                tau=TAU,
                fragments=2,
                overlap=1,
                outer_dtype="bfloat16",
            )
        )
    # 16-bit outer messages over every base
    for base in list(BASES) + gossip:
        for dtype in ("bfloat16", "float16"):
            cases.append(
                with_slowmo(replace(base, steps=STEPS), f"wire_{base.name}_{dtype}", tau=TAU, outer_dtype=dtype)
            )
    # sharded x0 / u (float32): numerators sent, each rank updates its slice, the new x0 all-gathered
    for base in list(BASES) + gossip:
        for frags, delay in ((1, 1), (2, 0), (2, 2), (4, 3)):
            cases.append(
                with_slowmo(
                    replace(base, steps=STEPS),
                    f"shard_{base.name}_F{frags}_D{delay}",
                    tau=TAU,
                    fragments=frags,
                    overlap=delay,
                    sharded=True,
                )
            )
    # Local SGD with period = tau: SlowMo's fragments are the only averaging (Streaming DiLoCo)
    cases.append(
        with_slowmo(
            Case("local_sgd", "local_sgd", period=TAU, steps=STEPS),
            "stream_bmuf_F4_D1",
            tau=TAU,
            fragments=4,
            overlap=1,
        )
    )
    # the explicit defaults are Alg. 1 (checked bit for bit against the plain SlowMo case)
    cases.append(
        with_slowmo(
            Case("local_sgd", "local_sgd", period=2),
            "defaults_local_sgd",
            tau=TAU,
            fragments=1,
            overlap=0,
            outer_dtype="float32",
        )
    )
    if world_size == 4:  # 2 nodes x 2 processes
        for base in BASES + (Case("sgp", "sgp"),):
            cases.append(
                with_slowmo(
                    replace(base, steps=STEPS, procs_per_node=2),
                    f"hier_{base.name}_F2_D1",
                    tau=TAU,
                    fragments=2,
                    overlap=1,
                )
            )
        cases.append(
            with_slowmo(
                Case("local_sgd", "local_sgd", period=2, steps=STEPS, procs_per_node=2),
                "hier_local_sgd_F2_D2_sharded",
                tau=TAU,
                fragments=2,
                overlap=2,
                sharded=True,
            )
        )
    return cases


@functools.cache
def distributed_results(world_size: int) -> list[dict]:
    cases = streaming_cases(world_size) + [
        with_slowmo(Case("local_sgd", "local_sgd", period=2), "plain_local_sgd", tau=TAU)
    ]
    return run_distributed(run_all_cases, world_size, args=(cases,))


def real(world_size: int, name: str, rank: int) -> dict:
    result = distributed_results(world_size)[rank][name]
    if result["error"] is not None:
        pytest.fail(f"{name} failed on rank {rank} (world size {world_size}):\n{result['error']}")
    return result


def tolerance(case: Case, world_size: int) -> tuple[float, float, int]:
    """(rtol, atol, steps compared). The simulator models a 16-bit all-reduce exactly for up to two
    workers; beyond, the order of the 16-bit additions is the collective's, and the different
    roundings then grow through later steps, so only the first outer update is compared, loosely."""
    workers = world_size // case.procs_per_node
    if case.slowmo.outer_dtype != "float32" and workers > 2:
        return 1e-2, 1e-2, TAU
    return RTOL, ATOL, case.steps


IDS = [(ws, c) for ws in WORLD_SIZES for c in streaming_cases(ws)]


@pytest.mark.parametrize("world_size,case", IDS, ids=[f"ws{ws}-{c.name}" for ws, c in IDS])
def test_streamed_trajectory_matches_reference(world_size, case):
    ref = simulate(case, world_size)
    rtol, atol, steps = tolerance(case, world_size)
    for rank in range(world_size):
        got = real(world_size, case.name, rank)
        expected = ref.params[:steps, rank // case.procs_per_node]
        assert torch.isfinite(got["params"]).all()
        assert torch.allclose(got["params"][:steps], expected, rtol=rtol, atol=atol), (
            f"{case.name}, rank {rank}: " + first_mismatch(got["params"][:steps], expected)
        )
        if case.algorithm == "local_sgd" and rtol == RTOL:
            assert torch.allclose(got["stats"], ref.stats[:, rank], rtol=RTOL, atol=ATOL), f"{case.name} statistics"
        if rtol == RTOL:
            assert sorted(got["consensus"]) == sorted(ref.consensus), "outer updates applied at other steps"
            for k, value in ref.consensus.items():
                assert got["consensus"][k] == pytest.approx(value, rel=1e-7, abs=1e-12), f"consensus at step {k}"


@pytest.mark.parametrize("world_size", WORLD_SIZES[1:])
def test_allreduce_base_keeps_ranks_bit_identical(world_size):
    for case in streaming_cases(world_size):
        if case.algorithm == "allreduce":
            runs = [real(world_size, case.name, r)["params"] for r in range(world_size)]
            assert all(torch.equal(runs[0], other) for other in runs[1:]), case.name


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_explicit_defaults_are_algorithm_1_bit_for_bit(world_size):
    for rank in range(world_size):
        a, b = real(world_size, "defaults_local_sgd", rank), real(world_size, "plain_local_sgd", rank)
        assert torch.equal(a["params"], b["params"]) and a["sent"] == b["sent"]


def test_reference_streamed_forms_reduce_to_algorithm_1():
    """In the simulator, F = 1 D = 0 float32 through the streamed code path equals the Alg. 1 path
    (Local SGD's extra average at the outer step changes nothing: the mean of means is the mean),
    and D > 0 really changes the trajectory."""
    from tests.reference import Simulator

    base = Case("l", "local_sgd", period=2, steps=STEPS, lr_hold=TAU)
    plain = simulate(with_slowmo(base, "a", tau=TAU), 3)
    spec = plain_spec = with_slowmo(base, "b", tau=TAU).slowmo
    sim = Simulator(replace(base, slowmo=None), 3)
    sim.case = replace(sim.case, slowmo=None)
    params = []
    for k in range(STEPS):
        sim.step(k)  # the inner step alone (lr held for tau steps by lr_hold)
        if (k + 1) % TAU == 0:
            sim.case = replace(sim.case, slowmo=plain_spec)
            sim.streamed_outer_step(k, group_lrs((k // TAU) * TAU))
            sim.case = replace(sim.case, slowmo=None)
        params.append(sim.snapshot()[0])
    assert spec.streamed is False
    torch.testing.assert_close(torch.stack(params), plain.params, rtol=1e-12, atol=1e-13)
    delayed = simulate(with_slowmo(base, "c", tau=TAU, overlap=1), 3)
    assert not torch.allclose(delayed.params, plain.params)


# --- fragments ----------------------------------------------------------------------------------
def test_fragments_cover_every_parameter_once_in_layer_order():
    sizes, groups = [12, 4, 8], [(0, 1), (2,)]
    assert fragment_bounds(24, 4) == [0, 6, 12, 18, 24]
    frags = build_fragments(sizes, groups, 4)
    assert [[(p.param, p.start, p.stop, p.group, p.offset) for p in f] for f in frags] == [
        [(0, 0, 6, 0, 0)],
        [(0, 6, 12, 0, 6)],
        [(1, 0, 4, 0, 12), (2, 0, 2, 1, 0)],
        [(2, 2, 8, 1, 2)],
    ]
    # every fragment is synchronised once per tau steps, fragment f tau/F steps before fragment f - 1
    tau = 8
    for f in range(4):
        due = [k for k in range(3 * tau) if fragment_due(k, f, tau, 4)]
        assert len(due) == 3 and all(b - a == tau for a, b in zip(due, due[1:]))
        assert due[0] == tau - 1 - f * tau // 4


def test_sharding_by_fragment_gives_every_rank_an_equal_contiguous_slice():
    sizes, groups = [10, 3, 7, 1], [(0, 2), (1, 3)]  # two param groups, interleaved in layer order
    for frags in (1, 2, 3):
        for world in (1, 2, 3, 4):
            for pieces in build_fragments(sizes, groups, frags):
                total = sum(p.stop - p.start for p in pieces)
                c = -(-total // world)
                flat, starts = [], [0]
                for p in pieces:
                    starts.append(starts[-1] + p.stop - p.start)
                for r, ranges in enumerate(owned_ranges(pieces, world)):
                    mine = [k for o in ranges for k in range(starts[o.piece] + o.lo, starts[o.piece] + o.hi)]
                    assert mine == list(range(min(r * c, total), min((r + 1) * c, total)))
                    flat += mine
                assert flat == list(range(total))


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,message",
    [
        ({"outer_dtype": "int8"}, "slowmo.outer_dtype must be one of float32, bfloat16, float16"),
        ({"fragments": 3}, "slowmo.fragments must be an integer >= 1 dividing slowmo.tau=4, got 3"),
        ({"overlap_steps": 4}, "slowmo.overlap_steps must be an integer in [0, slowmo.tau=4), got 4"),
        (
            {"outer_dtype": "bfloat16", "sharded": True},
            "slowmo.sharded=true works only with slowmo.outer_dtype=float32",
        ),
    ],
)
def test_bad_streaming_options_name_the_key(options, message, single_process_group):
    result = _build_error(0, 1, "local_sgd", options)
    assert result is not None and message in result, result


def test_push_sum_bases_accept_fragments_and_overlap(single_process_group):
    for options in ({"fragments": 2}, {"overlap_steps": 1}, {"outer_dtype": "bfloat16"}):
        assert _build_error(0, 1, "sgp", options) is None, options


def _build_error(rank, world_size, algorithm, options):
    model = TinyNet()
    algo_cfg = AlgorithmConfig(name=algorithm, period=2, graph="nonregular_exponential")
    try:
        build_algorithm(
            algo_cfg, SlowMoConfig(enabled=True, tau=TAU, **options), model, build_optimizer(model), build_topology(1)
        )
    except ValueError as err:
        return str(err)
    return None


# --- communication accounting ----------------------------------------------------------------------
class Float32Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x)


def _bytes_per_step(rank, world_size, variants):
    out = {}
    for name, options in variants.items():
        model = Float32Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        algo = build_algorithm(
            AlgorithmConfig(name="local_sgd", period=TAU),
            SlowMoConfig(enabled=True, tau=TAU, **options),
            model,
            opt,
            build_topology(1),
        )
        steps = []
        for k in range(2 * TAU):
            gen = torch.Generator().manual_seed(100 * rank + k)
            loss = model(torch.randn(4, 16, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            algo.after_optimizer_step(k)
            steps.append(algo.comm.pop())
        algo.close()
        out[name] = steps
    return out


def test_16_bit_outer_messages_halve_the_bytes_and_overlap_is_counted():
    variants = {
        "exact": {},
        "f32_D1": {"overlap_steps": 1},
        "bf16_D1": {"overlap_steps": 1, "outer_dtype": "bfloat16"},
        "fp16_D0": {"outer_dtype": "float16"},
        "f32_F4_D1": {"overlap_steps": 1, "fragments": 4},
        "f32_D1_sharded": {"overlap_steps": 1, "sharded": True},
        "f32_F4_D2_sharded": {"overlap_steps": 2, "fragments": 4, "sharded": True},
    }
    steps = run_distributed(_bytes_per_step, 2, args=(variants,))[0]
    numel = 16 * 8 + 8
    ring = lambda nbytes: 2 * (2 - 1) * nbytes // 2  # noqa: E731  (ring all-reduce over 2 ranks)
    send = TAU - 1
    assert steps["f32_D1"][send]["bytes_sent"] == ring(4 * numel)
    assert steps["bf16_D1"][send]["bytes_sent"] == ring(2 * numel) == steps["f32_D1"][send]["bytes_sent"] // 2
    assert steps["fp16_D0"][send]["bytes_sent"] == ring(2 * numel)
    assert steps["exact"][send]["bytes_sent"] == ring(4 * (numel + 1))  # Alg. 1 also sends the weight 1
    # D = 1: nothing blocks at the send step, the wait is one step later and the flight is overlapped
    assert steps["bf16_D1"][send]["blocking_s"] == 0.0 and steps["bf16_D1"][send]["overlapped_s"] == 0.0
    assert steps["bf16_D1"][send + 1]["overlapped_s"] > 0.0
    assert steps["exact"][send]["overlapped_s"] == 0.0 and steps["exact"][send]["blocking_s"] > 0.0
    # SlowMo's own share is counted apart: everything Local SGD + SlowMo (period = tau) sends is SlowMo's
    for name, per_step in steps.items():
        assert [s["outer_bytes_sent"] for s in per_step] == [s["bytes_sent"] for s in per_step], name
    assert steps["exact"][send]["outer_blocking_s"] == steps["exact"][send]["blocking_s"] > 0.0
    assert steps["bf16_D1"][send + 1]["outer_overlapped_s"] == steps["bf16_D1"][send + 1]["overlapped_s"] > 0.0
    # sharded: the all-reduce of the numerators at the send step, the all-gather of the new x0 (each
    # rank's half) ceil(D / 2) = 1 step later
    sharded = [s["bytes_sent"] for s in steps["f32_D1_sharded"]]
    assert sharded[send] == ring(4 * numel) and sharded[send + 1] == (2 - 1) * 4 * (numel // 2)
    # by fragment, every rank holds half of each fragment: the all-gathers add up to half the model
    # per outer iteration, as with F = 1 (not a whole fragment from the rank that owns most of it)
    quarters = [s["bytes_sent"] for s in steps["f32_F4_D2_sharded"]]
    assert sum(quarters[TAU : 2 * TAU]) == 4 * ring(4 * numel // 4) + (2 - 1) * 4 * (numel // 2)
    # F = 4 over Local SGD with period = tau: a quarter of the model every tau / 4 steps and no average
    # of the base's own, so the same bytes per outer iteration with a quarter of the peak
    quarter = [s["bytes_sent"] for s in steps["f32_F4_D1"]]
    assert max(quarter) == ring(4 * numel // 4)
    assert sum(quarter) == sum(s["bytes_sent"] for s in steps["f32_D1"])


# --- checkpoints with an outer message in flight -------------------------------------------------------
def _resume_in_flight(rank, world_size, case, split):
    """``case`` straight for its steps vs. stopped after ``split`` steps (an outer message in flight),
    saved through torch.save / torch.load(weights_only=True), rebuilt and resumed."""
    topology = build_topology(1)

    def build():
        model = TinyNet()
        opt = build_optimizer(model)
        return model, opt, build_algorithm(*configs_for(case), model, opt, topology)

    def run(model, opt, algo, steps):
        for k in steps:
            for group, lr in zip(opt.param_groups, group_lrs(algo.lr_schedule_step(k))):
                group["lr"] = lr
            x, y = batch(rank, k)
            loss = ((algo.train_model(x) - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            algo.after_optimizer_step(k)

    model, opt, algo = build()
    run(model, opt, algo, range(case.steps))
    straight = [p.detach().clone() for p in model.parameters()]
    algo.close()

    model, opt, algo = build()
    run(model, opt, algo, range(split))
    in_flight = len(algo.pending)
    resolved = [m.resolved for m in algo.pending]
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict()}, buffer)
    algo.close()
    dist.barrier()
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model, opt, algo = build()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    algo.load_state_dict(state["algo"])
    run(model, opt, algo, range(split, case.steps))
    algo.close()
    equal = all(torch.equal(a, b) for a, b in zip(straight, model.parameters()))
    return {"in_flight": in_flight, "resolved": resolved, "equal": equal}


@pytest.mark.parametrize(
    "name,base,options,split",
    [
        ("local_sgd_F2_D2", Case("l", "local_sgd", period=2, steps=STEPS), dict(fragments=2, overlap=2), 5),
        ("allreduce_F1_D1_bf16", Case("a", "allreduce", steps=STEPS), dict(overlap=1, outer_dtype="bfloat16"), 4),
        ("osgp_F2_D1", Case("o", "osgp", synch_freq=2, steps=STEPS), dict(fragments=2, overlap=1), 4),
        # sharded, D = 2: split 4 has fragment 0's all-reduce in flight, split 5 its all-gather
        (
            "local_sgd_F2_D2_sharded_reducing",
            Case("l", "local_sgd", period=2, steps=STEPS),
            dict(fragments=2, overlap=2, sharded=True),
            4,
        ),
        (
            "local_sgd_F2_D2_sharded_gathering",
            Case("l", "local_sgd", period=2, steps=STEPS),
            dict(fragments=2, overlap=2, sharded=True),
            5,
        ),
        ("sgp_F1_D2_sharded", Case("s", "sgp", steps=STEPS), dict(overlap=2, sharded=True), 5),
    ],
)
def test_resume_with_an_outer_message_in_flight_is_exact(name, base, options, split):
    case = with_slowmo(base, name, tau=TAU, **options)
    results = run_distributed(_resume_in_flight, 2, args=(case, split))
    for rank, r in enumerate(results):
        assert r["in_flight"] >= 1, f"rank {rank}: no outer message was in flight at the split"
        if "gathering" in name or "sgp_F1_D2_sharded" in name:
            assert all(r["resolved"]), f"rank {rank}: the all-gather of the new x0 should be in flight"
        if "reducing" in name:
            assert not any(r["resolved"]), f"rank {rank}: the all-reduce should be in flight"
        assert r["equal"], f"rank {rank}: resumed parameters differ"


@pytest.mark.parametrize("wire", [{"outer_dtype": "bfloat16"}, {"sharded": True}], ids=["bf16", "sharded"])
def test_trainer_resume_with_an_outer_message_in_flight(tmp_path, wire):
    """The real loop (Trainer, checkpoint files, resume=auto) as in tests/test_resume.py, stopped at
    step 5 while fragment 0's outer message (sent after step 4, D = 2) is in flight: the bf16
    all-reduce, or with sharded slow state the all-gather of the new x0."""
    from tests.conftest import write_torchvision_cifar

    data = write_torchvision_cifar(tmp_path / "data")
    overrides = {
        "algorithm": {"name": "local_sgd", "period": 2},
        "slowmo": {"enabled": True, "tau": 4, "beta": 0.5, "fragments": 2, "overlap_steps": 2, **wire},
    }
    results = run_distributed(_trainer_resume, 2, args=(str(tmp_path / "runs"), str(data), overrides), timeout=600)
    for rank, r in enumerate(results):
        assert r["pending_at_split"] >= 1, rank
        assert r["model_equal"] and r["algorithm_equal"], f"rank {rank} differs after resuming"


def _trainer_resume(rank, world_size, root, data_root, overrides):
    from pathlib import Path

    from tests.helpers import RESUME_BASE as BASE
    from tests.helpers import RESUME_STEPS as N
    from tests.helpers import merge as _merge
    from tests.helpers import rank_state as _rank_state
    from tests.helpers import run_trainer as _train
    from tests.helpers import states_equal as _equal

    torch.set_num_threads(1)
    base = _merge(BASE, {"data": {"root": data_root}}, overrides)
    straight_dir, split_dir = Path(root) / "straight", Path(root) / "split"
    straight = _train(_merge(base, {"train": {"max_steps": N}}), straight_dir)
    _train(_merge(base, {"train": {"max_steps": 5}}), split_dir)
    pending = len(_rank_state(split_dir, 5, rank)["algorithm"]["pending"])
    second = _train(
        _merge(base, {"train": {"max_steps": N}, "resume": "auto", "output_dir": str(split_dir)}), split_dir
    )
    a, b = _rank_state(straight_dir, N, rank), _rank_state(split_dir, N, rank)
    return {
        "pending_at_split": pending,
        "model_equal": all(torch.equal(straight["model"][k], second["model"][k]) for k in straight["model"]),
        "algorithm_equal": _equal(a["algorithm"], b["algorithm"]),
    }


def test_slowmo_describe_names_the_streaming_options(single_process_group):
    described = _describe(0, 1)
    assert "fragments=2" in described and "overlap_steps=1" in described and "outer_dtype=bfloat16" in described


def _describe(rank, world_size):
    model = TinyNet()
    algo = build_algorithm(
        AlgorithmConfig(name="local_sgd", period=2),
        SlowMoConfig(enabled=True, tau=TAU, fragments=2, overlap_steps=1, outer_dtype="bfloat16"),
        model,
        build_optimizer(model),
        build_topology(1),
    )
    assert isinstance(algo, SlowMo)
    return algo.describe()
