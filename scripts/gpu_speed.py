"""The speed rows of scripts/gpu_check.py: the rows' table (``SPEED``: row -> model, precision,
channels_last; ``UNITS``); the row's check (``speed``: runs both sides as subprocesses of
gpu_check.py, ``--worker JSON``, and compares their throughput against ``--min-ratio``); the two
sides themselves: the hand-written reference training loop (``plain_worker``: torchvision's
ResNet-50, or the same transformer in plain torch; same batch, precision and optimizer) and
slowmo-train's own CLI on one batch on the device (``slowmo_worker``), each returning its throughput;
the simulated cluster's row (``simulated_speed``: N workers in one process against one process
training their total batch, both through the CLI on CIFAR-10); and ``read_run``, which reads a run
directory's summary and train metrics for both scripts."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from slowmo_train import cli, tasks
from slowmo_train.config import ModelConfig
from slowmo_train.data import synthetic
from slowmo_train.models import build_model
from slowmo_train.scripting import read_metrics
from slowmo_train.tasks.base import HeadlineMetric, Task
from slowmo_train.tasks.wmt16 import translation_loss

if __package__:  # imported as scripts.gpu_speed (python -m scripts.gpu_check, the tests)
    from scripts.gpu_launch import Ctx, Outcome, clean_env, error_line, run_proc
else:  # imported as gpu_speed by python scripts/gpu_check.py: this folder is sys.path[0]
    from gpu_launch import Ctx, Outcome, clean_env, error_line, run_proc

SPEED = {
    "resnet50-fp32": ("resnet50", "fp32", False),
    "resnet50-bf16": ("resnet50", "bf16", False),
    "resnet50-bf16-channels_last": ("resnet50", "bf16", True),  # row -> (model, precision, channels_last)
    "transformer_base-fp32": ("transformer_base", "fp32", False),
    "transformer_base-bf16": ("transformer_base", "bf16", False),
}
UNITS = {"resnet50": ("samples_per_s", "img/s"), "transformer_base": ("tokens_per_s", "tok/s")}
#: the simulated cluster's row: ``--sim-workers`` ResNet-18 replicas (CIFAR stem, full width, batch
#: SIM_BATCH each) in one process (launcher.simulate, AR-SGD) against one process training their total
#: batch on the same GPU; the replicas run in turn with small kernels, so the bar is half its speed
SIMULATED_ROW, SIM_BATCH, SIM_MIN_RATIO = "speed:resnet18-simulated", 32, 0.5


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, [e for e in read_metrics(run_dir, "train") if "loss" in e]


# --- the row: both sides in subprocesses of gpu_check.py (--worker JSON), then the ratio --------------
def speed(row: str) -> Callable[[Ctx], Outcome]:
    model, precision, channels_last = SPEED[row]

    def check(ctx: Ctx) -> Outcome:
        a, rates, env = ctx.args, {}, clean_env(ctx)
        if ctx.gpus:  # figures per GPU: the first one
            env["CUDA_VISIBLE_DEVICES"] = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        for side in ("plain", "slowmo"):
            spec = dict(
                side=side,
                model=model,
                precision=precision,
                channels_last=channels_last,
                steps=a.speed_steps,
                image_size=a.image_size,
                image_batch=a.image_batch,
                tokens=a.tokens,
                vocab=a.vocab,
                image_root=str(ctx.data["imagenet1k"]),
                text_root=str(ctx.data["wmt16"]),
                run_dir=str(ctx.work / f"speed_{row}_{side}"),
            )
            code, out = run_proc(
                [sys.executable, str(Path(__file__).resolve().with_name("gpu_check.py")), "--worker", json.dumps(spec)],
                env,
                ctx.work,
                a.timeout,
                ctx.work / f"speed_{row}_{side}.out",
            )
            found = [line.split()[1] for line in out.splitlines() if line.startswith("RATE ")]
            if code != 0 or not found:
                return False, "", f"{side} loop: {error_line(code if code != 0 else 1, out, a.timeout)}"
            rates[side] = float(found[-1])
        ratio = rates["slowmo"] / rates["plain"]
        fig = f"{rates['slowmo']:,.0f} vs {rates['plain']:,.0f} {UNITS[model][1]} plain = {ratio:.2f}x"
        return ratio >= a.min_ratio, fig, "" if ratio >= a.min_ratio else f"below --min-ratio {a.min_ratio:g}"

    return check


def simulated_speed(ctx: Ctx) -> Outcome:
    """SIMULATED_ROW: ``launcher.simulate=N`` against one process with batch N x SIM_BATCH, both
    through slowmo-train's CLI on CIFAR-10 (--data-root's, or a synthetic one of 2 batches per worker);
    rate: the second logged interval."""
    a, n, rates, env = ctx.args, ctx.args.sim_workers, {}, clean_env(ctx)
    if ctx.gpus:
        env["CUDA_VISIBLE_DEVICES"] = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    data = ctx.data["cifar10"]
    if ctx.work in data.parents:  # synthetic: every worker needs two batches of its own
        data = synthetic.write_image_folder_cifar(
            ctx.work / "data" / "cifar10_sim", n_train=2 * SIM_BATCH * n, n_test=60
        )
    for side, extra in (
        ("one process", [f"train.batch_size={SIM_BATCH * n}"]),
        ("simulated", [f"train.batch_size={SIM_BATCH}", f"launcher.simulate={n}"]),
    ):
        run_dir = ctx.work / f"speed_simulated_{side.replace(' ', '_')}"
        cmd = [
            sys.executable,
            "-m",
            "slowmo_train",
            "task=cifar10",
            "algorithm=allreduce",
            *extra,
            f"data.root={data}",
            "data.download=false",
            f"train.max_steps={2 * a.speed_steps}",
            f"train.log_every={a.speed_steps}",
            "train.progress=log",
            "train.eval_every_epochs=1000000",
            "checkpoint.every_minutes=0",
            "checkpoint.at_end=false",
            "launcher.nproc_per_node=1",
            f"launcher.backend={'nccl' if ctx.gpus else 'gloo'}",
            f"output_dir={run_dir}",
        ]
        code, out = run_proc(cmd, env, ctx.work, a.timeout, run_dir.with_suffix(".out"))
        if code != 0:
            return False, "", f"{side}: {error_line(code, out, a.timeout)}"
        rates[side] = [e["samples_per_s"] for e in read_run(run_dir)[1] if "samples_per_s" in e][-1]
    ratio = rates["simulated"] / rates["one process"]
    fig = (
        f"{n} simulated workers {rates['simulated']:,.0f} vs one process (batch {SIM_BATCH * n}) "
        f"{rates['one process']:,.0f} img/s = {ratio:.2f}x (bar >= {SIM_MIN_RATIO:g})"
    )
    return ratio >= SIM_MIN_RATIO, fig, "" if ratio >= SIM_MIN_RATIO else f"below {SIM_MIN_RATIO:g}x of one process"


# --- the two sides of a speed row -------------------------------------------------------------------
def token_batch(vocab: int, tokens: int, device: torch.device) -> dict:
    """Sentence pairs of 32 random tokens, no padding, in the task's batch layout (src, prev, tgt: ids >= 4,
    past the special ids of data/subword.py; ntokens: the target tokens, the loss's unit)."""
    rows, length, g = max(1, tokens // 64), 32, torch.Generator().manual_seed(0)
    src, prev, tgt = (torch.randint(4, vocab, (rows, length), generator=g).to(device) for _ in range(3))
    return {"src": src, "prev": prev, "tgt": tgt, "ntokens": rows * length}


def plain_worker(w: dict) -> float:
    """The hand-written loop: torchvision's ResNet-50 (or the same transformer) on one batch on the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if w["model"] == "resnet50":
        model = torchvision.models.resnet50().to(device)
        x = torch.randn(w["image_batch"], 3, w["image_size"], w["image_size"], device=device)
        y = torch.randint(0, 1000, (w["image_batch"],), device=device)
        if w["channels_last"]:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        units, loss_fn = w["image_batch"], lambda: F.cross_entropy(model(x), y)
    else:
        model = build_model(ModelConfig(arch=w["model"], dropout=0.1), "wmt16", vocab_size=w["vocab"]).to(device)
        b = token_batch(w["vocab"], w["tokens"], device)
        opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-8)
        units, loss_fn = b["ntokens"], lambda: translation_loss(model, b)[0]  # label-smoothed cross-entropy
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[w["precision"]]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    model.train()

    def steps(n: int) -> None:
        for _ in range(n):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps(w["steps"])  # warm-up: cudnn.benchmark, the allocator, optimizer state
    start = time.perf_counter()
    steps(w["steps"])
    return units * w["steps"] / (time.perf_counter() - start)


def slowmo_worker(w: dict) -> float:
    """slowmo-train's CLI in this process, the task's batches replaced by one batch on the device: the
    first ImageNet batch of the task's own pipeline (its layout, its model), or random sentence pairs of
    the benchmark's vocabulary; the evaluation is a stub. Rate: the second logged interval."""
    name = "imagenet" if w["model"] == "resnet50" else "wmt16"
    real_builder = tasks.TASKS[name]

    def build(args):
        if name == "imagenet":
            task = real_builder(args)
            batch = next(iter(task.train_batches(0, 0)))
        else:
            model = build_model(args.model, "wmt16", vocab_size=w["vocab"]).to(args.worker.device)
            batch = token_batch(w["vocab"], w["tokens"], args.worker.device)
            task = Task(
                model=model,
                train_batches=None,
                steps_per_epoch=1,
                loss=translation_loss,
                evaluate=None,
                metric=HeadlineMetric("ppl", False, "valid"),
                batch_size=args.batch_size,
                train_size=10**9,
                unit="tokens",
            )
        metric = task.metric.name
        return dataclasses.replace(
            task,
            train_batches=lambda epoch, skip: itertools.repeat(batch),
            steps_per_epoch=10**6,
            evaluate=lambda m, final=False: {metric: 0.0},
        )

    tasks.TASKS[name] = (
        dataclasses.replace(real_builder, build=build) if dataclasses.is_dataclass(real_builder) else build
    )  # a TaskSpec record, or (older) the builder itself
    task_args = (
        [
            "+exp=imagenet_allreduce",
            f"data.root={w['image_root']}",
            f"data.image_size={w['image_size']}",
            "data.workers=0",
            f"train.batch_size={w['image_batch']}",
            "train.total_batch=null",
            f"model.channels_last={str(w['channels_last']).lower()}",
        ]
        if name == "imagenet"
        else ["+exp=wmt16_allreduce", f"data.root={w['text_root']}", f"model.arch={w['model']}", "model.dropout=0.1"]
    )
    sys.argv = [
        "slowmo-train",
        *task_args,
        f"train.max_steps={2 * w['steps']}",
        f"train.log_every={w['steps']}",
        "train.progress=log",
        f"train.precision={w['precision']}",
        "checkpoint.every_minutes=0",
        "checkpoint.at_end=false",
        "launcher.nproc_per_node=1",
        f"output_dir={w['run_dir']}",
        f"launcher.backend={'nccl' if torch.cuda.is_available() else 'gloo'}",
        "data.download=false",
    ]
    cli.main()
    key = UNITS[w["model"]][0]
    return [e[key] for e in read_run(Path(w["run_dir"]))[1] if key in e][-1]
