"""Speed on a slow link: every algorithm, with and without SlowMo, on the emulated cluster
(scripts/emulated_cluster.sh: one network namespace per node, each node's link capped by tc tbf),
measured against an analytic model built from the measured compute time, the link rate and the
bytes each algorithm must send. The paper's claim under test is its Table 2 (Wang et al., "SlowMo",
ICLR 2020): Local SGD + SlowMo is much faster per iteration than AR-SGD on a slow network and SlowMo
adds almost nothing to its base algorithm.

    sudo .venv/bin/python scripts/bench_speed.py --data-root ../shared/data/cifar10          # ~20 min
    sudo .venv/bin/python scripts/bench_speed.py --data-root ../shared/data/cifar10 --quick  # ~5 min

Per topology (2 nodes x 1 process, 4 x 1, 2 x 2 with the node hierarchy) it first runs a
compute-only job: the same model, batch and threads on every node at the same time, with
communication disabled (Local SGD whose period exceeds the run; only an 8-byte all-reduce per step
keeps the nodes in lock-step), so compute is measured under the same sharing of this machine's
cores, and the same waiting for the slowest node, as the real runs. The two link rates are then derived from
that compute time (``--rates auto``): the comm-bound one makes AR-SGD's all-reduce ~3x the compute
(see COMM_BOUND_FACTOR), the balanced one ~1x. Every configuration runs ``--warmup`` + ``--steps``
steps (ResNet-18 at width 0.25 on real CIFAR-10 batches, one thread per worker); the table reports,
per iteration: measured ms, the model's ms, compute ms, blocking and overlapped communication ms
(from the trainer's ``comm_*_per_step`` figures), and bytes sent per worker against the algorithm's
definition. Results: ``<out>/bench_speed.csv``, ``.md`` and ``.png``. The runner (emulated cluster,
timing, link rates) is scripts/emulated_bench.py, shared with the other cluster benchmarks.

Runs (each costs ~35 s of start-up on a loaded 2-core machine, so the matrix is trimmed): 2x1 at the
comm-bound rate: every base algorithm with and without SlowMo (tau 12), SGP + SlowMo (tau 48) and
OSGP with the trainer's default stop-signal poll every step; 2x1 at the balanced rate, 4x1 and 2x2:
AR-SGD, Local SGD + SlowMo, SGP, OSGP (2x2: the gossip ones with SlowMo).

Analytic model: ``slowmo_train/simulated/cluster.py`` (its docstring gives the formula per algorithm;
the simulated cluster reports a real cluster's time with it), with R_edge for the ring all-reduces.
R is the tbf rate times 1448/1514 (TCP payload per Ethernet frame on a 1500-byte MTU, the bytes tbf
counts). R_edge: a ring crosses each node's link once per direction, so a ring all-reduce moves
ring(X, n) bytes over every node link, also with 2 processes per node (ranks in node order).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from slowmo_train import scripting
from slowmo_train.simulated.cluster import step_ms

if __package__:  # imported, or run as python -m scripts.bench_speed
    from scripts.emulated_bench import (
        COMM_BOUND_FACTOR,
        PAYLOAD_EFFICIENCY,
        ROOT,
        Bench,
        ClusterShape,
        Config,
        check_cluster_args,
        rate_bits,
        ring,
        save_rows,
        small_test_root,
    )
else:  # python scripts/bench_speed.py: this folder is sys.path[0]
    from emulated_bench import (
        COMM_BOUND_FACTOR,
        PAYLOAD_EFFICIENCY,
        ROOT,
        Bench,
        ClusterShape,
        Config,
        check_cluster_args,
        rate_bits,
        ring,
        save_rows,
        small_test_root,
    )

BASES = ("allreduce", "local_sgd", "sgp", "osgp")
#: every base algorithm with and without SlowMo (tau 12)
PAIRS = [Config(a) for a in BASES] + [Config(a, 12) for a in BASES]
#: gossip with the paper's longer outer period too
TAU48 = [Config("sgp", 48)]
#: OSGP with the trainer's default stop-signal poll every step: an all-reduce issued while a
#: gossip message is in flight waits behind it on the same Gloo connection (head-of-line
#: blocking), which removes OSGP's overlap
POLL_EVERY_STEP = [Config("osgp", poll_every=1)]
HEADLINE = [Config("allreduce"), Config("local_sgd", 12), Config("sgp"), Config("osgp")]
HIERARCHY = [Config("allreduce"), Config("local_sgd", 12), Config("sgp", 12), Config("osgp", 12)]
QUICK_CONFIGS = [Config("allreduce"), Config("local_sgd", 12), Config("sgp"), Config("osgp"), Config("sgp", 12)]


def expected_bytes(cfg: Config, topo: ClusterShape, p: float, b: float) -> float:
    """Bytes rank 0 (a node leader) sends per step by each algorithm's definition (module docstring;
    the payload convention of slowmo_train/algorithms/comm.py)."""
    n, ppn = topo.world, topo.nproc
    hier = ppn > 1 and topo.nodes > 1
    intra = ring(p, ppn) if hier else 0.0  # gradient all-reduce inside the node
    if cfg.algorithm == "allreduce":
        base = ring(p, n)
    elif cfg.algorithm == "local_sgd":
        period = cfg.slowmo_tau or 12
        base = intra + (0.0 if cfg.slowmo_tau else ring(p + b, n) / period)
    else:  # push-sum: one message (numerators + weight) to one peer; the leader mirrors it to the node
        # with SlowMo, the gossip of an outer iteration's last step is skipped (the exact average follows)
        gossip_steps = (cfg.slowmo_tau - 1) / cfg.slowmo_tau if cfg.slowmo_tau else 1.0
        base = intra + ((p + 4) + ((p + 4) if hier else 0.0)) * gossip_steps
    outer = (ring(p + 4, n) + ring(b, n)) / cfg.slowmo_tau if cfg.slowmo_tau else 0.0
    if cfg.slowmo_tau and hier and cfg.algorithm == "osgp":
        # the outer step's flush adds the leader's in-flight messages, so the leader mirrors its
        # state to the node once more (inside the node, not over the link)
        outer += (p + 4) / cfg.slowmo_tau
    return base + outer


def model_ms(cfg: Config, topo: ClusterShape, compute_ms: float, rate: float, p: float, b: float) -> float:
    """The analytic time per step (module docstring; slowmo_train/simulated/cluster.py, which the
    simulated cluster uses too). ``rate`` in payload bytes per second."""
    return step_ms(cfg.algorithm, cfg.slowmo_tau, topo.world, compute_ms, rate, p, b)


class SpeedBench(Bench):
    """The topologies of this benchmark: per topology a compute-only run, then each configuration."""

    def topology(self, topo: ClusterShape, plan: list[tuple[str, list[Config]]]) -> None:
        auto = self.rates is None
        compute, (p, b) = self.compute_only(topo)
        if auto:
            print(
                f"  link rates from the measured compute time: comm-bound {self.rates['comm']} "
                f"(AR-SGD communication ~{COMM_BOUND_FACTOR}x compute), balanced {self.rates['balanced']}",
                flush=True,
            )
        for key, configs in plan:
            rate = self.rates[key]
            payload = rate_bits(rate) / 8 * PAYLOAD_EFFICIENCY
            for cfg in configs:
                m = self.try_run(topo, cfg, rate, cfg.tag, f"{topo.label} {rate} {cfg.label}")
                if m is None:
                    continue
                model = model_ms(cfg, topo, compute.ms_per_step, payload, p, b)
                want = expected_bytes(cfg, topo, p, b)
                self.rows.append(
                    {
                        "topology": topo.label,
                        "rate": rate,
                        "config": cfg.label,
                        "ms_per_step": round(m.ms_per_step, 1),
                        "model_ms": round(model, 1),
                        "measured_over_model": round(m.ms_per_step / model, 3),
                        "compute_ms": round(compute.ms_per_step, 1),
                        "blocking_ms": round(m.blocking_ms, 1),
                        "overlapped_ms": round(m.overlapped_ms, 1),
                        "mb_sent_per_step": round(m.bytes_sent / 1e6, 4),
                        "mb_expected": round(want / 1e6, 4),
                        "bytes_error_pct": round(100 * (m.bytes_sent / want - 1), 2) if want else 0.0,
                    }
                )
            self.save()

    def save(self) -> None:
        save_rows(self.out, "bench_speed", self.rows, lambda rows: markdown_table(rows) + "\n\n" + targets(rows))


def markdown_table(rows: list[dict]) -> str:
    head = [
        "nodes x procs",
        "link",
        "algorithm",
        "ms/iter",
        "model ms",
        "meas/model",
        "compute ms",
        "blocking ms",
        "overlapped ms",
        "MB sent/iter",
        "MB expected",
        "bytes err %",
    ]
    return scripting.markdown_table(head, [r.values() for r in rows])


def _row(rows, topo, rate, label):
    for r in rows:
        if (r["topology"], r["rate"], r["config"]) == (topo, rate, label):
            return r
    return None


def targets(rows: list[dict]) -> str:
    """The paper's Table 2 claims and the model's accuracy as targets, checked on this run's numbers
    (the model's ratio in brackets)."""
    out = []

    def ratio(topo, rate, num, den, text):
        a, b = _row(rows, topo, rate, num), _row(rows, topo, rate, den)
        if a and b:
            out.append(
                f"- {topo} {rate}: {text} = {a['ms_per_step'] / b['ms_per_step']:.3f} "
                f"(model {a['model_ms'] / b['model_ms']:.3f})"
            )

    for topo, rate in sorted({(r["topology"], r["rate"]) for r in rows}, key=lambda g: (g[0], rate_bits(g[1]))):
        for base in ("AR-SGD", "Local SGD", "SGP", "OSGP"):
            for tau in (12, 48):
                ratio(
                    topo,
                    rate,
                    f"{base} + SlowMo(tau={tau})",
                    base,
                    f"{base} + SlowMo(tau={tau}) / {base} [target <= 1.03]",
                )
        ratio(
            topo,
            rate,
            "AR-SGD",
            "Local SGD + SlowMo(tau=12)",
            "AR-SGD / (Local SGD + SlowMo) [target >= 2.5 comm-bound]",
        )
        ratio(topo, rate, "SGP", "OSGP", "SGP / OSGP [target >= 1.3 comm-bound]")
        ratio(
            topo, rate, "OSGP [poll every 1]", "OSGP", "OSGP with a stop-signal poll every step / OSGP polling every 48"
        )
    worst = max(rows, key=lambda r: abs(r["measured_over_model"] - 1))
    out.append(
        f"- largest model deviation: {worst['topology']} {worst['rate']} {worst['config']}: "
        f"measured/model = {worst['measured_over_model']} (target within 0.85-1.15)"
    )
    worst_b = max(rows, key=lambda r: abs(r["bytes_error_pct"]))
    out.append(
        f"- largest bytes deviation: {worst_b['config']} ({worst_b['topology']}): "
        f"{worst_b['bytes_error_pct']} % (target within 1 %)"
    )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["topology"], r["rate"]) for r in rows}, key=lambda g: (g[0], rate_bits(g[1])))
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.6 * len(groups)), squeeze=False)
    for ax, (topo, rate) in zip(axes[:, 0], groups):
        sel = [r for r in rows if (r["topology"], r["rate"]) == (topo, rate)]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["ms_per_step"] for r in sel], width=0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["model_ms"] for r in sel], width=0.4, label="model", alpha=0.6)
        ax.axhline(sel[0]["compute_ms"], color="k", lw=0.8, ls="--", label="compute only")
        ax.set_xticks(list(x))
        short = [
            r["config"]
            .replace(" + SlowMo(tau=", "\n+SlowMo tau ")
            .replace(")", "")
            .replace(" [poll every 1]", "\npoll every step")
            for r in sel
        ]
        ax.set_xticklabels(short, fontsize=6.5)
        ax.set_ylabel("ms / iteration")
        ax.set_title(f"{topo} (nodes x processes), link {rate} per node", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="CIFAR-10 (either layout)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the CSV, Markdown table and PNG go")
    ap.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "slowmo-bench-speed"), help="run directories (scratch)"
    )
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--warmup", type=int, default=12, help="steps excluded from the timing (also the log interval)")
    ap.add_argument(
        "--steps", type=int, default=24, help="timed steps, a multiple of 12 (SlowMo with tau=48 runs max(steps, 48))"
    )
    ap.add_argument(
        "--rates",
        default="auto",
        help="comm-bound,balanced link rates (tc syntax, e.g. 40mbit,120mbit); "
        "auto: derived from the first topology's measured compute time",
    )
    ap.add_argument("--quick", action="store_true", help="2x1 only, 5 configurations, one rate, short runs")
    ap.add_argument("--topologies", default="2x1,4x1,2x2")
    args = ap.parse_args()
    check_cluster_args("bench_speed", args.data_root)
    args.data_root = str(small_test_root(Path(args.data_root).resolve(), Path(args.work)))
    args.log_every = args.warmup
    if args.steps % args.log_every or args.steps % 12 or 48 % args.log_every:
        sys.exit(
            f"bench_speed: error: --steps={args.steps} must be a multiple of 12 and of --warmup={args.warmup} "
            "(and --warmup must divide 48)"
        )
    bench = SpeedBench(args)
    start = time.time()
    if args.quick:
        bench.topology(ClusterShape(2, 1), [("comm", QUICK_CONFIGS)])
    else:
        # the full matrix on 2 nodes at the comm-bound rate, every base +- SlowMo at the balanced
        # one, and the headline configurations on 4 nodes and with the hierarchy: each run costs
        # ~25 s of start-up on this shared machine, and the whole benchmark should stay ~20 min
        plan = {
            "2x1": [("comm", PAIRS + TAU48 + POLL_EVERY_STEP), ("balanced", HEADLINE)],
            "4x1": [("comm", HEADLINE)],
            "2x2": [("comm", HIERARCHY)],
        }
        for name in args.topologies.split(","):
            nodes, nproc = map(int, name.split("x"))
            bench.topology(ClusterShape(nodes, nproc), plan.get(name, [("comm", PAIRS)]))
    bench.save()
    plot(bench.rows, bench.out / "bench_speed.png")
    print(f"\n{markdown_table(bench.rows)}\n\n{targets(bench.rows)}\n")
    if bench.failures:
        print("bench_speed: FAILED runs: " + "; ".join(bench.failures), file=sys.stderr)
    print(
        f"bench_speed: {len(bench.rows)} configurations in {(time.time() - start) / 60:.1f} min; "
        f"results in {bench.out}/bench_speed.csv, .md, .png"
    )
    sys.exit(1 if bench.failures else 0)


if __name__ == "__main__":
    main()
