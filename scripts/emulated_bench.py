"""The emulated-cluster benchmark runner that bench_speed.py, bench_streaming.py, bench_checkouts.py and
bench_poll_overlap.py share: one configuration (``Config``) on N emulated nodes
(scripts/emulated_cluster.sh: one network namespace per node, each node's link capped by tc tbf),
timed from the run's metrics (``Measured``), and the link rates derived from a compute-only run.

    bench = Bench(args)   # args: data_root, out, work, width, batch, warmup, steps, log_every, rates
    measured = bench.run(ClusterShape(2, 1), Config("local_sgd", 12), "95mbit", "tag")
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slowmo_train import scripting
from slowmo_train.simulated.cluster import PAYLOAD_EFFICIENCY, ring  # noqa: F401 - the benchmarks' too

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "emulated_cluster.sh"


@dataclass(frozen=True)
class Config:
    algorithm: str
    slowmo_tau: int | None = None  # None: SlowMo off
    #: steps between the trainer's stop-signal polls (a tiny all-reduce). The benchmark polls once
    #: per 48 steps; see POLL_EVERY_STEP for why the default of 1 is measured separately.
    poll_every: int = 48
    #: further Hydra overrides, last on the command line (e.g. "slowmo.overlap_steps=1" for
    #: scripts/bench_streaming.py); they appear in the label and the tag
    extra: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        name = {"allreduce": "AR-SGD", "local_sgd": "Local SGD", "sgp": "SGP", "osgp": "OSGP"}[self.algorithm]
        name = name if self.slowmo_tau is None else f"{name} + SlowMo(tau={self.slowmo_tau})"
        name = name if self.poll_every == 48 else f"{name} [poll every {self.poll_every}]"
        return name if not self.extra else f"{name} [{', '.join(o.split('.')[-1] for o in self.extra)}]"

    @property
    def tag(self) -> str:
        tag = f"{self.algorithm}_{self.slowmo_tau or 0}_poll{self.poll_every}"
        return tag + "".join("_" + o.split("=")[0].split(".")[-1] + "-" + o.split("=", 1)[-1] for o in self.extra)

    def overrides(self, steps: int) -> list[str]:
        out = [f"algorithm={self.algorithm}", f"checkpoint.poll_every={self.poll_every}"]
        if self.algorithm == "local_sgd":
            out.append("algorithm.period=12")
        if self.slowmo_tau is not None:
            out += ["slowmo.enabled=true", f"slowmo.tau={self.slowmo_tau}"]
            if self.algorithm == "local_sgd":
                out.append(f"algorithm.period={self.slowmo_tau}")
        return out + list(self.extra)


#: the compute-only job: Local SGD that never averages inside the run, so no model crosses the
#: link, but with the trainer's 8-byte stop-signal all-reduce every step, which keeps the nodes in
#: lock-step like every synchronous algorithm: a step then costs the slower node's compute, as in the
#: real runs (independent nodes would report their mean compute, ~10% less on this loaded machine)
COMPUTE_ONLY = Config("local_sgd", poll_every=1)


@dataclass
class ClusterShape:
    """Emulated nodes x processes per node (not slowmo_train.dist.Topology, a rank's place in a job)."""

    nodes: int
    nproc: int

    @property
    def world(self) -> int:
        return self.nodes * self.nproc

    @property
    def label(self) -> str:
        return f"{self.nodes}x{self.nproc}"


@dataclass
class Measured:
    ms_per_step: float
    blocking_ms: float
    overlapped_ms: float
    bytes_sent: float
    extra: dict = field(default_factory=dict)


def rate_bits(rate: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate)
    if not m:
        raise ValueError(f"rate {rate!r} must look like 60mbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def read_run(run_dir: Path, skip_steps: int, units_per_step: int) -> Measured:
    """Time per step over the logged intervals after ``skip_steps`` (warm-up), from rank 0's
    metrics.jsonl; communication figures weighted by interval length."""
    train = [e for e in scripting.read_metrics(run_dir, "train") if "samples_per_s" in e]
    total_s = steps = blocking = overlapped = sent = outer_blocking = outer_overlapped = 0.0
    prev = 0
    for e in train:
        n = e["step"] - prev
        prev = e["step"]
        if e["step"] <= skip_steps:
            continue
        total_s += n * units_per_step / e["samples_per_s"]
        steps += n
        blocking += n * e.get("comm_blocking_s_per_step", 0.0)
        overlapped += n * e.get("comm_overlapped_s_per_step", 0.0)
        sent += n * e.get("comm_bytes_sent_per_step", 0.0)
        outer_blocking += n * e.get("comm_outer_blocking_s_per_step", 0.0)
        outer_overlapped += n * e.get("comm_outer_overlapped_s_per_step", 0.0)
    if steps == 0:
        raise RuntimeError(f"{run_dir}: no logged steps after the warm-up of {skip_steps}")
    # SlowMo's own share of the communication (CommStats.outer), per step
    extra = {"outer_blocking_ms": 1000 * outer_blocking / steps, "outer_overlapped_ms": 1000 * outer_overlapped / steps}
    return Measured(1000 * total_s / steps, 1000 * blocking / steps, 1000 * overlapped / steps, sent / steps, extra)


def model_sizes(run_dir: Path) -> tuple[float, float]:
    """Parameter and floating-buffer bytes of the benchmark's model (built from the run's config)."""
    from omegaconf import OmegaConf

    from slowmo_train.config import ModelConfig
    from slowmo_train.models import build_model

    model_cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(run_dir / "config.yaml").model)
    )
    model = build_model(model_cfg, "cifar10", num_classes=10)
    p = sum(t.numel() * t.element_size() for t in model.parameters())
    b = sum(t.numel() * t.element_size() for t in model.buffers() if t.is_floating_point())
    return float(p), float(b)


def check_cluster_args(prog: str, data_root: str, rate: str = "auto") -> None:
    """Exit with one line if a benchmark cannot run: a ``rate`` that is neither auto nor a tc rate, no
    ``data_root`` folder, or no root (the emulated cluster makes network namespaces)."""
    if rate != "auto":
        try:
            rate_bits(rate)
        except ValueError:
            sys.exit(f"{prog}: error: --rate={rate} must be 'auto' or a tc rate such as 95mbit")
    if not Path(data_root).is_dir():
        sys.exit(f"{prog}: error: --data-root={data_root} is not a directory")
    if os.geteuid() != 0:
        sys.exit(f"{prog}: error: the emulated cluster needs root (network namespaces); run it with sudo")


def small_test_root(data_root: Path, work: Path, per_class: int = 50) -> Path:
    """A data root whose train/ is the real training set (a symlink: the decoded-image cache is
    keyed by the resolved path, so it is reused) and whose test/ holds ``per_class`` images per
    class: the benchmark times training, and evaluating 10,000 images would add ~20 s to every run."""
    train, test = data_root / "train", data_root / "test"
    if not (train.is_dir() and test.is_dir()):
        raise SystemExit(
            f"bench_speed: error: --data-root={data_root} must be a CIFAR-10 ImageFolder tree "
            "with train/ and test/ (e.g. ../shared/data/cifar10)"
        )
    root = work / "data"
    shutil.rmtree(root, ignore_errors=True)
    (root / "test").mkdir(parents=True)
    (root / "train").symlink_to(train.resolve(), target_is_directory=True)
    for cls in sorted(d for d in test.iterdir() if d.is_dir()):
        (root / "test" / cls.name).mkdir()
        for image in sorted(cls.iterdir())[:per_class]:
            (root / "test" / cls.name / image.name).symlink_to(image.resolve())
    return root


#: the comm-bound rate makes AR-SGD's all-reduce this many times the compute time. It must be
#: >= 2; the model's AR-SGD / (Local SGD + SlowMo) ratio is (1/3 + k) / (1 + k/12), which
#: reaches 2.5 only at k ~ 2.7, while SGP / OSGP = (1 + k) / k falls below 1.3 above k ~ 3.3: k = 3
#: is where the paper's two comm-bound claims can both hold.
COMM_BOUND_FACTOR = 3.0


def auto_rates(compute_ms: float, allreduce_bytes: float) -> dict[str, str]:
    """Link rates (multiples of 5 mbit) that make AR-SGD's all-reduce take COMM_BOUND_FACTOR x and
    1 x the measured compute time."""

    def rate(factor: float) -> str:
        bits = allreduce_bytes * 8 / (factor * compute_ms / 1000) / PAYLOAD_EFFICIENCY
        return f"{max(5, int(round(bits / 5e6)) * 5)}mbit"

    return {"comm": rate(COMM_BOUND_FACTOR), "balanced": rate(1.0)}


class Bench:
    #: where the emulated cluster lives (namespace prefix, subnet, rendezvous port); another
    #: benchmark subclasses Bench with its own, so two of them never share namespaces
    CLUSTER_ARGS = ("--prefix", "smtb", "--subnet", "10.77.2", "--port", "29541")

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.rows: list[dict] = []
        self.failures: list[str] = []
        names = args.rates.split(",")
        self.rates = None if args.rates == "auto" else {"comm": names[0], "balanced": names[-1]}

    def run(self, topo: ClusterShape, cfg: Config, rate: str, tag: str) -> Measured:
        a = self.args
        run_dir = self.work / f"{topo.label}_{rate}_{tag}"
        shutil.rmtree(run_dir, ignore_errors=True)
        # the timed window must hold whole outer iterations: tau = 48 gets 48 timed steps
        steps = a.warmup + max(a.steps, cfg.slowmo_tau or 0)
        overrides = [
            "task=cifar10",
            "model.arch=resnet18",
            f"model.width={a.width}",
            f"train.batch_size={a.batch}",
            f"train.max_steps={steps}",
            f"train.log_every={a.log_every}",
            "train.eval_every_epochs=1000",
            "train.progress=log",
            "launcher.threads_per_worker=1",
            f"data.root={a.data_root}",
            "checkpoint.every_minutes=0",
            "checkpoint.at_end=false",
            f"output_dir={run_dir}",
            *cfg.overrides(steps),
        ]
        if cfg == COMPUTE_ONLY:
            overrides.append(f"algorithm.period={10 * steps}")
        cmd = [
            "bash",
            str(CLUSTER),
            "--nodes",
            str(topo.nodes),
            "--nproc",
            str(topo.nproc),
            "--rate",
            rate,
            *self.CLUSTER_ARGS,
            "--python",
            sys.executable,
            "--",
            *overrides,
        ]
        start = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-3000:]
            raise RuntimeError(f"{topo.label} {cfg.label} at {rate} failed:\n{tail}")
        measured = read_run(run_dir, a.warmup, a.batch * topo.world)
        print(
            f"  {topo.label} {rate:>8} {cfg.label:<28} {measured.ms_per_step:8.1f} ms/step "
            f"(blocking {measured.blocking_ms:.1f}, overlapped {measured.overlapped_ms:.1f}, "
            f"{measured.bytes_sent / 1e6:.3f} MB sent) [{time.time() - start:.0f} s]",
            flush=True,
        )
        return measured

    def try_run(self, topo: ClusterShape, cfg: Config, rate: str, tag: str, failure: str) -> Measured | None:
        """:meth:`run`, or None after printing its error and recording ``failure``: the other runs go on."""
        try:
            return self.run(topo, cfg, rate, tag)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"  FAILED: {err}", file=sys.stderr, flush=True)
            self.failures.append(failure)
            return None

    def compute_only(self, topo: ClusterShape) -> tuple[Measured, tuple[float, float]]:
        """The compute-only run on ``topo`` (COMPUTE_ONLY) and the model's parameter and buffer bytes;
        with ``--rates auto``, sets the link rates from its compute time (:func:`auto_rates`)."""
        compute = self.run(topo, COMPUTE_ONLY, "none", "compute")
        p, b = model_sizes(self.work / f"{topo.label}_none_compute")
        if self.rates is None:
            self.rates = auto_rates(compute.ms_per_step, ring(p, topo.world))
        return compute, (p, b)


def save_rows(out: Path, stem: str, rows: list[dict], text: Callable[[list[dict]], str]) -> None:
    """``out/stem.csv`` (the rows) and ``out/stem.md`` (``text(rows)``); nothing without rows."""
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.md").write_text(text(rows) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV that :func:`save_rows` wrote, numbers parsed back (e.g. to redraw a table)."""

    def parse(value: str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
