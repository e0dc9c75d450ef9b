"""The wmt16 task end to end on a toy corpus: loss, evaluation (perplexity and BLEU), a 2-process
training run through the CLI, and slowmo-translate on its run directory.

    .venv/bin/python -m pytest -q tests/test_wmt16_task.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowmo_train.config import DataConfig, EvalConfig, ModelConfig
from slowmo_train.tasks import TASKS
from slowmo_train.tasks.base import TaskArgs, WorkerInfo
from tests.helpers import write_corpus

REPO = Path(__file__).resolve().parents[1]


def build(tmp_path: Path, **eval_kw):
    root = write_corpus(tmp_path / "text", pairs=80)
    args = TaskArgs(
        model=ModelConfig(arch="transformer_small", width=0.125),
        data=DataConfig(
            root=str(root), cache_dir=str(tmp_path / "cache"), vocab_size=100, max_tokens=300, download="false"
        ),
        eval=EvalConfig(beam=2, **eval_kw),
        batch_size=0,
        eval_batch_size=0,
        seed=0,
        worker=WorkerInfo(0, 1, 0, torch.device("cpu")),
    )
    return TASKS["wmt16"](args)


def test_task_loss_counts_target_tokens_and_evaluation_reports_bleu_when_asked(tmp_path):
    task = build(tmp_path, bleu_every_evals=2)
    assert task.unit == "tokens" and task.train_size == 80 and task.steps_per_epoch >= 2
    assert Path(task.artifacts["spm_model"]).is_file()
    batch = next(task.train_batches(0, 0))
    loss, units = task.loss(task.model, batch)
    assert units == int((batch["tgt"] != 0).sum()) and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert task.metric.name == "ppl" and not task.metric.higher_is_better
    first = task.evaluate(task.model, False)
    assert set(first) == {"loss", "nll", "ppl"} and first["ppl"] > 1
    second = task.evaluate(task.model, False)  # every 2nd evaluation computes BLEU
    assert 0 <= second["bleu"] <= 100 and second["ppl"] == pytest.approx(first["ppl"])
    assert "bleu" in task.evaluate(task.model, True)  # the final one always does


def test_bleu_every_evaluation_makes_bleu_the_headline(tmp_path):
    task = build(tmp_path, bleu_every_evals=1, bleu_max_sentences=3)
    assert task.metric.name == "bleu" and task.metric.higher_is_better and task.metric.split == "test"
    assert "bleu" in task.evaluate(task.model, False)


@pytest.mark.multiproc
def test_two_process_run_then_slowmo_translate(tmp_path):
    root = write_corpus(tmp_path / "text", pairs=120)
    run = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "slowmo_train",
        "task=wmt16",
        "optim=adam",
        "algorithm=local_sgd",
        "algorithm.period=2",
        f"data.root={root}",
        "data.vocab_size=100",
        "data.max_tokens=300",
        "model.width=0.125",
        "train.max_steps=4",
        "train.log_every=2",
        "train.progress=log",
        "eval.beam=2",
        "eval.bleu_max_sentences=5",
        "optim.warmup_steps=2",
        "launcher.nproc_per_node=2",
        "launcher.threads_per_worker=1",
        f"output_dir={run}",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "ppl" and "bleu" in summary["final_eval"]
    assert (run / "model_final.pt").is_file() and list((run / "artifacts").glob("*.model"))
    out = subprocess.run(
        [sys.executable, "-m", "slowmo_train.translate", str(run), "--beam", "2"],
        cwd=REPO,
        env=env,
        input="A man runs on the beach.\nThe dog sits.\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "slowmo_train.translate", str(tmp_path / "missing")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
