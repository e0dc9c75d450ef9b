"""Throughput of slowmo-train's AR-SGD against a minimal hand-written DDP loop, in one run.

    python scripts/bench_allreduce.py                                      # defaults below
    python scripts/bench_allreduce.py --data-root /path/to/cifar10 --rounds 5 --min-ratio 0.95

Both sides train the same CIFAR-10 ResNet-18 (``slowmo_train.models.cifar_resnet18``, same width)
on the same in-memory uint8 images (``load_cifar10``, same disk cache) with the same batched
augmentation (``random_crop_flip`` + per-channel normalisation), the same per-worker batch, the same
threads per worker, 2 processes, gloo on the CPU, Nesterov SGD (momentum 0.9, weight decay 1e-4):

- A  slowmo-train: ``python -m slowmo_train task=cifar10 algorithm=allreduce ...`` (its own launcher,
     trainer loop, DDP with the counting comm hook, metrics, TensorBoard);
- B  baseline: ``torch.multiprocessing`` spawn of 2 processes running forward / backward / step on
     a plain ``DistributedDataParallel`` model, nothing else.

Throughput = samples over all ranks / wall seconds, measured from the end of step ``--warmup`` to
the end of step ``--warmup + --steps`` on rank 0. For slowmo-train the two instants are the wall
clock stamps of its ``train`` events in ``metrics.jsonl`` at those steps, so its logging work in
between counts; its own ``samples_per_s`` figures (which leave the logging out) are shown too.
slowmo-train always evaluates at the end of a run; that is not training, so the run is stopped
(SIGTERM to its process group) as soon as the last measured ``train`` event is written.

The two sides alternate, A B / B A / A B ... (the order flips each round so that a slow drift of
the machine's load does not favour either), and the medians over rounds are compared:
ratio = median(slowmo) / median(baseline); the target is >= 0.95.

Exit code: 0, or 1 when ``--min-ratio`` is given and the ratio is below it, or 2 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slowmo_train.scripting import launch_env, read_metrics

if __package__:  # imported, or run as python -m scripts.bench_allreduce
    from scripts.allreduce_report import print_report
else:  # python scripts/bench_allreduce.py: this folder is sys.path[0]
    from allreduce_report import print_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
NPROC = 2


class RunFailed(RuntimeError):
    pass


def default_threads(nproc: int = NPROC) -> int:
    """What slowmo-train picks with launcher.threads_per_worker=null (slowmo_train.dist.set_cpu_threads)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def child_env(work: Path) -> dict:
    """This environment without a surrounding torchrun's variables, so each side starts its own
    2-process job (slowmo-train would otherwise think it runs under torchrun); temporary files
    (torch elastic's log folders, multiprocessing's) go to ``work``, which is removed at the end."""
    return launch_env(TMPDIR=str(work))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """End the process group this script started for ``proc`` (launcher and its workers)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # workers that outlived their launcher share its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _train_events(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [e for e in read_metrics(metrics, "train") if "samples_per_s" in e]  # the last line may be in writing


# ------------------------------------------------------------------------------------- A: slowmo-train
def run_slowmo(args, threads: int, work: Path, round_no: int) -> dict:
    out = work / f"slowmo-{round_no}"
    total = args.warmup + args.steps
    cmd = [
        sys.executable,
        "-m",
        "slowmo_train",
        "task=cifar10",
        "algorithm=allreduce",
        f"data.root={args.data_root}",
        f"model.width={args.width}",
        f"train.batch_size={args.batch_size}",
        f"launcher.nproc_per_node={NPROC}",
        "launcher.backend=gloo",
        f"launcher.threads_per_worker={threads}",
        f"train.max_steps={total}",
        f"train.log_every={args.log_every}",
        "train.eval_every_epochs=1000000",
        "train.progress=log",
        f"output_dir={out}",
        f"seed={args.seed}",
    ]
    if args.cache_dir:
        cmd.append(f"data.cache_dir={args.cache_dir}")
    log_path = work / f"slowmo-{round_no}.log"
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + args.timeout
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(work), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while True:
                events = _train_events(metrics)
                if events and events[-1]["step"] >= total:
                    break  # measured; what follows is the final evaluation
                if proc.poll() is not None:
                    events = _train_events(metrics)
                    if events and events[-1]["step"] >= total:
                        break
                    raise RunFailed(
                        f"slowmo-train exited with code {proc.returncode} before step {total}:\n" + _tail(log_path)
                    )
                if time.monotonic() > deadline:
                    raise RunFailed(
                        f"slowmo-train did not reach step {total} in {args.timeout:.0f} s:\n" + _tail(log_path)
                    )
                time.sleep(0.2)
        finally:
            _kill_group(proc)
    by_step = {e["step"]: e for e in events}
    if args.warmup not in by_step or total not in by_step:
        raise RunFailed(f"slowmo-train logged steps {sorted(by_step)}, expected {args.warmup} and {total}")
    start, end = by_step[args.warmup], by_step[total]
    samples = (total - args.warmup) * args.batch_size * NPROC
    wall = end["time"] - start["time"]
    # the trainer's own figures: interval rates that leave out its logging work
    measured = [e for e in events if args.warmup < e["step"] <= total]
    steps_prev, busy = args.warmup, 0.0
    for e in measured:
        busy += (e["step"] - steps_prev) * args.batch_size * NPROC / e["samples_per_s"]
        steps_prev = e["step"]
    return {"samples_per_s": samples / wall, "trainer_samples_per_s": samples / busy, "wall_s": wall}


# ------------------------------------------------------------------------------------- B: baseline
def _baseline_batches(images, labels, batch: int, rank: int, world: int, seed: int, mean, std):
    """The same sharding and augmentation as slowmo_train.data.batches.TrainBatches, written out."""
    import torch

    from slowmo_train.data.batches import random_crop_flip

    if len(labels) // world < batch:
        raise ValueError(f"batch {batch} is larger than the {len(labels) // world} training images of each worker")
    epoch = 0
    while True:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch))
        shard = order[rank : world * (len(labels) // world) : world]
        rng = torch.Generator().manual_seed((seed + 1) * 1_000_003 + epoch * 7_919 + rank)
        for step in range(len(shard) // batch):
            idx = shard[step * batch : (step + 1) * batch]
            x = random_crop_flip(images[idx], 4, rng)
            yield (x.float().div_(255.0) - mean) / std, labels[idx]
        epoch += 1


def _baseline_worker(rank: int, world: int, cfg: dict, store: str, result: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from slowmo_train.data.cifar10 import load_cifar10
    from slowmo_train.models import cifar_resnet18
    from slowmo_train.tasks.cifar10 import CIFAR10_MEAN, CIFAR10_STD

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(cfg["seed"])
        if rank == 0:  # the first process fills the decode cache, the other reads it
            data = load_cifar10(cfg["data_root"], train=True, cache_dir=cfg["cache_dir"])
        dist.barrier()
        if rank != 0:
            data = load_cifar10(cfg["data_root"], train=True, cache_dir=cfg["cache_dir"])
        batch = cfg["batch_size"]
        model = cifar_resnet18(num_classes=len(data.classes), width=cfg["width"])
        ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.1 * batch * world / 256, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        mean = torch.tensor(CIFAR10_MEAN).view(1, -1, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, -1, 1, 1)
        batches = _baseline_batches(data.images, data.labels, batch, rank, world, cfg["seed"], mean, std)
        warmup, total = cfg["warmup"], cfg["warmup"] + cfg["steps"]
        ddp.train()
        start = time.perf_counter()
        for step in range(1, total + 1):
            x, y = next(batches)
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == warmup:
                start = time.perf_counter()
        wall = time.perf_counter() - start
        final_loss = loss.item()
        if rank == 0:
            Path(result).write_text(
                json.dumps(
                    {
                        "samples_per_s": cfg["steps"] * batch * world / wall,
                        "wall_s": wall,
                        "loss": final_loss,
                        "threads": torch.get_num_threads(),
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def _baseline_main(cfg_path: str) -> None:
    """Entry point of the baseline's launcher process: spawn the workers."""
    import torch.multiprocessing as mp

    cfg = json.loads(Path(cfg_path).read_text())
    mp.spawn(_baseline_worker, args=(NPROC, cfg, cfg["store"], cfg["result"]), nprocs=NPROC, join=True)


def run_baseline(args, threads: int, work: Path, round_no: int) -> dict:
    cfg_path = work / f"baseline-{round_no}.json"
    result = work / f"baseline-{round_no}.result.json"
    cfg = {
        "data_root": str(args.data_root),
        "cache_dir": args.cache_dir,
        "width": args.width,
        "batch_size": args.batch_size,
        "threads": threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": args.seed,
        "store": str(work / f"baseline-{round_no}.store"),
        "result": str(result),
    }
    cfg_path.write_text(json.dumps(cfg))
    log_path = work / f"baseline-{round_no}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(cfg_path)],
            cwd=REPO,
            env=child_env(work),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"the baseline did not finish in {args.timeout:.0f} s:\n" + _tail(log_path)) from None
        finally:
            _kill_group(proc)
    if code != 0 or not result.exists():
        raise RunFailed(f"the baseline exited with code {code}:\n" + _tail(log_path))
    out = json.loads(result.read_text())
    if out["threads"] != threads:
        raise RunFailed(f"the baseline ran {out['threads']} threads per worker, expected {threads}")
    return out


# ------------------------------------------------------------------------------------- driver
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA,
        help="CIFAR-10 (torchvision format or train/ test/ image folders); default: %(default)s",
    )
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: slowmo-train's)")
    p.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="per-worker batch (default %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="measured steps per run (default %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="steps before the measurement (default %(default)s)")
    p.add_argument(
        "--log-every",
        type=int,
        default=20,
        help="slowmo-train's train.log_every; must divide --warmup and --steps (default %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"threads per worker on both sides (default: cores // {NPROC} = {default_threads()})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one run")
    p.add_argument(
        "--min-ratio",
        type=float,
        default=None,
        help="exit with code 1 when median(slowmo) / median(baseline) is below this",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directories and logs (printed)")
    p.add_argument("--baseline-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_worker:
        return args
    for name in ("width", "batch_size", "steps", "warmup", "log_every", "rounds", "timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup % args.log_every or args.steps % args.log_every:
        p.error("--log-every must divide both --warmup and --steps (the measurement starts and ends at log steps)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if not args.data_root.is_dir():
        p.error(f"--data-root {args.data_root} is not a directory")
    args.data_root = args.data_root.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline_worker:
        _baseline_main(args.baseline_worker)
        return 0
    threads = args.threads or default_threads()
    runners = {"slowmo": run_slowmo, "baseline": run_baseline}
    results: dict[str, list[dict]] = {"slowmo": [], "baseline": []}
    orders = []
    print(
        f"AR-SGD throughput: slowmo-train vs a minimal DDP loop | {NPROC} processes x {threads} thread(s), gloo, CPU "
        f"| resnet18 width {args.width} | batch {args.batch_size}/worker | {args.warmup} warm-up + {args.steps} "
        f"measured steps | {args.rounds} rounds | data {args.data_root}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="bench_allreduce_"))
    try:
        for r in range(args.rounds):
            order = ("slowmo", "baseline") if r % 2 == 0 else ("baseline", "slowmo")
            orders.append(order)
            for side in order:
                t0 = time.monotonic()
                res = runners[side](args, threads, work, r)
                results[side].append(res)
                print(
                    f"  round {r + 1} {side:<8} {res['samples_per_s']:8.1f} samples/s "
                    f"({time.monotonic() - t0:.0f} s run)",
                    flush=True,
                )
    except RunFailed as err:  # the logs stay for a look
        print(f"bench_allreduce: a run failed (logs in {work}):\n{err}", file=sys.stderr, flush=True)
        return 2
    if args.keep:
        print(f"run directories and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)

    return print_report(args, orders, results)


if __name__ == "__main__":
    sys.exit(main())
