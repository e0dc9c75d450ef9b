"""Value checks of a composed job: :func:`validate` raises :class:`~slowmo_train.config.ConfigError`
naming the key, the value and what is allowed (the types were checked by OmegaConf against the
schemas in config.py). The task name and the architecture are checked by ``cli.preflight``, which
knows the tasks.

    job = to_job_config(cfg); validate(job, world_size=4)
"""

from __future__ import annotations

import os
from typing import Any

from slowmo_train import registry
from slowmo_train.config import (
    BASE_BUFFER_MODES,
    DOWNLOAD_MODES,
    GRAPH_NAMES,
    INNER_LR_MODES,
    LR_COUPLINGS,
    OPTIM_NAMES,
    OUTER_DTYPES,
    SCHEDULE_NAMES,
    ConfigError,
    JobConfig,
    download_mode,
)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _one_of(key: str, value: str, names) -> None:
    _check(value in names, key, value, "choose one of " + ", ".join(names))


def validate(job: JobConfig, world_size: int | None = None, check_paths: bool = True) -> None:
    """Check values and ranges. ``world_size`` (when known) checks divisibility constraints. The task
    name and the architecture are checked by ``cli.preflight``, which knows the tasks."""
    _check(job.model.width > 0, "model.width", job.model.width, "must be > 0")
    _check(
        job.model.channels_last in ("auto", True, False),
        "model.channels_last",
        job.model.channels_last,
        "must be auto, true or false",
    )
    _check(
        job.model.dropout is None or 0 <= job.model.dropout < 1,
        "model.dropout",
        job.model.dropout,
        "must be null (the preset's) or in [0, 1)",
    )
    o = job.optim
    _one_of("optim.name", o.name, OPTIM_NAMES)
    _one_of("optim.schedule", o.schedule, SCHEDULE_NAMES)
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.reference_batch >= 1, "optim.reference_batch", o.reference_batch, "must be an integer >= 1")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two values in [0, 1)")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(
        o.warmup_steps is None or o.warmup_steps >= 0,
        "optim.warmup_steps",
        o.warmup_steps,
        "must be null or an integer >= 0",
    )
    _check(0 < o.decay <= 1, "optim.decay", o.decay, "must be in (0, 1]")
    _check(o.milestone_epochs_of > 0, "optim.milestone_epochs_of", o.milestone_epochs_of, "must be > 0")
    _check(
        all(0 < m <= o.milestone_epochs_of for m in o.milestones),
        "optim.milestones",
        list(o.milestones),
        f"epochs in (0, optim.milestone_epochs_of={o.milestone_epochs_of}]",
    )
    if o.nesterov and o.name == "sgd":
        _check(
            o.momentum > 0,
            "optim.momentum",
            o.momentum,
            "Nesterov SGD needs momentum > 0 (or set optim.nesterov=false)",
        )

    a = job.algorithm
    _one_of("algorithm", a.name, registry.names())
    _one_of("algorithm.graph", a.graph, GRAPH_NAMES)
    _check(a.period >= 1, "algorithm.period", a.period, "must be an integer >= 1")
    _check(a.peers_per_itr >= 1, "algorithm.peers_per_itr", a.peers_per_itr, "must be an integer >= 1")
    _check(a.synch_freq >= 1, "algorithm.synch_freq", a.synch_freq, "must be an integer >= 1")
    _check(a.consensus_every >= 0, "algorithm.consensus_every", a.consensus_every, "must be >= 0")
    _check(
        a.nprocs_per_node is None or a.nprocs_per_node >= 1,
        "algorithm.nprocs_per_node",
        a.nprocs_per_node,
        "must be null (automatic) or an integer >= 1",
    )

    if registry.ALGORITHM_SPECS[a.name].kind == registry.ASYNC:
        _validate_async(job, world_size)

    s = job.slowmo
    _check(s.alpha > 0, "slowmo.alpha", s.alpha, "must be > 0")
    _check(
        s.beta == "auto" or (isinstance(s.beta, (int, float)) and not isinstance(s.beta, bool) and 0 <= s.beta < 1),
        "slowmo.beta",
        s.beta,
        "must be in [0, 1), or auto (chosen by the number of averaging workers)",
    )
    _check(s.tau >= 1, "slowmo.tau", s.tau, "must be an integer >= 1")
    _one_of("slowmo.base_buffers", s.base_buffers, BASE_BUFFER_MODES)
    _one_of("slowmo.lr_coupling", s.lr_coupling, LR_COUPLINGS)
    _one_of("slowmo.inner_lr", s.inner_lr, INNER_LR_MODES)
    _check(
        not (s.nesterov and s.lr_coupling == "coupled"),
        "slowmo.nesterov",
        s.nesterov,
        "Nesterov outer momentum needs slowmo.lr_coupling=decoupled",
    )
    if s.enabled and a.name == "local_sgd":
        _check(
            s.tau % a.period == 0,
            "slowmo.tau",
            s.tau,
            f"must be a multiple of algorithm.period={a.period} when SlowMo wraps Local SGD",
        )
    _one_of("slowmo.outer_dtype", s.outer_dtype, OUTER_DTYPES)
    _check(
        s.fragments >= 1 and s.tau % s.fragments == 0,
        "slowmo.fragments",
        s.fragments,
        f"must be an integer >= 1 dividing slowmo.tau={s.tau}",
    )
    _check(
        0 <= s.overlap_steps < s.tau,
        "slowmo.overlap_steps",
        s.overlap_steps,
        f"must be an integer in [0, slowmo.tau={s.tau})",
    )
    _check(
        not (s.sharded and s.outer_dtype != "float32"),
        "slowmo.sharded",
        s.sharded,
        "works only with slowmo.outer_dtype=float32 (16-bit outer messages carry x0 - x_i, which needs the "
        "whole x0 on every rank)",
    )

    t = job.train
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be an integer >= 1")
    _check(t.epochs > 0, "train.epochs", t.epochs, "must be > 0")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be null or an integer >= 1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be an integer >= 1")
    _check(t.eval_every_epochs > 0, "train.eval_every_epochs", t.eval_every_epochs, "must be > 0")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "must be an integer >= 1")
    _one_of("train.progress", t.progress, ("auto", "bar", "log", "none"))
    _one_of("train.precision", t.precision, ("fp32", "bf16", "fp16"))
    _one_of("train.nonfinite", t.nonfinite, ("stop", "skip"))
    _check(t.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", t.max_nonfinite_skips, "must be an integer >= 1")
    if t.total_batch is not None:
        _check(t.total_batch >= 1, "train.total_batch", t.total_batch, "must be null or an integer >= 1")
        if world_size is not None:
            _check(
                t.total_batch % world_size == 0,
                "train.total_batch",
                t.total_batch,
                f"must be divisible by the number of workers ({world_size})",
            )

    la = job.launcher
    _check(la.nproc_per_node >= 1, "launcher.nproc_per_node", la.nproc_per_node, "must be an integer >= 1")
    _one_of("launcher.backend", la.backend, ("auto", "gloo", "nccl"))
    _check(
        la.threads_per_worker is None or la.threads_per_worker >= 1,
        "launcher.threads_per_worker",
        la.threads_per_worker,
        "must be null or an integer >= 1",
    )
    _check(la.timeout_s > 0, "launcher.timeout_s", la.timeout_s, "must be > 0 seconds")
    _check(la.max_restarts >= 0, "launcher.max_restarts", la.max_restarts, "must be an integer >= 0")
    _check(la.simulate >= 0, "launcher.simulate", la.simulate, "must be an integer >= 0 (0 = one process per worker)")
    _check(la.simulate_link_mbit >= 0, "launcher.simulate_link_mbit", la.simulate_link_mbit, "must be >= 0 (0 = off)")
    if la.simulate:
        _check(
            la.nproc_per_node == 1,
            "launcher.nproc_per_node",
            la.nproc_per_node,
            f"launcher.simulate={la.simulate} plays every worker in this one process; set launcher.nproc_per_node=1",
        )
        _check(
            la.max_restarts == 0,
            "launcher.max_restarts",
            la.max_restarts,
            "a simulated cluster is one process, nothing to restart: set launcher.max_restarts=0 "
            "(continue a stopped run with resume=auto)",
        )
    c = job.checkpoint
    _check(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "must be an integer >= 0 (0 = off)")
    _check(c.every_minutes >= 0, "checkpoint.every_minutes", c.every_minutes, "must be >= 0 (0 = off)")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "must be an integer >= 1")
    _check(c.poll_every >= 1, "checkpoint.poll_every", c.poll_every, "must be an integer >= 1")
    _check(job.resume != "", "resume", job.resume, "use none, auto or the path of a checkpoint or run directory")
    _check(
        job.resume != "auto" or job.output_dir is not None,
        "resume",
        job.resume,
        "needs output_dir=DIR (the run directory to continue in)",
    )
    if world_size is not None and a.nprocs_per_node is not None:
        _check(
            world_size % a.nprocs_per_node == 0,
            "algorithm.nprocs_per_node",
            a.nprocs_per_node,
            f"must divide the number of workers ({world_size})",
        )

    d = job.data
    _check(d.train_subset is None or d.train_subset >= 1, "data.train_subset", d.train_subset, "must be null or >= 1")
    _one_of("data.download", download_mode(d), DOWNLOAD_MODES)
    _check(d.workers >= 0, "data.workers", d.workers, "must be an integer >= 0 (0 = load in the training process)")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "must be an integer >= 8 (224 for ImageNet)")
    _check(d.max_tokens >= 1, "data.max_tokens", d.max_tokens, "must be an integer >= 1")
    _check(d.vocab_size >= 16, "data.vocab_size", d.vocab_size, "must be an integer >= 16")
    _check(d.max_positions >= 2, "data.max_positions", d.max_positions, "must be an integer >= 2")

    e = job.eval
    _check(e.beam >= 1, "eval.beam", e.beam, "must be an integer >= 1")
    _check(e.lenpen >= 0, "eval.lenpen", e.lenpen, "must be >= 0")
    _check(
        e.max_len_a >= 0 and e.max_len_b >= 0, "eval.max_len_a/max_len_b", (e.max_len_a, e.max_len_b), "must be >= 0"
    )
    _one_of("eval.bleu_split", e.bleu_split, ("valid", "test"))
    _check(e.bleu_every_evals >= 0, "eval.bleu_every_evals", e.bleu_every_evals, "must be an integer >= 0")
    _check(
        e.bleu_max_sentences is None or e.bleu_max_sentences >= 1,
        "eval.bleu_max_sentences",
        e.bleu_max_sentences,
        "must be null or an integer >= 1",
    )
    if check_paths and download_mode(d) == "false":
        _check(
            os.path.isdir(d.root),
            "data.root",
            d.root,
            "directory does not exist; point data.root at a copy of the dataset, "
            "or set data.download=auto to fetch it when online",
        )


def _validate_async(job: JobConfig, world_size: int | None) -> None:
    a = job.algorithm
    _check(
        not job.slowmo.enabled,
        "slowmo.enabled",
        job.slowmo.enabled,
        f"SlowMo wraps synchronous base algorithms; algorithm={a.name} is asynchronous, set slowmo.enabled=false",
    )
    _check(
        job.launcher.simulate == 0,
        "launcher.simulate",
        job.launcher.simulate,
        f"plays workers of synchronous algorithms; algorithm={a.name} has its own one-process mode "
        "(algorithm.mode=simulated, algorithm.sim_workers): set launcher.simulate=0",
    )
    _one_of("algorithm.mode", a.mode, ("simulated", "real"))
    _one_of("algorithm.compute_time_dist", a.compute_time_dist, ("gamma", "exponential", "uniform", "constant"))
    _check(a.sim_workers >= 1, "algorithm.sim_workers", a.sim_workers, "must be an integer >= 1")
    _check(a.compute_time_shape > 0, "algorithm.compute_time_shape", a.compute_time_shape, "must be > 0")
    _check(a.compute_time_scale > 0, "algorithm.compute_time_scale", a.compute_time_scale, "must be > 0")
    _check(a.servers >= 1, "algorithm.servers", a.servers, "must be an integer >= 1")
    _check(
        job.optim.name == "sgd",
        "optim.name",
        job.optim.name,
        f"algorithm={a.name} applies its own momentum rule; use optim=sgd_nesterov (optim.name=sgd)",
    )
    _check(
        job.train.precision == "fp32",
        "train.precision",
        job.train.precision,
        f"algorithm={a.name} runs in fp32 only; set train.precision=fp32",
    )
    _check(
        job.train.total_batch is None,
        "train.total_batch",
        job.train.total_batch,
        f"algorithm={a.name} has no total batch per step; set train.batch_size (per worker) and train.total_batch=null",
    )
    _check(
        job.launcher.max_restarts == 0,
        "launcher.max_restarts",
        job.launcher.max_restarts,
        f"algorithm={a.name} does not restart its workers; set launcher.max_restarts=0 "
        "(continue a stopped run with resume=auto)",
    )
    if world_size is not None and a.mode == "simulated":
        _check(
            world_size == 1,
            "launcher.nproc_per_node",
            world_size,
            "algorithm.mode=simulated runs all workers in one process; set launcher.nproc_per_node=1 "
            "(algorithm.sim_workers sets the number of simulated workers)",
        )
    if world_size is not None and a.mode == "real":
        _check(
            world_size > a.servers,
            "launcher.nproc_per_node",
            world_size,
            f"algorithm.mode=real needs the algorithm.servers={a.servers} server rank(s) plus at least one worker",
        )
