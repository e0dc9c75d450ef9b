"""Does the trainer's stop-signal poll cost OSGP its overlap? OSGP on the emulated 2-node cluster at
135mbit per node, with a poll every step (the default) and every 48 steps, in A B B A order.

    sudo .venv/bin/python -m scripts.bench_poll_overlap ../shared/data/cifar10

From the repository root: it uses the emulated-cluster runner of scripts/emulated_bench.py (needs root for
network namespaces).
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

from scripts import emulated_bench


def main() -> None:
    data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10").resolve()
    work = Path(tempfile.gettempdir()) / "slowmo-bench-poll"
    args = types.SimpleNamespace(
        data_root=str(emulated_bench.small_test_root(data, work)),
        out=str(work / "out"),
        work=str(work),
        width=0.25,
        batch=16,
        warmup=12,
        steps=96,
        log_every=12,
        rates="135mbit,400mbit",
    )
    bench = emulated_bench.Bench(args)
    ms: dict[int, list[float]] = {1: [], 48: []}
    for rep, order in enumerate(((1, 48), (48, 1))):
        for poll in order:
            cfg = emulated_bench.Config("osgp", poll_every=poll)
            measured = bench.run(emulated_bench.ClusterShape(2, 1), cfg, "135mbit", f"osgp_poll{poll}_{rep}")
            ms[poll].append(measured.ms_per_step)
    print(f"OSGP ms/iteration: poll every step {ms[1]}, every 48 steps {ms[48]}")


if __name__ == "__main__":
    main()
