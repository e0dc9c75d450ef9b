"""The emulated cluster (scripts/emulated_cluster.sh): a real 2-node x 2-process torchrun job across
two network namespaces joined by a rate-limited bridge, with the node hierarchy on (gradients
all-reduced inside a node, node leaders gossip), and the clean-up of every namespace it made.

    python -m pytest -q tests/test_emulated_cluster.py

Skipped, with the reason, only where network namespaces cannot be created (not root, no iproute2,
a sandbox without CAP_NET_ADMIN).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slowmo_train.scripting import launch_env, read_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "emulated_cluster.sh"
# a prefix, subnet and port of its own, so the test can run next to a benchmark on the default ones
PREFIX, SUBNET, PORT = "smtt", "10.77.1", "29531"


def _namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = _namespaces_unavailable()
if REASON:
    print(f"test_emulated_cluster: skipped: {REASON}", file=sys.stderr)
pytestmark = [pytest.mark.multiproc, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-")]


def _cluster(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = launch_env()
    env["XDG_CACHE_HOME"] = str(Path(env.get("PYTEST_TMP", "/tmp")) / "slowmo-test-cache")
    cmd = [
        "bash",
        str(SCRIPT),
        "--prefix",
        PREFIX,
        "--subnet",
        SUBNET,
        "--port",
        PORT,
        "--python",
        sys.executable,
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_nodes_two_processes_with_hierarchy(tmp_path, folder_cifar):
    run_dir = tmp_path / "run"
    result = _cluster(
        "--nodes",
        "2",
        "--nproc",
        "2",
        "--rate",
        "200mbit",
        "--",
        "task=cifar10",
        "model.width=0.125",
        "train.batch_size=16",
        "train.max_steps=6",
        "train.log_every=2",
        "train.eval_batch_size=50",
        "train.progress=log",
        "launcher.threads_per_worker=1",
        "algorithm=sgp",
        "slowmo.enabled=true",
        "slowmo.tau=3",
        f"data.root={folder_cifar}",
        f"output_dir={run_dir}",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "emulated_cluster: all 2 node(s) finished" in out
    # both nodes' torchrun printed through the prefixing filter
    assert "[node 0]" in out and "[node 1]" in out
    # the hierarchy the trainer chose: 4 processes = 2 gossip workers of 2 processes each
    assert "4 processes = 2 worker(s) x 2 per node" in out, out[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_eval"]["split"] == "test"
    for rank in range(4):
        assert (run_dir / "logs" / f"rank{rank}.log").exists()

    # node leaders (ranks 0, 2) gossip across the link; their node mates only receive the leader's copy
    def last_train(rank: int) -> dict:
        return [e for e in read_metrics(run_dir, "train", rank=rank) if "loss" in e][-1]

    leader, mate = last_train(0), last_train(1)
    assert leader["comm_bytes_sent_per_step"] > 0
    assert mate["comm_bytes_sent_per_step"] < leader["comm_bytes_sent_per_step"]
    assert _our_namespaces() == []


def test_failure_is_reported_and_everything_removed(tmp_path, folder_cifar):
    result = _cluster("--nodes", "2", "--", "task=cifar10", "slowmo.beta=1.5", f"data.root={folder_cifar}", timeout=120)
    assert result.returncode != 0
    assert "slowmo.beta=1.5 is invalid" in result.stdout + result.stderr
    assert "emulated_cluster: FAILED" in result.stderr
    assert _our_namespaces() == []


def test_cleanup_removes_leftovers_of_an_interrupted_run():
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-n7"], check=True)
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-sw"], check=True)
    result = _cluster("--cleanup", timeout=60)
    assert result.returncode == 0, result.stderr
    assert _our_namespaces() == []


def test_bad_option_is_one_clear_line():
    result = _cluster("--nodes", "zero", "--", "task=cifar10", timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "emulated_cluster: error: --nodes=zero must be an integer in [1, 200]"
    ]
