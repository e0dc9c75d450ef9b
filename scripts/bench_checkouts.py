"""Two checkouts of slowmo-train side by side on the emulated cluster: does a change cost speed?

    git worktree add /path/to/baseline main
    sudo .venv/bin/python -m scripts.bench_checkouts --data-root ../shared/data/cifar10 --baseline /path/to/baseline

Every configuration runs alternately with the baseline's package and the candidate's (by default
this checkout; A B A B ...,
``--repeats`` times each, same interpreter and torch), on 2 emulated nodes at the comm-bound link
rate that scripts/bench_speed.py derives from the measured compute time, so that load on this
shared machine falls on both sides alike. The table gives ms per iteration (mean and the spread of
the repeats), the blocking and overlapped communication ms per iteration from the trainer's
``comm_*_per_step`` figures, and this checkout's time over the baseline's. Results:
``<out>/bench_checkouts.md``.

The default configurations are the ones whose communication overlaps compute, where a change in
how collectives are grouped or timed would show: OSGP (gossip in flight behind the next step),
SlowMo with its outer all-reduce overlapped (``slowmo.overlap_steps=2``, 4 fragments), and AR-SGD
(DDP's buckets behind the backward pass), plus SGP as a blocking control.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.emulated_bench import (
    COMPUTE_ONLY,
    ROOT,
    Bench,
    ClusterShape,
    Config,
    auto_rates,
    model_sizes,
    ring,
    small_test_root,
)
from slowmo_train.scripting import markdown_table

CONFIGS = [
    Config("osgp"),
    Config("local_sgd", 12, extra=("slowmo.overlap_steps=2", "slowmo.fragments=4")),
    Config("allreduce"),
    Config("sgp"),
]


def run_with(bench: Bench, package_root: Path, cfg: Config, rate: str, tag: str):
    """One run with the slowmo_train package of ``package_root``."""
    os.environ["PYTHONPATH"] = str(package_root)
    try:
        return bench.run(ClusterShape(2, 1), cfg, rate, tag)
    finally:
        os.environ.pop("PYTHONPATH", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="CIFAR-10 (either layout)")
    ap.add_argument("--baseline", required=True, help="another checkout of slowmo-train (e.g. a git worktree of main)")
    ap.add_argument("--candidate", default=str(ROOT), help="the checkout compared with it (default: this one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "slowmo-bench-checkouts"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rate", default="auto", help="link rate (tc syntax); auto: bench_speed's comm-bound rate")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    baseline, candidate = Path(args.baseline).resolve(), Path(args.candidate).resolve()
    for name, path in (("--baseline", baseline), ("--candidate", candidate)):
        if not (path / "slowmo_train" / "__init__.py").is_file():
            sys.exit(f"bench_checkouts: error: {name}={path} is not a slowmo-train checkout")
    if os.geteuid() != 0:
        sys.exit("bench_checkouts: error: the emulated cluster needs root (network namespaces)")
    data_root, args.out, args.work = (
        Path(args.data_root).resolve(),
        str(Path(args.out).resolve()),
        str(Path(args.work).resolve()),
    )
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # `python -m slowmo_train` would otherwise import the package of the current directory
    args.data_root = str(small_test_root(data_root, Path(args.work)))
    args.log_every, args.rates = args.warmup, "auto"
    bench = Bench(args)
    start = time.time()
    rate = args.rate
    if rate == "auto":
        compute = run_with(bench, candidate, COMPUTE_ONLY, "none", "compute")
        p, _ = model_sizes(Path(args.work) / "2x1_none_compute")
        rate = auto_rates(compute.ms_per_step, ring(p, 2))["comm"]
    rows = []
    for cfg in CONFIGS:
        runs: dict[str, list] = {"baseline": [], "this": []}
        for r in range(args.repeats):
            for side, root in (("baseline", baseline), ("this", candidate)):
                runs[side].append(run_with(bench, root, cfg, rate, f"{cfg.tag}_{side}{r}"))
        ms = {side: [m.ms_per_step for m in found] for side, found in runs.items()}
        row = {"config": cfg.label, "rate": rate}
        for side in ("baseline", "this"):
            row[f"{side} ms/iter"] = f"{statistics.mean(ms[side]):.1f} ({min(ms[side]):.1f}-{max(ms[side]):.1f})"
            row[f"{side} blocking/overlapped ms"] = (
                f"{statistics.mean(m.blocking_ms for m in runs[side]):.1f} / "
                f"{statistics.mean(m.overlapped_ms for m in runs[side]):.1f}"
            )
        row["this / baseline"] = f"{statistics.mean(ms['this']) / statistics.mean(ms['baseline']):.3f}"
        rows.append(row)
    table = markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_checkouts.md").write_text(table + "\n")
    print(
        f"\n{table}\n\nbench_checkouts: {len(rows)} configurations x {args.repeats} repeats x 2 checkouts in "
        f"{(time.time() - start) / 60:.1f} min; table in {out}/bench_checkouts.md"
    )


if __name__ == "__main__":
    main()
