"""Real asynchronous training: parameter-server rank(s) and worker ranks over torch.distributed
point-to-point messages on the gloo backend (messages are CPU tensors; NCCL is rejected, since its
point-to-point calls need GPU buffers and a receive from any source, which NCCL does not offer).

    slowmo-train algorithm=dana algorithm.mode=real algorithm.servers=1 launcher.nproc_per_node=3 \
        launcher.threads_per_worker=1 model.width=0.125 data.root=/path/to/cifar10

Ranks ``0 .. servers-1`` are servers; each holds one contiguous shard of the flat parameter vector and
runs the master rule on it (every rule in rules.py is element-wise, so sharding the vector shards the
rule). The other ranks are workers: each loops read -> gradient -> send, never waiting for another
worker. A server answers each gradient as soon as it has applied it, so a worker's next gradient is
computed at parameters that are ``staleness`` updates old when it arrives; server 0 records it.

Messages (fixed size per server, so a server can receive from any worker into one buffer):
worker -> server s: [kind, loss, units, shard_s of the message], kind GRAD | READY | QUIT;
server s -> worker: [flag, shard_s of the parameters to read], flag CONTINUE | EVAL | STOP.
Server 0 decides: once it has applied ``total`` updates it answers STOP, and every ``eval_every``
updates it answers EVAL to each worker's next gradient. A worker told EVAL or STOP by server 0 sends
READY or QUIT to the other servers; when a server has heard from every worker, all ranks evaluate
together (the master parameters are broadcast shard by shard, BatchNorm statistics are the workers'
average, ``task.evaluate`` runs on every rank) and then, after EVAL, the servers send fresh parameters.
Every gradient a worker sends is applied by every server (also the few in flight when server 0 says
STOP), so all shards see the same set of gradients; with several servers the order in which they
arrive may differ between shards. The arrival order depends on timing, so a real run is not
replayable and checkpoints (one per server, at every evaluation) are for inspection, not exact resume.

Data: every rank builds the task with its global rank and the world size (the task's evaluation is a
collective over all ranks), so worker w trains on the shard of rank ``servers + w`` and the servers'
shards go unused: with S servers and W workers an "epoch" covers W / (W + S) of the training images.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from slowmo_train.asynchronous.rules import build_rule
from slowmo_train.asynchronous.runner import (AsyncRunner, IntervalStats, endless_batches, make_async_plan,
                                              save_checkpoint)
from slowmo_train.metrics import MetricsWriter, Progress
from slowmo_train.optim import LrSchedule

log = logging.getLogger("slowmo_train")

GRAD, READY, QUIT = 0.0, 1.0, 2.0
CONTINUE, EVAL, STOP = 0.0, 1.0, 2.0
HEADER = 3  # kind, loss, units


def shard_bounds(numel: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous (start, end) of each server's shard; sizes differ by at most one element."""
    base, extra = divmod(numel, servers)
    bounds, start = [], 0
    for s in range(servers):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def evaluate_together(runner: AsyncRunner, bounds, workers: int, shard: torch.Tensor | None, final: bool) -> dict:
    """Collective over all ranks: assemble the master parameters from the servers' shards, average the
    workers' BatchNorm statistics, evaluate with the task's (collective) evaluation."""
    full = torch.zeros(runner.flat.numel)
    for s, (a, b) in enumerate(bounds):
        if shard is not None and dist.get_rank() == s:
            full[a:b].copy_(shard)
        piece = full[a:b].clone()
        dist.broadcast(piece, src=s)
        full[a:b].copy_(piece)
    is_server = shard is not None
    for buf in runner.flat.buffers():
        if is_server:
            buf.zero_()  # servers run no forward passes; only the workers' statistics count
        dist.all_reduce(buf)
        buf.div_(workers)
    return runner.evaluate(full, final)


def run_real(runner: AsyncRunner) -> dict:
    job = runner.job
    servers = job.algorithm.servers
    if dist.get_backend() != "gloo":
        raise ValueError(f"algorithm.mode=real runs on the gloo backend (a server receives from any worker); "
                         f"got {dist.get_backend()}: set launcher.backend=gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    workers = world - servers
    if workers < 1:
        raise ValueError(f"algorithm.mode=real needs more ranks than algorithm.servers={servers}; got {world}")
    bounds = shard_bounds(runner.flat.numel, servers)
    if rank < servers:
        return _serve(runner, rank, servers, workers, bounds)
    _work(runner, rank - servers, servers, bounds)
    return {}


def _serve(runner: AsyncRunner, s: int, servers: int, workers: int, bounds) -> dict:
    job, task = runner.job, runner.task
    a, b = bounds[s]
    plan = make_async_plan(job, task, workers, workers * task.steps_per_epoch)
    rule = build_rule(job.algorithm.name, runner.flat.vector()[a:b], workers, job.optim.momentum, job.optim.nesterov)
    schedule = LrSchedule(job.optim, plan.updates_per_epoch, job.train.epochs)
    lead = s == 0
    if lead:
        runner.log_plan(plan, f"{servers} server rank(s), {workers} worker rank(s)")
    metrics = MetricsWriter(runner.run_dir, 0) if lead else None
    progress = Progress(job.train.progress if lead else "none", plan.total_updates, 0 if lead else 1)
    stats = IntervalStats()
    metric = task.metric

    def lr_of(update: int) -> float:
        return plan.peak_lr * schedule.factor(min(update, plan.total_updates - 1))

    inbox = torch.zeros(HEADER + b - a)
    out = [torch.zeros(1 + b - a) for _ in range(workers)]
    sends: list = [None] * workers
    read_version = [0] * workers

    def settle(i: int) -> None:
        # wait for the last answer to worker i once (a gloo request must not be waited on twice)
        if sends[i] is not None:
            sends[i].wait()
            sends[i] = None

    def reply(i: int, flag: float, updates: int) -> None:
        settle(i)  # the buffer is ours again
        out[i][0] = flag
        if flag != STOP:
            out[i][1:].copy_(rule.params_for(i, lr_of(updates)))
            read_version[i] = updates
        sends[i] = dist.isend(out[i], dst=servers + i)

    for i in range(workers):
        reply(i, CONTINUE, 0)
    updates, best, final = 0, None, {}
    ready, stopped = set(), set()
    next_eval = plan.eval_every if plan.eval_every < plan.total_updates else math.inf
    evals_started = False  # server 0: EVAL answers are being handed out
    try:
        while True:
            src = dist.recv(inbox)
            i = src - servers
            kind = inbox[0].item()
            if kind == GRAD:
                lr = lr_of(updates)
                rule.master_update(i, inbox[HEADER:], lr)
                stats.add(inbox[1].item(), int(inbox[2].item()), updates - read_version[i])
                updates += 1
                if lead and updates % job.train.log_every == 0:
                    record = {"epoch": round(updates / plan.updates_per_epoch, 4), "lr": lr, **stats.record(task.unit)}
                    metrics.write("train", updates, **record)
                    progress.update(updates, f"loss {record['loss']:.3f} staleness {record['staleness_mean']:.1f} "
                                    f"{record['updates_per_s']:.1f} updates/s", force_line=True)
                    stats.reset()
                if not lead:
                    reply(i, CONTINUE, updates)
                elif evals_started or (updates >= next_eval and i not in ready):
                    # a pending evaluation goes first: every worker must be told EVAL exactly once
                    evals_started = True
                    reply(i, EVAL, updates)
                    ready.add(i)
                elif updates >= plan.total_updates or i in stopped:
                    reply(i, STOP, updates)
                    stopped.add(i)
                else:
                    reply(i, CONTINUE, updates)
            elif kind == READY:
                ready.add(i)
            else:
                stopped.add(i)
            if len(ready) == workers:
                for i in range(workers):
                    settle(i)
                eval_start = time.perf_counter()
                final = _eval_and_log(runner, bounds, workers, rule, updates, plan, metrics, progress, False, s)
                stats.start += time.perf_counter() - eval_start  # evaluation is not training throughput
                best = final[metric.name] if metric.better(final[metric.name], best) else best
                ready.clear()
                evals_started = False
                next_eval = updates + plan.eval_every if updates + plan.eval_every < plan.total_updates else math.inf
                for i in range(workers):
                    reply(i, CONTINUE, updates)
            if len(stopped) == workers:
                break
        for i in range(workers):
            settle(i)
        final = _eval_and_log(runner, bounds, workers, rule, updates, plan, metrics, progress, True, s)
        best = final[metric.name] if metric.better(final[metric.name], best) else best
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    summary = {"mode": "real", "algorithm": job.algorithm.name, "workers": workers, "servers": servers,
               "steps": updates, "final_eval": final, "metric": metric.name, "best": best, **stats.summary()}
    return runner.write_summary(summary) if lead else summary


def _eval_and_log(runner, bounds, workers, rule, updates, plan, metrics, progress, final, s) -> dict:
    start = time.perf_counter()
    result = evaluate_together(runner, bounds, workers, rule.eval_params(), final)
    name = "checkpoint_async.pt" if len(bounds) == 1 else f"checkpoint_async.server{s}.pt"
    save_checkpoint(runner.run_dir / name, rule, updates)
    if metrics is not None:
        metric = runner.task.metric
        metrics.write("eval", updates, epoch=round(updates / plan.updates_per_epoch, 4), split=metric.split, **result)
        progress.message(f"epoch {updates / plan.updates_per_epoch:.2f} update {updates}: "
                         f"{metric.split} {metric.name} {result[metric.name]:.2f} "
                         f"({time.perf_counter() - start:.1f} s)")
    return result


def _work(runner: AsyncRunner, i: int, servers: int, bounds) -> None:
    job, flat = runner.job, runner.flat
    rule_side = build_rule(job.algorithm.name, torch.zeros(1), 1, job.optim.momentum, job.optim.nesterov)
    side = rule_side.worker_side(flat.numel)
    inbox = [torch.zeros(1 + b - a) for a, b in bounds]
    outbox = [torch.zeros(HEADER + b - a) for a, b in bounds]
    params = torch.zeros(flat.numel)
    batches = endless_batches(runner.task)

    def receive_all() -> list[float]:
        for req in [dist.irecv(inbox[s], src=s) for s in range(servers)]:
            req.wait()
        for s, (a, b) in enumerate(bounds):
            if inbox[s][0].item() != STOP:
                params[a:b].copy_(inbox[s][1:])
        return [inbox[s][0].item() for s in range(servers)]

    receive_all()
    while True:
        grad, loss, units = flat.gradient(params, next(batches))
        message = side.message(grad)
        for s, (a, b) in enumerate(bounds):
            outbox[s][0], outbox[s][1], outbox[s][2] = GRAD, loss, units
            outbox[s][HEADER:].copy_(message[a:b])
        sends = [dist.isend(outbox[s], dst=s) for s in range(servers)]
        flags = receive_all()
        for req in sends:
            req.wait()
        if flags[0] == CONTINUE:
            continue
        # server 0 asked for an evaluation or the end: tell the other servers, then evaluate together
        kind = READY if flags[0] == EVAL else QUIT
        for s in range(1, servers):
            outbox[s][0] = kind
            dist.send(outbox[s], dst=s)
        evaluate_together(runner, bounds, dist.get_world_size() - servers, None, flags[0] == STOP)
        if flags[0] == STOP:
            return
        receive_all()
