"""Real asynchronous training: parameter-server rank(s) and worker ranks over point-to-point messages
on the control plane (slowmo_train/control.py: host tensors on gloo, which offers a receive from any
source; NCCL does not). The run needs ``launcher.backend=gloo``.

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
arrive may differ between shards.

Checkpoints (slowmo_train/checkpoint.py, as the synchronous trainer's: one rank file per server and
worker, ``resume=auto|PATH``) are written at evaluation barriers, where no gradient is in flight: at
the first barrier after every ``checkpoint.every_steps`` updates (server 0 decides) and at the end
(``checkpoint.at_end``). A server's file holds its shard of the master rule's state, the update
count, the update of the last evaluation, its log interval and evaluator; a worker's its side state
(DANA-Slim's momentum), BatchNorm statistics, number of batches drawn and RNG states. A resumed run
continues from that barrier (the servers send fresh parameters). With one server and one worker
the arrival order is deterministic and a run cut (e.g. ``train.max_steps``) and resumed equals the
uncut one bit for bit (tests/test_async_resume.py); with more workers or servers the order depends
on timing, so a resumed run continues from a consistent state but not along the same trajectory.
Real mode does not stop on SIGTERM and ignores ``checkpoint.every_minutes``. ``checkpoint_async.pt``
(one per server, at every evaluation) is also kept, for inspection.

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

from slowmo_train import control
from slowmo_train.algorithms import comm
from slowmo_train.asynchronous.common import AsyncContext, BatchStream, IntervalStats, one_line_reason, save_checkpoint
from slowmo_train.asynchronous.rules import build_rule
from slowmo_train.checkpoint import CheckpointError, capture_rng, restore_rng
from slowmo_train.evaluation import Evaluator
from slowmo_train.metrics import MetricsWriter, Progress

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


def evaluate_together(runner: AsyncContext, bounds, workers: int, shard: torch.Tensor | None, final: bool) -> dict:
    """Collective over all ranks: assemble the master parameters from the servers' shards, average the
    workers' BatchNorm statistics, evaluate with the task's (collective) evaluation."""
    full = torch.zeros(runner.flat.numel)
    for s, (a, b) in enumerate(bounds):
        if shard is not None and control.rank() == s:
            full[a:b].copy_(shard)
        piece = full[a:b].clone()
        control.broadcast_(piece, src=s)
        full[a:b].copy_(piece)
    is_server = shard is not None
    for buf in runner.flat.buffers():
        if is_server:
            buf.zero_()  # servers run no forward passes; only the workers' statistics count
        comm.all_reduce(buf)  # model buffers: the data plane
        buf.div_(workers)
    return runner.evaluate(full, final)


def run_real(runner: AsyncContext) -> dict:
    job = runner.job
    servers = job.algorithm.servers
    if dist.get_backend() != "gloo":
        raise ValueError(
            f"algorithm.mode=real runs on the gloo backend (a server receives from any worker); "
            f"got {dist.get_backend()}: set launcher.backend=gloo"
        )
    rank, world = control.rank(), control.world_size()
    workers = world - servers
    if workers < 1:
        raise ValueError(f"algorithm.mode=real needs more ranks than algorithm.servers={servers}; got {world}")
    bounds = shard_bounds(runner.flat.numel, servers)
    if rank < servers:
        return _serve(runner, rank, servers, workers, bounds)
    _work(runner, rank - servers, servers, bounds)
    return {}


def _serve(runner: AsyncContext, s: int, servers: int, workers: int, bounds) -> dict:
    job, task = runner.job, runner.task
    a, b = bounds[s]
    plan = runner.plan(workers * task.steps_per_epoch)
    rule = build_rule(job.algorithm.name, runner.flat.vector()[a:b], workers, job.optim.momentum, job.optim.nesterov)
    schedule = plan.lr_schedule(job.optim)
    lead = s == 0
    if lead:
        runner.log_plan(plan, workers, f"{servers} server rank(s), {workers} worker rank(s)")
    progress = Progress(job.train.progress if lead else "none", plan.total_steps, 0 if lead else 1)
    evaluator = Evaluator(task.metric, plan.eval_every_steps, plan.steps_per_epoch, None, step_word="update")
    stats = IntervalStats()
    checkpointer = runner.checkpointer()
    updates, final = 0, {}
    last_eval = 0  # the update of the last evaluation barrier before the end: the next is ``every`` on
    ckpt = runner.resume_checkpoint()
    if ckpt is not None:
        saved = _load(runner, ckpt, plan.total_steps)
        s_state = saved["async"]
        try:
            rule.load_state_dict(s_state["master"])
            stats.load_state_dict(s_state["stats"])
            evaluator.load_state_dict(s_state["evaluator"])
            restore_rng(saved["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{ckpt}: server {s} cannot restore its shard: {one_line_reason(err)}") from None
        updates, final, last_eval = int(saved["step"]), s_state["final"], int(s_state["last_eval"])
        checkpointer.last_path = ckpt
        if lead:
            log.info("resumed from %s at update %d", ckpt, updates)
    metrics = MetricsWriter(runner.run_dir, 0, resume_step=updates if ckpt is not None else None) if lead else None
    evaluator.writer = metrics

    def state() -> dict:
        return {
            "async": {
                "mode": "real",
                "role": "server",
                "rule": rule.name,
                "master": rule.state_dict(),
                "stats": stats.state_dict(),
                "evaluator": evaluator.state_dict(),
                "final": final,
                "last_eval": last_eval,
            },
            "rng": capture_rng(),
        }

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
            out[i][1:].copy_(rule.params_for(i, schedule.lr(updates)))
            read_version[i] = updates
        sends[i] = control.isend(out[i], dst=servers + i)

    # a resumed run continues from an evaluation barrier: the workers wait for fresh parameters
    for i in range(workers):
        reply(i, CONTINUE, updates)
    ready, stopped = set(), set()
    every = plan.eval_every_steps
    next_eval = last_eval + every if last_eval + every < plan.total_steps else math.inf
    evals_started = False  # server 0: EVAL answers are being handed out
    try:
        while True:
            src = control.recv(inbox)
            i = src - servers
            kind = inbox[0].item()
            if kind == GRAD:
                lr = schedule.lr(updates)
                rule.master_update(i, inbox[HEADER:], lr)
                stats.add(inbox[1].item(), int(inbox[2].item()), updates - read_version[i])
                updates += 1
                if lead and updates % job.train.log_every == 0:
                    record = {"epoch": round(updates / plan.steps_per_epoch, 4), "lr": lr, **stats.record(task.unit)}
                    metrics.write("train", updates, **record)
                    progress.update(
                        updates,
                        f"loss {record['loss']:.3f} staleness {record['staleness_mean']:.1f} "
                        f"{record['updates_per_s']:.1f} updates/s",
                        force_line=True,
                    )
                    stats.reset()
                if not lead:
                    reply(i, CONTINUE, updates)
                elif evals_started or (updates >= next_eval and i not in ready):
                    # a pending evaluation goes first: every worker must be told EVAL exactly once
                    evals_started = True
                    reply(i, EVAL, updates)
                    ready.add(i)
                elif updates >= plan.total_steps or i in stopped:
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
                final = _evaluate(runner, bounds, workers, rule, updates, evaluator, progress, False, s)
                stats.start += time.perf_counter() - eval_start  # evaluation is not training throughput
                ready.clear()
                evals_started = False
                last_eval = updates
                next_eval = updates + every if updates + every < plan.total_steps else math.inf
                _barrier_checkpoint(runner, checkpointer, updates, False, state, plan.steps_per_epoch)
                for i in range(workers):
                    reply(i, CONTINUE, updates)
            if len(stopped) == workers:
                break
        for i in range(workers):
            settle(i)
        final = _evaluate(runner, bounds, workers, rule, updates, evaluator, progress, True, s)
        _barrier_checkpoint(runner, checkpointer, updates, True, state, plan.steps_per_epoch)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    summary = {
        "mode": "real",
        "algorithm": job.algorithm.name,
        "workers": workers,
        "servers": servers,
        "steps": updates,
        "final_eval": final,
        "metric": task.metric.name,
        "best": evaluator.best,
        "checkpoint": str(checkpointer.last_path) if checkpointer.last_path else None,
        "resumed_from": str(ckpt) if ckpt else None,
        **stats.summary(),
    }
    return runner.write_summary(summary) if lead else summary


def _evaluate(
    runner: AsyncContext,
    bounds,
    workers: int,
    rule,
    updates: int,
    evaluator: Evaluator,
    progress: Progress,
    final: bool,
    s: int,
) -> dict:
    """Evaluate with every rank, write this server's checkpoint; server 0's evaluator writes the record."""
    result = evaluate_together(runner, bounds, workers, rule.eval_params(), final)
    name = "checkpoint_async.pt" if len(bounds) == 1 else f"checkpoint_async.server{s}.pt"
    save_checkpoint(runner.run_dir / name, rule, updates)
    evaluator.record(updates, result, progress)
    return result


def _load(runner: AsyncContext, ckpt, total: int) -> dict:
    """This rank's state from ``ckpt``; a run already at its last update cannot continue."""
    saved = runner.load_rank(ckpt, "real")
    if int(saved["step"]) >= total:
        raise CheckpointError(
            f"{ckpt} is at update {saved['step']}, the end of this run ({total} updates): "
            "raise train.max_steps (where it capped the run) to continue it"
        )
    return saved


def _barrier_checkpoint(
    runner: AsyncContext, checkpointer, updates: int, done: bool, state, steps_per_epoch: int
) -> None:
    """Every rank, at an evaluation barrier (no gradient in flight): server 0 decides whether a
    checkpoint is due (``checkpoint.every_steps`` crossed since the last evaluation, or the end), and
    every rank writes its part."""
    decision = None
    if control.rank() == 0:
        every = checkpointer.every_steps
        last = int(checkpointer.last_path.name.split("_")[-1]) if checkpointer.last_path else 0
        due = (every > 0 and updates // every > last // every) or (done and checkpointer.at_end)
        decision = (bool(due), updates)
    due, updates = control.broadcast_object(decision)
    if due:
        runner.save(checkpointer, updates, state(), updates / max(1, steps_per_epoch))


def _work(runner: AsyncContext, i: int, servers: int, bounds) -> None:
    job, flat = runner.job, runner.flat
    rule_side = build_rule(job.algorithm.name, torch.zeros(1), 1, job.optim.momentum, job.optim.nesterov)
    side = rule_side.worker_side(flat.numel)
    inbox = [torch.zeros(1 + b - a) for a, b in bounds]
    outbox = [torch.zeros(HEADER + b - a) for a, b in bounds]
    params = torch.zeros(flat.numel)
    checkpointer = runner.checkpointer()
    drawn = 0
    ckpt = runner.resume_checkpoint()
    if ckpt is not None:
        plan = runner.plan((control.world_size() - servers) * runner.task.steps_per_epoch)
        saved = _load(runner, ckpt, plan.total_steps)
        try:
            runner.task.model.load_state_dict(saved["model"])  # this worker's BatchNorm statistics
            side.load_state_dict(saved["async"]["side"])
            drawn = int(saved["async"]["batches_drawn"])
            restore_rng(saved["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{ckpt}: worker {i} cannot restore its state: {one_line_reason(err)}") from None
        checkpointer.last_path = ckpt
    batches = BatchStream(runner.task, drawn)

    def state() -> dict:
        return {
            "async": {"mode": "real", "role": "worker", "side": side.state_dict(), "batches_drawn": batches.drawn},
            "model": runner.task.model.state_dict(),
            "rng": capture_rng(),
        }

    def receive_all() -> list[float]:
        for req in [control.irecv(inbox[s], src=s) for s in range(servers)]:
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
        sends = [control.isend(outbox[s], dst=s) for s in range(servers)]
        flags = receive_all()
        for req in sends:
            req.wait()
        if flags[0] == CONTINUE:
            continue
        # server 0 asked for an evaluation or the end: tell the other servers, then evaluate together
        kind = READY if flags[0] == EVAL else QUIT
        for s in range(1, servers):
            outbox[s][0] = kind
            control.send(outbox[s], dst=s)
        evaluate_together(runner, bounds, control.world_size() - servers, None, flags[0] == STOP)
        _barrier_checkpoint(runner, checkpointer, 0, flags[0] == STOP, state, 1)
        if flags[0] == STOP:
            return
        receive_all()
