"""scripts/time_to_accuracy.py without the emulated cluster: the training time read from the trainer's
records, the target and the time to it, the table, and the runs' configurations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts import time_to_accuracy as tta
from scripts.emulated_bench import ClusterShape

ROOT = Path(__file__).resolve().parents[1]


def _rows(method: str, accs: list[float], ms: float, topo: str = "2x1") -> list[dict]:
    return [
        {"topology": topo, "rate": "95mbit", "method": method, "step": 40 * (i + 1)}
        | {"train_s": 40 * (i + 1) * ms / 1000, "top1": a, "ms_per_step": ms}
        for i, a in enumerate(accs)
    ]


def test_training_time_is_summed_from_the_logged_intervals_and_read_at_every_evaluation(tmp_path):
    # 2 nodes x batch 16: 32 images per step; 320 images/s for the first 8 steps, 160 after
    events = [
        {"event": "train", "step": 8, "loss": 2.0, "samples_per_s": 320.0},
        {"event": "train", "step": 8, "consensus": 0.1},  # an extra-metrics record: no interval
        {"event": "train", "step": 16, "loss": 1.9, "samples_per_s": 160.0},
        {"event": "eval", "step": 8, "top1": 20.0},
        {"event": "eval", "step": 16, "top1": 25.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    curve = tta.read_curve(tmp_path, 32)
    assert [p[0] for p in curve.points] == [8, 16] and [p[2] for p in curve.points] == [20.0, 25.0]
    assert [p[1] for p in curve.points] == pytest.approx([0.8, 2.4])
    assert curve.ms_per_step == pytest.approx(150.0)
    assert tta.time_to_target(curve, 22.0) == pytest.approx(2.4) and tta.time_to_target(curve, 30.0) is None
    events.append({"event": "eval", "step": 12, "top1": 21.0})  # not a log step: no training time to read
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    with pytest.raises(RuntimeError, match=r"steps \[12\]"):
        tta.read_curve(tmp_path, 32)


def test_the_target_is_ar_sgds_accuracy_at_80_percent_and_each_method_is_timed_to_it(tmp_path):
    accs = [10, 20, 30, 35, 40, 42, 44, 46, 47, 48]
    rows = _rows("AR-SGD", accs, 300.0)
    rows += _rows("Local SGD + SlowMo", [a + 2 for a in accs], 75.0)  # 4x faster, reaches 46 at eval 7
    rows += _rows("SGP", [a - 5 for a in accs], 350.0)  # never reaches 46
    rows += _rows("AR-SGD", accs[:5], 500.0, topo="4x1")  # stopped early: no target on 4x1
    summary = {(r["topology"], r["method"]): r for r in tta.summary_rows(rows)}
    ar = summary["2x1", "AR-SGD"]
    assert ar["target"] == 46 and ar["time_to_target_s"] == pytest.approx(320 * 0.3) and ar["speedup"] == 1.0
    fast = summary["2x1", "Local SGD + SlowMo"]
    assert fast["time_to_target_s"] == pytest.approx(280 * 0.075)
    assert fast["speedup"] == pytest.approx(96 / 21) and fast["best_top1"] == 50 and fast["final_top1"] == 50
    assert summary["2x1", "SGP"]["time_to_target_s"] is None and summary["2x1", "SGP"]["speedup"] is None
    assert summary["4x1", "AR-SGD"]["target"] is None
    table = tta.markdown(rows).splitlines()
    assert table[2] == "| 2x1 | AR-SGD | 300 | 120 | 48.00 | 48.00 | 46.00 | 96 | 1.00x |"
    assert table[3].endswith("| 46.00 | 21 | 4.57x |") and table[4].endswith("| 46.00 | - | - |")
    assert table[5].endswith("| - | - | - |")
    tta.plot(rows, Path(tmp_path) / "tta.png")
    assert (tmp_path / "tta.png").read_bytes()[:4] == b"\x89PNG"


def test_every_method_composes_with_the_same_budget_schedule_and_evaluations(tmp_path):
    from slowmo_train.config import to_job_config
    from slowmo_train.scripting import compose_config

    args = SimpleNamespace(batch=16, samples=12800, width=0.25, data_root="/data", rates="95mbit", out=tmp_path)
    args.work = tmp_path
    bench = tta.TimeToAccuracy(args)
    for beta, topo, steps in (("paper", ClusterShape(2, 1), 400), ("auto", ClusterShape(4, 1), 200)):
        args.beta = beta
        for key, (label, _, extra) in tta.METHODS.items():
            job = to_job_config(compose_config(bench.overrides(topo, key, tmp_path / key)))
            t = job.train
            assert (job.data.train_subset, t.batch_size, t.epochs, job.model.width) == (12800, 16, 1, 0.25)
            assert steps // tta.EVALS % t.log_every == 0  # every evaluation step is a log step
            assert job.optim.lr == tta.LR_PER_256 and job.optim.milestones == [0.5, 0.75, 0.875]
            assert job.slowmo.enabled == ("SlowMo" in label) and job.slowmo.tau == 12
            assert job.slowmo.beta == ("auto" if beta == "auto" and job.slowmo.enabled else 0.7)
            assert (job.slowmo.overlap_steps, job.slowmo.fragments) == ((1, 4) if extra else (0, 1))
            assert job.algorithm.name in ("allreduce", "local_sgd", "sgp", "osgp")


def test_equal_time_gives_each_method_ar_sgds_time_in_images(tmp_path):
    """A method k times faster per step trains on k times the images (nearest multiple of the batch x
    50), at most the training set; AR-SGD keeps --samples."""
    args = SimpleNamespace(batch=16, samples=12800, width=0.25, data_root="/d", rates="95mbit", out=tmp_path)
    args.work, args.beta = tmp_path, "paper"
    args.pace = {("2x1", "AR-SGD"): 120.0, ("2x1", "Local SGD"): 40.0, ("2x1", "SGP"): 150.0}
    args.pace |= {("2x1", "Local SGD + SlowMo"): 5.0}
    bench = tta.TimeToAccuracy(args)
    two = ClusterShape(2, 1)
    assert bench.samples(two, "allreduce") == 12800 and bench.samples(two, "localsgd") == 38400
    assert bench.samples(two, "sgp") == 9600  # 10240, to the nearest 1600
    assert bench.samples(two, "localsgd_slowmo") == 49600  # 24x would be 307200: capped
    job_args = bench.overrides(two, "localsgd", tmp_path / "r")
    assert "data.train_subset=38400" in job_args and "train.log_every=24" in job_args  # 1200 steps: eval every 120


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "localsgd,sgp"], "must include allreduce"),
        (["--methods", "allreduce,bogus"], "must include allreduce (the target) and name only"),
        (["--samples", "1000"], "--samples=1000 must be a multiple of 1600"),
        (["--equal-time", "/nonexistent.csv"], "--equal-time=/nonexistent.csv is not a CSV of this script"),
        (["--rate", "fast"], "--rate=fast must be 'auto' or a tc rate such as 95mbit"),
        (["--topologies", "2x1"], "is not a directory"),
    ],
)
def test_bad_arguments_fail_in_one_line(args, message):
    cmd = [sys.executable, "-m", "scripts.time_to_accuracy", "--data-root", "/nonexistent", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("time_to_accuracy: error:") and message in lines[0]


def test_the_report_region_shows_both_tables_their_commands_and_plots(tmp_path):
    from scripts import reproduce
    from scripts.emulated_bench import save_rows
    from scripts.reproduction import time_report

    accs = [10, 20, 30, 35, 40, 42, 44, 46, 47, 48]
    same = _rows("AR-SGD", accs, 300.0) + _rows("Local SGD + SlowMo", accs, 75.0)
    equal = _rows("AR-SGD", accs, 300.0) + _rows("Local SGD + SlowMo (beta auto)", [a + 5 for a in accs], 75.0)
    save_rows(tmp_path, time_report.SAME_IMAGES, same, tta.markdown)
    save_rows(tmp_path, time_report.EQUAL_TIME, equal, tta.markdown)
    text = time_report.render(tmp_path, "img")
    assert "--rate 95mbit" in text and f"--equal-time {tmp_path}/time_to_accuracy.csv --beta auto" in text
    assert tta.markdown(same) in text and tta.markdown(equal) in text
    for stem in (time_report.SAME_IMAGES, time_report.EQUAL_TIME):
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and f"img/{stem}.png" in text
    assert time_report.render(tmp_path / "none", "img") is None
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    args = ["report", "--runs-dir", str(tmp_path / "runs"), "--results", str(results), "--img-dir", str(tmp_path)]
    assert reproduce.main(args) == 0
    assert time_report.BEGIN in results.read_text() and tta.markdown(equal) in results.read_text()


def test_reproduce_names_the_two_runs(capsys, tmp_path):
    from scripts import reproduce

    assert reproduce.main(["time_to_accuracy", "--dry-run", "--img-dir", str(tmp_path)]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "-m scripts.time_to_accuracy" in first and "--rate auto" in first
    assert second.endswith(f"--equal-time {tmp_path}/time_to_accuracy.csv --beta auto")
