"""What a reproduction run is: a method (``Method``), a set of methods x seeds with shared overrides
(``RunSet``), one planned run and its command (``PlannedRun``), a run directory's state, and a command
as the docs show it. The sets themselves are in plan.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: the data folder beside the clone (see its README); elsewhere set SLOWMO_TRAIN_DATA
DATA = Path(os.environ.get("SLOWMO_TRAIN_DATA", REPO.parent / "shared" / "data")).resolve()
CIFAR_ROOT = DATA / "cifar10"
MULTI30K_ROOT = DATA / "translation" / "multi30k"


#: every set's runs were made with Algorithm 1's held lr (the default before ``slowmo.inner_lr=follow``
#: became it): pinned so that the commands remake them; the ``follow`` methods override it
HELD_LR = "slowmo.inner_lr=hold"


@dataclass(frozen=True)
class Method:
    key: str  # run-name stem, e.g. "localsgd_slowmo"
    label: str  # table label, e.g. "Local SGD + SlowMo"
    exp: str  # configs/exp/<exp>.yaml
    extra: tuple[str, ...] = ()  # method-specific overrides (never tuning: the sweep's tau/beta, streaming)


#: four real one-thread worker processes (the 4-worker sets)
REAL_LAUNCH = ("launcher.nproc_per_node=4", "launcher.threads_per_worker=1")


@dataclass(frozen=True)
class RunSet:
    name: str
    description: str
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    shared: tuple[str, ...]  # identical for every method of the set
    launch: tuple[str, ...] = REAL_LAUNCH  # how the workers run: real processes or the simulated cluster


@dataclass(frozen=True)
class PlannedRun:
    set_name: str
    method: Method
    seed: int
    shared: tuple[str, ...]
    launch: tuple[str, ...] = REAL_LAUNCH

    @property
    def name(self) -> str:
        return f"{self.method.key}_s{self.seed}"

    def run_dir(self, runs_dir: Path) -> Path:
        return runs_dir / self.set_name / self.name

    def command(self, runs_dir: Path, resume: bool = False) -> list[str]:
        # a method's own value of a shared key replaces it (Hydra takes one value per key)
        own = {a.split("=", 1)[0] for a in self.method.extra}
        launch = [a for a in self.launch if a.split("=", 1)[0] not in own]
        shared = [a for a in self.shared if a.split("=", 1)[0] not in own]
        cmd = [
            sys.executable,
            "-m",
            "slowmo_train",
            f"+exp={self.method.exp}",
            *launch,
            f"seed={self.seed}",
            f"output_dir={self.run_dir(runs_dir)}",
            *shared,
            *self.method.extra,
        ]
        return cmd + (["resume=auto"] if resume else [])


def run_state(run_dir: Path) -> str:
    """done (summary.json), resume (a checkpoint to continue from) or new."""
    if (run_dir / "summary.json").exists():
        return "done"
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        return "resume"
    return "new"


def portable(command: str) -> str:
    """A command as the docs show it: ``python`` for this interpreter, the data folder as seen from
    the repository (its default place beside the clone)."""
    data = os.path.relpath(DATA, REPO) if DATA.is_relative_to(REPO.parent) else str(DATA)
    return command.replace(sys.executable, "python").replace(str(DATA), data)
