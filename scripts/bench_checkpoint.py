"""Cost of one checkpoint, through the same code the trainer uses (``slowmo_train.checkpoint.
Checkpointer.save``, ``poll`` and ``load_rank_state``): MB per rank, seconds to write directly
and to read back, and, for background saves (``checkpoint.background=true``), the time to a
consistent host snapshot, the time until the files are durable, and how long training steps are
stalled by a periodic save in each mode.

    python scripts/bench_checkpoint.py                           # CIFAR ResNet-18, AR-SGD: model + Nesterov momentum
    python scripts/bench_checkpoint.py --slowmo --repeats 5      # + SlowMo's x0 and u
    python scripts/bench_checkpoint.py --model resnet50 --slowmo            # ImageNet ResNet-50, SGD + x0 + u
    python scripts/bench_checkpoint.py --model transformer_big --slowmo     # WMT16 transformer big, Adam + x0 + u
    python scripts/bench_checkpoint.py --dir /scratch/ckpt       # the file system the runs will use

One process (world size 1): every rank writes its own file in parallel, so this is the per-rank
cost; on a shared file system the aggregate bandwidth is the number to watch. The write includes
serialising, SHA-256 hashing, fsync and the atomic rename; the read includes hashing and
``torch.load(weights_only=True)``. Weights are random; a few real training steps on random data
fill the optimizer state (momentum / Adam moments). Optimizer defaults: Nesterov SGD for the
ResNets, Adam for the transformer (``--optim``). The transformer's vocabulary is the paper's joint
32k (``--vocab``): 209.1M parameters, 3.9 GB of state per rank with Adam and SlowMo.

Step stall (``--steps`` > 0): a direct save stalls its step by the whole save; a background save
stalls the training by its snapshot plus whatever the n steps that run until its completion lose
to the writer thread (CPU, memory bandwidth) and the per-step completion poll: sum(step + save +
poll times from the save to its completion) - n x baseline, the baseline being the median of the
``--steps`` steps right before and right after that save (a shared machine's load drifts).
Gradients are dropped after each step. Peak memory of the transformer run: 12.6-13.2 GB (live state
with DDP's buckets 5.4 GB, SlowMo's state_dict clones of x0 and u 1.7 GB, the host snapshot 4 GB,
gradients 0.8 GB). Timings on a shared machine move 10-20 % and more.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from slowmo_train.algorithms import build_algorithm
from slowmo_train.checkpoint import Checkpointer, capture_rng, load_rank_state
from slowmo_train.config import AlgorithmConfig, OptimConfig, SlowMoConfig
from slowmo_train.dist import build_topology
from slowmo_train.models import cifar_resnet18
from slowmo_train.models.resnet import resnet50
from slowmo_train.models.transformer import transformer
from slowmo_train.optim import build_optimizer

DEFAULT_OPTIM = {"resnet18": "sgd", "resnet50": "sgd", "transformer_big": "adam"}


class Training:
    """The model, optimizer and algorithm of the benchmark, stepped in the trainer's hook order."""

    def __init__(self, args):
        if args.model == "resnet18":
            self.model = cifar_resnet18(num_classes=10, width=args.width)
        elif args.model == "resnet50":
            self.model = resnet50(num_classes=1000, width=args.width)
        else:
            self.model = transformer("transformer_big", args.vocab, args.width)
        self.args = args
        optim = OptimConfig() if args.optim == "sgd" else OptimConfig(name="adam", lr=5e-4, weight_decay=0.0)
        self.optimizer = build_optimizer(optim, self.model, optim.lr)
        # base_buffers=keep (the paper's WMT16 setting): the optimizer state is never reset at an
        # outer step, so every checkpoint holds all of it
        self.algorithm = build_algorithm(
            AlgorithmConfig(),
            SlowMoConfig(enabled=args.slowmo, base_buffers="keep"),
            self.model,
            self.optimizer,
            build_topology(1),
            torch.device("cpu"),
        )
        self.k = 0

    def loss(self) -> torch.Tensor:
        m, a = self.algorithm.train_model, self.args
        if a.model == "transformer_big":
            src, prev = torch.randint(1, a.vocab, (2, 16)), torch.randint(1, a.vocab, (2, 16))
            return F.cross_entropy(m(src, prev).flatten(0, 1), torch.randint(1, a.vocab, (32,)))
        shape, classes = ((8, 3, 32, 32), 10) if a.model == "resnet18" else ((2, 3, 224, 224), 1000)
        return F.cross_entropy(m(torch.randn(*shape)), torch.randint(0, classes, (shape[0],)))

    def step(self) -> float:
        """One training step; returns its seconds."""
        start = time.perf_counter()
        algo, opt = self.algorithm, self.optimizer
        algo.before_forward(self.k)
        loss = self.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        algo.after_backward(self.k)
        opt.step()
        algo.after_optimizer_step(self.k)
        opt.zero_grad(set_to_none=True)  # see the docstring: peak memory
        self.k += 1
        return time.perf_counter() - start

    def state(self, step: int) -> dict:
        return {
            "format": 1,
            "step": step,
            "rank": 0,
            "world_size": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "rng": capture_rng(),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=sorted(DEFAULT_OPTIM),
        default="resnet18",
        help="resnet18 (CIFAR-10), resnet50 (ImageNet) or transformer_big (WMT16); default %(default)s",
    )
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default %(default)s)")
    p.add_argument("--optim", choices=["sgd", "adam"], default=None, help="base optimizer (default: the model's)")
    p.add_argument("--vocab", type=int, default=32000, help="transformer vocabulary (default %(default)s)")
    p.add_argument("--slowmo", action="store_true", help="wrap the algorithm in SlowMo (adds x0 and u)")
    p.add_argument("--repeats", type=int, default=3, help="checkpoints written per mode (default %(default)s)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="baseline training steps timed for the stall (0: no stall measurement; default: 5 for "
        "the ResNet-18, 3 otherwise)",
    )
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    args = p.parse_args()
    args.optim = args.optim or DEFAULT_OPTIM[args.model]
    steps = args.steps if args.steps is not None else (5 if args.model == "resnet18" else 3)

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    run = Training(args)
    for _ in range(2):  # real optimizer state (momentum buffers, Adam moments)
        run.step()
    params = sum(x.numel() for x in run.model.parameters())
    train_step, state = run.step, run.state

    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    step = 0
    try:
        baseline = statistics.median(train_step() for _ in range(steps)) if steps else float("nan")
        direct = Checkpointer(root / "direct", keep=1, rank=0, world_size=1)
        writes, sizes = [], []
        for _ in range(args.repeats):
            step += 1
            start = time.perf_counter()
            path = direct.save(step, state(step), {"bench": True})
            writes.append(time.perf_counter() - start)  # = the stall: the step waits for all of it
            sizes.append((path / "rank0.pt").stat().st_size / 2**20)
            if steps:
                train_step()
        last = path

        background = Checkpointer(root / "background", keep=1, rank=0, world_size=1, background=True)
        snapshots, durable, stalls, overlapped = [], [], [], []
        for _ in range(args.repeats):
            # the baseline of this save: the steps right before it (and after it, below), since the
            # load of a shared machine drifts over a run
            around = [train_step() for _ in range(steps)]
            step += 1
            spent, n = 0.0, 0
            start = time.perf_counter()
            saved = state(step)  # the step waits for the state_dicts too (SlowMo's clones x0 and u)
            built = time.perf_counter() - start
            background.save(step, saved, {"bench": True})
            del saved
            spent += time.perf_counter() - start
            while background.pending:
                if steps:
                    spent += train_step()
                    n += 1
                else:
                    time.sleep(0.01)
                start = time.perf_counter()
                background.poll()
                spent += time.perf_counter() - start
            t = background.last_timing
            snapshots.append(built + t["snapshot_s"])
            durable.append(built + t["written_s"])
            if steps:
                around += [train_step() for _ in range(steps)]
                stalls.append(spent - n * statistics.median(around))
                overlapped.append(n)

        # read back last, without the training state in memory (the transformer's would not fit twice)
        del run, train_step, state, background
        gc.collect()
        reads = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_rank_state(last, 0)
            reads.append(time.perf_counter() - start)
            gc.collect()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()

    what = "SlowMo over AR-SGD" if args.slowmo else "AR-SGD"
    opt = "Nesterov SGD" if args.optim == "sgd" else "Adam"
    name = args.model if args.model != "transformer_big" else f"transformer_big vocab {args.vocab}"
    print(
        f"{name} width {args.width} ({params / 1e6:.2f}M params), {what}, {opt} state, "
        f"{args.repeats} checkpoints per mode in {args.dir or tempfile.gettempdir()}, torch threads {args.threads}"
    )

    def row(label: str, values: list[float]) -> str:
        return f"  {label:<22} {statistics.median(values):.3f}   (min {min(values):.3f}, max {max(values):.3f})"

    print(f"  MB per rank      {statistics.median(sizes):.1f}")
    print(f"  write s (median) {statistics.median(writes):.3f}   (min {min(writes):.3f}, max {max(writes):.3f})")
    print(f"  read  s (median) {statistics.median(reads):.3f}   (min {min(reads):.3f}, max {max(reads):.3f})")
    print("  background save (checkpoint.background=true), medians:")
    print(row("snapshot s", snapshots) + "   the step waits for this")
    print(row("durable s", durable) + "   snapshot + file written, fsync'ed, renamed")
    if steps:
        print(
            f"  step stall s           direct {statistics.median(writes):.3f}   background "
            f"{statistics.median(stalls):.3f} (min {min(stalls):.3f}, max {max(stalls):.3f}; "
            f"{statistics.median(overlapped):.0f} steps overlap the write)   first baseline step {baseline:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
