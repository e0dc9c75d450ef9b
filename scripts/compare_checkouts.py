"""Bit for bit: do two checkouts of slowmo-train train the same way? For reshaping code that must not
change what it computes.

    git worktree add /path/to/baseline main
    python scripts/compare_checkouts.py --baseline /path/to/baseline            # this checkout against it
    python scripts/compare_checkouts.py --baseline /path/to/baseline --world 2 --configs osgp,sgp_slowmo

Each checkout's package (``PYTHONPATH``; same interpreter and torch) trains the same configurations
through its ``Trainer`` on ``--world`` gloo ranks (3 by default, where the order of a sum over ranks
matters) for 13 steps on the same tiny synthetic CIFAR-10 set: every base algorithm with SlowMo in its
exact, sharded, streamed (fragments, overlap, bf16 messages) and decoupled/Nesterov forms, plus OSGP
alone. Printed per configuration and rank: whether the final parameters are bitwise equal (and the
largest difference), and whether the logged metrics are equal (times, throughputs and communication
times excluded; bytes sent included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from slowmo_train.scripting import merge_dicts as merge

ROOT = Path(__file__).resolve().parents[1]
SLOWMO = {"enabled": True, "tau": 3, "beta": 0.5}
STREAMED = {"enabled": True, "tau": 4, "beta": 0.5, "fragments": 2}
CONFIGS = {
    "allreduce_slowmo": {"algorithm": {"name": "allreduce"}, "slowmo": SLOWMO},
    "local_sgd_slowmo": {"algorithm": {"name": "local_sgd", "period": 3}, "slowmo": {**SLOWMO, "beta": 0.6}},
    "sgp_slowmo": {"algorithm": {"name": "sgp"}, "slowmo": SLOWMO},
    "osgp_slowmo": {"algorithm": {"name": "osgp", "synch_freq": 1}, "slowmo": {**SLOWMO, "tau": 4}},
    "osgp": {"algorithm": {"name": "osgp", "synch_freq": 2}},
    "sgp_slowmo_sharded": {"algorithm": {"name": "sgp"}, "slowmo": {**SLOWMO, "sharded": True}},
    "local_sgd_streamed": {
        "algorithm": {"name": "local_sgd", "period": 4},
        "slowmo": {**STREAMED, "overlap_steps": 1, "outer_dtype": "bfloat16"},
    },
    "osgp_sharded_streamed": {
        "algorithm": {"name": "osgp", "synch_freq": 1},
        "slowmo": {**STREAMED, "sharded": True, "overlap_steps": 2},
    },
    "allreduce_decoupled_nesterov": {
        "algorithm": {"name": "allreduce"},
        "slowmo": {**SLOWMO, "lr_coupling": "decoupled", "nesterov": True, "base_buffers": "average"},
    },
}
BASE = {
    "model": {"width": 0.125},
    "train": {
        "batch_size": 8,
        "epochs": 3,
        "max_steps": 13,
        "log_every": 4,
        "eval_every_epochs": 1,
        "eval_batch_size": 50,
        "progress": "none",
    },
    "checkpoint": {"every_minutes": 0, "every_steps": 0, "at_end": False},
}


def _comparable(event: dict) -> dict:
    return {
        k: v
        for k, v in event.items()
        if k != "time" and not k.endswith("_per_s") and (not k.startswith("comm_") or k.startswith("comm_bytes"))
    }


def train(rank: int, world: int, data_root: str, root: str, names: list[str]) -> dict:
    """In a spawned rank, with whichever slowmo_train PYTHONPATH selects."""
    from slowmo_train.config import to_job_config
    from slowmo_train.dist import DistEnv
    from slowmo_train.trainer import Trainer

    out = {}
    for name in names:
        run = Path(root) / name
        run.mkdir(parents=True, exist_ok=True)
        job = merge(BASE, {"data": {"root": data_root}, "output_dir": str(run)}, CONFIGS[name])
        trainer = Trainer(to_job_config(job), DistEnv(rank, world, rank, world, True), torch.device("cpu"), run)
        summary = trainer.run()
        log = run / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
        out[name] = {
            "params": torch.cat([p.detach().reshape(-1) for p in trainer.task.model.parameters()]).clone(),
            "events": [_comparable(json.loads(line)) for line in log.read_text().splitlines()],
            "final": summary["final_eval"],
        }
    return out


def run_one(world: int, data_root: str, names: list[str], out: str) -> None:
    from tests.distributed_helpers import run_distributed

    root = tempfile.mkdtemp(prefix="compare-checkouts-")
    torch.save(run_distributed(train, world, args=(data_root, root, names), timeout=1800), out)


def compare(a: list[dict], b: list[dict]) -> bool:
    same = True
    for rank, (ra, rb) in enumerate(zip(a, b)):
        for name in ra:
            pa, pb = ra[name]["params"], rb[name]["params"]
            params = torch.equal(pa, pb)
            events = sorted(map(json.dumps, ra[name]["events"])) == sorted(map(json.dumps, rb[name]["events"]))
            same &= params and events
            print(
                f"rank {rank} {name:30s} params bitwise {params} (max diff {(pa - pb).abs().max().item():.2e})"
                f"  metrics equal {events}"
            )
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="another checkout (e.g. a git worktree of main)")
    ap.add_argument("--candidate", default=str(ROOT), help="the checkout compared with it (default: this one)")
    ap.add_argument("--world", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS))
    ap.add_argument("--run", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)  # one side, in a subprocess
    args = ap.parse_args()
    names = args.configs.split(",")
    if args.run:
        run_one(args.world, args.run[0], names, args.run[1])
        return
    from slowmo_train.data.synthetic import write_image_folder_cifar

    work = Path(tempfile.mkdtemp(prefix="compare-checkouts-"))
    data = write_image_folder_cifar(work / "cifar", n_train=96, n_test=30)
    results = []
    for side, checkout in (("baseline", args.baseline), ("candidate", args.candidate)):
        out = work / f"{side}.pt"
        env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
        cmd = [
            sys.executable,
            __file__,
            "--baseline",
            args.baseline,
            "--world",
            str(args.world),
            "--configs",
            args.configs,
            "--run",
            str(data),
            str(out),
        ]
        print(f"compare_checkouts: training {len(names)} configurations with {checkout} ...", flush=True)
        subprocess.run(cmd, env=env, cwd=checkout, check=True)
        results.append(torch.load(out, weights_only=False))
    same = compare(*results)
    print(f"compare_checkouts: {'identical' if same else 'DIFFERENT'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
