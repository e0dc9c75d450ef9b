"""Slurm launches without Slurm: what the sbatch example and the submitit launcher config would run.

    python -m pytest -q tests/test_slurm.py

1. ``scripts/slurm/slowmo_train.sbatch`` runs under bash with fake ``srun`` / ``scontrol`` / python
   on PATH (the fake srun starts the command once per node with that node's SLURM_NODEID, as Slurm
   does): the torchrun command every node gets, and the requeue + SIGTERM path on USR1.
2. ``configs/hydra/launcher/slowmo_slurm.yaml`` composed by Hydra and handed to the
   hydra-submitit-launcher plugin: submitit's executor parameters and the sbatch file it renders.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "slowmo_train.sbatch"

FAKE_SRUN = """#!/bin/bash
# fake srun: record the options, start the command once per node (SLURM_NODEID set), forward SIGTERM
while [[ "$1" == --* ]]; do echo "$1" >> "$FAKE_LOG/srun.opts"; shift; done
pids=()
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do SLURM_NODEID=$n "$@" & pids+=($!); done
trap 'echo TERM >> "$FAKE_LOG/srun.signals"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
  while true; do wait "$pid"; s=$?; kill -0 "$pid" 2>/dev/null || break; done
  ((s != 0)) && status=$s
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-%s\\n' 17 18 19; fi
"""
# the "python" each node runs: records its arguments, then optionally waits to be terminated
FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/node$SLURM_NODEID.args"
if [[ -n "${FAKE_SLEEP:-}" ]]; then
  trap 'echo "node$SLURM_NODEID got TERM" >> "$FAKE_LOG/python.signals"; exit 0' TERM
  touch "$FAKE_LOG/node$SLURM_NODEID.started"
  for ((i = 0; i < 300; i++)); do sleep 0.1; done
fi
"""


def _fake_bin(tmp_path: Path) -> tuple[dict, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("fakepython", FAKE_PYTHON)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "PYTHON": str(bin_dir / "fakepython"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "slowmo-train",
        "SLURM_JOB_NODELIST": "gpu-node-[17-19]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_NNODES": "3",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_RESTART_COUNT": "1",
    }
    return env, log


def test_sbatch_runs_torchrun_on_every_node_with_rendezvous_on_the_first(tmp_path):
    env, log = _fake_bin(tmp_path)
    result = subprocess.run(
        ["bash", str(SBATCH), "+exp=cifar10_sgp_slowmo", "slowmo.beta=0.6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives and "#SBATCH --signal=B:USR1@120" in directives
    assert "--kill-on-bad-exit=1" in (log / "srun.opts").read_text().split()
    for node in range(3):
        args = (log / f"node{node}.args").read_text().splitlines()
        assert args == [
            "-m",
            "torch.distributed.run",
            "--nnodes=3",
            "--nproc_per_node=8",
            f"--node_rank={node}",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=gpu-node-17:29500",
            "--rdzv_id=4242",
            "--max_restarts=0",
            "-m",
            "slowmo_train",
            "output_dir=runs/slowmo-train-4242",
            "resume=auto",
            "+exp=cifar10_sgp_slowmo",
            "slowmo.beta=0.6",
        ], args
    assert (tmp_path / "runs" / "slowmo-train-4242").is_dir()
    assert "3 node(s) x 8" in result.stdout and "restart 1" in result.stdout


def test_sbatch_usr1_requeues_and_terminates_the_workers(tmp_path):
    env, log = _fake_bin(tmp_path)
    env.update(FAKE_SLEEP="1", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", NPROC_PER_NODE="2")
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "task=cifar10"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 30
    while not all((log / f"node{n}.started").exists() for n in range(2)):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@120 delivers to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "requeue 4242" in (log / "scontrol.calls").read_text().splitlines()
    assert sorted((log / "python.signals").read_text().split("\n")[:-1]) == ["node0 got TERM", "node1 got TERM"]
    assert "--nproc_per_node=2" in (log / "node1.args").read_text().splitlines()


def test_sbatch_outside_slurm_is_one_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "run this script with sbatch" in result.stderr


def test_submitit_launcher_config_renders_the_slurm_array(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'slowmo-train[slurm]'")
    import submitit
    from hydra.utils import instantiate

    from slowmo_train.scripting import compose_config

    env, _ = _fake_bin(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])  # submitit looks for srun before it renders anything
    sweep_dir = tmp_path / "multirun" / "beta"
    cfg = compose_config(
        return_hydra_config=True,
        overrides=[
            "hydra/launcher=slowmo_slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=8",
            f"hydra.sweep.dir={sweep_dir}",
            "hydra.job.name=sweep",
            "+exp=cifar10_localsgd_slowmo",
        ],
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    captured = {}

    class _Job:
        def results(self):
            return [None]

    def fake_map_array(executor, fn, *iterables):
        # what submitit would write and pass to sbatch for this array (nothing is submitted)
        slurm = executor._executor
        slurm.parameters["map_count"] = len(iterables[0])
        captured["params"] = dict(executor._executor.parameters)
        captured["sbatch"] = slurm._make_submission_file_text(slurm._submitit_command_str, "test")
        captured["max_num_timeout"] = slurm.max_num_timeout
        captured["overrides"] = list(iterables[0])
        captured["fn"] = fn
        return [_Job() for _ in iterables[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    overrides = [["slowmo.beta=0.4"], ["slowmo.beta=0.6"], ["slowmo.beta=0.8"]]
    launcher.launch(overrides, initial_job_idx=0)

    assert captured["overrides"] == overrides
    assert captured["max_num_timeout"] == 3
    assert captured["fn"] is launcher and hasattr(launcher, "checkpoint")  # requeue resubmits the job
    params = captured["params"]
    assert params["nodes"] == 1 and params["ntasks_per_node"] == 1 and params["gpus_per_node"] == 8
    assert params["partition"] == "gpu" and params["time"] == 240 and params["signal_delay_s"] == 120
    sbatch = captured["sbatch"].splitlines()
    for line in (
        "#SBATCH --array=0-2%3",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=240",
        "#SBATCH --job-name=sweep",
    ):
        assert line in sbatch, captured["sbatch"]
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in sbatch)
    assert str(sweep_dir / ".submitit") in captured["sbatch"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"GLOO_SOCKET_IFNAME": "", "NCCL_SOCKET_IFNAME": ""}),
        ({"SOCKET_IFNAME": "ib0"}, {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}),
        (
            {"SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "mlx5_0"},
            {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "mlx5_0"},
        ),
        ({"GLOO_SOCKET_IFNAME": "eno1"}, {"GLOO_SOCKET_IFNAME": "eno1", "NCCL_SOCKET_IFNAME": ""}),
    ],
)
def test_sbatch_passes_the_network_interfaces_to_every_node(tmp_path, given, expected):
    """SOCKET_IFNAME sets both GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME; each may be set on its own."""
    env, log = _fake_bin(tmp_path)
    recorder = tmp_path / "bin" / "envpython"
    recorder.write_text(
        '#!/bin/bash\necho "${GLOO_SOCKET_IFNAME:-} ${NCCL_SOCKET_IFNAME:-}" > "$FAKE_LOG/node$SLURM_NODEID.if"\n'
    )
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    env.update(PYTHON=str(recorder), **given)
    result = subprocess.run(
        ["bash", str(SBATCH), "task=cifar10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for node in range(3):
        gloo, _, nccl = (log / f"node{node}.if").read_text().rstrip("\n").partition(" ")
        assert {"GLOO_SOCKET_IFNAME": gloo, "NCCL_SOCKET_IFNAME": nccl} == expected
    gloo, nccl = (expected[k] or "auto" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"))
    assert f"interfaces gloo {gloo} nccl {nccl}" in result.stdout
