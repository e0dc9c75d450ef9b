"""Typed configuration: one dataclass per component, registered in Hydra's ConfigStore.

``configs/config.yaml`` puts the ``job_schema`` node first in its defaults list, so every YAML file
and command-line override is type-checked against these dataclasses (unknown keys and wrong types
are rejected by OmegaConf). :func:`validate` then checks values and ranges and raises
:class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from slowmo_train import registry


class ConfigError(ValueError):
    """A user error in the configuration; printed as one line, without a stack trace."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class TaskConfig:
    name: str = "cifar10"


@dataclass
class ModelConfig:
    #: the task's architecture: resnet18 (cifar10), resnet50 (imagenet),
    #: transformer_small | transformer_base | transformer_big (wmt16)
    arch: str = "resnet18"
    #: channel-width multiplier of ResNets (1.0 = the standard width; 0.25 suits CPU runs)
    width: float = 1.0
    #: ResNets: channels-last memory format (faster convolutions on GPUs with tensor cores):
    #: auto (on CUDA devices) | true | false
    channels_last: Any = "auto"
    #: transformers: override the preset's dropout (null = the preset's)
    dropout: Optional[float] = None


@dataclass
class DataConfig:
    #: a torchvision CIFAR-10 folder (cifar-10-batches-py) or an ImageFolder root with train/ and test/
    root: str = "data/cifar10"
    #: auto (use data.root if it holds the dataset, else fetch it there) | true (fetch if missing) |
    #: false (never fetch). ImageNet is never downloaded.
    download: str = "auto"
    #: where decoded images are cached as uint8 tensors (default: ~/.cache/slowmo-train)
    cache_dir: Optional[str] = None
    #: use only the first N training images (after a fixed shuffle); null = all
    train_subset: Optional[int] = None
    #: streaming tasks (imagenet): DataLoader worker processes per training process
    workers: int = 4
    #: image tasks with a streaming pipeline (imagenet): training crop side in pixels; validation
    #: resizes the shorter side to image_size * 256 / 224 and center-crops image_size (small = CPU smoke)
    image_size: int = 224
    #: translation: tokens (source + target, padding included) per worker and step
    max_tokens: int = 4096
    #: translation: size of the joint sentencepiece vocabulary learned on the training text
    vocab_size: int = 8000
    #: translation: longer sentence pairs (in subword tokens) are dropped from training
    max_positions: int = 256
    #: translation: source and target language suffixes of the text files (train.en, train.de, ...)
    src_lang: str = "en"
    tgt_lang: str = "de"


@dataclass
class EvalConfig:
    """Evaluation settings that are not about cadence (that is train.eval_every_epochs)."""

    #: translation: beam size, length penalty and maximum output length a * source length + b
    beam: int = 4
    lenpen: float = 0.6
    max_len_a: float = 1.2
    max_len_b: int = 10
    #: translation: split scored with BLEU (valid | test) and how often (0 = only at the end;
    #: N = also every N-th evaluation)
    bleu_split: str = "test"
    bleu_every_evals: int = 0
    #: translation: translate at most this many sentences for BLEU (null = the whole split)
    bleu_max_sentences: Optional[int] = None


@dataclass
class OptimConfig:
    name: str = "sgd"
    #: peak learning rate for a total batch of ``reference_batch`` (scaled linearly with the total batch)
    lr: float = 0.1
    reference_batch: int = 256
    #: scale the lr linearly with the total batch (Goyal et al., 2017); false keeps optim.lr as is
    #: (Adam on transformers)
    scale_lr: bool = True
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    #: no weight decay on normalisation-layer weights/biases (BatchNorm gamma, beta) nor on any
    #: layer's bias; Goyal et al. (2017, Sec. 5.1) exempt the BN coefficients on ImageNet
    no_decay_bn_bias: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    #: schedule: "step" (warm-up then divide at milestones), "inverse_sqrt" (transformers), "constant"
    schedule: str = "step"
    warmup_epochs: float = 5.0
    #: warm-up length in optimizer steps; overrides warmup_epochs when set (inverse_sqrt: 4000)
    warmup_steps: Optional[int] = None
    #: epochs (out of ``milestone_epochs_of``) at which the lr is multiplied by ``decay``
    milestones: list[float] = field(default_factory=lambda: [100.0, 150.0, 175.0])
    milestone_epochs_of: float = 200.0
    decay: float = 0.1


@dataclass
class AlgorithmConfig:
    #: a name of the algorithm table, slowmo_train/registry.py (synchronous or asynchronous)
    name: str = "allreduce"
    #: Local SGD: average parameters every ``period`` steps (H)
    period: int = 12
    #: SGP/OSGP: peers each worker sends to per step
    peers_per_itr: int = 1
    #: SGP/OSGP communication graph: exponential | nonregular_exponential
    graph: str = "exponential"
    #: OSGP: messages sent at step k are received at step k + synch_freq (staleness bound)
    synch_freq: int = 1
    #: processes per node for the hierarchy (null = LOCAL_WORLD_SIZE on multi-node runs, else 1)
    nprocs_per_node: Optional[int] = None
    #: gossip algorithms: log the consensus distance every N steps (0 = only at SlowMo outer steps)
    consensus_every: int = 100
    #: asynchronous algorithms (kind "async" in slowmo_train/registry.py), see slowmo_train/asynchronous:
    #: simulated (one process plays sim_workers workers with random compute times) | real (parameter
    #: server rank(s) + worker ranks over torch.distributed point-to-point)
    mode: str = "simulated"
    #: simulated mode: number of asynchronous workers
    sim_workers: int = 8
    #: simulated mode: time per gradient ~ gamma(shape, scale) | exponential(scale) | uniform[0, 2 scale] | constant
    compute_time_dist: str = "gamma"
    compute_time_shape: float = 2.0
    compute_time_scale: float = 1.0
    #: real mode: parameter-server ranks (the first ``servers`` ranks; parameters sharded over them)
    servers: int = 1


@dataclass
class SlowMoConfig:
    enabled: bool = False
    #: slow learning rate
    alpha: float = 1.0
    #: slow momentum, in [0, 1)
    beta: float = 0.7
    #: inner steps per outer iteration
    tau: int = 12
    #: base-optimizer buffers at the outer step: reset | keep | average
    base_buffers: str = "reset"
    #: coupled (the paper: u = beta u + d / gamma_t; x0 -= alpha gamma_t u) | decoupled (outer SGD on d)
    lr_coupling: str = "coupled"
    #: decoupled only: Nesterov outer momentum
    nesterov: bool = False
    #: keep x0 and u sharded across ranks (1/n each)
    sharded: bool = False
    #: wire dtype of the outer all-reduce: float32 (no cast) | bfloat16 | float16; x0, u stay full precision
    outer_dtype: str = "float32"
    #: split the parameters into F contiguous fragments synchronised in turn (tau % F == 0)
    fragments: int = 1
    #: apply the outer update D inner steps after starting its all-reduce (0: blocking, Alg. 1)
    overlap_steps: int = 0


@dataclass
class TrainConfig:
    #: per-worker batch size
    batch_size: int = 128
    #: if set, the total batch over all workers; batch_size becomes total_batch / world size
    total_batch: Optional[int] = None
    epochs: float = 200.0
    #: stop after this many optimizer steps (null = run all epochs)
    max_steps: Optional[int] = None
    log_every: int = 50
    eval_every_epochs: float = 1.0
    eval_batch_size: int = 1000
    #: auto (bar on a terminal, plain lines otherwise) | bar | log | none
    progress: str = "auto"
    #: fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    precision: str = "fp32"
    #: GPUs with TF32 tensor cores (Ampere and newer) run fp32 matmuls and convolutions in TF32
    #: (10-bit mantissa products, fp32 accumulation); false: full fp32 (the paper's V100s had no TF32)
    tf32: bool = True
    #: non-finite loss or parameters: stop (one error line; the last checkpoint stays good) | skip
    #: (drop that step's update on every rank; costs one small all-reduce per step)
    nonfinite: str = "stop"
    #: with nonfinite=skip: stop once this many steps were skipped
    max_nonfinite_skips: int = 10


@dataclass
class LauncherConfig:
    #: workers started on this machine when not run under torchrun
    nproc_per_node: int = 1
    #: auto (nccl with CUDA, else gloo) | gloo | nccl
    backend: str = "auto"
    #: intra-op threads per worker (null = cores / local workers)
    threads_per_worker: Optional[int] = None
    timeout_s: float = 1800.0
    #: restart all workers this many times after one dies (they resume from the newest checkpoint);
    #: under torchrun use its --max-restarts instead
    max_restarts: int = 0


@dataclass
class CheckpointConfig:
    """When checkpoints are written (slowmo_train/checkpoint.py). Any key may change on resume."""

    #: every N optimizer steps (0 = off)
    every_steps: int = 0
    #: every N minutes of wall clock, decided by rank 0 (0 = off)
    every_minutes: float = 30.0
    #: complete checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)
    keep: int = 2
    #: write one when the run reaches its last step
    at_end: bool = True
    #: ranks agree every N steps (one 8-byte all-reduce) on stopping after SIGTERM/SIGINT and on
    #: time-based checkpoints
    poll_every: int = 1


@dataclass
class JobConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    slowmo: SlowMoConfig = field(default_factory=SlowMoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    #: none (start fresh) | auto (the newest complete checkpoint in output_dir, else fresh) | PATH
    #: (a checkpoint directory, or a run directory: its newest complete checkpoint)
    resume: str = "none"
    #: run directory (null = outputs/<date>/<time>_<name>)
    output_dir: Optional[str] = None
    name: str = "run"


def register_configs() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


# Allowed values. Algorithm names: slowmo_train/registry.py; task names: slowmo_train/tasks/__init__.py
# (checked by cli.preflight, since the tasks import torch).
DOWNLOAD_MODES = ("auto", "true", "false")
#: the SlowMo options' values, read by algorithms/slowmo.py too
BASE_BUFFER_MODES = ("reset", "keep", "average")
LR_COUPLINGS = ("coupled", "decoupled")
OUTER_DTYPES = ("float32", "bfloat16", "float16")
GRAPH_NAMES = ("exponential", "nonregular_exponential")
OPTIM_NAMES = ("sgd", "adam")
SCHEDULE_NAMES = ("step", "inverse_sqrt", "constant")


def to_job_config(cfg: DictConfig | dict) -> JobConfig:
    """Turn a composed (or plain dict) config into a read-only JobConfig object."""
    base = OmegaConf.structured(JobConfig)
    merged = OmegaConf.merge(base, cfg)
    job = OmegaConf.to_object(merged)
    assert isinstance(job, JobConfig)
    return job


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _one_of(key: str, value: str, names) -> None:
    _check(value in names, key, value, "choose one of " + ", ".join(names))


def validate(job: JobConfig, world_size: int | None = None, check_paths: bool = True) -> None:
    """Check values and ranges. ``world_size`` (when known) checks divisibility constraints. The task
    name and the architecture are checked by ``cli.preflight``, which knows the tasks."""
    _check(job.model.width > 0, "model.width", job.model.width, "must be > 0")
    _check(job.model.channels_last in ("auto", True, False), "model.channels_last", job.model.channels_last,
           "must be auto, true or false")
    _check(job.model.dropout is None or 0 <= job.model.dropout < 1, "model.dropout", job.model.dropout,
           "must be null (the preset's) or in [0, 1)")
    o = job.optim
    _one_of("optim.name", o.name, OPTIM_NAMES)
    _one_of("optim.schedule", o.schedule, SCHEDULE_NAMES)
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.reference_batch >= 1, "optim.reference_batch", o.reference_batch, "must be an integer >= 1")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two values in [0, 1)")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps,
           "must be null or an integer >= 0")
    _check(0 < o.decay <= 1, "optim.decay", o.decay, "must be in (0, 1]")
    _check(o.milestone_epochs_of > 0, "optim.milestone_epochs_of", o.milestone_epochs_of, "must be > 0")
    _check(all(0 < m <= o.milestone_epochs_of for m in o.milestones), "optim.milestones", list(o.milestones),
           f"epochs in (0, optim.milestone_epochs_of={o.milestone_epochs_of}]")
    if o.nesterov and o.name == "sgd":
        _check(o.momentum > 0, "optim.momentum", o.momentum,
               "Nesterov SGD needs momentum > 0 (or set optim.nesterov=false)")

    a = job.algorithm
    _one_of("algorithm", a.name, registry.names())
    _one_of("algorithm.graph", a.graph, GRAPH_NAMES)
    _check(a.period >= 1, "algorithm.period", a.period, "must be an integer >= 1")
    _check(a.peers_per_itr >= 1, "algorithm.peers_per_itr", a.peers_per_itr, "must be an integer >= 1")
    _check(a.synch_freq >= 1, "algorithm.synch_freq", a.synch_freq, "must be an integer >= 1")
    _check(a.consensus_every >= 0, "algorithm.consensus_every", a.consensus_every, "must be >= 0")
    _check(a.nprocs_per_node is None or a.nprocs_per_node >= 1, "algorithm.nprocs_per_node", a.nprocs_per_node,
           "must be null (automatic) or an integer >= 1")

    if registry.ALGORITHM_SPECS[a.name].kind == registry.ASYNC:
        _validate_async(job, world_size)

    s = job.slowmo
    _check(s.alpha > 0, "slowmo.alpha", s.alpha, "must be > 0")
    _check(0 <= s.beta < 1, "slowmo.beta", s.beta, "must be in [0, 1)")
    _check(s.tau >= 1, "slowmo.tau", s.tau, "must be an integer >= 1")
    _one_of("slowmo.base_buffers", s.base_buffers, BASE_BUFFER_MODES)
    _one_of("slowmo.lr_coupling", s.lr_coupling, LR_COUPLINGS)
    _check(not (s.nesterov and s.lr_coupling == "coupled"), "slowmo.nesterov", s.nesterov,
           "Nesterov outer momentum needs slowmo.lr_coupling=decoupled")
    if s.enabled and a.name == "local_sgd":
        _check(s.tau % a.period == 0, "slowmo.tau", s.tau,
               f"must be a multiple of algorithm.period={a.period} when SlowMo wraps Local SGD")
    _one_of("slowmo.outer_dtype", s.outer_dtype, OUTER_DTYPES)
    _check(s.fragments >= 1 and s.tau % s.fragments == 0, "slowmo.fragments", s.fragments,
           f"must be an integer >= 1 dividing slowmo.tau={s.tau}")
    _check(0 <= s.overlap_steps < s.tau, "slowmo.overlap_steps", s.overlap_steps,
           f"must be an integer in [0, slowmo.tau={s.tau})")
    _check(not (s.sharded and s.outer_dtype != "float32"), "slowmo.sharded", s.sharded,
           "works only with slowmo.outer_dtype=float32 (16-bit outer messages carry x0 - x_i, which needs the "
           "whole x0 on every rank)")

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
            _check(t.total_batch % world_size == 0, "train.total_batch", t.total_batch,
                   f"must be divisible by the number of workers ({world_size})")

    la = job.launcher
    _check(la.nproc_per_node >= 1, "launcher.nproc_per_node", la.nproc_per_node, "must be an integer >= 1")
    _one_of("launcher.backend", la.backend, ("auto", "gloo", "nccl"))
    _check(la.threads_per_worker is None or la.threads_per_worker >= 1, "launcher.threads_per_worker",
           la.threads_per_worker, "must be null or an integer >= 1")
    _check(la.timeout_s > 0, "launcher.timeout_s", la.timeout_s, "must be > 0 seconds")
    _check(la.max_restarts >= 0, "launcher.max_restarts", la.max_restarts, "must be an integer >= 0")
    c = job.checkpoint
    _check(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "must be an integer >= 0 (0 = off)")
    _check(c.every_minutes >= 0, "checkpoint.every_minutes", c.every_minutes, "must be >= 0 (0 = off)")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "must be an integer >= 1")
    _check(c.poll_every >= 1, "checkpoint.poll_every", c.poll_every, "must be an integer >= 1")
    _check(job.resume != "", "resume", job.resume, "use none, auto or the path of a checkpoint or run directory")
    _check(job.resume != "auto" or job.output_dir is not None, "resume", job.resume,
           "needs output_dir=DIR (the run directory to continue in)")
    if world_size is not None and a.nprocs_per_node is not None:
        _check(world_size % a.nprocs_per_node == 0, "algorithm.nprocs_per_node", a.nprocs_per_node,
               f"must divide the number of workers ({world_size})")

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
    _check(e.max_len_a >= 0 and e.max_len_b >= 0, "eval.max_len_a/max_len_b", (e.max_len_a, e.max_len_b),
           "must be >= 0")
    _one_of("eval.bleu_split", e.bleu_split, ("valid", "test"))
    _check(e.bleu_every_evals >= 0, "eval.bleu_every_evals", e.bleu_every_evals, "must be an integer >= 0")
    _check(e.bleu_max_sentences is None or e.bleu_max_sentences >= 1, "eval.bleu_max_sentences",
           e.bleu_max_sentences, "must be null or an integer >= 1")
    if check_paths and download_mode(d) == "false":
        _check(os.path.isdir(d.root), "data.root", d.root,
               "directory does not exist; point data.root at a copy of the dataset, "
               "or set data.download=auto to fetch it when online")


def _validate_async(job: JobConfig, world_size: int | None) -> None:
    a = job.algorithm
    _check(not job.slowmo.enabled, "slowmo.enabled", job.slowmo.enabled,
           f"SlowMo wraps synchronous base algorithms; algorithm={a.name} is asynchronous, set slowmo.enabled=false")
    _one_of("algorithm.mode", a.mode, ("simulated", "real"))
    _one_of("algorithm.compute_time_dist", a.compute_time_dist, ("gamma", "exponential", "uniform", "constant"))
    _check(a.sim_workers >= 1, "algorithm.sim_workers", a.sim_workers, "must be an integer >= 1")
    _check(a.compute_time_shape > 0, "algorithm.compute_time_shape", a.compute_time_shape, "must be > 0")
    _check(a.compute_time_scale > 0, "algorithm.compute_time_scale", a.compute_time_scale, "must be > 0")
    _check(a.servers >= 1, "algorithm.servers", a.servers, "must be an integer >= 1")
    _check(job.optim.name == "sgd", "optim.name", job.optim.name,
           f"algorithm={a.name} applies its own momentum rule; use optim=sgd_nesterov (optim.name=sgd)")
    _check(job.train.precision == "fp32", "train.precision", job.train.precision,
           f"algorithm={a.name} runs in fp32 only; set train.precision=fp32")
    _check(job.train.total_batch is None, "train.total_batch", job.train.total_batch,
           f"algorithm={a.name} has no total batch per step; set train.batch_size (per worker) and "
           "train.total_batch=null")
    _check(job.resume == "none", "resume", job.resume,
           f"algorithm={a.name} cannot resume from a checkpoint (not implemented); set resume=none")
    _check(job.launcher.max_restarts == 0, "launcher.max_restarts", job.launcher.max_restarts,
           f"algorithm={a.name} cannot resume, so a restart would train from scratch; set launcher.max_restarts=0")
    if world_size is not None and a.mode == "simulated":
        _check(world_size == 1, "launcher.nproc_per_node", world_size,
               "algorithm.mode=simulated runs all workers in one process; set launcher.nproc_per_node=1 "
               "(algorithm.sim_workers sets the number of simulated workers)")
    if world_size is not None and a.mode == "real":
        _check(world_size > a.servers, "launcher.nproc_per_node", world_size,
               f"algorithm.mode=real needs the algorithm.servers={a.servers} server rank(s) plus at least one worker")


def download_mode(data: DataConfig) -> str:
    """data.download normalised: YAML/CLI booleans arrive as "True"/"False" in the string field."""
    return str(data.download).strip().lower()


def per_worker_batch(train: TrainConfig, world_size: int) -> int:
    return train.total_batch // world_size if train.total_batch is not None else train.batch_size
