"""What several test files share. Fixtures live in conftest.py, spawning gloo ranks in
distributed_helpers.py, the float64 reference simulator in reference.py.

    hook_step(algorithm, optimizer, k, loss_fn, batch)   one optimizer step in the trainer's hook order
    run_trainer(job_dict, run_dir)                       one Trainer run (resume tests)
    merge(*dicts), states_equal(a, b), rank_state(run_dir, step, rank)
    EXPERIMENTS, compose_job("+exp=quickstart", ...)      the experiments; a composed config (not validated)
    write_corpus(root)                                   a toy En-De corpus in the Multi30k layout
    report_rows(sweep, out)                              slowmo-train-report on a sweep; its CSV rows
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slowmo_train.scripting import merge_dicts

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "exp").glob("*.yaml"))


def compose_job(*overrides: str):
    """The Hydra config ``slowmo-train OVERRIDES...`` composes (slowmo_train.scripting.compose_config)."""
    from slowmo_train.scripting import compose_config

    return compose_config(overrides)


# --- the training step ------------------------------------------------------------------------------
def hook_step(
    algorithm,
    optimizer: torch.optim.Optimizer,
    k: int,
    loss_fn: Callable,
    batch,
    set_lr: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """One optimizer step ``k`` through the algorithm's hooks, in the order of
    ``slowmo_train.trainer.Trainer.train_step`` (fp32, no fault injection, no skipped steps): the lr
    at ``algorithm.lr_schedule_step(k)`` (``set_lr``; None keeps the optimizer's), before_forward, the
    loss ``loss_fn(algorithm.train_model, batch)`` (a task's ``loss`` without its units), zero_grad,
    backward, after_backward, optimizer.step, after_optimizer_step. Returns the loss."""
    if set_lr is not None:
        set_lr(algorithm.lr_schedule_step(k))
    algorithm.before_forward(k)
    loss = loss_fn(algorithm.train_model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    algorithm.after_backward(k)
    optimizer.step()
    algorithm.after_optimizer_step(k)
    return loss.detach()


# --- whole Trainer runs -------------------------------------------------------------------------------
#: the exact-resume runs (tests/test_resume.py, tests/test_slowmo_streaming.py): 200 images / 2 ranks /
#: batch 16 = 6 steps per epoch, so RESUME_STEPS crosses the epoch boundary
RESUME_STEPS = 10
RESUME_BASE = {
    "model": {"width": 0.125},
    "train": {
        "batch_size": 16,
        "epochs": 3,
        "log_every": 3,
        "eval_every_epochs": 100,
        "eval_batch_size": 100,
        "progress": "none",
    },
    "optim": {"warmup_epochs": 1.0},
    "checkpoint": {"every_minutes": 0},
}


#: nested dictionaries merged left to right (slowmo_train.scripting.merge_dicts)
merge = merge_dicts


def run_trainer(job_dict: dict, run_dir: Path) -> dict:
    """One Trainer run; returns this rank's final model and step."""
    from slowmo_train.config import to_job_config
    from slowmo_train.dist import read_env
    from slowmo_train.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(to_job_config(job_dict), read_env(), torch.device("cpu"), run_dir)
    trainer.run()
    return {"model": {k: v.clone() for k, v in trainer.task.model.state_dict().items()}, "step": trainer.step}


def rank_state(run_dir: Path, step: int, rank: int) -> dict:
    """What ``rank`` saved in the checkpoint of ``step``."""
    from slowmo_train.checkpoint import load_rank_state, step_dir

    return load_rank_state(step_dir(run_dir, step), rank)[1]


def states_equal(a, b) -> bool:
    """Nested tensors, dicts, lists and values equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


# --- data ---------------------------------------------------------------------------------------------
WORDS = "a man dog woman runs sits on the in green red blue street beach house park ball".split()
WORTE = "ein mann hund frau läuft sitzt auf der im grünen roten blauen straße strand haus park ball".split()


def write_corpus(root: Path, pairs: int = 60, seed: int = 0) -> Path:
    """A toy En-De corpus in the Multi30k layout (word-for-word 'translations')."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", pairs), ("valid", 8), ("test", 8)):
        en, de = [], []
        for _ in range(n):
            ids = rng.integers(0, len(WORDS), size=rng.integers(2, 9))
            en.append(" ".join(WORDS[i] for i in ids).capitalize() + ".")
            de.append(" ".join(WORTE[i] for i in ids).capitalize() + ".")
        (root / f"{split}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
        (root / f"{split}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    return root


def report_rows(sweep: Path, out: Path) -> list[dict]:
    """``slowmo-train-report SWEEP --out OUT`` as a user runs it; the rows of its report.csv."""
    result = subprocess.run(
        [sys.executable, "-m", "slowmo_train.report", str(sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with open(out / "report.csv", newline="") as f:
        return list(csv.DictReader(f))
