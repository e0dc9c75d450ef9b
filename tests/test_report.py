"""slowmo-train-report: run directories -> one table (printed + CSV) and loss/metric curves (PNG).

    python -m pytest -q tests/test_report.py

The runs are written the way the trainer writes them (config.yaml, metrics.jsonl, summary.json) with
known numbers, so every column can be checked exactly; one test feeds a real (tiny) Hydra multirun.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slowmo_train.report import main
from slowmo_train.scripting import launch_env
from tests.helpers import report_rows


def _write_run(path: Path, beta: float, seconds_per_step: float, top1: list[float], sent: float) -> Path:
    """A 3-eval run of 60 steps, logging every 10 steps, evaluating every 20."""
    path.mkdir(parents=True)
    config = {
        "algorithm": {"name": "local_sgd", "period": 12},
        "slowmo": {"enabled": True, "beta": beta, "tau": 12},
        "train": {"batch_size": 32},
        "output_dir": str(path),
        "seed": 0,
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    events, t = [], 1000.0
    for step in range(10, 61, 10):
        t += 10 * seconds_per_step
        events.append(
            {
                "event": "train",
                "step": step,
                "time": t,
                "loss": 2.0 - step / 100,
                "lr": 0.1,
                "samples_per_s": 64 / seconds_per_step,
                "comm_bytes_sent_per_step": sent,
            }
        )
        if step % 20 == 0:
            t += 5.0  # evaluation time, which is not training time
            events.append({"event": "eval", "step": step, "time": t, "split": "test", "top1": top1[step // 20 - 1]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = {
        "steps": 60,
        "metric": "top1",
        "higher_is_better": True,
        "best": max(top1),
        "best_step": 40,
        "final_eval": {"split": "test", "top1": top1[-1]},
        "comm_bytes_sent_per_step": sent,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_table_csv_and_plot(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "2026-11-22" / "04-00-00"
    _write_run(sweep / "0", 0.4, 0.20, [30.0, 45.0, 44.0], 1.5e6)
    _write_run(sweep / "1", 0.8, 0.25, [35.0, 50.0, 55.0], 1.5e6)
    main([str(sweep), "--out", str(tmp_path / "out"), "--name", "beta"])
    printed = capsys.readouterr().out

    rows = list(csv.DictReader(open(tmp_path / "out" / "beta.csv")))
    assert [r["run"] for r in rows] == ["0", "1"]
    # only the swept key differs (output_dir differs too but is not an override)
    assert "slowmo.beta" in rows[0] and "output_dir" not in rows[0] and "seed" not in rows[0]
    assert [r["slowmo.beta"] for r in rows] == ["0.4", "0.8"]
    assert [r["final"] for r in rows] == ["44.0", "55.0"] and [r["best"] for r in rows] == ["45.0", "55.0"]
    # 10 steps between log lines; the intervals with an evaluation are left out
    assert [float(r["ms_per_step"]) for r in rows] == [200.0, 250.0]
    assert [float(r["mb_sent_per_step"]) for r in rows] == [1.5, 1.5]
    assert float(rows[1]["train_wall_s"]) == pytest.approx(60 * 0.25 + 3 * 5.0 - 5.0)
    assert "slowmo.beta" in printed and "55.0" in printed and "beta.png" in printed

    png = tmp_path / "out" / "beta.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "holds no run" in capsys.readouterr().err


@pytest.mark.multiproc
def test_report_of_a_real_hydra_multirun(tmp_path, torchvision_cifar):
    """`slowmo-train -m ... slowmo.beta=0.4,0.8` then `slowmo-train-report` on the sweep folder."""
    env = launch_env()
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "slowmo_train",
        "-m",
        "task=cifar10",
        "algorithm=local_sgd",
        "slowmo.enabled=true",
        "slowmo.tau=12",
        "slowmo.beta=0.4,0.8",
        "model.width=0.125",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.log_every=2",
        "train.eval_batch_size=50",
        "train.progress=none",
        "launcher.threads_per_worker=1",
        f"data.root={torchvision_cifar}",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {p.name for p in sweep.iterdir() if (p / "metrics.jsonl").exists()} == {"0", "1"}

    rows = report_rows(sweep, tmp_path / "rep")
    assert [r["slowmo.beta"] for r in rows] == ["0.4", "0.8"]
    assert all(r["metric"] == "top1" and r["final"] != "" and float(r["ms_per_step"]) > 0 for r in rows)
    assert (tmp_path / "rep" / "report.png").exists()
