"""Benchmark: ASGD, NAG-ASGD and DANA (simulated asynchronous workers) against synchronous Nesterov SGD
on real CIFAR-10, with the same total batch and the same number of gradient computations.

    .venv/bin/python scripts/bench_async.py --data ../shared/data/cifar10 --workers 8 16 32 \
        --subset 10000 --epochs 4 --width 0.125 --out outputs/bench_async --jobs 2

For N workers with per-worker batch b, the synchronous baseline takes steps of the total batch N*b
(the paper's SSGD with N workers); the asynchronous methods apply N times as many updates of batch b,
each from one simulated worker (gamma compute times, algorithm.compute_time_*), so every method
computes gradients on the same number of samples. The baseline runs through the same simulated runner
with one worker, where NAG-ASGD is exactly Nesterov SGD (tests/test_async_rules.py). The peak lr scales
with the batch of one update (optim.lr per 256 samples), as optim.peak_lr does for every run.

Each run is one subprocess (``--one``) that composes the project's Hydra config with overrides, so the
same overrides work with ``slowmo-train``. Results: ``<out>/results.json``, ``<out>/async_cifar10.png``
and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slowmo_train.scripting import compose_config, markdown_table

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("sync", "asgd", "nag_asgd", "dana")
LABELS = {
    "sync": "sync Nesterov SGD (batch N*b)",
    "asgd": "ASGD",
    "nag_asgd": "NAG-ASGD",
    "dana": "DANA-Zero",
    "dana_slim": "DANA-Slim",
}


def overrides_for(method: str, workers: int, args) -> list[str]:
    common = [
        f"data.root={args.data}",
        "data.download=false",
        f"data.train_subset={args.subset}",
        f"model.width={args.width}",
        f"train.epochs={args.epochs}",
        f"train.eval_every_epochs={args.epochs}",
        "train.log_every=100",
        "train.progress=log",
        f"optim.lr={args.lr}",
        f"optim.milestone_epochs_of={args.epochs}",
        f"optim.warmup_epochs={args.warmup}",
        f"optim.milestones=[{0.75 * args.epochs}]",
        f"seed={args.seed}",
        f"algorithm.compute_time_dist={args.dist}",
        f"algorithm.compute_time_shape={args.shape}",
        "train.eval_batch_size=1000",
    ]
    if method == "sync":
        return ["algorithm=nag_asgd", "algorithm.sim_workers=1", f"train.batch_size={workers * args.batch}", *common]
    return [f"algorithm={method}", f"algorithm.sim_workers={workers}", f"train.batch_size={args.batch}", *common]


def run_one(overrides: list[str], out_dir: str) -> None:
    """One run in this process (no launcher): compose, validate, train with the async runner."""
    import torch
    from omegaconf import OmegaConf

    from slowmo_train import dist as sdist
    from slowmo_train.asynchronous.runner import AsyncRunner
    from slowmo_train.config import to_job_config
    from slowmo_train.config_checks import validate
    from slowmo_train.metrics import setup_logging

    torch.set_num_threads(1)
    job = to_job_config(compose_config(overrides))
    validate(job, world_size=1)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(job), run_dir / "config.yaml")
    setup_logging(run_dir, 0)
    env = sdist.read_env()
    sdist.init_process_group(env, "gloo")
    try:
        AsyncRunner(job, env, torch.device("cpu"), run_dir).run()
    finally:
        sdist.destroy_process_group()


def launch(method: str, workers: int, args) -> dict:
    out = Path(args.out) / f"{method}_n{workers}"
    summary = out / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, __file__, "--one", str(out), "--", *overrides_for(method, workers, args)]
        start = time.time()
        with open(Path(args.out) / f"{method}_n{workers}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"{method} N={workers}: {time.time() - start:.0f} s", flush=True)
    result = json.loads(summary.read_text())
    result.update(method=method, workers=workers)
    return result


def plot(results: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in args.methods:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["workers"])
        ax.plot([r["workers"] for r in rows], [r["final_eval"]["top1"] for r in rows], marker="o", label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.workers, [str(n) for n in args.workers])
    ax.set_xlabel(f"workers N (per-worker batch {args.batch}, total batch N*{args.batch})")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title(f"CIFAR-10 subset {args.subset}, ResNet-18 x{args.width}, {args.epochs} epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        run_one(sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:], sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(LABELS))
    p.add_argument("--batch", type=int, default=16, help="per-worker batch b")
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--lr", type=float, default=0.2, help="lr per 256 samples (the paper's CIFAR 0.1 per 128)")
    p.add_argument("--dist", default="gamma")
    p.add_argument("--shape", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="outputs/bench_async")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    todo = [(m, n) for n in args.workers for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda mn: launch(*mn, args), todo))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out) / "async_cifar10.png", args)
    rows = []
    for n in args.workers:
        cells = []
        for m in args.methods:
            r = next(r for r in results if r["method"] == m and r["workers"] == n)
            cells.append(f"{r['final_eval']['top1']:.2f} (stale {r['staleness_mean']:.1f})")
        rows.append([n, n * args.batch, *cells])
    print(markdown_table(["N", "total batch", *(LABELS[m] for m in args.methods)], rows))


if __name__ == "__main__":
    main()
