"""scripts/bench_allreduce.py end to end on a tiny CIFAR-10 folder: one A/B round of a few steps;
scripts/bench_simulated.py --quick on one too; scripts/bench_streaming.py's plan, expected bytes,
table and goal check (no cluster, no root)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import bench_streaming as bs
from slowmo_train.scripting import launch_env
from tests.conftest import write_image_folder_cifar

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_allreduce.py"
SIMULATED = SCRIPT.with_name("bench_simulated.py")


@pytest.mark.multiproc
@pytest.mark.slow
def test_bench_prints_both_throughputs_and_the_ratio(tmp_path):
    root = write_image_folder_cifar(tmp_path / "cifar", n_train=200, n_test=20)
    env = launch_env()
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data-root",
        str(root),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--width",
        "0.125",
        "--batch-size",
        "8",
        "--warmup",
        "2",
        "--steps",
        "4",
        "--log-every",
        "2",
        "--rounds",
        "1",
        "--timeout",
        "240",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    medians = re.search(r"slowmo-train median ([\d.]+), baseline median ([\d.]+)", out)
    assert medians, out
    assert float(medians.group(1)) > 0 and float(medians.group(2)) > 0
    ratio = re.search(r"ratio slowmo/baseline = ([\d.]+)", out)
    assert ratio and float(ratio.group(1)) > 0, out


@pytest.mark.multiproc
@pytest.mark.slow
def test_bench_simulated_quick_measures_every_mode(tmp_path):
    root = write_image_folder_cifar(tmp_path / "cifar", n_train=200, n_test=20)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(SIMULATED),
        "--quick",
        "--data-root",
        str(root),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--timeout",
        "240",
    ]
    result = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "bench_simulated.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == {"simulated", "real", "one_process"}, rows
    for r in rows:
        assert r["status"] == "ok" and (r["size"], r["algorithm"]) == ("2", "local_sgd"), r
        assert float(r["images_per_s"]) > 0 and float(r["trainer_images_per_s"]) > 0, r
        assert float(r["peak_rss_mb"]) > 0 and float(r["startup_s"]) > 0 and float(r["ratio_vs_one_process"]) > 0, r
    assert {r["mode"]: int(r["processes"]) for r in rows} == {"simulated": 1, "real": 2, "one_process": 1}
    assert "simulated / one process = " in (out / "bench_simulated.md").read_text()


def test_bench_streaming_plan_is_the_issue_matrix():
    plan = bs.build_plan(["local_sgd", "sgp"], quick=False)
    for algorithm, tau in (("local_sgd", 12), ("sgp", 48)):
        mine = [v for v in plan if v.algorithm == algorithm]
        assert mine[0].is_base and not mine[0].repeat and mine[-1].repeat
        variants = {(v.delay, v.fragments, v.dtype) for v in mine if not v.is_base}
        assert variants == {(d, f, t) for d in (0, 1, 2) for f in (1, 4) for t in ("float32", "bfloat16")}
        for v in mine[1:-1]:
            args = v.config().overrides(60)
            assert f"algorithm={algorithm}" in args and f"slowmo.tau={tau}" in args
            assert {
                f"slowmo.overlap_steps={v.delay}",
                f"slowmo.fragments={v.fragments}",
                f"slowmo.outer_dtype={v.dtype}",
            } <= set(args)
            if algorithm == "local_sgd":
                assert args[args.index("slowmo.enabled=true") :].count("algorithm.period=12") == 1
        assert "slowmo.enabled=true" not in mine[0].config().overrides(60)
    tags = [(v.config().tag, v.repeat) for v in plan]
    assert len(tags) == len(set(tags)) == 28
    quick = bs.build_plan(["local_sgd"], quick=True)
    assert len(quick) == 4 and quick[0].is_base and not any(v.repeat for v in quick)
    # bench_speed's own configurations keep their tags and labels (its run directories and tables)
    old = bs.Config("local_sgd", 12)
    assert (old.tag, old.label) == ("local_sgd_12_poll48", "Local SGD + SlowMo(tau=12)")


def test_bench_streaming_rows_bytes_and_goal_check():
    p, b, n = 4_000_000.0, 10_000.0, 2
    base = bs.Measured(100.0, 20.0, 0.0, (p + b) / 12)
    lsgd = {v.name: v for v in bs.build_plan(["local_sgd"], quick=False)}
    sgp = {v.name: v for v in bs.build_plan(["sgp"], quick=False)}
    # expected bytes per step: SlowMo replaces Local SGD's own average (period = tau); bf16 halves P
    assert bs.expected_bytes(lsgd["base"], p, b, n) == (p + b) / 12
    assert bs.expected_bytes(lsgd["D0 F1 fp32"], p, b, n) == (p + 4 + b) / 12
    assert bs.expected_bytes(lsgd["D1 F4 bf16"], p, b, n) == (p / 2 + b) / 12
    assert bs.expected_bytes(sgp["D2 F4 bf16"], p, b, n) == p + 4 + (p / 2 + 4 * 8 + b) / 48
    # a whole-model outer all-reduce supersedes the gossip of the outer iteration's last step
    assert bs.expected_bytes(sgp["D0 F1 fp32"], p, b, n) == pytest.approx((p + 4) * 47 / 48 + (p + 4 + b) / 48)
    assert bs.expected_bytes(sgp["base"], p, b, n) == p + 4
    fast = bs.Measured(
        100.5,
        21.0,
        30.0,
        bs.expected_bytes(lsgd["D1 F1 fp32"], p, b, n),
        {"outer_blocking_ms": 1.0, "outer_overlapped_ms": 2.5},
    )
    slow = bs.Measured(103.0, 25.0, 10.0, bs.expected_bytes(lsgd["D2 F4 fp32"], p, b, n) * 1.02)
    rows = [
        bs.make_row(lsgd["base"], base, base, "95mbit", p, b, n),
        bs.make_row(lsgd["D1 F1 fp32"], fast, base, "95mbit", p, b, n),
        bs.make_row(lsgd["base (repeat)"], bs.Measured(99.0, 20.0, 0.0, (p + b) / 12), base, "95mbit", p, b, n),
    ]
    assert rows[0]["overhead_pct"] == "" and rows[1]["overhead_pct"] == 0.5 and rows[2]["overhead_pct"] == -1.0
    # SlowMo's own blocking / overlapped time per outer iteration: the trainer's outer counters x tau
    assert rows[1]["slowmo_blocking_ms_per_outer"] == 12.0 and rows[1]["slowmo_overlapped_ms_per_outer"] == 30.0
    assert rows[1]["bytes_error_pct"] == 0.0
    assert rows[1]["blocking_overhead_pct"] == 1.0 and rows[2]["blocking_overhead_pct"] == 0.0
    link_bytes_per_s = 95e6 / 8 * 1448 / 1514
    assert rows[1]["outer_link_ms"] == round(1000 * (p + b) / link_bytes_per_s, 1)
    check = bs.goal_check(rows)
    assert "1/1 variants under 1 % overhead" in check and "PASS" in check and "-1.00 % (the noise floor)" in check
    assert "added blocking time: 0/1 under 1 % (worst +1.00 %)" in check
    rows.append(bs.make_row(lsgd["D2 F4 fp32"], slow, base, "95mbit", p, b, n))
    assert rows[-1]["overhead_pct"] == 3.0 and rows[-1]["bytes_error_pct"] == 2.0
    check = bs.goal_check(rows)
    assert "1/2 variants" in check and "FAIL" in check and "worst D2 F4 fp32 +3.00 %" in check
    assert "added blocking time: 0/2 under 1 % (worst +5.00 %)" in check
    table = bs.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[3].startswith("| Local SGD | D1 F1 fp32 | 12 | 100.5 | 0.5 |")


def test_bench_streaming_sharded_plan_and_bytes():
    plan = bs.build_plan(["local_sgd", "sgp"], quick=False, sharded=True)
    for algorithm in ("local_sgd", "sgp"):
        mine = [v for v in plan if v.algorithm == algorithm]
        assert mine[0].is_base and not any(v.repeat for v in mine)
        pairs = {(v.delay, v.fragments, v.sharded) for v in mine[1:]}
        assert pairs == {(d, f, s) for d, f in bs.SHARDED_VARIANTS for s in (False, True)}
        assert all(v.dtype == "float32" for v in mine[1:])
        for v in mine[1:]:
            assert ("slowmo.sharded=true" in v.config().overrides(60)) == v.sharded
    assert len({v.config().tag for v in plan}) == len(plan)  # distinct run directories
    p, b, n = 4_000_000.0, 10_000.0, 2
    lsgd = {v.name: v for v in plan if v.algorithm == "local_sgd"}
    # the all-gather of the new x0 adds (n-1)/n P per outer iteration, on either code path
    for name in ("D0 F1 fp32", "D2 F4 fp32"):
        extra = bs.expected_bytes(lsgd[f"{name} sharded"], p, b, n) - bs.expected_bytes(lsgd[name], p, b, n)
        assert extra == pytest.approx((n - 1) / n * p / 12)
