"""Cost of one checkpoint: seconds to write and to read back, and MB per rank, for the CIFAR-10
ResNet-18 at full width (11.2M parameters) with its optimizer state, through the same code the
trainer uses (``slowmo_train.checkpoint.Checkpointer.save`` and ``load_rank_state``).

    python scripts/bench_checkpoint.py                           # AR-SGD: model + Nesterov momentum
    python scripts/bench_checkpoint.py --slowmo --repeats 5      # + SlowMo's x0 and u
    python scripts/bench_checkpoint.py --dir /scratch/ckpt       # the file system the runs will use

One process (world size 1): every rank writes its own file in parallel, so this is the per-rank
cost; on a shared file system the aggregate bandwidth is the number to watch. The write includes
serialising, SHA-256 hashing, fsync and the atomic rename; the read includes hashing and
``torch.load(weights_only=True)``. The model and the optimizer state are filled by a few real
training steps on random data so that the momentum buffers exist.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from slowmo_train.algorithms import build_algorithm
from slowmo_train.checkpoint import Checkpointer, capture_rng, load_rank_state
from slowmo_train.config import AlgorithmConfig, OptimConfig, SlowMoConfig
from slowmo_train.dist import build_topology
from slowmo_train.models import cifar_resnet18
from slowmo_train.optim import build_optimizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier (default %(default)s)")
    p.add_argument("--slowmo", action="store_true", help="wrap the algorithm in SlowMo (adds x0 and u)")
    p.add_argument("--repeats", type=int, default=3, help="checkpoints written and read (default %(default)s)")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    model = cifar_resnet18(num_classes=10, width=args.width)
    optimizer = build_optimizer(OptimConfig(), model, 0.1)
    algorithm = build_algorithm(AlgorithmConfig(), SlowMoConfig(enabled=args.slowmo), model, optimizer,
                                build_topology(1), torch.device("cpu"))
    for _ in range(2):  # real optimizer state (momentum buffers)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = sum(x.numel() for x in model.parameters())

    def state(step: int) -> dict:
        return {"format": 1, "step": step, "rank": 0, "world_size": 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "algorithm": algorithm.state_dict(), "rng": capture_rng()}

    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        saver = Checkpointer(root, keep=1, rank=0, world_size=1)
        writes, reads, sizes = [], [], []
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            path = saver.save(step, state(step), {"bench": True})
            writes.append(time.perf_counter() - start)
            sizes.append((path / "rank0.pt").stat().st_size / 2**20)
            start = time.perf_counter()
            load_rank_state(path, 0)
            reads.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()

    what = "SlowMo over AR-SGD" if args.slowmo else "AR-SGD"
    print(f"resnet18 width {args.width} ({params / 1e6:.2f}M params), {what}, Nesterov SGD state, "
          f"{args.repeats} checkpoints in {args.dir or tempfile.gettempdir()}")
    print(f"  MB per rank      {statistics.median(sizes):.1f}")
    print(f"  write s (median) {statistics.median(writes):.3f}   (min {min(writes):.3f}, max {max(writes):.3f})")
    print(f"  read  s (median) {statistics.median(reads):.3f}   (min {min(reads):.3f}, max {max(reads):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
