"""``launcher.simulate=N``: this process plays all N workers of a synchronous algorithm.

    slowmo-train +exp=cifar10_localsgd_slowmo launcher.simulate=32 train.total_batch=4096

Each rank is a greenlet running the real worker (``cli.worker_main``): the same trainer, algorithm,
data shard, augmentation and seed as rank i of a real run, so the run directory (metrics.jsonl,
TensorBoard, checkpoints, summary.json) is what N processes would have written, and a checkpoint
of a simulated run resumes as a real run of N processes and the other way round. The ranks take
turns on the main thread (slowmo_train/simulated/world.py): one computes at a time, with all the
process's intra-op threads, and on one GPU the N replicas share the device.

What it does not model: stragglers and real network contention (every rank's compute is its own,
communication takes no time; ``slowmo_train/simulated/cluster.py`` gives the wall time a real
cluster would take from the bytes sent and a link rate).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from slowmo_train import control
from slowmo_train import dist as sdist
from slowmo_train.algorithms.comm import floating_buffers
from slowmo_train.config import to_job_config
from slowmo_train.faults import RunError, StopSignals, share_signals
from slowmo_train.simulated import world as simulated
from slowmo_train.simulated.cluster import model_run

log = logging.getLogger("slowmo_train")

#: of the memory free at start-up, what the replicas' state may take (the rest: one replica's
#: activations, the data, the allocator's slack)
MEMORY_SHARE = 0.8


def launch_simulated(entrypoint: Callable[[dict, str | None], dict], job_dict: dict, size: int, run_dir: str | None):
    """Run ``entrypoint(job_dict, run_dir)`` as ranks 0..size-1 of a simulated cluster; returns rank
    0's result, or raises the first rank's error (the cause; its peers fail after it)."""
    backend = sdist.pick_backend(job_dict["launcher"]["backend"])
    world = simulated.World(size, backend)
    if "task" in job_dict:  # a whole job (tests may run other entry points)
        admit(to_job_config(job_dict), world, torch.device("cuda" if backend == "nccl" else "cpu"))
    signals = StopSignals.install()  # the main thread's handler; every rank reads its flag
    share_signals(signals)
    simulated.install(world)
    sdist.set_training_world(world.everyone)
    control.set_group(world.control)
    try:
        world.run(lambda rank: entrypoint(job_dict, run_dir))
    finally:
        simulated.install(None)
        control.set_group(None)
        sdist.set_training_world(None)
        share_signals(None)
        signals.restore()
    if world.failure is not None:
        world.failure.failed_rank = world.failed_rank  # the cause's rank, for the error line
        raise world.failure
    summary = world.results[0]
    if isinstance(summary, dict) and summary.get("run_dir") and world.model_bytes:
        summary = model_run(summary, Path(summary["run_dir"]), job_dict, size, world.model_bytes)
    return summary


def available_bytes(device: torch.device) -> int:
    """Memory free for new allocations on ``device``: the GPU's free memory, or the host's
    MemAvailable (Linux; without /proc, unbounded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def copies_per_replica(job) -> float:
    """Model-sized tensors one worker keeps: weights, gradients, the optimizer's slots (momentum;
    Adam's two moments), SlowMo's x0 and u (sharded: 1/N of them) and a gossip message in flight."""
    from slowmo_train.registry import ALGORITHM_SPECS

    copies = 2.0 + {"sgd": 1.0 if job.optim.momentum else 0.0, "adam": 2.0}.get(job.optim.name, 2.0)
    if job.slowmo.enabled:
        copies += 2.0 / (job.launcher.simulate if job.slowmo.sharded else 1)
    if ALGORITHM_SPECS[job.algorithm.name].gossip:
        copies += 1.0
    return copies


def replica_model(job) -> torch.nn.Module:
    """The task's model on the meta device (no memory): the shape of every replica. The class count
    and vocabulary are the configured or largest ones (ImageNet: 1000 classes)."""
    from slowmo_train.models import build_model

    facts = {"cifar10": {"num_classes": 10}, "imagenet": {"num_classes": 1000}}.get(job.task.name)
    facts = facts if facts is not None else {"vocab_size": job.data.vocab_size}
    with torch.device("meta"):
        return build_model(job.model, job.task.name, **facts)


def admit(job, world: simulated.World, device: torch.device) -> None:
    """Before any replica exists: refuse a cluster whose replicas will not fit on ``device`` with
    one line, and note one replica's parameter and buffer bytes for the cluster time model."""
    model = replica_model(job)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    world.model_bytes = (param_bytes, sum(b.numel() * b.element_size() for b in floating_buffers(model)))
    model_bytes = param_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    each = int(model_bytes * copies_per_replica(job))
    free = available_bytes(device)
    fits = int(MEMORY_SHARE * free) // max(1, each)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "simulated cluster: %d workers on %s, ~%.1f MiB of state per replica (%.2fM parameters), room for ~%d",
        world.size,
        device,
        each / 2**20,
        params / 1e6,
        fits,
    )
    if world.size > fits:
        raise RunError(
            f"launcher.simulate={world.size}: {world.size} replicas of {params / 1e6:.2f}M parameters need "
            f"~{world.size * each / 2**30:.1f} GiB ({each / 2**20:.1f} MiB each: weights, gradients, optimizer and "
            f"algorithm state) but {device} has room for ~{fits} ({free / 2**30:.1f} GiB free, "
            f"{MEMORY_SHARE:.0%} of it for replicas): lower launcher.simulate or use a device with more memory"
        )
