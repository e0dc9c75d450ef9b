"""Time to accuracy on a slow link: test accuracy against training wall time for AR-SGD, Local SGD,
SGP and OSGP, each with and without SlowMo, and streamed SlowMo, trained on the emulated cluster
(scripts/emulated_cluster.sh: one network namespace per node, each node's link capped by tc tbf at a
comm-bound rate); and the wall time each needs to reach a target fixed before the runs: the test
accuracy AR-SGD reaches at 80 % of its budget. This is the number a user buys SlowMo for (Wang et al.,
"SlowMo", ICLR 2020, arXiv:1910.00643, Sec. 5-6: the same accuracy in less time on a slow network).

    # 1. the same images for every method (~17 min): accuracy per image and ms per step
    .venv/bin/python -m scripts.time_to_accuracy --data-root ../shared/data/cifar10 --rate 220mbit
    # 2. the same training time for every method (~25 min): AR-SGD's, from the ms/step of run 1
    .venv/bin/python -m scripts.time_to_accuracy --data-root ../shared/data/cifar10 --rate 220mbit \
        --equal-time docs/img/time_to_accuracy.csv --beta auto
    # a 3-minute look
    .venv/bin/python -m scripts.time_to_accuracy --data-root ../shared/data/cifar10 --topologies 2x1 \
        --methods allreduce,localsgd_slowmo --samples 3200 --out /path/to/out

From the repository root, as root (network namespaces). ``--out /path/to/out`` keeps docs/img untouched.

The protocol (fixed before the runs; the same for every method, nothing tuned for any of them):

* every method is its ``configs/exp/cifar10_<method>.yaml`` (SlowMo at the paper's alpha 1, beta 0.7,
  tau 12; Local SGD averaging every 12 steps; SGP/OSGP one peer per step), on ResNet-18 x ``--width``,
  ``--batch`` images per node, one process of one thread per node;
* the same samples for every method and topology: one pass over a ``--samples``-image CIFAR-10
  subset (so 4 nodes take half the steps of 2), lr 0.4 per 256 images (peak 0.05 on 2 nodes, 0.1 on
  4), the paper's schedule shape compressed to the pass (warm-up 5/200, lr / 10 at 1/2, 3/4, 7/8);
* test top-1 on 1,000 test images (100 per class) at every tenth of the pass; training time is the
  trainer's own clock, evaluation excluded, summed from rank 0's logged intervals;
* the link rate: ``--rate auto`` measures a compute-only run on 2 nodes and picks the rate at which
  AR-SGD's all-reduce takes 3x the compute (scripts/emulated_bench.py ``auto_rates``), one rate for
  both topologies, as one network would be;
* the target: AR-SGD's test top-1 at 80 % of its steps (its 8th evaluation), per topology. A method's
  time to target is the training time of its first evaluation at or above it (not reached: "-").

``--equal-time CSV`` gives every method AR-SGD's training time instead of its images: a method whose
step is k times faster (its ms/step in CSV, an earlier run of this script) trains on k times as many
images, one pass with the schedule compressed to it (to the nearest multiple of the batch x 50, at
most the 50,000 training images). That is the comparison a user makes with a fixed time on the
cluster. ``--beta auto`` runs the SlowMo methods with ``slowmo.beta=auto`` (with SGD 0.2 on 2 nodes,
0.6 on 4: the rule measured on the simulated cluster) instead of the paper's 0.7. The two options
add ``_equal_time`` and ``_beta_auto`` to the results' names.

Results: ``<out>/time_to_accuracy.csv`` (every evaluation), ``.md`` (the table) and ``.png`` (accuracy
against training time, one panel per topology).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.emulated_bench import (
    CLUSTER,
    Bench,
    ClusterShape,
    check_cluster_args,
    read_rows,
    save_rows,
    small_test_root,
)
from scripts.reproduction.plan import STREAMED  # the outer all-reduce in 4 fragments, one step late, in bf16
from slowmo_train import scripting

ROOT = Path(__file__).resolve().parents[1]
#: key -> (label, configs/exp/cifar10_<exp>.yaml, extra overrides)
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "allreduce": ("AR-SGD", "allreduce", ()),
    "allreduce_slowmo": ("AR-SGD + SlowMo", "allreduce_slowmo", ()),
    "localsgd": ("Local SGD", "localsgd", ()),
    "localsgd_slowmo": ("Local SGD + SlowMo", "localsgd_slowmo", ()),
    "localsgd_slowmo_streamed": ("Local SGD + SlowMo (streamed)", "localsgd_slowmo", STREAMED),
    "sgp": ("SGP", "sgp", ()),
    "sgp_slowmo": ("SGP + SlowMo", "sgp_slowmo", ()),
    "osgp": ("OSGP", "osgp", ()),
    "osgp_slowmo": ("OSGP + SlowMo", "osgp_slowmo", ()),
}
EVALS = 10  # evaluations per run, at every tenth of the pass
CIFAR_TRAIN = 50_000
TARGET_EVAL = 8  # AR-SGD's evaluation at 80 % of its budget sets the target
LR_PER_256 = 0.4
#: the trainer's stop-signal poll (a tiny all-reduce) every N steps: once per step would queue
#: behind OSGP's in-flight gossip and undo its overlap (scripts/emulated_bench.py, POLL_EVERY_STEP)
POLL_EVERY = 48


@dataclass(frozen=True)
class Curve:
    """One run: (step, training seconds, test top-1) at every evaluation, and ms per step."""

    points: tuple[tuple[int, float, float], ...]
    ms_per_step: float


def train_seconds_at(train: list[dict], units_per_step: int) -> dict[int, float]:
    """Cumulative training seconds at every logged step, from the trainer's ``train`` records (each
    interval's seconds = its steps x units per step / its rate; evaluation is outside them)."""
    out, total, prev = {}, 0.0, 0
    for e in train:
        if "samples_per_s" not in e:
            continue
        total += (e["step"] - prev) * units_per_step / e["samples_per_s"]
        prev = e["step"]
        out[e["step"]] = total
    return out


def read_curve(run_dir: Path, units_per_step: int) -> Curve:
    """The run's evaluations with the training time at each (every evaluation step is a log step)."""
    seconds = train_seconds_at(scripting.read_metrics(run_dir, "train"), units_per_step)
    evals = scripting.read_metrics(run_dir, "eval")
    missing = [e["step"] for e in evals if e["step"] not in seconds]
    if missing or not evals:
        raise RuntimeError(f"{run_dir}: evaluations at steps {missing or 'none'} have no logged training time")
    last = max(seconds)
    return Curve(tuple((e["step"], seconds[e["step"]], e["top1"]) for e in evals), 1000 * seconds[last] / last)


def time_to_target(curve: Curve, target: float) -> float | None:
    """Training seconds of the first evaluation at or above ``target`` (None: never reached)."""
    return next((s for _, s, acc in curve.points if acc >= target), None)


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per topology and method: ms per step, final and best top-1, time to AR-SGD's 80 % target and the
    speed-up over AR-SGD's time to it. ``rows``: one per evaluation (the CSV)."""
    out = []
    for topo in dict.fromkeys(r["topology"] for r in rows):
        runs: dict[str, list[dict]] = {}
        for r in rows:
            if r["topology"] == topo:
                runs.setdefault(r["method"], []).append(r)
        ar = runs.get("AR-SGD", [])
        # no AR-SGD run (it failed): no target, every time to it "-"
        target = ar[TARGET_EVAL - 1]["top1"] if len(ar) >= TARGET_EVAL else None
        ar_time = ar[TARGET_EVAL - 1]["train_s"] if target is not None else None
        for method, points in runs.items():
            reached = None if target is None else next((p["train_s"] for p in points if p["top1"] >= target), None)
            out.append(
                {
                    "topology": topo,
                    "method": method,
                    "ms_per_step": points[-1]["ms_per_step"],
                    "final_top1": points[-1]["top1"],
                    "best_top1": max(p["top1"] for p in points),
                    "target": target,
                    "time_to_target_s": reached,
                    "speedup": None if reached is None else ar_time / reached,
                    "train_s": points[-1]["train_s"],
                }
            )
    return out


def markdown(rows: list[dict]) -> str:
    def cell(v, fmt):
        return "-" if v is None or v == "" else format(v, fmt)

    table = scripting.markdown_table(
        [
            "nodes x procs",
            "method",
            "ms/step",
            "train s",
            "final top-1",
            "best top-1",
            "target",
            "s to target",
            "vs AR-SGD",
        ],
        [
            [
                r["topology"],
                r["method"],
                cell(r["ms_per_step"], ".0f"),
                cell(r["train_s"], ".0f"),
                cell(r["final_top1"], ".2f"),
                cell(r["best_top1"], ".2f"),
                cell(r["target"], ".2f"),
                cell(r["time_to_target_s"], ".0f"),
                "-" if r["speedup"] in (None, "") else f"{r['speedup']:.2f}x",
            ]
            for r in summary_rows(rows)
        ],
    )
    return table


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topos = list(dict.fromkeys(r["topology"] for r in rows))
    fig, axes = plt.subplots(1, len(topos), figsize=(5.2 * len(topos), 3.6), squeeze=False)
    for ax, topo in zip(axes[0], topos):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [r for r in rows if r["topology"] == topo and r["method"] == method]
            if pts:
                style = "--" if "SlowMo" not in method else "-"
                ax.plot([p["train_s"] for p in pts], [p["top1"] for p in pts], style, marker=".", label=method)
        target = next((s["target"] for s in summary_rows(rows) if s["topology"] == topo), None)
        if target is not None:
            ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{topo} nodes x procs", xlabel="training time (s)", ylabel="test top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


class TimeToAccuracy(Bench):
    CLUSTER_ARGS = ("--prefix", "smtt", "--subnet", "10.77.4", "--port", "29561")

    def overrides(self, topo: ClusterShape, key: str, run_dir: Path) -> list[str]:
        a = self.args
        _, exp, extra = METHODS[key]
        if self.beta_auto(key):
            extra = (*extra, "slowmo.beta=auto")
        total = a.batch * topo.world
        samples = self.samples(topo, key)
        every = samples // total // EVALS
        return [
            f"+exp=cifar10_{exp}",
            f"data.root={a.data_root}",
            f"data.train_subset={samples}",
            f"model.width={a.width}",
            f"train.batch_size={a.batch}",
            "train.epochs=1",
            f"train.eval_every_epochs={1 / EVALS:g}",
            "train.eval_batch_size=250",
            f"train.log_every={max(1, every // 5)}",
            "train.progress=log",
            "launcher.threads_per_worker=1",
            f"optim.lr={LR_PER_256}",
            "optim.warmup_epochs=0.025",
            "optim.milestone_epochs_of=1",
            "optim.milestones=[0.5,0.75,0.875]",
            f"checkpoint.poll_every={POLL_EVERY}",
            "checkpoint.every_minutes=0",
            "checkpoint.at_end=false",
            f"output_dir={run_dir}",
            *extra,
        ]

    def beta_auto(self, key: str) -> bool:
        """Whether ``key`` runs SlowMo with ``slowmo.beta=auto`` (``--beta auto``)."""
        return self.args.beta == "auto" and "slowmo" in METHODS[key][1]

    def samples(self, topo: ClusterShape, key: str) -> int:
        """The images of one pass: ``--samples``, or with ``--equal-time`` as many as the method trains in
        AR-SGD's time (its ms per step in that CSV), to the nearest multiple of the batch x 50 (10
        evaluations, each 5 log intervals), at most the 50,000 training images."""
        a = self.args
        pace = getattr(a, "pace", None)
        if not pace or key == "allreduce":
            return a.samples
        unit = a.batch * topo.world * EVALS * 5
        ratio = pace[topo.label, "AR-SGD"] / pace[topo.label, METHODS[key][0]]
        return max(unit, min(round(a.samples * ratio / unit), CIFAR_TRAIN // unit) * unit)

    def train(self, topo: ClusterShape, key: str, rate: str) -> list[dict]:
        run_dir = self.work / f"{topo.label}_{key}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = ["bash", str(CLUSTER), "--nodes", str(topo.nodes), "--nproc", str(topo.nproc), "--rate", rate]
        cmd += [*self.CLUSTER_ARGS, "--python", sys.executable, "--", *self.overrides(topo, key, run_dir)]
        start = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"{topo.label} {key} failed:\n{(result.stdout + result.stderr)[-3000:]}")
        curve = read_curve(run_dir, self.args.batch * topo.world)
        label = METHODS[key][0] + (" (beta auto)" if self.beta_auto(key) else "")
        print(
            f"  {topo.label} {rate} {label:<30} {curve.ms_per_step:6.0f} ms/step, final top-1 "
            f"{curve.points[-1][2]:.2f} after {curve.points[-1][1]:.0f} s [{time.time() - start:.0f} s]",
            flush=True,
        )
        return [
            {"topology": topo.label, "rate": rate, "method": label, "step": s, "train_s": t, "top1": acc}
            | {"ms_per_step": curve.ms_per_step}
            for s, t, acc in curve.points
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="CIFAR-10 (either layout)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the CSV, Markdown table and PNG go")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "slowmo-time-to-accuracy"))
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16, help="per node (one process each)")
    ap.add_argument("--samples", type=int, default=12800, help="training images (one pass)")
    ap.add_argument("--rate", default="auto", help="link rate (tc syntax, e.g. 95mbit), or auto (comm-bound)")
    ap.add_argument("--topologies", default="2x1,4x1")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument(
        "--beta", choices=("paper", "auto"), default="paper", help="SlowMo's beta: 0.7, or slowmo.beta=auto"
    )
    ap.add_argument(
        "--equal-time",
        metavar="CSV",
        help="give every method AR-SGD's training time: its images scaled by the ms/step of this earlier CSV",
    )
    ap.add_argument("--redraw", action="store_true", help="only redraw the table and plot from <out>'s CSV")
    args = ap.parse_args()
    out = Path(args.out)
    stem = (
        "time_to_accuracy" + ("_equal_time" if args.equal_time else "") + ("_beta_auto" if args.beta == "auto" else "")
    )
    if args.redraw:
        rows = read_rows(out / f"{stem}.csv")
        save_rows(out, stem, rows, markdown)
        plot(rows, out / f"{stem}.png")
        print(markdown(rows))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "allreduce" not in methods:
        sys.exit(
            f"time_to_accuracy: error: --methods={args.methods} must include allreduce (the target) and name only "
            + ", ".join(METHODS)
        )
    topos = [ClusterShape(*map(int, t.split("x"))) for t in args.topologies.split(",")]
    for topo in topos:
        if args.samples % (args.batch * topo.world * EVALS * 5):
            sys.exit(
                f"time_to_accuracy: error: --samples={args.samples} must be a multiple of "
                f"{args.batch * topo.world * EVALS * 5} (batch x nodes x {EVALS} evaluations x 5 log lines) "
                f"for {topo.label}"
            )
    if args.equal_time:
        try:
            args.pace = {(r["topology"], r["method"]): r["ms_per_step"] for r in read_rows(Path(args.equal_time))}
        except (OSError, KeyError) as err:
            sys.exit(f"time_to_accuracy: error: --equal-time={args.equal_time} is not a CSV of this script ({err})")
        missing = [
            f"{t.label} {METHODS[m][0]}" for t in topos for m in methods if (t.label, METHODS[m][0]) not in args.pace
        ]
        if missing:
            sys.exit(
                f"time_to_accuracy: error: --equal-time={args.equal_time} has no ms/step for " + ", ".join(missing)
            )
    check_cluster_args("time_to_accuracy", args.data_root, args.rate)
    args.data_root = str(small_test_root(Path(args.data_root).resolve(), Path(args.work), per_class=100))
    # what Bench's compute-only run reads: its link rates, 8 warm-up steps then 40 timed
    args.rates, args.warmup, args.steps, args.log_every = args.rate, 8, 40, 8
    bench = TimeToAccuracy(args)
    start = time.time()
    if args.rate == "auto":
        bench.compute_only(ClusterShape(2, 1))
    rate = bench.rates["comm"]
    print(f"time_to_accuracy: link rate {rate} per node and direction", flush=True)
    rows: list[dict] = []
    for topo in topos:
        for key in methods:
            try:
                rows += bench.train(topo, key, rate)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"  FAILED: {err}", file=sys.stderr, flush=True)
                bench.failures.append(f"{topo.label} {key}")
            save_rows(out, stem, rows, markdown)  # after every run: a stopped benchmark keeps its rows
    plot(rows, out / f"{stem}.png")
    print(f"\n{markdown(rows)}\n")
    print(f"time_to_accuracy: {len(rows) // EVALS} runs in {(time.time() - start) / 60:.1f} min; results in {out}")
    if bench.failures:
        sys.exit("time_to_accuracy: FAILED runs: " + "; ".join(bench.failures))


if __name__ == "__main__":
    main()
