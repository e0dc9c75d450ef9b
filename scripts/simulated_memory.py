"""How many simulated workers (launcher.simulate=N) fit in a given memory, per model: the estimate the
simulated launcher refuses a run with (slowmo_train/simulated/launcher.py), as a markdown table.

    python scripts/simulated_memory.py                          # 24 GiB host, 80 GiB and 141 GiB GPUs
    python scripts/simulated_memory.py --gib 16 40 --overrides slowmo.enabled=false

Each row composes an experiment (configs/exp) and builds its model on the meta device; a worker keeps
the model-sized tensors of ``copies_per_replica`` (weights, gradients, optimizer slots, SlowMo's x0
and u, a gossip message), and 80 % of the memory is given to replicas.
"""

from __future__ import annotations

import argparse

from slowmo_train.config import to_job_config
from slowmo_train.scripting import compose_config, markdown_table
from slowmo_train.simulated.launcher import MEMORY_SHARE, copies_per_replica, replica_model

ROWS = [
    ("CIFAR-10 ResNet-18 x 0.125, SGP + SlowMo", ["+exp=cifar10_sgp_slowmo", "model.width=0.125"]),
    ("CIFAR-10 ResNet-18, SGP + SlowMo", ["+exp=cifar10_sgp_slowmo"]),
    ("ImageNet ResNet-50, SGP + SlowMo", ["+exp=imagenet_sgp_slowmo"]),
    ("WMT16 transformer big, SGP + SlowMo (Adam)", ["+exp=wmt16_sgp_slowmo"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, nargs="+", default=[24.0, 80.0, 141.0], help="memory sizes in GiB")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every row")
    args = p.parse_args()
    rows = []
    for label, overrides in ROWS:
        job = to_job_config(compose_config([*overrides, *args.overrides]))
        model = replica_model(job)
        params = sum(t.numel() for t in model.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        copies = copies_per_replica(job)
        each = nbytes * copies
        fits = [f"{int(MEMORY_SHARE * g * 2**30 // each):,}" for g in args.gib]
        rows.append([label, f"{params / 1e6:.2f} M", f"{copies:g}", f"{each / 2**20:,.1f} MiB", *fits])
    header = ["model", "parameters", "copies", "per worker", *[f"workers in {g:g} GiB" for g in args.gib]]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
