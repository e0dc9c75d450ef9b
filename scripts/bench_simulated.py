"""Throughput of the simulated cluster (``launcher.simulate=N``: one process plays N workers, the
ranks taking turns on all of its threads) against N real gloo processes and against one process
training the same total batch, on this machine's CPUs.

    .venv/bin/python scripts/bench_simulated.py --data-root ../shared/data/cifar10 --out /path/to/out
    .venv/bin/python scripts/bench_simulated.py --data-root ../shared/data/cifar10 --quick --out /path/to/out

Per size N (``--sizes``, default 8, 16, 32) and algorithm (``--algorithms``: Local SGD, AR-SGD, SGP)
three modes (``--modes``) train ResNet-18 x ``--width`` (0.125) on real CIFAR-10, ``--batch`` (32)
images per worker, ``--warmup`` + ``--steps`` steps, no evaluation or checkpoint (the run is stopped
once its last measured train line is written):

- simulated    ``launcher.simulate=N`` (one process; torch uses all of its threads);
- real         ``launcher.nproc_per_node=N launcher.threads_per_worker=1`` (N gloo processes); skipped,
               with a printed reason, when N x the memory of one worker would not fit in
               ``MEMORY_SHARE`` of MemAvailable (REAL_MB_PER_PROCESS per worker, or the PSS per
               worker a real run measured if more: 16 real processes of this model took ~7 GB);
- one_process  ``algorithm=allreduce launcher.nproc_per_node=1 train.batch_size=<batch x N>``: the same
               images per step in one process, the compute limit of this machine.

Per run: images/s over the steady steps (the wall-clock stamps of the train lines at steps ``--warmup``
and ``--warmup + --steps``: the first logged interval(s) are warm-up), the trainer's own figure over the
same steps (its ``samples_per_s``, which leaves the logging out), start-up seconds (launch until step 1
ended: the first train line's stamp less the other steps of its interval at the steady pace, or at that
interval's own mean pace if the steady one was slower), peak memory from /proc, sampled every 0.25 s
while the run goes, of the process itself or summed over the N worker processes of a real run (the
launcher left out): resident (VmHWM, each process's own peak; pages shared between processes, such as
torch's libraries, count in every one) and proportional (the largest sum of Pss seen: shared pages split
among their users, so what N processes really take), and the ratio to the one-process run of the same
block. Timings on a shared machine move 10-20 % between runs, so each (N, algorithm) block runs its
modes back to back, the order reversed every other block, and the ratios pair runs of one block. The
one-process run is AR-SGD whatever the block's algorithm (one worker has nothing to average); its rows
carry the block's algorithm so that they pair.

``--warmup`` is 8: one process's batches of 64+ images ran ~10x slower in their first 5-10 steps here.

Goal: simulated within 1.3x of one process training the same total batch (ratio >= 1/1.3 = 0.77).
Results: ``<out>/bench_simulated.csv``, ``.md`` and ``.png`` (matplotlib, if installed).
Exit status 2 if a run failed.
"""

from __future__ import annotations

import argparse
import csv
import math
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

ROOT = Path(__file__).resolve().parents[1]
MODES = ("simulated", "real", "one_process")
ALGORITHMS = {"local_sgd": "Local SGD", "allreduce": "AR-SGD", "sgp": "SGP"}
GOAL = 1 / 1.3  # simulated / one process
#: memory (PSS) of one real worker of ResNet-18 x 0.125 (16 processes took ~7 GB on a 2-core machine)
REAL_MB_PER_PROCESS = 450.0
#: of MemAvailable, what the real processes may take
MEMORY_SHARE = 0.8
FIELDS = (
    "size algorithm mode images_per_s trainer_images_per_s ratio_vs_one_process startup_s peak_rss_mb peak_pss_mb "
    "processes threads wall_s status"
).split()


class RunFailed(RuntimeError):
    pass


# --- memory from /proc -------------------------------------------------------------------------------
def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (the run's launcher and everything it started)."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:  # /proc/PID/stat: pid (comm) state ppid pgrp ...
            if int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(name))
        except OSError:
            pass  # gone meanwhile
    return pids


def proc_kb(path: str, key: str) -> int:
    """The ``key:`` line of a /proc file in kB (VmHWM in /proc/PID/status: the process's peak resident
    set; Pss in /proc/PID/smaps_rollup: its resident pages, shared ones split among their users;
    MemAvailable in /proc/meminfo); 0 once the process is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- one run -------------------------------------------------------------------------------------------
def overrides(mode: str, size: int, algorithm: str, args, run_dir: Path) -> list[str]:
    common = [f"data.root={args.data_root}", f"model.width={args.width}", f"output_dir={run_dir}"]
    # an interval after the window: a simulated run's last line waits for other ranks' final evaluation
    common += [f"train.max_steps={args.warmup + args.steps + args.log_every}", f"train.log_every={args.log_every}"]
    common += (
        "task=cifar10 data.download=false train.eval_every_epochs=1000000 train.progress=log seed=0 "
        "checkpoint.every_minutes=0 checkpoint.at_end=false launcher.backend=gloo"
    ).split()
    if args.cache_dir:
        common.append(f"data.cache_dir={args.cache_dir}")
    worker = [f"algorithm={algorithm}", f"train.batch_size={args.batch}"]
    return (
        common
        + {
            "simulated": [*worker, f"launcher.simulate={size}"],
            "real": [*worker, f"launcher.nproc_per_node={size}", "launcher.threads_per_worker=1"],
            "one_process": [
                "algorithm=allreduce",
                f"train.batch_size={args.batch * size}",
                "launcher.nproc_per_node=1",
            ],
        }[mode]
    )


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen) -> None:
    """End the process group this script started for ``proc`` (the run and its workers) at once:
    nothing after the last measured train line is needed (SIGTERM would save a checkpoint and evaluate)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _train_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [e for e in read_metrics(path, "train") if "samples_per_s" in e] if path.exists() else []


def worker_pids(run_dir: Path, log: Path) -> set[int]:
    """The workers' process ids, from their own lines ("rank R: process PID, ...")."""
    text = "".join(p.read_text(errors="replace") for p in [log, *sorted((run_dir / "logs").glob("*.log"))])
    return {int(p) for p in re.findall(r"rank \d+: process (\d+)", text)}


def run_once(mode: str, size: int, algorithm: str, args, work: Path) -> dict:
    tag = f"{mode}_{algorithm}_{size}"
    run_dir, log = work / tag, work / f"{tag}.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    total = args.warmup + args.steps
    cmd = [sys.executable, "-m", "slowmo_train", *overrides(mode, size, algorithm, args, run_dir)]
    env = launch_env(TMPDIR=str(work))  # torch elastic's and multiprocessing's temporary files
    peaks: dict[int, int] = {}  # pid -> VmHWM
    pss: list[dict[int, int]] = []  # per sample: pid -> Pss
    with open(log, "w") as out:
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                pids = group_pids(proc.pid)
                for pid in pids:
                    peaks[pid] = max(peaks.get(pid, 0), proc_kb(f"/proc/{pid}/status", "VmHWM"))
                pss.append({pid: proc_kb(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids})
                events = _train_events(run_dir)
                if events and events[-1]["step"] >= total:
                    break  # measured; what follows is not training
                if proc.poll() is not None:
                    raise RunFailed(f"exited with code {proc.returncode} before step {total}:\n" + _tail(log))
                if time.time() - launched > args.timeout:
                    raise RunFailed(f"did not reach step {total} in {args.timeout:.0f} s:\n" + _tail(log))
                time.sleep(0.25)
        finally:
            wall = time.time() - launched
            _kill_group(proc)
    by_step = {e["step"]: e for e in events}
    if args.warmup not in by_step or total not in by_step:
        raise RunFailed(f"train lines at steps {sorted(by_step)}, expected {args.warmup} and {total}")
    images = args.batch * size  # per step, over all workers
    window = by_step[total]["time"] - by_step[args.warmup]["time"]
    per_step = window / args.steps
    first = events[0]  # its trainer figure gives the mean step of its interval, start-up included
    first_mean = images / first["samples_per_s"]
    busy = sum(args.log_every * images / e["samples_per_s"] for e in events if args.warmup < e["step"] <= total)
    if mode == "real":
        workers = worker_pids(run_dir, log) & set(peaks) or set(peaks) - {proc.pid}
    else:
        workers = {proc.pid}
    threads = re.search(r"torch threads (\d+)", log.read_text(errors="replace"))
    return {
        "images_per_s": round(args.steps * images / window, 1),
        "trainer_images_per_s": round(args.steps * images / busy, 1),
        "startup_s": round(first["time"] - (first["step"] - 1) * min(per_step, first_mean) - launched, 1),
        "peak_rss_mb": round(sum(peaks[p] for p in workers) / 1024, 1),
        "peak_pss_mb": round(max(sum(s.get(p, 0) for p in workers) for s in pss) / 1024, 1),
        "processes": len(workers),
        "threads": int(threads.group(1)) if threads else "",
        "wall_s": round(wall, 1),
    }


# --- the benchmark ---------------------------------------------------------------------------------------
def real_fits(size: int, mb_per_process: float) -> str | None:
    """Why N real processes would not fit in memory now (None: they fit)."""
    need, free = size * mb_per_process, proc_kb("/proc/meminfo", "MemAvailable") / 1024 or math.inf
    if need <= MEMORY_SHARE * free:
        return None
    return (
        f"{size} real processes need ~{need / 1024:.1f} GiB ({mb_per_process:.0f} MB each), "
        f"more than {MEMORY_SHARE:.0%} of the {free / 1024:.1f} GiB available"
    )


def run_all(args, work: Path, save) -> tuple[list[dict], list[str]]:
    rows, failures, block = [], [], 0
    mb_per_process = REAL_MB_PER_PROCESS
    for size in args.sizes:
        for algorithm in args.algorithms:
            order = args.modes if block % 2 == 0 else args.modes[::-1]
            block += 1
            mine = []
            for mode in order:
                row = {k: "" for k in FIELDS} | {"size": size, "algorithm": algorithm, "mode": mode}
                why = real_fits(size, mb_per_process) if mode == "real" else None
                label = f"N={size:<3} {ALGORITHMS.get(algorithm, algorithm):<9} {mode:<11}"
                if why:
                    row["status"] = f"skipped: {why}"
                    print(f"  {label} skipped: {why}", flush=True)
                else:
                    try:
                        row |= run_once(mode, size, algorithm, args, work) | {"status": "ok"}
                    except RunFailed as err:
                        first = str(err).splitlines()[0]
                        row["status"] = f"failed: {first}"
                        failures.append(f"{' '.join(label.split())}: {first}")
                        print(f"  {label} FAILED: {err}", file=sys.stderr, flush=True)
                    else:
                        if mode == "real":
                            mb_per_process = max(mb_per_process, row["peak_pss_mb"] / size)
                        print(
                            f"  {label} {row['images_per_s']:8.1f} img/s  start-up {row['startup_s']:5.1f} s  "
                            f"peak RSS {row['peak_rss_mb']:7.0f} MB, PSS {row['peak_pss_mb']:7.0f} MB "
                            f"({row['processes']} proc.)",
                            flush=True,
                        )
                mine.append(row)
            one = next((r for r in mine if r["mode"] == "one_process" and r["status"] == "ok"), None)
            for row in mine:
                if one and row["status"] == "ok":
                    row["ratio_vs_one_process"] = round(row["images_per_s"] / one["images_per_s"], 3)
            rows += sorted(mine, key=lambda r: MODES.index(r["mode"]))
            save(rows)
    return rows, failures


def summary_table(rows: list[dict]) -> str:
    """One line per (N, algorithm): the three modes side by side."""
    head = ["N", "algorithm"]
    for what in ("img/s", "x one proc.", "start-up s", "peak RSS MB", "peak PSS MB"):
        head += [f"{m.replace('_', ' ')} {what}" for m in MODES if what != "x one proc." or m != "one_process"]
    lines = []
    for size, algorithm in dict.fromkeys((r["size"], r["algorithm"]) for r in rows):
        by = {r["mode"]: r for r in rows if (r["size"], r["algorithm"]) == (size, algorithm)}

        def cell(mode, key, by=by):
            r = by.get(mode)
            return "-" if r is None else r[key] if r["status"] == "ok" else r["status"].split(":")[0]

        line = [size, ALGORITHMS.get(algorithm, algorithm)]
        line += [cell(m, "images_per_s") for m in MODES]
        line += [cell(m, "ratio_vs_one_process") for m in MODES if m != "one_process"]
        line += [cell(m, key) for key in ("startup_s", "peak_rss_mb", "peak_pss_mb") for m in MODES]
        lines.append(line)
    return markdown_table(head, lines)


def goal_check(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["mode"] == "simulated" and r["ratio_vs_one_process"] != "":
            verdict = "PASS" if r["ratio_vs_one_process"] >= GOAL else "FAIL"
            out.append(
                f"- N={r['size']} {ALGORITHMS.get(r['algorithm'], r['algorithm'])}: simulated / one process = "
                f"{r['ratio_vs_one_process']:.3f} (goal >= {GOAL:.2f}, within 1.3x): {verdict}"
            )
    notes = [f"- N={r['size']} {r['algorithm']} {r['mode']}: {r['status']}" for r in rows if r["status"] != "ok"]
    return "\n".join(out + notes)


def save(out: Path, rows: list[dict], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_simulated.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench_simulated.md").write_text(f"{header}\n\n{summary_table(rows)}\n\n{goal_check(rows)}\n")


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    plt.rcParams.update({"font.size": 8})
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    fig, axes = plt.subplots(2, len(algorithms), figsize=(3.6 * len(algorithms), 5.2), squeeze=False)
    for col, algorithm in enumerate(algorithms):
        for mode in MODES:
            sel = [r for r in rows if r["algorithm"] == algorithm and r["mode"] == mode and r["status"] == "ok"]
            if not sel:
                continue
            sizes = [r["size"] for r in sel]
            axes[0, col].plot(sizes, [r["images_per_s"] for r in sel], marker="o", label=mode.replace("_", " "))
            axes[1, col].plot(sizes, [r["peak_pss_mb"] for r in sel], marker="o", label=mode.replace("_", " "))
        axes[0, col].set_title(ALGORITHMS.get(algorithm, algorithm))
        for ax, ylabel in zip(axes[:, col], ("images / s", "peak PSS (MB)")):
            ax.set(xlabel="workers N", ylabel=ylabel, xticks=sorted({r["size"] for r in rows}), ylim=(0, None))
        axes[0, col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True, help="CIFAR-10 (torchvision layout or image folders)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="CSV, Markdown and PNG (%(default)s)")
    p.add_argument("--sizes", help="worker counts N (default 8,16,32; --quick: 2)")
    p.add_argument("--algorithms", help=f"of {','.join(ALGORITHMS)} (default all; --quick: local_sgd)")
    p.add_argument("--modes", default=",".join(MODES), help="of %(default)s")
    p.add_argument("--steps", type=int, help="measured steps (default 16; --quick: 4)")
    p.add_argument("--warmup", type=int, help="steps before the measurement (default 8; --quick: 2)")
    p.add_argument("--width", type=float, default=0.125, help="ResNet-18 width multiplier (%(default)s)")
    p.add_argument("--batch", type=int, default=32, help="images per worker and step (%(default)s)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: slowmo-train's)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for one run (%(default)s)")
    p.add_argument("--work", help="run directories and logs (default: a temporary folder, removed unless a run failed)")
    p.add_argument("--quick", action="store_true", help="a tiny run: N=2, Local SGD, 2 + 4 steps")
    args = p.parse_args(argv)
    quick = {"sizes": "2", "algorithms": "local_sgd", "steps": 4, "warmup": 2}
    full = {"sizes": "8,16,32", "algorithms": ",".join(ALGORITHMS), "steps": 16, "warmup": 8}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.algorithms = args.algorithms.split(",")
    args.modes = tuple(args.modes.split(","))
    if bad := [a for a in args.algorithms if a not in ALGORITHMS]:
        p.error(f"--algorithms: unknown {bad} (synchronous ones only: {', '.join(ALGORITHMS)})")
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {bad} (of {', '.join(MODES)})")
    if min(args.sizes) < 1 or args.steps < 1 or args.warmup < 1 or args.batch < 1:
        p.error("--sizes, --steps, --warmup and --batch must be >= 1")
    args.log_every = math.gcd(args.warmup, args.steps)  # the measurement starts and ends at a train line
    if not args.data_root.is_dir():
        p.error(f"--data-root {args.data_root} is not a directory")
    args.data_root = args.data_root.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    header = (
        f"Simulated cluster vs real processes vs one process | ResNet-18 x {args.width}, batch {args.batch}/worker, "
        f"CIFAR-10, gloo on CPU ({os.cpu_count()} cores) | {args.warmup} warm-up + {args.steps} measured steps, "
        f"a train line every {args.log_every}"
    )
    print(header, flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_simulated_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows, failures = run_all(args, work.resolve(), lambda rows: save(args.out, rows, header))
    print(f"\n{summary_table(rows)}\n\n{goal_check(rows)}\n")
    if rows and plot(rows, args.out / "bench_simulated.png"):
        print(f"plot: {args.out / 'bench_simulated.png'}")
    print(
        f"bench_simulated: {sum(r['status'] == 'ok' for r in rows)} runs in {(time.time() - start) / 60:.1f} min; "
        f"results in {args.out}/bench_simulated.csv, .md"
    )
    if failures:
        print(f"bench_simulated: FAILED runs (logs in {work}): " + "; ".join(failures), file=sys.stderr)
    elif not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
