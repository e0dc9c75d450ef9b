"""Fault drill: inject each failure slowmo-train handles into a real CIFAR-10 run and tabulate what
the run did, the steps lost and the time from the fault to the resumed run.

    python scripts/fault_drill.py --data-root /path/to/cifar10                 # every fault, ~20 min on 2 cores
    python scripts/fault_drill.py --data-root /path/to/cifar10 --only kill,sigterm

Every run: 2 local workers (the built-in launcher), ResNet-18 width 0.25, batch 64 per worker, 40
steps, a checkpoint every 10 steps, one thread per worker. Faults are injected with
``SLOWMO_TRAIN_FAULTS`` (slowmo_train/faults.py) or with real signals sent to the launcher. Where
the run stops instead of recovering on its own, the drill relaunches it at once with ``resume=auto``
(what a requeue or the user does) and measures until that run logs "resumed from".

Steps lost = the steps that were trained and must be trained again (the fault's step minus the
step of the checkpoint the run resumed from). Times come from the per-rank logs (1 s resolution).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slowmo_train.scripting import launch_env, markdown_table, read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 10


def base_args(data_root: Path, run_dir: Path) -> list[str]:
    return [
        "task=cifar10",
        f"data.root={data_root}",
        "launcher.nproc_per_node=2",
        "model.width=0.25",
        "launcher.threads_per_worker=1",
        "train.batch_size=64",
        f"train.max_steps={STEPS}",
        "train.log_every=5",
        "train.eval_every_epochs=1000",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.every_minutes=0",
        "train.progress=log",
        f"output_dir={run_dir}",
    ]


def launch(args: list[str], log: Path, faults: str | None = None) -> subprocess.Popen:
    env = launch_env(drop=["SLOWMO_TRAIN_FAULTS"])
    if faults:
        env["SLOWMO_TRAIN_FAULTS"] = faults
    out = open(log, "a")
    return subprocess.Popen(
        [sys.executable, "-m", "slowmo_train", *args],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )


def log_time(run_dir: Path, pattern: str, rank: int | None = None, last: bool = False) -> float | None:
    """Wall time (today, seconds since the epoch) of the first (or last) log line matching ``pattern``."""
    files = [run_dir / "logs" / f"rank{rank}.log"] if rank is not None else sorted((run_dir / "logs").glob("rank*.log"))
    hits = []
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            if re.search(pattern, line):
                hits.append(line[:8])
    if not hits:
        return None
    stamp = hits[-1] if last else hits[0]
    today = dt.date.today()
    return dt.datetime.combine(today, dt.time.fromisoformat(stamp)).timestamp()


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in read_metrics(path, "train") if "loss" in e]


def resumed_step(run_dir: Path) -> int | None:
    hits = []
    for f in sorted((run_dir / "logs").glob("rank0.log")):
        hits += re.findall(r"resumed from \S+ at step (\d+)", f.read_text())
    return int(hits[-1]) if hits else None


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("slowmo-train:")]
    return lines[-1] if lines else ""


def wait_for_step(run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in train_steps(run_dir)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} never reached step {step}")


def relaunch_and_time(args: list[str], run_dir: Path, log: Path, since: float) -> tuple[float, int | None, int]:
    """Relaunch with resume=auto right away; (seconds from ``since`` to "resumed from", resumed step, rc)."""
    proc = launch(args + ["resume=auto"], log)
    rc = proc.wait(timeout=1800)
    t = log_time(run_dir, r"resumed from", rank=0, last=True)
    return (t - since if t else float("nan")), resumed_step(run_dir), rc


def scenario(name: str, data_root: Path, work: Path) -> dict:
    run_dir = work / name
    log = work / f"{name}.log"
    args = base_args(data_root, run_dir)
    row: dict = {"fault": name}
    if name in ("kill", "kill_in_save", "hang"):
        faults = {
            "kill": "kill@step=25,rank=1",
            "kill_in_save": "kill_in_save@step=20,rank=1",
            "hang": "hang@step=25,rank=1,seconds=600",
        }[name]
        extra = ["launcher.max_restarts=1"] + (["launcher.timeout_s=20"] if name == "hang" else [])
        proc = launch(args + extra, log, faults)
        rc = proc.wait(timeout=1800)
        pattern = {"kill": r"SIGKILL at step", "kill_in_save": r"SIGKILL while saving", "hang": r"sleeping"}[name]
        t_fault = log_time(run_dir, pattern, rank=1)
        t_resumed = log_time(run_dir, r"resumed from", rank=0)
        fault_step = 20 if name == "kill_in_save" else 25
        row.update(
            rc=rc,
            resumed_from=resumed_step(run_dir),
            fault_step=fault_step,
            seconds=(t_resumed - t_fault) if t_fault and t_resumed else float("nan"),
            final_step=json.loads((run_dir / "summary.json").read_text())["steps"] if rc == 0 else None,
            line=last_line(log),
        )
    elif name in ("sigterm_launcher", "ctrl_c"):
        proc = launch(args, log)
        wait_for_step(run_dir, 25)
        t_fault = time.time()
        if name == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=600)
        line = last_line(log)
        m = re.search(r"at step (\d+)", line)
        stop_step = int(m.group(1)) if m else None
        seconds, resumed, rc2 = relaunch_and_time(args, run_dir, log, t_fault)
        row.update(
            rc=rc,
            fault_step=stop_step,
            resumed_from=resumed,
            seconds=seconds,
            line=line,
            final_step=json.loads((run_dir / "summary.json").read_text())["steps"] if rc2 == 0 else None,
        )
    elif name in ("sigterm_one_rank", "nan_stop", "disk_full"):
        faults = {
            "sigterm_one_rank": "sigterm@step=25,rank=1",
            "nan_stop": "nan@step=23,rank=1",
            "disk_full": "disk_full@step=30,rank=1",
        }[name]
        proc = launch(args, log, faults)
        rc = proc.wait(timeout=1800)
        pattern = {
            "sigterm_one_rank": r"received SIGTERM",
            "nan_stop": r"NaN loss at step",
            "disk_full": r"checkpoint of step 30 not written",
        }[name]
        t_fault = log_time(run_dir, pattern, rank=1)
        line = last_line(log)
        fault_step = {"sigterm_one_rank": 25, "nan_stop": 25, "disk_full": 30}[name]  # stop/detection step
        seconds, resumed, rc2 = relaunch_and_time(args, run_dir, log, t_fault or time.time())
        row.update(
            rc=rc,
            fault_step=fault_step,
            resumed_from=resumed,
            seconds=seconds,
            line=line,
            final_step=json.loads((run_dir / "summary.json").read_text())["steps"] if rc2 == 0 else None,
        )
    elif name == "nan_stop_restarts":
        # a failure that a restart cannot fix: the launcher must not retry it (RUN_DIR/FATAL)
        start = time.time()
        proc = launch(args + ["launcher.max_restarts=3"], log, "nan@step=23,rank=1")
        rc = proc.wait(timeout=1800)
        attempts = len(set(re.findall(r"launch attempt (\d+)", (run_dir / "logs" / "rank0.log").read_text())))
        row.update(
            rc=rc,
            fault_step=25,
            resumed_from=None,
            seconds=round(time.time() - start, 1),
            final_step=None,
            attempts=attempts,
            line=last_line(log),
        )
    elif name == "nan_skip":
        proc = launch(args + ["train.nonfinite=skip"], log, "nan@step=23,rank=1")
        rc = proc.wait(timeout=1800)
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(
            rc=rc,
            fault_step=23,
            resumed_from=None,
            seconds=0.0,
            final_step=summary["steps"],
            skips=summary["nonfinite_skips"],
            line=last_line(log),
        )
    elif name == "corrupt_checkpoint":
        proc = launch(args + ["train.max_steps=10"], log)
        proc.wait(timeout=1800)
        rank1 = run_dir / "checkpoints" / "step_00000010" / "rank1.pt"
        data = bytearray(rank1.read_bytes())
        data[len(data) // 2] ^= 0xFF
        rank1.write_bytes(bytes(data))
        proc = launch(args + ["resume=auto"], log)
        rc = proc.wait(timeout=1800)
        row.update(rc=rc, fault_step=None, resumed_from=None, seconds=None, final_step=None, line=last_line(log))
    elif name == "unwritable_dir":
        blocker = work / "a_file"
        blocker.write_text("x")
        proc = launch(base_args(data_root, blocker / "run"), log)
        rc = proc.wait(timeout=600)
        row.update(rc=rc, fault_step=None, resumed_from=None, seconds=None, final_step=None, line=last_line(log))
    return row


SCENARIOS = [
    "kill",
    "kill_in_save",
    "hang",
    "sigterm_launcher",
    "sigterm_one_rank",
    "ctrl_c",
    "nan_stop",
    "nan_stop_restarts",
    "nan_skip",
    "disk_full",
    "corrupt_checkpoint",
    "unwritable_dir",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True, help="CIFAR-10 (either layout)")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    p.add_argument("--work", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        start = time.monotonic()
        row = scenario(name, args.data_root.resolve(), work)
        row["drill_s"] = round(time.monotonic() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    table = []
    for r in rows:
        lost = (r["fault_step"] - r["resumed_from"]) if r.get("resumed_from") is not None and r.get("fault_step") else 0
        secs = f"{r['seconds']:.0f}" if isinstance(r.get("seconds"), float) and r["seconds"] == r["seconds"] else "-"
        done = f"finished at step {r['final_step']}" if r.get("final_step") else ""
        if "attempts" in r:
            done = f"(launch attempts: {r['attempts']}, in {r['seconds']:.0f} s)"
        table.append([r["fault"], r["rc"], f"{r['line'][:160]} {done}", lost, secs])
    print("\n" + markdown_table(["fault", "exit", "what the run did", "steps lost", "fault -> resumed (s)"], table))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
