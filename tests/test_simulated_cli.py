"""The simulated cluster through the user's entry point: `slowmo-train launcher.simulate=N`.

Its outputs are a real run's (metrics, TensorBoard, checkpoints, summary), a stop signal saves and a
resumed run continues exactly, Hydra sweeps and the report work, and every failure is one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slowmo_train.algorithms.outer_optimizer import auto_beta
from slowmo_train.config_checks import ConfigError, validate
from slowmo_train.scripting import launch_env, read_metrics
from tests.helpers import compose_job, rank_state, report_rows, states_equal

COMMON = [
    "task=cifar10",
    "model.width=0.125",
    "algorithm=sgp",
    "slowmo.enabled=true",
    "slowmo.tau=2",
    "slowmo.beta=0.5",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.log_every=1",
    "train.eval_batch_size=50",
    "train.progress=log",
    "launcher.threads_per_worker=1",
    "checkpoint.every_minutes=0",
]


def _slowmo_train(args: list[str], cwd: Path, faults: str = "") -> subprocess.CompletedProcess:
    env = launch_env()
    env["XDG_CACHE_HOME"] = str(cwd / "cache")
    if faults:
        env["SLOWMO_TRAIN_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", "slowmo_train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_metrics(run_dir) if e["event"] == "train"]


@pytest.mark.slow
def test_simulated_run_outputs_stop_and_exact_resume(tmp_path, torchvision_cifar):
    """Three workers in one process: a straight run, and one stopped by SIGTERM at step 3 then
    resumed: the same losses, parameters and algorithm state on every rank."""
    base = [*COMMON, f"data.root={torchvision_cifar}", "launcher.simulate=3", "launcher.simulate_link_mbit=100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = _slowmo_train([*base, f"output_dir={straight}"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 processes = 3 worker(s)" in done.stdout and "test top1" in done.stdout
    assert "[rank 1]" not in done.stdout  # the console shows rank 0's lines (and warnings)

    stopped = _slowmo_train([*base, f"output_dir={split}"], tmp_path, faults="sigterm@step=3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step" in stopped.stderr  # the step after the signal (pipelined poll)
    resumed = _slowmo_train([*base, f"output_dir={split}", "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert _losses(straight) == _losses(split)
    for rank in range(3):
        a, b = rank_state(straight, 6, rank), rank_state(split, 6, rank)
        for part in ("model", "optimizer", "algorithm"):
            assert states_equal(a[part], b[part]), f"rank {rank}'s {part} differs after the resume"
    # the same files as a real run of three processes
    for rank in range(3):
        assert (straight / "checkpoints" / "step_00000006" / f"rank{rank}.pt").exists()
    assert (straight / "metrics.rank2.jsonl").exists() and (straight / "tensorboard").is_dir()
    assert "[rank 2]" in (straight / "logs" / "rank0.log").read_text()
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["comm_bytes_sent_per_step"] > 0 and summary["comm_messages_sent_per_step"] > 0
    modelled = summary["simulated_cluster"]
    assert modelled["workers"] == 3 and modelled["link_mbit"] == 100
    assert modelled["modelled_ms_per_step"] > modelled["compute_ms_per_step"] > 0


def test_simulated_failures_are_one_line(tmp_path, torchvision_cifar):
    """A rank that fails ends the whole simulated cluster with one line naming it, and no hang."""
    base = [*COMMON, f"data.root={torchvision_cifar}", "launcher.simulate=2"]
    nan = _slowmo_train([*base, f"output_dir={tmp_path / 'nan'}"], tmp_path, faults="nan@step=2,rank=1")
    assert nan.returncode == 1
    errors = [line for line in nan.stderr.splitlines() if line.startswith("slowmo-train: error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "step 2" in errors[0], nan.stderr[-2000:]

    # 200 replicas of a 180M-parameter ResNet-18 (x4) need ~700 GB: refused before they are built
    wide = ["launcher.simulate=200", "train.batch_size=1", "model.width=4", f"output_dir={tmp_path / 'wide'}"]
    huge = _slowmo_train([*base, *wide], tmp_path)
    assert huge.returncode == 1
    errors = [line for line in huge.stderr.splitlines() if line.startswith("slowmo-train: error:")]
    assert len(errors) == 1 and "launcher.simulate=200" in errors[0] and "lower launcher.simulate" in errors[0], errors


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["launcher.simulate=-1"], "launcher.simulate"),
        (["launcher.simulate=4", "launcher.nproc_per_node=2"], "launcher.nproc_per_node"),
        (["launcher.simulate=4", "launcher.max_restarts=1"], "launcher.max_restarts"),
        (["launcher.simulate=4", "algorithm=nag_asgd", "optim=sgd_nesterov"], "launcher.simulate"),
        (["launcher.simulate_link_mbit=-5"], "launcher.simulate_link_mbit"),
    ],
)
def test_simulate_config_errors_name_the_key(overrides, key):
    from slowmo_train.config import to_job_config

    job = to_job_config(compose_job(*overrides))
    with pytest.raises(ConfigError) as err:
        validate(job, world_size=job.launcher.simulate or job.launcher.nproc_per_node, check_paths=False)
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_simulated_hydra_sweep_over_beta_and_the_report(tmp_path, torchvision_cifar):
    """`slowmo-train -m slowmo.beta=0.6,B,auto launcher.simulate=4` (B: auto's value for 4 workers),
    then `slowmo-train-report`: auto trains exactly as its value written out."""
    sweep, auto = tmp_path / "sweep", auto_beta(4)
    betas = [f"{b:g}" for b in sorted({0.6, auto})] + ["auto"]
    args = ["-m", *COMMON, f"data.root={torchvision_cifar}", "launcher.simulate=4", f"slowmo.beta={','.join(betas)}"]
    result = _slowmo_train([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"beta={auto:g} (auto)" in result.stdout + result.stderr
    rows = report_rows(sweep, tmp_path / "rep")
    assert [float(r["slowmo.beta"]) for r in rows[:-1]] == [float(b) for b in betas[:-1]]
    assert rows[-1]["slowmo.beta"] == "auto"
    assert all(r["final"] != "" for r in rows)
    runs = [_losses(sweep / str(i)) for i in range(len(betas))]
    assert runs[-1] == runs[betas.index(f"{auto:g}")]
    assert len(betas) == 2 or runs[0] != runs[1]


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_simulated_checkpoint_resumes_as_real_processes(tmp_path, torchvision_cifar):
    """Stop a simulated run of 2 workers at step 3, finish it with 2 real processes: the same as a
    simulated run that never stopped."""
    base = [*COMMON, f"data.root={torchvision_cifar}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _slowmo_train([*base, "launcher.simulate=2", f"output_dir={straight}"], tmp_path).returncode == 0
    first = _slowmo_train([*base, "launcher.simulate=2", f"output_dir={split}"], tmp_path, faults="sigterm@step=3")
    assert first.returncode == 0, first.stderr[-2000:]
    second = _slowmo_train([*base, "launcher.nproc_per_node=2", f"output_dir={split}", "resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _losses(straight) == _losses(split)
    for rank in range(2):
        a, b = rank_state(straight, 6, rank), rank_state(split, 6, rank)
        assert states_equal(a["model"], b["model"]) and states_equal(a["algorithm"], b["algorithm"]), rank


def test_cluster_time_model_by_hand():
    """The analytic step time (slowmo_train/simulated/cluster.py) on numbers worked out by hand:
    4 workers, P = 1 MB, B = 0, 1 MB/s of payload, 100 ms of compute."""
    from slowmo_train.simulated.cluster import payload_rate, ring, step_ms

    p, rate = 1e6, 1e6
    assert ring(p, 4) == 1.5e6 and ring(p, 1) == 0.0
    assert step_ms("allreduce", None, 4, 100.0, rate, p, 0.0) == pytest.approx(100 / 3 + 1500)
    assert step_ms("local_sgd", None, 4, 100.0, rate, p, 0.0, period=10) == pytest.approx(100 + 150)
    outer = 1.5 * (p + 4) / 1e6 * 1000 / 12  # ring(P + 4) over tau = 12 steps
    assert step_ms("local_sgd", 12, 4, 100.0, rate, p, 0.0) == pytest.approx(100 + outer)
    assert step_ms("sgp", None, 4, 100.0, rate, p, 0.0) == pytest.approx(100 + 1000.004)
    assert step_ms("osgp", None, 4, 2000.0, rate, p, 0.0) == pytest.approx(2000.0)  # the gossip hides
    assert payload_rate(8.0) == pytest.approx(1e6 * 1448 / 1514)


def test_memory_table_script(capsys, monkeypatch):
    from scripts import simulated_memory

    monkeypatch.setattr(sys, "argv", ["simulated_memory.py", "--gib", "24"])
    simulated_memory.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| model | parameters") and len(out) == 2 + len(simulated_memory.ROWS)
    resnet = next(line for line in out if line.startswith("| CIFAR-10 ResNet-18, "))
    assert "11.17 M" in resnet
