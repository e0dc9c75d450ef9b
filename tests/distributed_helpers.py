"""Run a function on N gloo ranks in spawned processes and collect what each rank returns.

    results = run_distributed(fn, world_size=3, args=(...,))   # fn(rank, world_size, *args)

``fn`` must be a module-level function (it is pickled); it runs after ``init_process_group`` and the
process group is destroyed afterwards. Results must be picklable by torch.save (move tensors to CPU).
"""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slowmo_train import control
from slowmo_train.dist import destroy_process_group, init_control_plane


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, env, backend):
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOCAL_RANK": str(rank),
        }
    )
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        init_control_plane()  # as slowmo_train.dist.init_process_group does in a real run
        result = fn(rank, world_size, *args)
        control.barrier()
        # Serialise to bytes: tensors sent through a torch queue would be shared-memory handles
        # that die with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        destroy_process_group()


def run_distributed(
    fn, world_size: int, args: tuple = (), env: dict | None = None, timeout: float = 300.0, backend: str = "gloo"
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (the default group's ``backend``,
    gloo unless a test asks for another); return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env or {}, backend), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def mean_over_ranks(per_rank: dict) -> dict:
    """Collective: the mean over ranks of each per-rank scalar (device tensors or floats), as the
    trainer logs the algorithms' extra metrics (e.g. the consensus distance)."""
    keys = list(per_rank)
    if not keys:
        return {}
    values = torch.stack([torch.as_tensor(per_rank[k], dtype=torch.float64).reshape(()).cpu() for k in keys])
    return dict(zip(keys, control.mean(values)))
