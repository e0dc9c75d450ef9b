"""Run every base algorithm (optionally under SlowMo) on the same task and tabulate communication.

    python scripts/algorithm_tour.py --data-root ../shared/data/cifar10 --nproc 4 --steps 60 -- slowmo.enabled=true

Each run is a real `slowmo-train` launch with `launcher.nproc_per_node` local workers; the table
reads every run's summary.json (rank 0's mean bytes and seconds of communication per step) and the
final test accuracy. Arguments after `--` are passed to every run as Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALGORITHMS = ["allreduce", "local_sgd", "sgp", "osgp"]


def run_one(algorithm: str, args, extra: list[str], out: Path) -> dict:
    run_dir = out / algorithm
    cmd = [
        sys.executable,
        "-m",
        "slowmo_train",
        "task=cifar10",
        f"algorithm={algorithm}",
        f"data.root={args.data_root}",
        f"model.width={args.width}",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"launcher.nproc_per_node={args.nproc}",
        "train.progress=log",
        f"train.log_every={args.log_every}",
        "train.eval_every_epochs=1000",
        f"output_dir={run_dir}",
        *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-2000:] + result.stderr[-4000:])
        raise SystemExit(f"{algorithm} failed (exit {result.returncode}); see {run_dir}/logs")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_s"] = wall
    summary["run_dir"] = str(run_dir)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"))
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=12)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temporary folder)")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="slowmo-tour-"))
    rows = []
    for algorithm in args.algorithms:
        s = run_one(algorithm, args, extra, out)
        rows.append((algorithm, s))
        print(f"finished {algorithm} in {s['wall_s']:.0f} s", flush=True)
    print(f"\n{args.nproc} workers, {args.steps} steps, overrides: {' '.join(extra) or '(none)'}")
    header = (
        f"{'algorithm':<10} {'sent MB/step':>13} {'recv MB/step':>13} {'blocking ms/step':>17} "
        f"{'overlapped ms/step':>19} {'test top1':>10} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for algorithm, s in rows:
        print(
            f"{algorithm:<10} {s['comm_bytes_sent_per_step'] / 1e6:>13.3f} "
            f"{s['comm_bytes_received_per_step'] / 1e6:>13.3f} "
            f"{s['comm_blocking_s_per_step'] * 1e3:>17.2f} {s['comm_overlapped_s_per_step'] * 1e3:>19.2f} "
            f"{s['final_eval'].get('top1', float('nan')):>10.2f} {s['wall_s']:>7.0f}"
        )
    print(f"\nrun directories: {out}")


if __name__ == "__main__":
    main()
