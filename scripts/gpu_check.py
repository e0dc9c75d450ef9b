"""GPU acceptance check: does slowmo-train run, resume, recover and keep its speed on this machine?

    python scripts/gpu_check.py                                 # every row (sized for < 8 min on one H200)
    python scripts/gpu_check.py --quick                         # one smoke per task, fewer of the rest
    python scripts/gpu_check.py --only 'exp:wmt16_*,resume:*'   # rows by name (fnmatch; --list shows them)
    python scripts/gpu_check.py --data-root ../shared/data --out gpu_check.md   # real data; table to a file

The script launches every run itself, one rank per GPU with NCCL (``torchrun --standalone
--nproc_per_node=<GPUs>``; on one GPU plain ``python -m slowmo_train``, world size 1). Rows:

- ``exp:NAME``: the 24 paper experiments at smoke size (``+exp=NAME +smoke=tiny``): 4 steps, finite
  losses and final evaluation, a final model, and with CUDA no gloo/CPU in the logs.
- ``resume:NAME``: 4 steps, then ``resume=auto`` to step 8: from step 4, each train line once.
- ``restart:NAME``: ``SLOWMO_TRAIN_FAULTS=kill@step=3`` SIGKILLs the last rank; ``torchrun
  --max-restarts=1`` restarts the job, which resumes from step 2 and finishes step 6.
- ``bf16:NAME``, ``fp16:NAME``: smokes with ``train.precision=bf16|fp16``.
- ``speed:MODEL-PRECISION``: throughput on one GPU through slowmo-train (CLI, trainer, precision,
  AR-SGD; only the batches are replaced by one batch on the device) against a hand-written loop
  (torchvision's ResNet-50, or the same transformer in plain torch.nn; same batch, precision and
  optimizer; cudnn.benchmark, TF32): ``--speed-steps`` warm-up then timed steps; fails below ``--min-ratio``.
- ``speed:resnet18-simulated``: ``--sim-workers`` (32) CIFAR-10 ResNet-18 workers (full width, batch 32
  each, AR-SGD) simulated in one process on one GPU (``launcher.simulate``) against one process training
  their total batch (1024) on it, both through the CLI; the replicas run in turn with small kernels, so
  the bar is 0.5x of one process.

Without CUDA the speed rows are ``skipped: no CUDA device`` (``--speed-on-cpu`` runs them) and the rest
run tiny with gloo. Data: synthetic datasets of the real layouts (slowmo_train/data/synthetic.py)
unless ``--data-root`` holds cifar10/, imagenet/ (or imagenet_sample/), multi30k/ (or
translation/multi30k/). Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from slowmo_train.data import synthetic
from slowmo_train.scripting import markdown_table

if __package__ or __name__ != "__main__":  # imported (the tests load this file as a module), or python -m
    from scripts.gpu_launch import Ctx, Outcome, clean_env, error_line, run_proc
    from scripts.gpu_speed import SIMULATED_ROW, SPEED, plain_worker, read_run, simulated_speed, slowmo_worker, speed
else:  # python scripts/gpu_check.py: this folder is sys.path[0]
    from gpu_launch import Ctx, Outcome, clean_env, error_line, run_proc
    from gpu_speed import SIMULATED_ROW, SPEED, plain_worker, read_run, simulated_speed, slowmo_worker, speed

TASKS = ("cifar10", "imagenet", "wmt16")
EXPERIMENTS = [f"{t}_{b}{s}" for t in TASKS for b in ("allreduce", "localsgd", "sgp", "osgp") for s in ("", "_slowmo")]


@dataclass
class Check:
    name: str
    run: Callable[[Ctx], Outcome]
    gpu_only: bool = False
    quick: bool = False
    alone: bool = False  # timed: nothing else may run meanwhile


# --- launching slowmo-train --------------------------------------------------------------------------
def launch(
    ctx: Ctx, overrides: list[str], run_dir: Path, faults: str | None = None, restarts: int = 0
) -> tuple[int | None, str]:
    args = [
        *overrides,
        f"output_dir={run_dir}",
        f"launcher.backend={'nccl' if ctx.gpus else 'gloo'}",
        "launcher.nproc_per_node=1",
        *ctx.args.override,
    ]
    torchrun = (
        ["torch.distributed.run", "--standalone", f"--nproc_per_node={ctx.nproc}", f"--max-restarts={restarts}", "-m"]
        if ctx.nproc > 1 or restarts
        else []
    )  # a restart needs torchrun's agent, even for 1 rank
    return run_proc(
        [sys.executable, "-m", *torchrun, "slowmo_train", *args],
        clean_env(ctx, faults),
        ctx.work,
        ctx.args.timeout,
        run_dir.with_suffix(".out"),
    )


def smoke_overrides(ctx: Ctx, name: str) -> list[str]:
    task = name.split("_")[0]
    data = [f"data.root={ctx.data[task]}"] if task in TASKS else []
    toy = ["data.vocab_size=60"] if task == "wmt16" and ctx.work in ctx.data[task].parents else []  # ~40 words
    return [f"+exp={name}", "+smoke=tiny", *data, "data.download=false", *toy]


def finished(
    ctx: Ctx,
    overrides: list[str],
    run_dir: Path,
    steps: int,
    train_steps: list[int],
    resumed: str | None = None,
    **launch_args,
) -> str | None:
    """Run slowmo-train; what is wrong with its exit, summary, metrics and logs (None: nothing)."""
    code, out = launch(ctx, overrides, run_dir, **launch_args)
    if code != 0:
        return error_line(code, out, ctx.args.timeout)
    try:
        summary, train = read_run(run_dir)
    except (OSError, ValueError) as err:
        return f"no readable summary/metrics: {err}"
    final, metric, came_from = summary["final_eval"], summary["metric"], summary.get("resumed_from")
    logs = "".join(p.read_text() for p in sorted((run_dir / "logs").glob("rank*.log")))
    for bad, why in (
        (summary["steps"] != steps, f"summary says {summary['steps']} steps, planned {steps}"),
        (not math.isfinite(final.get(metric, math.nan)), f"final evaluation lacks a finite {metric}: {final}"),
        (not all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in train), "a train loss is not finite"),
        (not (came_from or "").endswith(resumed) if resumed else came_from, f"resumed from {came_from}"),
        ([e["step"] for e in train] != train_steps, f"train lines at {[e['step'] for e in train]}"),
        (not (run_dir / "model_final.pt").exists(), "no model_final.pt"),
        (ctx.gpus and ("backend gloo" in logs or "device cpu" in logs), "ran on gloo/CPU although CUDA is here"),
    ):
        if bad:
            return why
    return None


def figure_of(run_dir: Path) -> str:
    summary, _ = read_run(run_dir)
    skips = f", fp16 skips {summary['fp16_skipped_steps']}" if summary.get("fp16_skipped_steps") else ""
    return f"{summary['metric']} {summary['final_eval'][summary['metric']]:.4g}{skips}"


# --- the checks ----------------------------------------------------------------------------------------
def smoke(name: str, extra: tuple[str, ...] = (), tag: str = "exp") -> Callable[[Ctx], Outcome]:
    def check(ctx: Ctx) -> Outcome:
        run = ctx.work / f"{tag}_{name}"
        bad = finished(ctx, smoke_overrides(ctx, name) + list(extra), run, 4, [2, 4])
        return bad is None, "" if bad else figure_of(run), bad or ""

    return check


def resume(name: str) -> Callable[[Ctx], Outcome]:
    def check(ctx: Ctx) -> Outcome:
        run, common = ctx.work / f"resume_{name}", [*smoke_overrides(ctx, name), "checkpoint.every_steps=2"]
        bad = finished(ctx, [*common, "train.max_steps=4"], run, 4, [2, 4])
        if bad:
            return False, "", f"first run: {bad}"
        bad = finished(ctx, [*common, "train.max_steps=8", "resume=auto"], run, 8, [2, 4, 6, 8], "step_00000004")
        return bad is None, "" if bad else f"4 -> 8 steps, {figure_of(run)}", f"resumed run: {bad}" if bad else ""

    return check


def restart(name: str) -> Callable[[Ctx], Outcome]:
    def check(ctx: Ctx) -> Outcome:
        run, rank = ctx.work / f"restart_{name}", ctx.nproc - 1
        overrides = [*smoke_overrides(ctx, name), "checkpoint.every_steps=2", "train.max_steps=6"]
        bad = finished(
            ctx, overrides, run, 6, [2, 4, 6], "step_00000002", faults=f"kill@step=3,rank={rank}", restarts=1
        )
        log = run / "logs" / f"rank{rank}.log"
        if not bad and "launch attempt 1" not in (log.read_text() if log.exists() else ""):
            bad = f"no restart: {log.name} lacks 'launch attempt 1'"
        return bad is None, "" if bad else f"rank {rank} killed at step 3, resumed at 2, {figure_of(run)}", bad or ""

    return check


def all_checks() -> list[Check]:
    quick = {"cifar10_sgp_slowmo", "imagenet_localsgd_slowmo", "wmt16_osgp_slowmo"}
    checks = [Check(f"exp:{n}", smoke(n), quick=n in quick) for n in EXPERIMENTS]
    checks += [
        Check("resume:cifar10_sgp_slowmo", resume("cifar10_sgp_slowmo"), quick=True),
        Check("resume:wmt16_localsgd_slowmo", resume("wmt16_localsgd_slowmo")),
        Check("restart:cifar10_osgp_slowmo", restart("cifar10_osgp_slowmo"), quick=True),
    ]
    for prec, names in (
        ("bf16", ("imagenet_sgp_slowmo", "wmt16_osgp_slowmo")),
        ("fp16", ("cifar10_localsgd_slowmo", "wmt16_allreduce_slowmo")),
    ):
        checks += [
            Check(f"{prec}:{n}", smoke(n, (f"train.precision={prec}",), prec), quick=i == 0)
            for i, n in enumerate(names)
        ]
    checks += [
        Check(
            f"speed:{row}",
            speed(row),
            gpu_only=True,
            alone=True,
            quick=row in ("resnet50-bf16-channels_last", "transformer_base-bf16"),
        )
        for row in SPEED
    ]
    return checks + [Check(SIMULATED_ROW, simulated_speed, gpu_only=True, alone=True)]


# --- main ------------------------------------------------------------------------------------------------
def prepare_data(ctx: Ctx, need_imagenet1k: bool) -> None:
    root, world = Path(ctx.args.data_root or "/nonexistent"), max(2, ctx.nproc)  # every rank needs its own batch
    writers = {
        "cifar10": lambda p: synthetic.write_image_folder_cifar(p, n_train=max(300, 40 * world), n_test=60),
        "imagenet": lambda p: synthetic.write_image_folder_imagenet(p, per_class=max(6, 3 * world)),
        "wmt16": synthetic.write_parallel_text,
    }
    for task, subdirs in {
        "cifar10": ["cifar10"],
        "imagenet": ["imagenet", "imagenet_sample"],
        "wmt16": ["multi30k", "translation/multi30k", "wmt16"],
    }.items():
        found = [root / s for s in subdirs if (root / s).is_dir()]
        ctx.data[task] = found[0].resolve() if found else writers[task](ctx.work / "data" / task)
    ctx.data["imagenet1k"] = ctx.work / "data" / "imagenet1k"  # the speed rows: 1000 classes, one image each
    if need_imagenet1k:
        synthetic.write_image_folder_imagenet(ctx.data["imagenet1k"], per_class=1, classes=1000, size=32)


def render(rows: list[dict], markdown: bool) -> str:
    lines = [["check", "result", "figure", "seconds"]] + [
        [r["check"], r["result"], r["figure"], str(r["seconds"])] for r in rows
    ]
    if markdown:
        return markdown_table(lines[0], [[c.replace("|", "/") for c in line] for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line[:3], widths)) + "  " + line[3].rjust(widths[3]) for line in lines
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one smoke per task, one resume/restart/bf16/fp16, 2 speeds")
    p.add_argument("--only", help="comma-separated fnmatch patterns of row names (exp:NAME: any configs/exp file)")
    p.add_argument("--list", action="store_true", help="print the selected rows' names and exit")
    p.add_argument("--out", help="also write the table to FILE: JSON if it ends in .json, else markdown")
    p.add_argument("--data-root", help="DIR with cifar10/, imagenet/, multi30k/ (missing ones: synthetic)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add a Hydra override to every run except the speed rows' (repeatable)",
    )
    p.add_argument("--nproc", type=int, help="ranks per run (default: the GPUs; 1 without CUDA)")
    p.add_argument("--jobs", type=int, help="runs at a time, speed rows excepted (default: 4 with CUDA, else 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per launched run (default 300)")
    p.add_argument("--min-ratio", type=float, default=0.9, help="slowmo-train / plain speed below this fails")
    p.add_argument("--speed-on-cpu", action="store_true", help="run the speed rows without CUDA too")
    p.add_argument("--speed-steps", type=int, default=30, help="warm-up steps, then as many timed ones")
    p.add_argument(
        "--sim-workers", type=int, default=32, help=f"workers of {SIMULATED_ROW} (launcher.simulate; default 32)"
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--image-batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=8192, help="source + target tokens per transformer step")
    p.add_argument("--vocab", type=int, default=32000, help="transformer vocabulary in the speed rows")
    p.add_argument("--work-dir", help="keep runs and logs under DIR (default: a temporary one, kept on failure)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    a = parse_args()
    if a.worker:
        w = json.loads(a.worker)
        print(f"RATE {(plain_worker if w['side'] == 'plain' else slowmo_worker)(w):.6g}", flush=True)
        return 0
    patterns = a.only.split(",") if a.only else None
    checks = [
        c
        for c in all_checks()
        if (not patterns or any(fnmatch.fnmatch(c.name, pat) for pat in patterns)) and (not a.quick or c.quick)
    ]
    checks += [
        Check(pat, smoke(pat[4:]))
        for pat in patterns or []
        if pat.startswith("exp:") and not any(ch in pat for ch in "*?[") and pat not in [c.name for c in checks]
    ]
    if a.list or not checks:
        print("\n".join(c.name for c in checks) or f"gpu_check: no row matches {a.only!r} (see --list)")
        return 0 if checks else 2
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if a.work_dir:
        Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=a.work_dir)).resolve()  # fresh: no old checkpoints
    ctx = Ctx(a, gpus, a.nproc or max(1, gpus), work)
    runnable = [c for c in checks if gpus or not c.gpu_only or a.speed_on_cpu]
    prepare_data(ctx, any(c.name.startswith("speed:resnet50") for c in runnable))
    where = f"{gpus} x {torch.cuda.get_device_name(0)}, nccl" if gpus else "no CUDA device, gloo on CPU"
    print(
        f"gpu_check: {where}, {ctx.nproc} rank(s) per run, torch {torch.__version__}; data: "
        + ", ".join(f"{t} {'synthetic' if work in ctx.data[t].parents else ctx.data[t]}" for t in TASKS),
        flush=True,
    )
    results: dict[str, dict] = {}

    def run_one(c: Check) -> None:
        start, ok, fig, note = time.monotonic(), True, "", "no CUDA device"
        if c in runnable:
            try:
                ok, fig, note = c.run(ctx)
            except Exception as err:  # a bug in a check or an unreadable run: this row fails, the others go on
                ok, note = False, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        result = ("ok" if ok else "FAIL") if c in runnable else "skipped"
        results[c.name] = {
            "check": c.name,
            "result": result + (f": {note}" if note else ""),
            "figure": fig,
            "seconds": round(time.monotonic() - start, 1),
            "ok": ok,
        }
        print(f"[{len(results)}/{len(checks)}] {c.name}: {results[c.name]['result']} {fig}", file=sys.stderr)

    total = time.monotonic()
    with ThreadPoolExecutor(max_workers=a.jobs or (4 if gpus else 1)) as pool:
        list(pool.map(run_one, [c for c in checks if not c.alone]))
    for c in [c for c in checks if c.alone]:  # timed rows: nothing else runs meanwhile
        run_one(c)
    rows = [results[c.name] for c in checks]
    failed = [r for r in rows if not r["ok"]]
    print(render(rows, markdown=False))
    print(
        f"{len(rows) - len(failed)} of {len(rows)} rows ok or skipped, {len(failed)} failed; "
        f"{time.monotonic() - total:.0f} s"
    )
    if a.out:
        out = Path(a.out)
        out.write_text(
            json.dumps({"machine": where, "rows": rows}, indent=2) + "\n"
            if out.suffix == ".json"
            else f"gpu_check: {where}\n\n{render(rows, markdown=True)}\n"
        )
    if failed or a.work_dir:
        print(f"gpu_check: runs and logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
