"""scripts/bench_allreduce.py end to end on a tiny CIFAR-10 folder: one A/B round of a few steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_image_folder_cifar

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_allreduce.py"


def test_bench_prints_both_throughputs_and_the_ratio(tmp_path):
    root = write_image_folder_cifar(tmp_path / "cifar", n_train=200, n_test=20)
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(SCRIPT), "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
           "--width", "0.125", "--batch-size", "8", "--warmup", "2", "--steps", "4", "--log-every", "2",
           "--rounds", "1", "--timeout", "240"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    medians = re.search(r"slowmo-train median ([\d.]+), baseline median ([\d.]+)", out)
    assert medians, out
    assert float(medians.group(1)) > 0 and float(medians.group(2)) > 0
    ratio = re.search(r"ratio slowmo/baseline = ([\d.]+)", out)
    assert ratio and float(ratio.group(1)) > 0, out
