"""Streamed and overlapped SlowMo outer steps on a slow link: what the opt-in options
``slowmo.overlap_steps=D``, ``slowmo.fragments=F`` and ``slowmo.outer_dtype`` (see the docstring of
slowmo_train/algorithms/slowmo.py) cost per iteration over the base algorithm alone, on the emulated
cluster (scripts/emulated_cluster.sh, 2 nodes x 1 process, each node's link capped by tc tbf).

    .venv/bin/python -m scripts.bench_streaming --data-root ../shared/data/cifar10          # ~25 min
    .venv/bin/python -m scripts.bench_streaming --data-root ../shared/data/cifar10 --quick  # ~7 min
    .venv/bin/python -m scripts.bench_streaming --data-root ../shared/data/cifar10 --sharded --steps 192  # ~15 min

From the repository root (it imports scripts/emulated_bench.py), as root (network namespaces;
otherwise prefix ``sudo``). ``--rate 95mbit`` skips the compute-only run, ``--algorithms local_sgd``
runs one base, ``--out /path/to/out`` keeps docs/img untouched.

SlowMo (Wang et al., "SlowMo", ICLR 2020, Alg. 1) averages the models exactly every tau steps with
a blocking all-reduce. Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping
communication", 2025, arXiv:2501.18512) hides that all-reduce: it is posted asynchronously and applied
D steps later (overlap), the model is sent in F fragments in turn (a 1/F-sized all-reduce every tau/F
steps), and the outer pseudo-gradient travels in bfloat16 (half the bytes). The goal under test: with
D >= 1, SlowMo adds less than 1 % to the time per iteration of its base algorithm.

The matrix (2 x 1 at the comm-bound rate; ``--rate auto`` derives it like scripts/bench_speed.py: a
compute-only run, then the rate at which AR-SGD's all-reduce takes ~3x the compute):

* Local SGD (algorithm.period=12) alone, then + SlowMo (tau 12, so period = tau) with
  D in {0, 1, 2} x F in {1, 4} x outer_dtype in {float32, bfloat16} (12 runs);
* SGP alone, then + SlowMo (tau 48) with the same 12 variants;
* each base once more at the end of its block ("base (repeat)"): the spread between the two base
  runs is the noise floor the 1 % goal has to be read against (not with ``--quick``).

``--sharded`` runs another matrix instead, into ``bench_streaming_sharded.*``: per base, the base,
then (D, F) in {(0, 1), (1, 4), (2, 1), (2, 4)} in float32, each unsharded and with
``slowmo.sharded=true`` (x0 and u split across the ranks; the new x0 all-gathered, D0 F1 through
Alg. 1's blocking path, the others non-blocking): what keeping 1/n of the slow state costs.

Each run is ``--warmup`` steps (excluded) + max(``--steps``, tau) timed steps, so the timed window
holds whole outer iterations. ResNet-18 at width 0.25 on real CIFAR-10 batches, one thread per
worker, through the runner bench_speed uses (scripts/emulated_bench.py: ``Bench.run``, ``Config``
with ``extra`` overrides). D0 F1 float32 is the original blocking code path of Alg. 1; every other
variant takes the streamed path.

How to read the comparison (it is not the same for every variant):

* Local SGD: SlowMo's synchronisation *replaces* Local SGD's own average. With algorithm.period =
  tau = 12 the base skips its average at the end of every outer iteration, also with F = 4 (the
  staggered fragments are then the only averaging: Streaming DiLoCo's inner loop). So every Local
  SGD row moves about the bytes of its base (P + B per 12 steps; half the parameter bytes with
  bfloat16), only timed differently: with D = 0 a blocking all-reduce replaces a blocking one, with
  D >= 1 an overlapped one replaces it, and the "overhead" can be negative. This is a comparison of
  two ways to average, not of SlowMo's cost on top of an unchanged base.
* SGP: the outer all-reduce comes on top of the gossip (what the 1 % goal is about), less one
  gossip per outer iteration when F = 1 (the exact average supersedes it); the push-sum weight adds
  an 8-byte float64 all-reduce per fragment on the streamed path (``FragmentSync.post`` in
  slowmo_train/algorithms/outer_sync.py).

Per row, per iteration: ms, SlowMo's overhead over its base ((ms - ms_base) / ms_base), the same
counting only the added blocking time ((blocking - blocking_base) / ms_base: on this shared machine
the compute time drifts by several % between runs, which the blocking time mostly leaves out), blocking
and overlapped communication ms (the trainer's ``comm_*_per_step``), SlowMo's own blocking and
overlapped time per outer iteration (the trainer's ``comm_outer_*_per_step`` x tau: time inside
SlowMo's operations, counted by ``CommStats.outer``; for OSGP it includes the flush of in-flight
gossip the outer step forces), the link time of one outer
iteration's SlowMo traffic at the rate (what D steps of compute have to cover), and MB sent against
the expected bytes (ring(X) = 2(n-1)/n X, P = parameter bytes in float32, P_wire = P or P/2 for
bfloat16, B = BatchNorm buffer bytes):

    Local SGD            ring(P + B) / 12
    SGP                  P + 4 (one push-sum message per step; with SlowMo and F = 1 the gossip of
                         the last step of an outer iteration is skipped: (tau - 1) / tau of it)
    + SlowMo, Alg. 1     (ring(P + 4) + ring(B)) / tau            (D0 F1 float32: exact_average)
    + SlowMo, streamed   (ring(P_wire) + F ring(8) [push-sum only] + ring(B)) / tau
    sharded, also        + (n-1)/n P / tau (the all-gather of the new x0, to within the padding)
    Local SGD + SlowMo drops its own ring(P + B) / 12 (period = tau, see above).

Results: ``<out>/bench_streaming.csv``, ``.md`` (table + the goal check) and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.emulated_bench import (
    PAYLOAD_EFFICIENCY,
    Bench,
    ClusterShape,
    Config,
    Measured,
    check_cluster_args,
    model_sizes,
    rate_bits,
    read_rows,
    ring,
    save_rows,
    small_test_root,
)

if __package__:  # python -m scripts.bench_streaming, or imported
    from scripts.streaming_report import goal_check, markdown_table, plot
else:  # python scripts/bench_streaming.py: this folder is sys.path[0]
    from streaming_report import goal_check, markdown_table, plot


ROOT = Path(__file__).resolve().parents[1]
#: outer period per base (Local SGD's = its averaging period, as in bench_speed)
TAU = {"local_sgd": 12, "sgp": 48}
NAMES = {"local_sgd": "Local SGD", "sgp": "SGP"}
#: Local SGD's own averaging period (bench_speed's Config sets algorithm.period=12)
LOCAL_PERIOD = 12
DELAYS, FRAGMENTS, DTYPES = (0, 1, 2), (1, 4), ("float32", "bfloat16")
#: --quick: the Alg. 1 path, one overlapped and one streamed + overlapped + bf16 variant
QUICK_VARIANTS = ((0, 1, "float32"), (1, 1, "float32"), (1, 4, "bfloat16"))
#: --sharded: (D, F), each unsharded and sharded, float32
SHARDED_VARIANTS = ((0, 1), (1, 4), (2, 1), (2, 4))
TOPOLOGY = ClusterShape(2, 1)


@dataclass(frozen=True)
class Variant:
    """One run of the matrix: a base alone (``tau`` None) or the base + SlowMo with (D, F, dtype)."""

    algorithm: str
    tau: int | None = None
    delay: int = 0
    fragments: int = 1
    dtype: str = "float32"
    repeat: bool = False  # the base measured a second time (noise floor)
    sharded: bool = False  # slowmo.sharded=true

    @property
    def is_base(self) -> bool:
        return self.tau is None

    @property
    def name(self) -> str:
        if self.is_base:
            return "base (repeat)" if self.repeat else "base"
        name = f"D{self.delay} F{self.fragments} {'bf16' if self.dtype == 'bfloat16' else 'fp32'}"
        return name + (" sharded" if self.sharded else "")

    @property
    def streamed(self) -> bool:
        return not self.is_base and (self.delay > 0 or self.fragments > 1 or self.dtype != "float32")

    def config(self) -> Config:
        if self.is_base:
            return Config(self.algorithm)
        return Config(
            self.algorithm,
            self.tau,
            extra=(
                f"slowmo.overlap_steps={self.delay}",
                f"slowmo.fragments={self.fragments}",
                f"slowmo.outer_dtype={self.dtype}",
                *(("slowmo.sharded=true",) if self.sharded else ()),
            ),
        )


def build_plan(algorithms: list[str], quick: bool, sharded: bool = False) -> list[Variant]:
    """Per base: the base, its SlowMo variants, then (full runs only) the base again."""
    grid = QUICK_VARIANTS if quick else [(d, f, t) for d in DELAYS for f in FRAGMENTS for t in DTYPES]
    plan = []
    for algorithm in algorithms:
        plan.append(Variant(algorithm))
        if sharded:
            plan += [
                Variant(algorithm, TAU[algorithm], d, f, sharded=s) for d, f in SHARDED_VARIANTS for s in (False, True)
            ]
            continue
        plan += [Variant(algorithm, TAU[algorithm], d, f, t) for d, f, t in grid]
        if not quick:
            plan.append(Variant(algorithm, repeat=True))
    return plan


def outer_bytes(v: Variant, p: float, b: float, n: int) -> float:
    """Bytes one rank sends for SlowMo in one outer iteration (tau steps), module docstring."""
    if v.is_base:
        return 0.0
    if not v.streamed:  # Alg. 1: exact_average appends the weight (a parameter-dtype scalar)
        return ring(p + 4, n) + ring(b, n) + ((n - 1) / n * p if v.sharded else 0.0)
    wire = p / 2 if v.dtype == "bfloat16" else p
    weights = v.fragments * ring(8, n) if v.algorithm == "sgp" else 0.0
    gather = (n - 1) / n * p if v.sharded else 0.0
    return ring(wire, n) + weights + ring(b, n) + gather


def expected_bytes(v: Variant, p: float, b: float, n: int) -> float:
    """Bytes one rank sends per step (payload convention of slowmo_train/algorithms/comm.py)."""
    if v.algorithm == "sgp":
        # at the end of an outer iteration a whole-model outer all-reduce (F = 1) supersedes that
        # step's gossip: the exact average is invariant under mixing, so SGP skips it
        skipped = 1 if v.tau and v.fragments == 1 else 0
        base = (p + 4) * (1 - skipped / v.tau) if skipped else p + 4
    elif v.is_base:
        base = ring(p + b, n) / LOCAL_PERIOD
    else:  # SlowMo's synchronisation replaces Local SGD's own average (period = tau; any D, F)
        base = 0.0
    return base + (outer_bytes(v, p, b, n) / v.tau if v.tau else 0.0)


def make_row(v: Variant, m: Measured, base: Measured, rate: str, p: float, b: float, n: int) -> dict:
    """One table row; ``base`` is the first measurement of ``v``'s base algorithm."""
    want = expected_bytes(v, p, b, n)
    link_ms = 1000 * outer_bytes(v, p, b, n) / (rate_bits(rate) / 8 * PAYLOAD_EFFICIENCY)
    return {
        "algorithm": NAMES[v.algorithm],
        "variant": v.name,
        "tau": v.tau or "",
        "overlap_steps": "" if v.is_base else v.delay,
        "fragments": "" if v.is_base else v.fragments,
        "outer_dtype": "" if v.is_base else v.dtype,
        "rate": rate,
        "ms_per_iter": round(m.ms_per_step, 1),
        "overhead_pct": "" if v.is_base and not v.repeat else round(100 * (m.ms_per_step / base.ms_per_step - 1), 2),
        "blocking_overhead_pct": ""
        if v.is_base and not v.repeat
        else round(100 * (m.blocking_ms - base.blocking_ms) / base.ms_per_step, 2),
        "blocking_ms": round(m.blocking_ms, 1),
        "overlapped_ms": round(m.overlapped_ms, 1),
        # measured directly: the blocking time inside SlowMo's own operations (CommStats.outer)
        "slowmo_blocking_ms_per_outer": "" if v.is_base else round(m.extra.get("outer_blocking_ms", 0.0) * v.tau, 1),
        "slowmo_overlapped_ms_per_outer": ""
        if v.is_base
        else round(m.extra.get("outer_overlapped_ms", 0.0) * v.tau, 1),
        "outer_link_ms": "" if v.is_base else round(link_ms, 1),
        "mb_sent_per_iter": round(m.bytes_sent / 1e6, 4),
        "mb_expected": round(want / 1e6, 4),
        "bytes_error_pct": round(100 * (m.bytes_sent / want - 1), 2) if want else 0.0,
    }


class StreamingBench(Bench):
    CLUSTER_ARGS = ("--prefix", "smts", "--subnet", "10.77.3", "--port", "29551")
    stem = "bench_streaming"  # output file names; bench_streaming_sharded with --sharded

    def sweep(self, plan: list[Variant]) -> None:
        topo = TOPOLOGY
        if self.rates is None:
            compute, _ = self.compute_only(topo)
            print(
                f"  comm-bound link rate from the measured compute time ({compute.ms_per_step:.1f} ms/step): "
                f"{self.rates['comm']}",
                flush=True,
            )
        rate = self.rates["comm"]
        sizes, bases = None, {}
        for v in plan:
            cfg = v.config()
            if v.algorithm not in bases and not v.is_base:
                print(f"  skipping {cfg.label}: its base run failed", file=sys.stderr, flush=True)
                self.failures.append(f"{cfg.label} (no base)")
                continue
            tag = cfg.tag + ("_repeat" if v.repeat else "")
            m = self.try_run(topo, cfg, rate, tag, cfg.label)
            if m is None:
                continue
            if sizes is None:
                sizes = model_sizes(self.work / f"{topo.label}_{rate}_{tag}")
            bases.setdefault(v.algorithm, m)
            self.rows.append(make_row(v, m, bases[v.algorithm], rate, *sizes, topo.world))
            self.save()

    def save(self) -> None:
        save_rows(self.out, self.stem, self.rows, lambda rows: markdown_table(rows) + "\n\n" + goal_check(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="CIFAR-10 ImageFolder tree with train/ and test/")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the CSV, Markdown table and PNG go")
    ap.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "slowmo-bench-streaming"), help="run directories (scratch)"
    )
    ap.add_argument("--algorithms", default="local_sgd,sgp", help=f"bases, from {', '.join(TAU)}")
    ap.add_argument(
        "--rate",
        default="auto",
        help="link rate per node (tc syntax, e.g. 95mbit); auto: the "
        "comm-bound rate of bench_speed, from a compute-only run",
    )
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK_VARIANTS)} SlowMo variants per base, no repeat")
    ap.add_argument(
        "--sharded",
        action="store_true",
        help="the sharded matrix instead (module docstring), into bench_streaming_sharded.*",
    )
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--warmup", type=int, default=12, help="steps excluded from the timing (also the log interval)")
    ap.add_argument(
        "--steps",
        type=int,
        default=48,
        help="timed steps, a multiple of 12 and of --warmup (runs with tau 48 time max(steps, 48))",
    )
    ap.add_argument("--replot", metavar="CSV", help="only redraw the table and PNG from a saved bench_streaming.csv")
    args = ap.parse_args()
    if args.replot:
        rows = read_rows(Path(args.replot))
        out, stem = Path(args.out), Path(args.replot).stem
        (out / f"{stem}.md").write_text(markdown_table(rows) + "\n\n" + goal_check(rows) + "\n")
        plot(rows, out / f"{stem}.png")
        print(f"bench_streaming: redrew {out}/{stem}.md and .png from {args.replot}")
        return
    algorithms = args.algorithms.split(",")
    bad = [a for a in algorithms if a not in TAU]
    if bad or not algorithms:
        sys.exit(
            f"bench_streaming: error: --algorithms={args.algorithms} must be a comma-separated list of {', '.join(TAU)}"
        )
    if args.warmup < 1 or args.steps % 12 or args.steps % args.warmup or 48 % args.warmup:
        sys.exit(
            f"bench_streaming: error: --steps={args.steps} must be a multiple of 12 and of --warmup="
            f"{args.warmup} (and --warmup must divide 48)"
        )
    check_cluster_args("bench_streaming", args.data_root, args.rate)
    args.data_root = str(small_test_root(Path(args.data_root).resolve(), Path(args.work)))
    args.log_every = args.warmup
    args.rates = "auto" if args.rate == "auto" else f"{args.rate},{args.rate}"  # Bench's comm,balanced
    bench = StreamingBench(args)
    if args.sharded:
        bench.stem = "bench_streaming_sharded"
    start = time.time()
    bench.sweep(build_plan(algorithms, args.quick, args.sharded))
    bench.save()
    if bench.rows:
        plot(bench.rows, bench.out / f"{bench.stem}.png")
        print(f"\n{markdown_table(bench.rows)}\n\n{goal_check(bench.rows)}\n")
    if bench.failures:
        print("bench_streaming: FAILED runs: " + "; ".join(bench.failures), file=sys.stderr)
    print(
        f"bench_streaming: {len(bench.rows)} runs in {(time.time() - start) / 60:.1f} min; "
        f"results in {bench.out}/{bench.stem}.csv, .md, .png"
    )
    sys.exit(1 if bench.failures else 0)


if __name__ == "__main__":
    main()
