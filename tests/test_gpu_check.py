"""scripts/gpu_check.py, the GPU acceptance check, on CPU: the rows that make sense without CUDA run
(gloo, tiny synthetic data), the GPU-only rows say they were skipped, a failing row makes it exit 1.

    .venv/bin/python -m pytest -q tests/test_gpu_check.py            # a small selection (~1 min)
    .venv/bin/python -m pytest -q -m slow tests/test_gpu_check.py    # the whole CPU path, the speed rows tiny
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _gpu_check(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _module():
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _rows(table: str) -> dict[str, str]:
    """check name -> the rest of its line, from the printed table."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check ") and "result" in line)
    rows = {}
    for line in lines[start + 1 :]:
        if not line or " rows ok or skipped" in line:
            break
        name, _, rest = line.partition(" ")
        rows[name] = rest.strip()
    return rows


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gpu_check")
    result = _gpu_check(
        "--only",
        "exp:cifar10_allreduce,resume:cifar10_sgp_slowmo,speed:resnet50-fp32",
        "--jobs",
        "2",
        "--out",
        str(cwd / "table.json"),
        cwd=cwd,
    )
    return result, cwd


def test_cpu_selection_runs_skips_gpu_rows_and_exits_0(cpu_run):
    result, cwd = cpu_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA device, gloo on CPU" in result.stdout
    rows = _rows(result.stdout)
    assert list(rows) == ["exp:cifar10_allreduce", "resume:cifar10_sgp_slowmo", "speed:resnet50-fp32"]
    assert rows["exp:cifar10_allreduce"].startswith("ok") and "top1 " in rows["exp:cifar10_allreduce"]
    assert rows["resume:cifar10_sgp_slowmo"].startswith("ok") and "4 -> 8 steps" in rows["resume:cifar10_sgp_slowmo"]
    assert rows["speed:resnet50-fp32"].startswith("skipped: no CUDA device")
    assert "3 of 3 rows ok or skipped, 0 failed" in result.stdout
    table = json.loads((cwd / "table.json").read_text())
    assert [r["result"].split(":")[0] for r in table["rows"]] == ["ok", "ok", "skipped"]
    assert all(r["seconds"] >= 0 for r in table["rows"])
    assert "kept in" not in result.stderr  # nothing failed: the temporary runs are gone


def test_a_failing_row_shows_its_error_line_and_exits_1(tmp_path):
    """A bad override breaks a real experiment (slowmo-train's one-line error), an unknown experiment
    fails in Hydra; the table is also written as markdown and the runs are kept for a look."""
    result = _gpu_check(
        "--only",
        "exp:cifar10_allreduce,exp:no_such_experiment",
        "--override",
        "train.precision=fp64",
        "--jobs",
        "2",
        "--out",
        str(tmp_path / "table.md"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _rows(result.stdout)
    assert rows["exp:cifar10_allreduce"].startswith("FAIL: slowmo-train: error: train.precision='fp64'"), rows
    assert rows["exp:no_such_experiment"].startswith(
        "FAIL: exit code 1: In 'config': Could not find 'exp/no_such_experiment'"
    ), rows
    assert "0 of 2 rows ok or skipped, 2 failed" in result.stdout
    markdown = (tmp_path / "table.md").read_text()
    assert "| check | result | figure | seconds |" in markdown and "| exp:cifar10_allreduce | FAIL: " in markdown
    kept = Path(result.stderr.split("runs and logs kept in ")[1].split()[0])
    assert (kept / "exp_cifar10_allreduce.out").exists()


def test_row_selection_and_list(capsys, monkeypatch):
    gpu_check = _module()
    names = [c.name for c in gpu_check.all_checks()]
    assert len([n for n in names if n.startswith("exp:")]) == 24 and len(set(names)) == len(names)
    assert {
        "resume:cifar10_sgp_slowmo",
        "restart:cifar10_osgp_slowmo",
        "bf16:imagenet_sgp_slowmo",
        "fp16:cifar10_localsgd_slowmo",
        "speed:resnet50-bf16-channels_last",
        "speed:resnet18-simulated",
    } <= set(names)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--quick", "--list"])
    assert gpu_check.main() == 0
    quick = capsys.readouterr().out.split()
    assert len([n for n in quick if n.startswith("exp:")]) == 3 and "restart:cifar10_osgp_slowmo" in quick
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--only", "nothing*"])
    assert gpu_check.main() == 2


def test_error_line_prefers_slowmo_trains_own_line():
    error_line = _module().error_line
    out = "12:00:00 [rank 0] INFO run directory: x\nslowmo-train: error: data.root='/x' has no train/\nmore\n"
    assert error_line(1, out, 300) == "slowmo-train: error: data.root='/x' has no train/"
    trace = "Traceback (most recent call last):\n  File 'x', line 1\nRuntimeError: CUDA error: out of memory\n"
    assert error_line(1, trace, 300) == "exit code 1: RuntimeError: CUDA error: out of memory"
    assert error_line(None, "anything", 300) == "timed out after 300s"


@pytest.mark.slow
def test_whole_cpu_path(tmp_path):
    """Every row: 24 smokes, 2 resumes, the restart after SIGKILL, bf16 and fp16 with gloo; speed skipped."""
    result = _gpu_check(cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    rows = _rows(result.stdout)
    assert len(rows) == 37
    assert all(r.startswith("ok") for n, r in rows.items() if not n.startswith("speed:")), rows
    assert all(r.startswith("skipped: no CUDA device") for n, r in rows.items() if n.startswith("speed:")), rows


@pytest.mark.slow
def test_speed_rows_on_cpu_tiny(tmp_path):
    """The speed rows' two workers (the plain loop and slowmo-train's CLI with the batches swapped) at a
    tiny size; CPU figures mean nothing, so any ratio passes."""
    result = _gpu_check(
        "--only",
        "speed:resnet50-bf16-channels_last,speed:transformer_base-fp32",
        "--speed-on-cpu",
        "--image-size",
        "32",
        "--image-batch",
        "2",
        "--tokens",
        "256",
        "--vocab",
        "1000",
        "--speed-steps",
        "2",
        "--min-ratio",
        "0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _rows(result.stdout)
    assert " img/s plain = " in rows["speed:resnet50-bf16-channels_last"]
    assert " tok/s plain = " in rows["speed:transformer_base-fp32"]
