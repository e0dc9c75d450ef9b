"""The real algorithms (build_algorithm on gloo ranks, the trainer's hook order) reproduce the
reference simulator (tests/reference.py) on every rank, for world sizes 1-4 (the real side:
tests/reference_runs.py).

One spawned run per world size trains every configuration and returns all trajectories (spawning
costs seconds; a step of the tiny model costs microseconds).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from tests.distributed_helpers import run_distributed
from tests.reference import HIDDEN, Case, Simulator, out_peers, simulate, with_slowmo
from tests.reference_runs import ATOL, RTOL, first_mismatch, run_all_cases

# isort: split
# tests/test_slowmo_streaming.py imports these from here until it imports them from tests.reference_runs

WORLD_SIZES = (1, 2, 3, 4)
TAU = 4
#: (suffix, SlowMo options): coupled and decoupled, sharded and unsharded, all three buffer modes
SLOWMO_VARIANTS = (
    ("coupled", dict(coupling="coupled", sharded=False, base_buffers="reset")),
    ("coupled_sharded", dict(coupling="coupled", sharded=True, base_buffers="average")),
    ("decoupled_nesterov_sharded", dict(coupling="decoupled", nesterov=True, sharded=True, base_buffers="keep")),
    ("decoupled", dict(coupling="decoupled", sharded=False, base_buffers="average")),
)
#: alpha = 1, beta = 0 SlowMo is the base algorithm with an exact average every tau steps
IDENTITY_SLOWMO = dict(alpha=1.0, beta=0.0, tau=TAU, base_buffers="keep")


def base_cases(world_size: int) -> list[Case]:
    cases = [
        Case("allreduce", "allreduce"),
        Case("local_sgd", "local_sgd", period=2),
        Case("sgp_exp", "sgp", graph="exponential"),
        Case("sgp_nonreg", "sgp", graph="nonregular_exponential"),
        Case("osgp_exp", "osgp", graph="exponential", synch_freq=1),
    ]
    if world_size >= 2:
        cases.append(Case("osgp_nonreg_s2", "osgp", graph="nonregular_exponential", synch_freq=2))
    if world_size >= 3:  # two peers need two distinct offsets
        cases.append(Case("sgp_exp_p2", "sgp", graph="exponential", peers=2))
    return cases


def hierarchy_cases() -> list[Case]:
    """2 nodes x 2 processes (world size 4)."""
    bases = [
        Case("hier_allreduce", "allreduce"),
        Case("hier_local_sgd", "local_sgd", period=2),
        Case("hier_sgp", "sgp", graph="nonregular_exponential"),
        Case("hier_osgp", "osgp", synch_freq=2),
    ]
    bases = [replace(c, procs_per_node=2) for c in bases]
    slow = [
        with_slowmo(bases[0], "hier_slowmo_allreduce", tau=TAU),
        with_slowmo(bases[1], "hier_slowmo_local_sgd_sharded", tau=TAU, sharded=True, base_buffers="average"),
        with_slowmo(bases[2], "hier_slowmo_sgp_decoupled", tau=TAU, coupling="decoupled", nesterov=True),
        with_slowmo(bases[3], "hier_slowmo_osgp_sharded", tau=TAU, sharded=True),
    ]
    return bases + slow


def identity_cases() -> list[Case]:
    return [
        Case("local_sgd_H4_hold4", "local_sgd", period=TAU, lr_hold=TAU),
        with_slowmo(Case("", "local_sgd", period=TAU), "slowmo_a1b0_local_sgd", **IDENTITY_SLOWMO),
        with_slowmo(Case("", "sgp", graph="nonregular_exponential"), "slowmo_a1b0_sgp_nonreg", **IDENTITY_SLOWMO),
        with_slowmo(Case("", "osgp", synch_freq=2), "slowmo_a1b0_osgp_s2", **IDENTITY_SLOWMO),
        with_slowmo(Case("", "allreduce"), "slowmo_a1b0_allreduce", **IDENTITY_SLOWMO),
    ]


def inner_lr_cases() -> list[Case]:
    """slowmo.inner_lr=follow (tests/test_slowmo_inner_lr.py) under a 4-step warm-up and the drop at
    step 5, so the lr changes within the first two outer iterations: the exact form (coupled;
    decoupled sharded) and streamed forms (fragments, overlap, sharded, push-sum)."""
    local = Case("local_sgd", "local_sgd", period=2, warmup=4)
    allreduce, sgp = Case("allreduce", "allreduce", warmup=4), Case("sgp", "sgp", warmup=4)
    follow = dict(tau=TAU, inner_lr="follow")
    return [
        with_slowmo(local, "inner_lr_follow_local_sgd", **follow),
        with_slowmo(allreduce, "inner_lr_follow_decoupled_sharded", coupling="decoupled", sharded=True, **follow),
        with_slowmo(local, "inner_lr_follow_F2_D1_local_sgd", fragments=2, overlap=1, **follow),
        with_slowmo(allreduce, "inner_lr_follow_F2_D1_sharded", fragments=2, overlap=1, sharded=True, **follow),
        with_slowmo(sgp, "inner_lr_follow_F2_D0_sgp", fragments=2, base_buffers="average", **follow),
    ]


def all_cases(world_size: int) -> list[Case]:
    bases = base_cases(world_size)
    cases = list(bases)
    for base in bases[:5]:
        for suffix, options in SLOWMO_VARIANTS:
            cases.append(with_slowmo(base, f"slowmo_{suffix}_{base.name}", tau=TAU, **options))
    cases += identity_cases()
    cases += inner_lr_cases()
    if world_size == 4:
        cases += hierarchy_cases()
    return cases


def reference_for(case: Case) -> Case:
    """What the simulator runs for ``case``: identity SlowMo is checked against the base with a
    plain exact average every tau steps, a different code path of the simulator."""
    if case.name.startswith("slowmo_a1b0_") and case.algorithm != "local_sgd":
        return replace(case, slowmo=None, average_every=TAU, lr_hold=TAU)
    return case


@functools.cache
def distributed_results(world_size: int) -> list[dict[str, dict]]:
    return run_distributed(run_all_cases, world_size, args=(all_cases(world_size),))


@functools.cache
def reference_result(case: Case, world_size: int):
    return simulate(reference_for(case), world_size)


def real_result(world_size: int, name: str, rank: int) -> dict:
    result = distributed_results(world_size)[rank][name]
    if result["error"] is not None:
        pytest.fail(f"{name} failed on rank {rank} (world size {world_size}):\n{result['error']}")
    return result


CASE_IDS = [(ws, case) for ws in WORLD_SIZES for case in all_cases(ws)]


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size,case", CASE_IDS, ids=[f"ws{ws}-{c.name}" for ws, c in CASE_IDS])
def test_real_trajectory_matches_reference(world_size, case):
    ref = reference_result(case, world_size)
    for rank in range(world_size):
        real = real_result(world_size, case.name, rank)
        expected = ref.params[:, rank // case.procs_per_node]
        assert torch.allclose(real["params"], expected, rtol=RTOL, atol=ATOL), (
            f"{case.name}, rank {rank}: " + first_mismatch(real["params"], expected)
        )
        # Running statistics are deterministic where the algorithm defines them: Local SGD averages
        # them with the parameters; DDP and gossip have their own buffer policies.
        if case.algorithm == "local_sgd":
            assert torch.allclose(real["stats"], ref.stats[:, rank], rtol=RTOL, atol=ATOL), (
                f"{case.name}, rank {rank} running statistics: " + first_mismatch(real["stats"], ref.stats[:, rank])
            )
        if case.slowmo is not None and reference_for(case) is case:
            for k, value in ref.consensus.items():
                assert real["consensus"][k] == pytest.approx(value, rel=1e-7, abs=1e-12), f"consensus at step {k}"


#: streamed forms keep each rank's local progress across the merge (test_slowmo_streaming.py checks them)
SLOWMO_IDS = [(ws, c) for ws, c in CASE_IDS if c.slowmo is not None and not c.slowmo.streamed and ws > 1]


@pytest.mark.parametrize("world_size,case", SLOWMO_IDS, ids=[f"ws{ws}-{c.name}" for ws, c in SLOWMO_IDS])
def test_ranks_bit_identical_after_outer_steps(world_size, case):
    runs = [real_result(world_size, case.name, r) for r in range(world_size)]
    for k in range(case.slowmo.tau - 1, case.steps, case.slowmo.tau):
        for rank in range(1, world_size):
            assert torch.equal(runs[rank]["params"][k], runs[0]["params"][k]), f"rank {rank} after outer step {k}"
            assert torch.equal(runs[rank]["stats"][k], runs[0]["stats"][k]), f"statistics of rank {rank}, step {k}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_identity_slowmo_over_local_sgd_is_local_sgd_and_pays_once(world_size):
    """alpha=1, beta=0, tau=H: SlowMo over Local SGD is Local SGD, and the Local SGD average the
    outer step would overwrite is skipped (exact_average_follows)."""
    plain = real_result(world_size, "local_sgd_H4_hold4", 0)
    slow = real_result(world_size, "slowmo_a1b0_local_sgd", 0)
    assert torch.allclose(slow["params"], plain["params"], rtol=RTOL, atol=ATOL)
    assert torch.allclose(slow["stats"], plain["stats"], rtol=RTOL, atol=ATOL)
    n, numel = world_size, plain["params"].shape[1]

    def ring(elements):  # ring all-reduce payload of float64 elements per rank
        return 2 * (n - 1) * 8 * elements // n if n > 1 else 0

    for k in range(TAU - 1, 12, TAU):
        assert plain["sent"][k] == ring(numel + HIDDEN)
        assert slow["sent"][k] == ring(numel + 1) + ring(HIDDEN)  # exact average (+ weight), statistics


def test_hierarchy_two_nodes_equals_two_workers():
    """2 nodes x 2 processes behave as 2 workers whose gradient is the mean over their node."""
    for case in hierarchy_cases():
        ref = reference_result(case, 4)
        assert ref.params.shape[1] == 2
        for rank in range(4):
            real = real_result(4, case.name, rank)
            assert torch.allclose(real["params"], ref.params[:, rank // 2], rtol=RTOL, atol=ATOL), (
                f"{case.name}, rank {rank}: " + first_mismatch(real["params"], ref.params[:, rank // 2])
            )
        # the hierarchy matters: four independent workers would train differently
        if case.algorithm != "allreduce":
            assert not torch.allclose(ref.params[:, 0], simulate(replace(case, procs_per_node=1), 4).params[:, 0])


# --- the simulator's own consistency ----------------------------------------------------------------
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("base", ["allreduce", "local_sgd", "sgp", "osgp"])
def test_reference_identity_slowmo_is_periodic_average(world_size, base):
    case = Case("b", base, period=TAU, graph="nonregular_exponential", synch_freq=2)
    slow = simulate(with_slowmo(case, "s", **IDENTITY_SLOWMO), world_size)
    averaged = simulate(replace(case, average_every=TAU, lr_hold=TAU), world_size)
    torch.testing.assert_close(slow.params, averaged.params, rtol=1e-12, atol=1e-13)


def test_reference_graphs_follow_the_definition():
    c, nr = Case("e", "sgp"), Case("n", "sgp", graph="nonregular_exponential")
    assert [out_peers(c, 4, i, 0) for i in range(4)] == [[1], [2], [3], [0]]
    assert [out_peers(c, 4, i, 1) for i in range(4)] == [[2], [3], [0], [1]]
    assert [out_peers(nr, 4, i, 0) for i in range(4)] == [[1], [3], [3], [1]]
    assert out_peers(replace(c, peers=2), 3, 0, 1) == [1, 2]
    assert out_peers(c, 1, 0, 0) == []


def test_reference_push_sum_conserves_mass_and_debiases():
    """Nonregular gossip moves weights away from 1, yet sum(num)/sum(w) stays what averaging the
    workers' local updates gives."""
    sim = Simulator(Case("n", "osgp", graph="nonregular_exponential", synch_freq=2), 4)
    for k in range(5):
        sim.step(k)
    weights = [w.weight for w in sim.workers] + [m[3] for m in sim.in_flight]
    assert sum(weights) == pytest.approx(4.0)
    assert any(abs(w.weight - 1) > 1e-3 for w in sim.workers)


def test_reference_slowmo_changes_the_trajectory():
    case = Case("l", "local_sgd", period=2)
    slow = simulate(with_slowmo(case, "s", tau=TAU), 3)
    assert not torch.allclose(slow.params, simulate(case, 3).params)
