"""One-command CPU-scale reproduction of the SlowMo paper's comparisons (Wang, Tantia, Ballas and
Rabbat, "SlowMo: Improving Communication-Efficient Distributed SGD with Slow Momentum", ICLR 2020,
arXiv:1910.00643, Table 1 and the ablations of Sec. 6), with a report in docs/RESULTS.md.

    .venv/bin/python scripts/reproduce.py all                    # every set (~6 h on 2 cores), then the report
    .venv/bin/python scripts/reproduce.py regime                 # one set: regime | regime_follow | regime_long |
                                                                 #   beta_workers | beta_workers_few |
                                                                 #   regime_buffers | translation_forms |
                                                                 #   translation_regime | cifar |
                                                                 #   streamed | streamed_parts | sweep |
                                                                 #   translation | diagnostics
    .venv/bin/python scripts/reproduce.py all --dry-run          # print the training commands only
    .venv/bin/python scripts/reproduce.py report                 # regenerate docs/RESULTS.md + docs/img only
    .venv/bin/python scripts/reproduce.py time_to_accuracy       # as root: the emulated cluster (~45 min)

Run directories go to ``--runs-dir`` (default ``runs/reproduce``, ignored by git): one per
(set, method, seed), e.g. ``runs/reproduce/cifar/localsgd_slowmo_s1``. Re-running a command skips
every run that has a ``summary.json``, resumes one with a checkpoint (``resume=auto``) and starts
the others; a failed run is reported and the set goes on; Ctrl-C stops the current run (its workers
save a checkpoint) and the script, and the same command continues later.

Every run is one call of the project's own CLI with the set's shared overrides (``SETS`` in
scripts/reproduction/plan.py), which are the same for every method: the same budget, schedule and
tuning effort for all of them.
The report rewrites only the region between ``<!-- reproduce:begin -->`` and
``<!-- reproduce:end -->`` of docs/RESULTS.md (appended with its heading when absent) and the plots
``docs/img/reproduce_*.png`` (scripts/reproduction/report.py); it reads the runs with
slowmo_train/report.py.

SlowMo's own regime (the simulated cluster, one process with one thread per run, so two sets can
run side by side on 2 cores; measured 2026-12-02 with two sets at a time; REGIME_SHARED in plan.py):
  regime 24 + regime_follow 6 runs (32 workers, 16 epochs)  ~3.0 min each -> ~90 min
  regime_long 2 runs (48 epochs)                            ~9 min each   -> ~18 min
  beta_workers 40 runs (4-32 workers)                       ~2.0-3.0 min  -> ~100 min
  translation_forms 4 runs (4 simulated workers)            ~6 min each   -> ~24 min
  translation_regime 18 runs (4 simulated workers)          ~6 min each   -> ~55 min (two at a time)
  beta_workers_few 20 runs (2 workers)                      ~1.0-1.3 min  -> ~22 min
  regime_buffers 9 runs (32 workers, 16 epochs)             ~3 min each   -> ~14 min (two at a time)

The 4-worker sets (2 cores; 4 one-thread workers per run; one run at a time; measured 2026-12-01 18:10-19:54
UTC, 51 runs in 85.7 min of training, the machine idle but for short test runs during a few; see CIFAR_SHARED,
SWEEP_SHARED, TRANSLATION_SHARED in scripts/reproduction/plan.py):
  cifar 16 + streamed 4 + streamed_parts 6 runs  ~1.6 min each  -> 42.7 min
  sweep 12 runs                                  ~0.9 min each  -> 10.3 min
  translation 10 runs                            ~2.5 min each  -> 24.9 min
  diagnostics 3 runs                             ~2.6 min each  ->  7.7 min
Other jobs on the cores stretch this: with another engineer's 2-worker job running (load average
6-12) a 3-epoch AR-SGD run took 3 min 20 s instead of 89 s and a translation run 5 min 53 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # imported (the tests) or run as python -m scripts.reproduce
    from scripts.reproduction.plan import REPO, SETS, plan, run_state
    from scripts.reproduction.report import write_report
else:  # python scripts/reproduce.py: this folder is sys.path[0]
    from reproduction.plan import REPO, SETS, plan, run_state
    from reproduction.report import write_report


def _fmt(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def machine_info() -> dict:
    model = ""
    try:
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    except OSError:
        pass
    import torch

    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_set(set_name: str, runs_dir: Path, dry_run: bool = False) -> list[str]:
    """Run every planned run of a set that is not finished; return the names of the failed ones."""
    runs = plan(set_name)
    failed: list[str] = []
    if dry_run:
        for r in runs:
            state = run_state(r.run_dir(runs_dir))
            print(("# done: " if state == "done" else "") + " ".join(r.command(runs_dir, state == "resume")))
        return failed
    (runs_dir / set_name).mkdir(parents=True, exist_ok=True)
    (runs_dir / set_name / "machine.json").write_text(json.dumps(machine_info(), indent=2) + "\n")
    todo = [r for r in runs if run_state(r.run_dir(runs_dir)) != "done"]
    print(f"[{set_name}] {len(runs) - len(todo)} of {len(runs)} runs already finished, {len(todo)} to go", flush=True)
    start, durations = time.time(), []
    for i, r in enumerate(todo, 1):
        run_dir = r.run_dir(runs_dir)
        state = run_state(run_dir)
        if state == "new" and run_dir.exists():
            shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint: nothing to keep
        run_dir.mkdir(parents=True, exist_ok=True)
        eta = statistics.mean(durations) * (len(todo) - i + 1) if durations else None
        print(
            f"[{set_name} {i}/{len(todo)}] start {r.name}{' (resume)' if state == 'resume' else ''} | "
            f"elapsed {_fmt(time.time() - start)}" + (f", eta {_fmt(eta)}" if eta else ""),
            flush=True,
        )
        t0 = time.time()
        with open(run_dir / "reproduce.log", "a") as log:
            # its own session: a Ctrl-C reaches the CLI once, from here (the CLI takes a second one as
            # "kill the workers now", which a terminal's SIGINT to the whole group would amount to)
            proc = subprocess.Popen(
                r.command(runs_dir, state == "resume"),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                print(
                    f"[{set_name}] stopping {r.name}: its workers save a checkpoint (Ctrl-C again: kill them)",
                    flush=True,
                )
                proc.send_signal(signal.SIGINT)
                while True:
                    try:
                        proc.wait()
                        break
                    except KeyboardInterrupt:
                        proc.send_signal(signal.SIGINT)
                print(f"[{set_name}] interrupted during {r.name}; run the same command again to continue", flush=True)
                raise
        durations.append(time.time() - t0)
        if code == 0 and run_state(run_dir) == "done":
            print(f"[{set_name} {i}/{len(todo)}] done {r.name} in {_fmt(durations[-1])}", flush=True)
        else:
            failed.append(r.name)
            print(
                f"[{set_name} {i}/{len(todo)}] FAILED {r.name} (exit {code}) in {_fmt(durations[-1])}: "
                f"{last_error(run_dir / 'reproduce.log')}",
                flush=True,
            )
    return failed


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip()[:300] + f" (log: {log})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "what",
        choices=[*SETS, "all", "report", "time_to_accuracy"],
        help="a set to train (then report), all, report, or time_to_accuracy (the emulated cluster, as root)",
    )
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce"), help="default: runs/reproduce")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md")
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    args = ap.parse_args(argv)
    runs_dir = args.runs_dir if args.runs_dir.is_absolute() else (REPO / args.runs_dir)
    if args.what == "time_to_accuracy":
        from scripts.reproduction import time_report

        if args.dry_run:
            print("\n".join(" ".join(c) for c in time_report.commands(args.img_dir)))
            return 0
        if time_report.run(args.img_dir):
            return 1
        write_report(runs_dir, args.results, args.img_dir)
        return 0
    sets = list(SETS) if args.what == "all" else [] if args.what == "report" else [args.what]
    failed: list[str] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID stops as cleanly as Ctrl-C
    try:
        for name in sets:
            failed += [f"{name}/{f}" for f in run_set(name, runs_dir, args.dry_run)]
    except KeyboardInterrupt:
        return 130
    if args.dry_run:
        return 0
    write_report(runs_dir, args.results, args.img_dir)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
