"""Typed configuration: one dataclass per component, registered in Hydra's ConfigStore.

``configs/config.yaml`` puts the ``job_schema`` node first in its defaults list, so every YAML file
and command-line override is type-checked against these dataclasses (unknown keys and wrong types
are rejected by OmegaConf). ``config_checks.validate`` then checks values and ranges and raises
:class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


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
    dropout: float | None = None


@dataclass
class DataConfig:
    #: a torchvision CIFAR-10 folder (cifar-10-batches-py) or an ImageFolder root with train/ and test/
    root: str = "data/cifar10"
    #: auto (use data.root if it holds the dataset, else fetch it there) | true (fetch if missing) |
    #: false (never fetch). ImageNet is never downloaded.
    download: str = "auto"
    #: where decoded images are cached as uint8 tensors (default: ~/.cache/slowmo-train)
    cache_dir: str | None = None
    #: use only the first N training images (after a fixed shuffle); null = all
    train_subset: int | None = None
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
    bleu_max_sentences: int | None = None


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
    warmup_steps: int | None = None
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
    nprocs_per_node: int | None = None
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
    #: slow momentum, in [0, 1), or auto: by the number of averaging workers (nodes) and the base
    #: optimizer, the rules outer_optimizer.AUTO_BETA (SGD) and AUTO_BETA_ADAPTIVE (Adam), docs/RESULTS.md
    beta: Any = 0.7
    #: inner steps per outer iteration
    tau: int = 12
    #: base-optimizer buffers at the outer step: reset | keep | average
    base_buffers: str = "reset"
    #: coupled (the paper: u = beta u + d / gamma_t; x0 -= alpha gamma_t u) | decoupled (outer SGD on d)
    lr_coupling: str = "coupled"
    #: decoupled only: Nesterov outer momentum
    nesterov: bool = False
    #: lr of the inner steps: follow (every inner step follows the schedule; gamma_t of the coupled
    #: update is the lr of the outer step, i.e. of the iteration's last inner step, as in fairscale's
    #: SlowMo; exactly Alg. 1 when the lr is constant within the iteration; measured better, see
    #: docs/RESULTS.md) | hold (Alg. 1: the schedule's value at the first step of the outer iteration,
    #: held for its tau steps)
    inner_lr: str = "follow"
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
    total_batch: int | None = None
    epochs: float = 200.0
    #: stop after this many optimizer steps (null = run all epochs)
    max_steps: int | None = None
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
    threads_per_worker: int | None = None
    timeout_s: float = 1800.0
    #: restart all workers this many times after one dies (they resume from the newest checkpoint);
    #: under torchrun use its --max-restarts instead
    max_restarts: int = 0
    #: play N workers in this one process (the simulated cluster, slowmo_train/simulated): the same
    #: training, outputs and checkpoints as N real processes; synchronous algorithms only. 0: one
    #: process per worker
    simulate: int = 0
    #: with simulate: also report the time a real cluster with links of this rate (megabit/s per node
    #: and direction) would take, from the analytic model of slowmo_train/simulated/cluster.py (0: off)
    simulate_link_mbit: float = 0.0


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
    #: periodic saves copy the state to host memory at the step (pinned, non-blocking on GPUs) and
    #: write it in a background thread while training continues; the checkpoint is complete (has its
    #: manifest) once every rank has written its file, a few steps later. Saves at a stop signal and
    #: at the last step are written directly and complete before the process exits. Costs one host
    #: copy of the rank's state, kept between saves; false: every save is written inside its step
    background: bool = True
    #: background saves only for states of at least this many MB per rank (the largest rank's
    #: decides); a smaller one is written inside its step in well under a second and is complete at
    #: once (0: every periodic save in the background)
    background_min_mb: float = 64.0


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
    output_dir: str | None = None
    name: str = "run"


def register_configs() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


# Allowed values, checked by config_checks.validate. Algorithm names: slowmo_train/registry.py; task names:
# slowmo_train/tasks/__init__.py (checked by cli.preflight, since the tasks import torch).
DOWNLOAD_MODES = ("auto", "true", "false")
#: the SlowMo options' values, read by algorithms/slowmo.py too
BASE_BUFFER_MODES = ("reset", "keep", "average")
LR_COUPLINGS = ("coupled", "decoupled")
INNER_LR_MODES = ("hold", "follow")
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


def download_mode(data: DataConfig) -> str:
    """data.download normalised: YAML/CLI booleans arrive as "True"/"False" in the string field."""
    return str(data.download).strip().lower()


def per_worker_batch(train: TrainConfig, world_size: int) -> int:
    return train.total_batch // world_size if train.total_batch is not None else train.batch_size
