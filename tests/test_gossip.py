"""SGP / OSGP push-sum gossip (Assran et al., ICML 2019) and the exponential graphs.

The multi-process checks run every configuration of one world size inside ONE spawned gloo run
(spawning costs seconds), cached by a module fixture; the test functions then assert on the results.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slowmo_train.algorithms import build_algorithm
from slowmo_train.algorithms.graphs import GRAPHS, build_graph, num_offsets
from slowmo_train.config import AlgorithmConfig, SlowMoConfig
from tests.distributed_helpers import mean_over_ranks, run_distributed
from tests.helpers import hook_step

IN, OUT, BATCH = 32, 8, 8
GRAPH_NAMES = tuple(GRAPHS)


# ============================================================================= graphs (no processes)
@pytest.mark.parametrize("n, expected", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (16, 4), (17, 5)])
def test_num_offsets_counts_powers_of_two_below_n(n, expected):
    assert num_offsets(n) == expected


@pytest.mark.parametrize("name", GRAPH_NAMES)
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
def test_graph_peers_consistent_and_column_stochastic(name, n):
    for p in range(1, num_offsets(n) + 1):
        graph = build_graph(name, n, p)
        for k in range(2 * num_offsets(n) + 3):
            in_degree = [0] * n
            for i in range(n):
                out = graph.out_peers(i, k)
                assert len(out) == p and len(set(out)) == p and i not in out
                assert all(0 <= j < n for j in out)
                for j in out:
                    in_degree[j] += 1
                    assert i in graph.in_peers(j, k)
            for j in range(n):
                assert graph.in_peers(j, k) == sorted(graph.in_peers(j, k))
                assert len(graph.in_peers(j, k)) == in_degree[j]
            assert sum(in_degree) == n * p
            if name == "exponential":
                assert in_degree == [p] * n, "the exponential graph must be regular"
            w = graph.mixing_matrix(k)
            assert torch.allclose(w.sum(dim=0), torch.ones(n, dtype=torch.float64), atol=1e-12)
            assert (w >= 0).all()


def test_exponential_offsets_follow_the_formula():
    graph = build_graph("exponential", 8, 2)
    # k=1, p=2: exponents (2, 3) mod 3 = (2, 0) -> offsets 4, 1
    assert graph.out_peers(3, 1) == [7, 4]
    nonregular = build_graph("nonregular_exponential", 8, 2)
    # k=1, p=2, i=3: exponents (5, 6) mod 3 = (2, 0)
    assert nonregular.out_peers(3, 1) == [7, 4]
    assert nonregular.out_peers(1, 0) == [3, 5]  # exponents (1, 2)


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_nonregular_exponential_has_varying_in_degree(n):
    graph = build_graph("nonregular_exponential", n, 1)
    degrees = {tuple(len(graph.in_peers(i, k)) for i in range(n)) for k in range(num_offsets(n))}
    assert any(len(set(d)) > 1 for d in degrees)
    assert any(0 in d for d in degrees), "some worker should receive nothing in some step"


def test_single_worker_has_no_peers():
    graph = build_graph("exponential", 1, 3)
    assert graph.out_peers(0, 5) == [] and graph.in_peers(0, 5) == []
    assert graph.mixing_matrix(0).tolist() == [[1.0]]


def test_too_many_peers_rejected_with_the_key_name():
    with pytest.raises(ValueError, match=r"algorithm.peers_per_itr must be <= 2 .* got 3"):
        build_graph("exponential", 4, 3)
    with pytest.raises(ValueError, match=r"algorithm.peers_per_itr must be <= 1 .* got 2"):
        build_graph("nonregular_exponential", 2, 2)
    with pytest.raises(ValueError, match=r"algorithm.peers_per_itr must be an integer >= 1, got 0"):
        build_graph("exponential", 4, 0)
    with pytest.raises(ValueError, match=r"algorithm.graph must be one of"):
        build_graph("ring", 4, 1)


# ============================================================================= shared helpers
def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _batch(data_rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * data_rank + step)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _build(name, model, topology, lr, momentum=0.0, **cfg):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    algo = build_algorithm(AlgorithmConfig(name=name, **cfg), SlowMoConfig(), model, optimizer, topology)
    return algo, optimizer


def _train(algo, optimizer, data_rank, steps, first_step=0):
    """The trainer's hook order (tests/helpers.py: hook_step)."""
    stats = []
    for k in range(first_step, first_step + steps):
        hook_step(algo, optimizer, k, _mse, _batch(data_rank, k))
        stats.append(algo.comm.pop())
    return stats


def _algorithms():
    """(name, extra cfg) of SGP and OSGP with synch_freq 1 and 2."""
    return [("sgp", {}), ("osgp", {"synch_freq": 1}), ("osgp", {"synch_freq": 2})]


# ============================================================================= the spawned run
def _consensus(algo) -> float:
    """Mean over ranks of ||z_i - mean_j z_j|| (collective), what the trainer logs."""
    return mean_over_ranks({"d": algo.local_consensus_distance()})["d"]


def _scenarios(rank: int, world: int) -> dict:
    from slowmo_train.algorithms.base import exact_average
    from slowmo_train.dist import build_topology

    torch.manual_seed(0)
    flat_topology = build_topology(1)
    out: dict = {}
    max_peers = num_offsets(world)

    # 1. zero learning rate: push-sum must conserve the mass and drive z_i to the average
    for graph in GRAPH_NAMES:
        for peers in sorted({1, max_peers}):
            for name, extra in _algorithms():
                model = _model(seed=100 + rank)  # different start per rank: something to average
                init = _flat(model)
                algo, opt = _build(
                    name, model, flat_topology, lr=0.0, graph=graph, peers_per_itr=peers, consensus_every=0, **extra
                )
                distances = [_consensus(algo)]
                for chunk in range(3):  # 60 steps: stale (OSGP) mixing contracts slower
                    _train(algo, opt, rank, 20, first_step=20 * chunk)
                    distances.append(_consensus(algo))
                unflushed_z = _flat(model)
                average = exact_average(algo)  # flushes
                nums, weight = algo.mixing_state()
                out[("mass", graph, peers, name, extra.get("synch_freq", 0))] = {
                    "init": init,
                    "num": torch.cat([t.reshape(-1) for t in nums]).clone(),
                    "w": float(weight),
                    "z": _flat(model),
                    "unflushed_z": unflushed_z,
                    "average": torch.cat([a.reshape(-1) for a in average]),
                    "distances": distances,
                }
                algo.close()

    # 2. bytes and times per step (identical start, lr > 0)
    for peers in sorted({1, max_peers}):
        for name, extra in _algorithms():
            algo, opt = _build(name, _model(0), flat_topology, lr=0.05, peers_per_itr=peers, **extra)
            stats = _train(algo, opt, rank, 6)
            algo.close()
            out[("bytes", peers, name, extra.get("synch_freq", 0))] = {
                "stats": stats,
                "numel": sum(p.numel() for p in algo.parameters()),
            }

    # 3. trajectories with lr > 0 and momentum, checked against a small simulation in the parent
    for graph in GRAPH_NAMES:
        for name, extra in [("sgp", {}), ("osgp", {"synch_freq": 2})]:
            model = _model(0)
            algo, opt = _build(name, model, flat_topology, lr=0.1, momentum=0.9, graph=graph, **extra)
            _train(algo, opt, rank, 7)
            z = _flat(model)
            algo.flush()
            out[("trajectory", graph, name)] = {"z": z, "flushed_z": _flat(model), "w": float(algo.weight)}
            algo.close()

    # 4. load_consensus resets the push-sum state, with messages in flight
    model = _model(100 + rank)
    algo, opt = _build("osgp", model, flat_topology, lr=0.1, graph="nonregular_exponential", synch_freq=2)
    _train(algo, opt, rank, 5)
    pending_before = len(algo._in_flight)
    values = [torch.full_like(p, 0.25) for p in algo.parameters()]
    algo.load_consensus(values)
    after = {
        "w": float(algo.weight),
        "num": algo.numerators.clone(),
        "z": _flat(model),
        "in_flight": len(algo._in_flight),
        "pending_before": pending_before,
    }
    _train(algo, opt, rank, 3, first_step=5)  # and training goes on
    algo.close()
    out["load_consensus"] = after

    # 5. checkpoint with OSGP messages in flight resumes bit-exactly
    def fresh():
        return _build(
            "osgp", _model(0), flat_topology, lr=0.1, momentum=0.9, graph="nonregular_exponential", synch_freq=2
        )

    algo, opt = fresh()
    _train(algo, opt, rank, 10)
    uninterrupted = _flat(algo.model)
    algo.close()
    algo, opt = fresh()
    _train(algo, opt, rank, 5)
    # optimizer.state_dict() references the live momentum buffers, hence the deep copy
    saved, saved_opt = algo.state_dict(), copy.deepcopy(opt.state_dict())
    _train(algo, opt, rank, 5, first_step=5)  # the saving run continues unchanged too
    continued = _flat(algo.model)
    algo.close()
    algo, opt = fresh()
    algo.load_state_dict(saved)
    opt.load_state_dict(saved_opt)
    _train(algo, opt, rank, 5, first_step=5)
    out["resume"] = {
        "uninterrupted": uninterrupted,
        "continued": continued,
        "resumed": _flat(algo.model),
        "saved_in_flight": len(saved["in_flight"]),
    }
    algo.close()

    # 6. consensus distance as a metric every consensus_every steps
    algo, opt = _build("sgp", _model(100 + rank), flat_topology, lr=0.0, consensus_every=3)
    metrics = []
    for k in range(6):
        _train(algo, opt, rank, 1, first_step=k)
        metrics.append(mean_over_ranks(algo.pop_metrics()))
    out["metrics"] = metrics
    algo.close()

    # 7. node hierarchy: world 4 as 2 nodes x 2 processes, world 2 as 1 node x 2 processes
    if world in (2, 4):
        node_topology = build_topology(2)
        for name, extra in [("sgp", {}), ("osgp", {"synch_freq": 1})]:
            model = _model(0)
            algo, opt = _build(
                name,
                model,
                node_topology,
                lr=0.1,
                momentum=0.9,
                graph="nonregular_exponential",
                nprocs_per_node=2,
                **extra,
            )
            stats = _train(algo, opt, rank, 6)
            z = _flat(model)
            algo.flush()
            out[("hierarchy", name)] = {"z": z, "flushed_z": _flat(model), "w": float(algo.weight), "stats": stats}
            algo.close()
    return out


_RESULTS: dict[int, list] = {}


def results(world: int) -> list[dict]:
    """Per-rank results of the one spawned run of this world size (cached for the module)."""
    if world not in _RESULTS:
        _RESULTS[world] = run_distributed(_scenarios, world, timeout=120)
    return _RESULTS[world]


WORLDS = [2, 3, 4, 5]


# ============================================================================= simulation (parent)
def _simulate(n, graph_name, staleness, steps, lr, momentum, data_ranks, peers=1):
    """Push-sum SGP/OSGP of ``n`` workers in one process, straight from the equations; worker i's
    gradient is the mean of the gradients on the batches of ``data_ranks[i]``."""
    graph = build_graph(graph_name, n, peers)
    models = [_model(0) for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]
    x = [_flat(m) for m in models]
    w = [torch.ones(1) for _ in range(n)]
    sent: dict[int, dict[int, tuple]] = {}
    for k in range(steps):
        for i, (model, opt) in enumerate(zip(models, opts)):
            z = x[i] / w[i]
            with torch.no_grad():
                offset = 0
                for p in model.parameters():
                    p.copy_(z[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            grads = []
            for r in data_ranks[i]:
                model.zero_grad()
                xb, yb = _batch(r, k)
                F.mse_loss(model(xb), yb).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for j, p in enumerate(model.parameters()):
                p.grad = sum(g[j] for g in grads) / len(grads)
            opt.step()
            x[i] = x[i] + (_flat(model) - z)
        sent[k] = {}
        for i in range(n):
            share = len(graph.out_peers(i, k)) + 1
            x[i], w[i] = x[i] / share, w[i] / share
            sent[k][i] = (x[i].clone(), w[i].clone())
        if k - staleness in sent:
            due = k - staleness
            for i in range(n):
                for src in graph.in_peers(i, due):
                    x[i] = x[i] + sent[due][src][0]
                    w[i] = w[i] + sent[due][src][1]
            del sent[due]
    z = [x[i] / w[i] for i in range(n)]
    for due in sorted(sent):  # flush
        for i in range(n):
            for src in graph.in_peers(i, due):
                x[i], w[i] = x[i] + sent[due][src][0], w[i] + sent[due][src][1]
    return z, [x[i] / w[i] for i in range(n)], [float(v) for v in w]


# ============================================================================= multi-process tests
@pytest.mark.multiproc
@pytest.mark.parametrize("world", WORLDS)
def test_push_sum_conserves_mass_and_reaches_the_average(world):
    res = results(world)
    for key in [k for k in res[0] if isinstance(k, tuple) and k[0] == "mass"]:
        per_rank = [r[key] for r in res]
        init_sum = sum(r["init"] for r in per_rank)
        num_sum = sum(r["num"] for r in per_rank)
        assert torch.allclose(num_sum, init_sum, atol=2e-5, rtol=0), key
        assert sum(r["w"] for r in per_rank) == pytest.approx(world, abs=1e-5), key
        expected_average = init_sum / world
        for r in per_rank:
            assert torch.allclose(r["average"], expected_average, atol=1e-5), key
            # 60 mixing steps on these small graphs: the de-biased models agree with the average
            assert torch.allclose(r["z"], expected_average, atol=1e-3), key
            assert torch.allclose(r["unflushed_z"], expected_average, atol=1e-3), key
        distances = per_rank[0]["distances"]
        assert distances[-1] < 1e-2 * distances[0], (key, distances)
        if key[1] == "exponential" and key[4] == 0:
            assert all(r["w"] == pytest.approx(1.0, abs=1e-6) for r in per_rank), "regular graph keeps w = 1"


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [3, 4, 5])  # with two workers both graphs are one edge
def test_nonregular_graph_moves_weights_away_from_one(world):
    res = results(world)
    weights = [r[("trajectory", "nonregular_exponential", "sgp")]["w"] for r in res]
    assert max(abs(w - 1) for w in weights) > 1e-3


@pytest.mark.multiproc
@pytest.mark.parametrize("world", WORLDS)
def test_bytes_per_step_match_one_model_per_peer(world):
    res = results(world)
    for key in [k for k in res[0] if isinstance(k, tuple) and k[0] == "bytes"]:
        _, peers, name, synch_freq = key
        for r in res:
            numel = r[key]["numel"]
            message = (numel + 1) * 4  # float32 numerators + the weight in the same message
            for step in r[key]["stats"]:
                assert step["bytes_sent"] == peers * message, key
                assert abs(step["bytes_sent"] - peers * numel * 4) <= 0.01 * peers * numel * 4
                assert step["blocking_s"] >= 0 and step["overlapped_s"] >= 0
            # the (default) exponential graph is regular: everyone receives as much as it sends
            assert all(step["bytes_received"] == peers * message for step in r[key]["stats"])
            if synch_freq > 0:
                assert sum(s["overlapped_s"] for s in r[key]["stats"]) > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("world", WORLDS)
def test_trajectories_match_push_sum_equations(world):
    res = results(world)
    for graph in GRAPH_NAMES:
        for name, staleness in [("sgp", 0), ("osgp", 2)]:
            z, flushed, w = _simulate(
                world, graph, staleness, 7, lr=0.1, momentum=0.9, data_ranks=[[i] for i in range(world)]
            )
            for i, r in enumerate(res):
                got = r[("trajectory", graph, name)]
                assert torch.allclose(got["z"], z[i], atol=1e-5), (graph, name, i)
                assert torch.allclose(got["flushed_z"], flushed[i], atol=1e-5), (graph, name, i)
                assert got["w"] == pytest.approx(w[i], abs=1e-5)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", WORLDS)
def test_load_consensus_resets_state(world):
    r = results(world)[0]["load_consensus"]
    assert r["pending_before"] == 2  # OSGP s=2 had two steps of messages in flight
    assert r["in_flight"] == 0 and r["w"] == 1.0
    assert torch.equal(r["num"], torch.full_like(r["num"], 0.25))
    assert torch.equal(r["z"], torch.full_like(r["z"], 0.25))


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [3, 5])
def test_state_dict_resumes_bit_exactly_with_messages_in_flight(world):
    for r in results(world):
        resume = r["resume"]
        assert resume["saved_in_flight"] == 2
        assert torch.equal(resume["continued"], resume["uninterrupted"])
        assert torch.equal(resume["resumed"], resume["uninterrupted"])


@pytest.mark.multiproc
def test_consensus_distance_metric_every_n_steps():
    metrics = results(3)[0]["metrics"]
    assert [("consensus_distance" in m) for m in metrics] == [False, False, True, False, False, True]
    assert metrics[5]["consensus_distance"] < metrics[2]["consensus_distance"]


@pytest.mark.multiproc
def test_two_nodes_of_two_processes_act_as_two_workers():
    res = results(4)
    for name, staleness in [("sgp", 0), ("osgp", 1)]:
        z, flushed, w = _simulate(
            2, "nonregular_exponential", staleness, 6, lr=0.1, momentum=0.9, data_ranks=[[0, 1], [2, 3]]
        )
        for rank, r in enumerate(res):
            got, node = r[("hierarchy", name)], rank // 2
            assert torch.allclose(got["z"], z[node], atol=1e-5), (name, rank)
            assert torch.allclose(got["flushed_z"], flushed[node], atol=1e-5), (name, rank)
            assert got["w"] == pytest.approx(w[node], abs=1e-6)
        for leader, mate in [(0, 1), (2, 3)]:  # node mates mirror the leader bitwise
            assert torch.equal(res[leader][("hierarchy", name)]["z"], res[mate][("hierarchy", name)]["z"])
        # every rank all-reduces the gradient inside the node; leaders also gossip
        numel = IN * OUT + OUT
        step = res[0][("hierarchy", name)]["stats"][0]
        assert step["bytes_sent"] >= (numel + 1) * 4 + numel * 4


@pytest.mark.multiproc
def test_one_node_of_two_processes_is_synchronous_sgd():
    res = results(2)
    for name, staleness in [("sgp", 0), ("osgp", 1)]:
        z, _, _ = _simulate(1, "exponential", staleness, 6, lr=0.1, momentum=0.9, data_ranks=[[0, 1]])
        for r in res:
            got = r[("hierarchy", name)]
            assert got["w"] == 1.0
            assert torch.allclose(got["z"], z[0], atol=1e-5)
        assert torch.equal(res[0][("hierarchy", name)]["z"], res[1][("hierarchy", name)]["z"])


# ============================================================================= single process
def test_single_worker_degenerates_to_local_sgd(single_process_group):
    from slowmo_train.dist import build_topology

    model = _model(0)
    reference = _model(0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    algo, opt = _build("sgp", model, build_topology(1), lr=0.1, peers_per_itr=5)
    stats = _train(algo, opt, 0, 4)
    _train(_NoAlgorithm(reference), ref_opt, 0, 4)
    assert algo.describe().startswith("sgp(")
    assert all(s["bytes_sent"] == 0 and s["bytes_received"] == 0 for s in stats)
    assert float(algo.weight) == 1.0
    assert torch.allclose(_flat(model), _flat(reference), atol=1e-6)


def test_bad_hyper_parameters_rejected(single_process_group):
    from slowmo_train.dist import build_topology

    topology = build_topology(1)
    with pytest.raises(ValueError, match="algorithm.synch_freq must be an integer in"):
        _build("osgp", _model(0), topology, lr=0.1, synch_freq=0)
    with pytest.raises(ValueError, match="algorithm.graph must be one of"):
        _build("sgp", _model(0), topology, lr=0.1, graph="ring")
    with pytest.raises(ValueError, match="algorithm.consensus_every must be"):
        _build("sgp", _model(0), topology, lr=0.1, consensus_every=-1)


def test_follows_parameters_re_laid_out_by_another_component(single_process_group):
    """A wrapper (e.g. SlowMo) may flatten the parameters again after gossip did; gossip must then
    read and write the new buffer instead of a stale one."""
    from slowmo_train.algorithms.comm import FlatParameters
    from slowmo_train.dist import build_topology

    model = _model(0)
    algo, opt = _build("sgp", model, build_topology(1), lr=0.1)
    _train(algo, opt, 0, 2)
    before = _flat(model)
    new_buffer = FlatParameters(list(model.parameters())).buffer
    assert torch.equal(new_buffer, before)
    _train(algo, opt, 0, 2, first_step=2)
    assert not torch.equal(_flat(model), before), "training must keep moving the parameters"
    assert torch.equal(new_buffer, _flat(model))
    algo.load_consensus([torch.zeros_like(p) for p in model.parameters()])
    assert torch.equal(new_buffer, torch.zeros_like(new_buffer))


class _NoAlgorithm:
    """Plain local SGD, with the trainer's hooks as no-ops."""

    def __init__(self, model):
        self.model = self.train_model = model
        self.comm = type("Stats", (), {"pop": staticmethod(lambda: {})})()

    def before_forward(self, k):
        pass

    def after_backward(self, k):
        pass

    def after_optimizer_step(self, k):
        pass
