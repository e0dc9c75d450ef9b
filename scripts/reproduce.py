"""One-command CPU-scale reproduction of the SlowMo paper's comparisons (Wang, Tantia, Ballas and
Rabbat, "SlowMo: Improving Communication-Efficient Distributed SGD with Slow Momentum", ICLR 2020,
arXiv:1910.00643, Table 1 and the ablations of Sec. 6), with a report in docs/RESULTS.md.

    .venv/bin/python scripts/reproduce.py all                    # every set (~86 min idle), then the report
    .venv/bin/python scripts/reproduce.py cifar                  # one set: cifar | streamed | streamed_parts |
                                                                 #   sweep | translation | diagnostics
    .venv/bin/python scripts/reproduce.py all --dry-run          # print the training commands only
    .venv/bin/python scripts/reproduce.py report                 # regenerate docs/RESULTS.md + docs/img only

Run directories go to ``--runs-dir`` (default ``runs/reproduce``, ignored by git): one per
(set, method, seed), e.g. ``runs/reproduce/cifar/localsgd_slowmo_s1``. Re-running a command skips
every run that has a ``summary.json``, resumes one with a checkpoint (``resume=auto``) and starts
the others; a failed run is reported and the set goes on; Ctrl-C stops the current run (its workers
save a checkpoint) and the script, and the same command continues later.

Every run is one call of the project's own CLI with the set's shared overrides (``SETS`` below),
which are the same for every method: the same budget, schedule and tuning effort for all of them.
The report rewrites only the region between ``<!-- reproduce:begin -->`` and
``<!-- reproduce:end -->`` of docs/RESULTS.md (appended with its heading when absent) and the plots
``docs/img/reproduce_*.png``; it reads the runs with slowmo_train/report.py.

Budget (2 cores; 4 one-thread workers per run; one run at a time; measured 2026-12-01 18:10-19:54
UTC, 51 runs in 85.7 min of training, the machine idle but for short test runs during a few; see CIFAR_SHARED,
SWEEP_SHARED, TRANSLATION_SHARED):
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
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slowmo_train.report import Run, load_run, step_seconds
from slowmo_train.scripting import markdown_table

REPO = Path(__file__).resolve().parents[1]

#: the data folder beside the clone (see its README); elsewhere set SLOWMO_TRAIN_DATA
DATA = Path(os.environ.get("SLOWMO_TRAIN_DATA", REPO.parent / "shared" / "data")).resolve()
CIFAR_ROOT = DATA / "cifar10"
MULTI30K_ROOT = DATA / "translation" / "multi30k"
SEEDS = (1, 2)
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
HEADING = "## Reproduction of the paper's comparisons"


# --- what runs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    key: str                      # run-name stem, e.g. "localsgd_slowmo"
    label: str                    # table label, e.g. "Local SGD + SlowMo"
    exp: str                      # configs/exp/<exp>.yaml
    extra: tuple[str, ...] = ()   # method-specific overrides (never tuning: the sweep's tau/beta, streaming)


@dataclass(frozen=True)
class RunSet:
    name: str
    description: str
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    shared: tuple[str, ...]       # identical for every method of the set


@dataclass(frozen=True)
class PlannedRun:
    set_name: str
    method: Method
    seed: int
    shared: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.method.key}_s{self.seed}"

    def run_dir(self, runs_dir: Path) -> Path:
        return runs_dir / self.set_name / self.name

    def command(self, runs_dir: Path, resume: bool = False) -> list[str]:
        # a method's own value of a shared key replaces it (Hydra takes one value per key)
        own = {a.split("=", 1)[0] for a in self.method.extra}
        shared = [a for a in self.shared if a.split("=", 1)[0] not in own]
        cmd = [sys.executable, "-m", "slowmo_train", f"+exp={self.method.exp}",
               "launcher.nproc_per_node=4", "launcher.threads_per_worker=1", f"seed={self.seed}",
               f"output_dir={self.run_dir(runs_dir)}", *shared, *self.method.extra]
        return cmd + (["resume=auto"] if resume else [])


# CIFAR-10 settings, measured on the 2-core machine with nothing else running: 4 workers x 32
# images = 128 in total, so quickstart's lr 0.4 per 256 images (peak 0.2) applies unchanged; width
# 0.125 (0.18M parameters) trains ~1200-1450 images/s with 4 one-thread workers and evaluates the
# 10k test images in ~2.5 s, so an epoch of a 30k subset costs ~25 s and a run of 4 epochs (936
# steps, 78 outer steps at tau 12) ~1.8 min with ~14 s of start-up (measured: OSGP + SlowMo 1 min
# 46 s, 63.7 % test top-1; AR-SGD with 3 epochs 89 s, 62.3 %).
# A 30k subset rather than all 50k buys a fourth epoch at the same cost (more epochs rather
# than more data), i.e. a learning curve and the lr drop; the paper's schedule shape (warm-up,
# lr / 10 for the last quarter) is compressed to those 4 epochs as in configs/exp/quickstart.yaml.
CIFAR_SHARED = (
    f"data.root={CIFAR_ROOT}", "model.width=0.125", "train.batch_size=32", "data.train_subset=30000",
    "train.epochs=4", "train.eval_every_epochs=1", "train.eval_batch_size=250", "train.log_every=20",
    "train.progress=log", "optim.lr=0.4", "optim.warmup_epochs=0.2", "optim.milestone_epochs_of=4",
    "optim.milestones=[3]", "checkpoint.every_minutes=2",
)
# The sweep: 12 runs in ~12 min, so the same subset, model, batch, lr and schedule shape as
# CIFAR_SHARED for 2 epochs only (468 steps, 19 outer steps even at tau 24; measured: 20k images x
# 2 epochs took 46 s, so ~56 s per run here).
SWEEP_SHARED = (
    f"data.root={CIFAR_ROOT}", "model.width=0.125", "train.batch_size=32", "data.train_subset=30000",
    "train.epochs=2", "train.eval_every_epochs=1", "train.eval_batch_size=250", "train.log_every=20",
    "train.progress=log", "optim.lr=0.4", "optim.warmup_epochs=0.2", "optim.milestone_epochs_of=2",
    "optim.milestones=[1.5]", "checkpoint.every_minutes=2",
)
# Translation: configs/exp/wmt16_small_cpu.yaml (transformer_small, 8k joint vocabulary, Adam at
# 2e-3 with a short warm-up, test2016 BLEU) cut to ~3 min per run with 4 workers: half width
# (d_model 128, 2.4M parameters), 1024 tokens per worker and step (241 steps per epoch), 2 epochs
# (measured idle: AR-Adam 2 min 55 s, test2016 BLEU 20.9; under load Local Adam + SlowMo 11.7).
# BLEU (beam search over the 1000 test2016 sentences, ~14 s) only at the final evaluation; the
# per-epoch evaluations give the validation perplexity curve.
TRANSLATION_SHARED = (
    f"data.root={MULTI30K_ROOT}", "model.arch=transformer_small", "model.width=0.5", "data.vocab_size=8000",
    "data.max_tokens=1024", "train.epochs=2", "train.eval_every_epochs=1", "train.log_every=20",
    "train.progress=log", "optim.lr=2e-3", "optim.warmup_steps=100", "eval.bleu_split=test",
    "checkpoint.every_minutes=2",
)
# Streamed SlowMo: the outer all-reduce in 4 fragments, applied one step late, in bf16.
STREAMED = ("slowmo.overlap_steps=1", "slowmo.fragments=4", "slowmo.outer_dtype=bfloat16")

CIFAR_METHODS = tuple(
    Method(key, label, f"cifar10_{key}")
    for key, label in [("allreduce", "AR-SGD"), ("allreduce_slowmo", "AR-SGD + SlowMo"),
                       ("localsgd", "Local SGD"), ("localsgd_slowmo", "Local SGD + SlowMo"),
                       ("sgp", "SGP"), ("sgp_slowmo", "SGP + SlowMo"),
                       ("osgp", "OSGP"), ("osgp_slowmo", "OSGP + SlowMo")])
STREAMED_METHODS = (
    Method("localsgd_slowmo_streamed", "Local SGD + SlowMo (streamed)", "cifar10_localsgd_slowmo", STREAMED),
    Method("sgp_slowmo_streamed", "SGP + SlowMo (streamed)", "cifar10_sgp_slowmo", STREAMED),
)
# which of the three streamed options moves the accuracy (Local SGD + SlowMo, one option at a time)
STREAMED_PARTS = tuple(
    Method(f"localsgd_slowmo_{key}", f"Local SGD + SlowMo, {option} only", "cifar10_localsgd_slowmo", (option,))
    for key, option in zip(("D1", "F4", "bf16"), STREAMED))
SWEEP_BETAS = (0.0, 0.4, 0.6, 0.8)
SWEEP_TAUS = (6, 12, 24)
# pure BMUF: Local SGD's averaging period equals SlowMo's tau (Sec. 3: Local SGD + SlowMo = BMUF)
SWEEP_METHODS = tuple(
    Method(f"beta{beta:g}_tau{tau}", f"beta={beta:g}, tau={tau}", "cifar10_localsgd_slowmo",
           (f"slowmo.beta={beta:g}", f"slowmo.tau={tau}", f"algorithm.period={tau}"))
    for beta in SWEEP_BETAS for tau in SWEEP_TAUS)
TRANSLATION_METHODS = tuple(
    Method(key, label, f"wmt16_{key}")
    for key, label in [("allreduce", "AR-Adam"), ("localsgd", "Local Adam"),
                       ("localsgd_slowmo", "Local Adam + SlowMo"), ("sgp", "SGP"), ("sgp_slowmo", "SGP + SlowMo")])
# Not part of the comparison (its verdicts use only the equally tuned runs above): where SlowMo
# loses on Multi30k, is it the exact average every tau steps or the slow momentum? beta = 0 keeps
# the averaging and drops the momentum; half the lr, 2e-3 (1 - beta), gives SlowMo's outer step
# the long-run size of the base's own (with alpha = 1 the momentum scales it by 1 / (1 - beta)).
DIAGNOSTIC_METHODS = (
    Method("sgp_slowmo_beta0", "SGP + SlowMo, beta = 0", "wmt16_sgp_slowmo", ("slowmo.beta=0",)),
    Method("sgp_slowmo_lr1e-3", "SGP + SlowMo, lr 1e-3", "wmt16_sgp_slowmo", ("optim.lr=1e-3",)),
    Method("localsgd_slowmo_lr1e-3", "Local Adam + SlowMo, lr 1e-3", "wmt16_localsgd_slowmo", ("optim.lr=1e-3",)),
)

SETS: dict[str, RunSet] = {
    "cifar": RunSet("cifar", "CIFAR-10, ResNet-18 x 0.125, 4 workers", CIFAR_METHODS, SEEDS, CIFAR_SHARED),
    "streamed": RunSet("streamed", "CIFAR-10, streamed SlowMo (4 fragments, one step late, bf16)", STREAMED_METHODS,
                       SEEDS, CIFAR_SHARED),
    "streamed_parts": RunSet("streamed_parts", "CIFAR-10, Local SGD + SlowMo with one streamed option at a time",
                             STREAMED_PARTS, SEEDS, CIFAR_SHARED),
    "sweep": RunSet("sweep", "CIFAR-10, Local SGD + SlowMo, beta x tau", SWEEP_METHODS, (1,), SWEEP_SHARED),
    "translation": RunSet("translation", "Multi30k En-De, transformer_small x 0.5, 4 workers, Adam",
                          TRANSLATION_METHODS, SEEDS, TRANSLATION_SHARED),
    "diagnostics": RunSet("diagnostics", "Multi30k En-De as the translation set, SlowMo's beta or lr changed "
                          "(diagnosis, not comparison)", DIAGNOSTIC_METHODS, (1,), TRANSLATION_SHARED),
}


def plan(set_name: str) -> list[PlannedRun]:
    run_set = SETS[set_name]
    return [PlannedRun(set_name, m, seed, run_set.shared) for seed in run_set.seeds for m in run_set.methods]


# --- running -----------------------------------------------------------------------------------------
def run_state(run_dir: Path) -> str:
    """done (summary.json), resume (a checkpoint to continue from) or new."""
    if (run_dir / "summary.json").exists():
        return "done"
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        return "resume"
    return "new"


def _fmt(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def machine_info() -> dict:
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    import torch

    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


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
        print(f"[{set_name} {i}/{len(todo)}] start {r.name}{' (resume)' if state == 'resume' else ''} | "
              f"elapsed {_fmt(time.time() - start)}" + (f", eta {_fmt(eta)}" if eta else ""), flush=True)
        t0 = time.time()
        with open(run_dir / "reproduce.log", "a") as log:
            # its own session: a Ctrl-C reaches the CLI once, from here (the CLI takes a second one as
            # "kill the workers now", which a terminal's SIGINT to the whole group would amount to)
            proc = subprocess.Popen(r.command(runs_dir, state == "resume"), cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                print(f"[{set_name}] stopping {r.name}: its workers save a checkpoint (Ctrl-C again: kill them)",
                      flush=True)
                proc.send_signal(signal.SIGINT)
                while True:
                    try:
                        proc.wait()
                        break
                    except KeyboardInterrupt:
                        proc.send_signal(signal.SIGINT)
                print(f"[{set_name}] interrupted during {r.name}; run the same command again to continue",
                      flush=True)
                raise
        durations.append(time.time() - t0)
        if code == 0 and run_state(run_dir) == "done":
            print(f"[{set_name} {i}/{len(todo)}] done {r.name} in {_fmt(durations[-1])}", flush=True)
        else:
            failed.append(r.name)
            print(f"[{set_name} {i}/{len(todo)}] FAILED {r.name} (exit {code}) in {_fmt(durations[-1])}: "
                  f"{last_error(run_dir / 'reproduce.log')}", flush=True)
    return failed


def portable(command: str) -> str:
    """A command as the docs show it: ``python`` for this interpreter, the data folder as seen from
    the repository (its default place beside the clone)."""
    data = os.path.relpath(DATA, REPO) if DATA.is_relative_to(REPO.parent) else str(DATA)
    return command.replace(sys.executable, "python").replace(str(DATA), data)


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip()[:300] + f" (log: {log})"


# --- statistics and verdicts -------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float | None              # sample standard deviation over seeds; None with one seed
    n: int

    def fmt(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f}" + (f" ± {self.sd:.{digits}f}" if self.sd is not None else "")


def stat(values: list[float]) -> Stat | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return Stat(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class Claim:
    what: str                     # e.g. "Local SGD -> Local SGD + SlowMo, best test top-1"
    low: str                      # the method the paper finds worse (or, for "no_gain", the base)
    high: str
    paper: str                    # the paper's numbers, as text
    kind: str = "higher"          # higher: mean(high) > mean(low); no_gain: high is not better than low
    score: str = "best"           # best (top-1) | bleu (final test BLEU)


def verdict(low: Stat | None, high: Stat | None, kind: str = "higher", noise: float | None = None) -> tuple[str, str]:
    """Decide from the measured mean difference against the seed spread: the difference must exceed
    the standard deviation of a difference of two means, sqrt(sd_low^2 + sd_high^2) (``noise`` stands
    in for a one-seed comparison). Returns (verdict, measured difference as text)."""
    if low is None or high is None:
        return "no data", ""
    diff = high.mean - low.mean
    sds = [s.sd for s in (low, high) if s.sd is not None]
    spread = math.sqrt(sum(s * s for s in sds)) if len(sds) == 2 else noise
    text = f"{diff:+.2f}" + (f" (spread {spread:.2f})" if spread is not None else " (one seed, no spread)")
    if spread is None:
        return "not resolved", text
    if kind == "no_gain":
        return ("reproduces" if diff <= spread else "does not reproduce"), text
    if abs(diff) <= spread:
        return "not resolved", text
    return ("reproduces" if diff > 0 else "does not reproduce"), text


# --- loading runs ------------------------------------------------------------------------------------
@dataclass
class MethodRuns:
    label: str
    runs: list[Run]

    def best(self) -> Stat | None:
        """The headline metric's best evaluation (summary.json; top-1 for CIFAR-10)."""
        return stat([r.summary.get("best") for r in self.runs])

    def final_bleu(self) -> Stat | None:
        """Test BLEU of the final model: translation runs measure BLEU at their final evaluation only."""
        return stat([(r.summary.get("final_eval") or {}).get("bleu") for r in self.runs])

    def score(self, name: str) -> Stat | None:
        return self.final_bleu() if name == "bleu" else self.best()

    def final_metric(self) -> Stat | None:
        return stat([(r.summary.get("final_eval") or {}).get(r.metric) for r in self.runs if r.metric])

    def final_loss(self) -> Stat | None:
        return stat([r.train[-1]["loss"] if r.train else None for r in self.runs])

    def ms_per_step(self) -> Stat | None:
        return stat([1000 * s if (s := step_seconds(r)) is not None else None for r in self.runs])

    def bytes_per_step(self) -> Stat | None:
        return stat([r.summary.get("comm_bytes_sent_per_step") for r in self.runs])


def load_set(set_name: str, runs_dir: Path) -> dict[str, MethodRuns]:
    """Finished runs (with summary.json) of a set, grouped by method key, in the plan's order."""
    out: dict[str, MethodRuns] = {}
    for r in plan(set_name):
        d = r.run_dir(runs_dir)
        if run_state(d) != "done" or not (d / "metrics.jsonl").exists():
            continue
        out.setdefault(r.method.key, MethodRuns(r.method.label, [])).runs.append(load_run(d))
    return out


# --- report ------------------------------------------------------------------------------------------
CIFAR_PAPER = {"allreduce": "92.66", "localsgd": "91.73", "localsgd_slowmo": "93.20", "sgp": "93.90",
               "sgp_slowmo": "94.32", "osgp": "93.17", "osgp_slowmo": "93.74"}
TRANSLATION_PAPER = {"allreduce": "27.17", "localsgd": "26.62", "localsgd_slowmo": "27.14", "sgp": "26.92",
                     "sgp_slowmo": "27.84"}
CIFAR_CLAIMS = (
    Claim("Local SGD -> + SlowMo, best test top-1", "localsgd", "localsgd_slowmo", "91.73 -> 93.20"),
    Claim("OSGP -> + SlowMo, best test top-1", "osgp", "osgp_slowmo", "93.17 -> 93.74"),
    Claim("SGP -> + SlowMo, best test top-1", "sgp", "sgp_slowmo", "93.90 -> 94.32"),
    Claim("Local SGD + SlowMo beats AR-SGD, best test top-1", "allreduce", "localsgd_slowmo", "92.66 < 93.20"),
    Claim("SGP + SlowMo beats AR-SGD, best test top-1", "allreduce", "sgp_slowmo", "92.66 < 94.32"),
    Claim("SlowMo over AR-SGD does not help, best test top-1", "allreduce", "allreduce_slowmo",
          "Sec. 6: no gain", "no_gain"),
)
TRANSLATION_CLAIMS = (
    Claim("Local Adam -> + SlowMo, test BLEU", "localsgd", "localsgd_slowmo", "26.62 -> 27.14", score="bleu"),
    Claim("SGP -> + SlowMo, test BLEU", "sgp", "sgp_slowmo", "26.92 -> 27.84", score="bleu"),
    Claim("SGP + SlowMo beats AR-Adam, test BLEU", "allreduce", "sgp_slowmo", "27.17 < 27.84", score="bleu"),
    Claim("AR-Adam beats Local Adam, test BLEU", "localsgd", "allreduce", "26.62 < 27.17", score="bleu"),
)


def _cell(s: Stat | None, digits: int = 2) -> str:
    return s.fmt(digits) if s is not None else "–"


def _bytes(s: Stat | None) -> str:
    return f"{s.mean / 1e3:.1f} kB" if s is not None else "–"


def method_table(groups: dict[str, MethodRuns], paper: dict[str, str], translation: bool = False) -> str:
    first, second = ("test2016 BLEU (final)", "best valid ppl") if translation else ("best test top-1",
                                                                                    "final test top-1")
    rows = []
    for key, g in groups.items():
        a, b = (g.final_bleu(), g.best()) if translation else (g.best(), g.final_metric())
        rows.append([g.label, len(g.runs), _cell(a), _cell(b), _cell(g.final_loss(), 3), _cell(g.ms_per_step(), 1),
                     _bytes(g.bytes_per_step()), paper.get(key, "–")])
    return markdown_table(["method", "seeds", first, second, "final train loss", "ms / iter", "bytes sent / iter",
                           "paper"], rows)


#: the columns of every table of the paper's claims
CLAIM_HEADER = ("paper's claim", "paper", "measured difference", "verdict")


def claims_table(groups: dict[str, MethodRuns], claims: tuple[Claim, ...],
                 more: list[list[str]] = ()) -> tuple[str, list[str]]:
    """The claims' rows (then ``more`` rows in the same columns) and their verdicts."""
    rows, verdicts = [], []
    for c in claims:
        lo, hi = groups.get(c.low), groups.get(c.high)
        v, text = verdict(lo.score(c.score) if lo else None, hi.score(c.score) if hi else None, c.kind)
        verdicts.append(v)
        rows.append([c.what, c.paper, text, f"**{v}**"])
    return markdown_table(CLAIM_HEADER, rows + list(more)), verdicts


def loss_claim(groups: dict[str, MethodRuns]) -> list[str]:
    lo, hi = groups.get("localsgd"), groups.get("localsgd_slowmo")
    # lower is better: the "higher" test on the negated losses
    neg = lambda s: Stat(-s.mean, s.sd, s.n) if s else None  # noqa: E731
    v, text = verdict(neg(lo.final_loss()) if lo else None, neg(hi.final_loss()) if hi else None)
    return ["Local SGD -> + SlowMo, final train loss (lower)", "0.122 -> 0.006", f"{text} (reduction)", f"**{v}**"]


def plot_curves(groups: dict[str, MethodRuns], path: Path, metric: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = plt.get_cmap("tab10")
    # one colour per base algorithm, dashed with SlowMo: each pair reads at a glance
    bases = list(dict.fromkeys(key.split("_")[0] for key in groups))
    for key, g in groups.items():
        i, style = bases.index(key.split("_")[0]), "--" if "slowmo" in key else "-"
        for j, run in enumerate(g.runs):
            label = g.label if j == 0 else None
            ax_loss.plot([e["step"] for e in run.train], [e["loss"] for e in run.train], style,
                         color=colors(i % 10), lw=0.8, alpha=0.8, label=label)
            evals = [e for e in run.evals if metric in e]
            ax_metric.plot([e["step"] for e in evals], [e[metric] for e in evals], style, marker="o", ms=2.5,
                           color=colors(i % 10), lw=0.8, alpha=0.8, label=label)
    ax_loss.set(xlabel="step", ylabel="training loss")
    ax_metric.set(xlabel="step", ylabel=ylabel)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    ax_metric.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sweep_grid(groups: dict[str, MethodRuns]) -> list[list[float | None]]:
    """best top-1, rows = beta, columns = tau."""
    grid = []
    for beta in SWEEP_BETAS:
        row = []
        for tau in SWEEP_TAUS:
            g = groups.get(f"beta{beta:g}_tau{tau}")
            s = g.best() if g else None
            row.append(s.mean if s else None)
        grid.append(row)
    return grid


def plot_heatmap(grid: list[list[float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[math.nan if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(SWEEP_TAUS)), [str(t) for t in SWEEP_TAUS])
    ax.set_yticks(range(len(SWEEP_BETAS)), [f"{b:g}" for b in SWEEP_BETAS])
    ax.set(xlabel="tau (= Local SGD period)", ylabel="slow momentum beta", title="best test top-1 (%)")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sweep_section(groups: dict[str, MethodRuns], noise: float | None) -> list[str]:
    grid = sweep_grid(groups)
    out = [markdown_table(["beta \\ tau", *SWEEP_TAUS],
                          [[f"{beta:g}", *("–" if v is None else f"{v:.2f}" for v in row)]
                           for beta, row in zip(SWEEP_BETAS, grid)])]
    ms = {tau: stat([s.mean for b in SWEEP_BETAS if (g := groups.get(f"beta{b:g}_tau{tau}"))
                     and (s := g.ms_per_step())]) for tau in SWEEP_TAUS}
    by = {tau: stat([s.mean for b in SWEEP_BETAS if (g := groups.get(f"beta{b:g}_tau{tau}"))
                     and (s := g.bytes_per_step())]) for tau in SWEEP_TAUS}
    out += ["", "ms / iter (mean over beta): " + ", ".join(
        f"tau {t}: {_cell(ms[t], 1)}" for t in SWEEP_TAUS) + "; bytes sent / iter: " + ", ".join(
        f"tau {t}: {_bytes(by[t])}" for t in SWEEP_TAUS) + "."]
    # claims: beta in 0.4-0.8 beats beta = 0 (mean over taus); tau 6 is more accurate than tau 24
    col = lambda betas, tau: [grid[SWEEP_BETAS.index(b)][SWEEP_TAUS.index(tau)] for b in betas]  # noqa: E731
    with_mom = stat([v for t in SWEEP_TAUS for v in col(SWEEP_BETAS[1:], t) if v is not None])
    without = stat([v for t in SWEEP_TAUS for v in col(SWEEP_BETAS[:1], t) if v is not None])
    small = stat([v for v in col(SWEEP_BETAS, SWEEP_TAUS[0]) if v is not None])
    large = stat([v for v in col(SWEEP_BETAS, SWEEP_TAUS[-1]) if v is not None])
    pt = lambda s: Stat(s.mean, None, s.n) if s else None  # noqa: E731  (spread over cells is not seed noise)
    v1, t1 = verdict(pt(without), pt(with_mom), noise=noise)
    v2, t2 = verdict(pt(large), pt(small), noise=noise)
    out += ["", markdown_table(CLAIM_HEADER, [
        ["beta in 0.4-0.8 beats beta = 0 (mean over tau), best top-1", "Sec. 6, Fig. 3", t1, f"**{v1}**"],
        [f"tau {SWEEP_TAUS[0]} more accurate than tau {SWEEP_TAUS[-1]} (mean over beta), best top-1",
         "Sec. 6: tau trades speed for accuracy", t2, f"**{v2}**"]])]
    return out


def streamed_section(exact: dict[str, MethodRuns], streamed: dict[str, MethodRuns]) -> list[str]:
    rows = []
    for key in ("localsgd_slowmo", "sgp_slowmo"):
        e, s = exact.get(key), streamed.get(f"{key}_streamed")
        eb, sb = (e.best() if e else None), (s.best() if s else None)
        ef, sf = (e.final_metric() if e else None), (s.final_metric() if s else None)
        db = sb.mean - eb.mean if eb and sb else None
        df = sf.mean - ef.mean if ef and sf else None
        ok = "–" if db is None or df is None else ("yes" if abs(db) <= 0.5 and abs(df) <= 0.5
                                                     else "no: better" if min(db, df) > 0 else "no")
        label = (e or s).label if (e or s) else key
        rows.append([label, _cell(eb), _cell(sb), "–" if db is None else f"{db:+.2f}", _cell(ef), _cell(sf),
                     "–" if df is None else f"{df:+.2f}", ok])
    return [markdown_table(["method", "exact best", "streamed best", "diff best", "exact final", "streamed final",
                            "diff final", "within 0.5"], rows)]


def diagnostics_section(translation: dict[str, MethodRuns], diagnostics: dict[str, MethodRuns]) -> list[str]:
    """The diagnostic runs beside the translation rows they vary (not part of any verdict)."""
    out = ["### Diagnosis: SlowMo on Multi30k with beta = 0 or half the lr (one seed; not part of the verdicts)", "",
           "The translation command with one change each: " + "; ".join(
               f"{m.label}: `{' '.join(m.extra)}`" for m in DIAGNOSTIC_METHODS) + ". The rows above them are the "
           "translation set's (mean over its seeds).", ""]
    if not diagnostics:
        return out + ["No finished runs yet: `scripts/reproduce.py diagnostics`.", ""]
    rows = {k: translation[k] for k in ("sgp", "sgp_slowmo", "localsgd", "localsgd_slowmo") if k in translation}
    rows.update(diagnostics)
    return out + [method_table(rows, TRANSLATION_PAPER, translation=True), ""]


def streamed_parts_section(exact: dict[str, MethodRuns], streamed: dict[str, MethodRuns],
                           parts: dict[str, MethodRuns]) -> list[str]:
    if not parts:
        return ["No finished runs yet: `scripts/reproduce.py streamed_parts`."]
    ref = exact.get("localsgd_slowmo")
    ref_best = ref.best() if ref else None
    rows = [("exact (Alg. 1)", ref_best)] + [
        (m.label.split(", ", 1)[1], parts[m.key].best() if m.key in parts else None) for m in STREAMED_PARTS]
    if "localsgd_slowmo_streamed" in streamed:
        rows.append(("all three", streamed["localsgd_slowmo_streamed"].best()))
    cells = []
    for label, best in rows:
        diff = f"{best.mean - ref_best.mean:+.2f}" if best and ref_best and label != "exact (Alg. 1)" else "–"
        cells.append([label, _cell(best), diff])
    return [markdown_table(["Local SGD + SlowMo", "best test top-1", "diff to exact"], cells)]


def machine_line(runs_dir: Path) -> str:
    for name in SETS:
        p = runs_dir / name / "machine.json"
        if p.exists():
            m = json.loads(p.read_text())
            return (f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('os')}, Python {m.get('python')}, "
                    f"torch {m.get('torch')}; gloo on CPU, 4 worker processes with one thread each.")
    return "Machine: unknown (no machine.json in the run directories)."


def render(runs_dir: Path, img_dir: Path, img_ref: str = "img") -> str:
    """The Markdown of the reproduction region; writes the plots to img_dir."""
    cifar, streamed = load_set("cifar", runs_dir), load_set("streamed", runs_dir)
    sweep, translation = load_set("sweep", runs_dir), load_set("translation", runs_dir)
    shown = runs_dir.relative_to(REPO) if runs_dir.is_relative_to(REPO) else runs_dir  # the docs stay portable
    out = ["_Generated by `scripts/reproduce.py report` from the run directories in "
           f"`{shown}`; do not edit by hand._", "",
           "The SlowMo paper's comparisons (Wang et al., ICLR 2020, arXiv:1910.00643, Table 1 and Sec. 6) at "
           "CPU scale: the same step budget, schedule shape and hyper-parameters for every method of a set (no "
           "per-method tuning; SlowMo's alpha, beta and tau are those of `configs/exp/`). Numbers are mean ± "
           "sample standard deviation over seeds. A claim **reproduces** when the measured mean difference has "
           "the paper's sign and exceeds the spread sqrt(sd_a² + sd_b²); it is **not resolved** when the "
           "difference is within the spread (or only one seed exists); otherwise it **does not reproduce**. "
           "The models are ~100x smaller and trained ~100x shorter than the paper's, so absolute numbers are "
           "not comparable; only the orderings are.", "", machine_line(runs_dir), "",
           "Commands (the first trains every set, skipping finished runs; the second rewrites this region):", "",
           "```", ".venv/bin/python scripts/reproduce.py all", ".venv/bin/python scripts/reproduce.py report",
           "```", ""]
    for set_name in ("cifar", "translation", "sweep"):
        rs = SETS[set_name]
        out += [f"`{set_name}` set: {rs.description}; {len(rs.methods)} methods x seeds "
                f"{', '.join(map(str, rs.seeds))}; every run is the command below with its own `+exp=`, `seed=`, "
                "`output_dir=`" + (", `slowmo.beta`, `slowmo.tau`, `algorithm.period`" if set_name == "sweep" else "")
                + ":", "", "```", portable(" ".join(plan(set_name)[0].command(shown))), "```", ""]
    out += ["### CIFAR-10 (Table 1, top)", ""]
    if cifar:
        out += [method_table(cifar, CIFAR_PAPER), ""]
        table, _ = claims_table(cifar, CIFAR_CLAIMS, more=[loss_claim(cifar)])
        out += [table, ""]
        plot_curves(cifar, img_dir / "reproduce_cifar.png", "top1", "test top-1 (%)")
        out += [f"![CIFAR-10 curves]({img_ref}/reproduce_cifar.png)", ""]
    else:
        out += ["No finished runs yet: `scripts/reproduce.py cifar`.", ""]
    out += ["### Multi30k En-De (Table 1, WMT16 column at CPU scale)", ""]
    if translation:
        out += [method_table(translation, TRANSLATION_PAPER, translation=True), ""]
        table, _ = claims_table(translation, TRANSLATION_CLAIMS)
        out += [table, ""]
        plot_curves(translation, img_dir / "reproduce_translation.png", "ppl", "valid perplexity")
        out += [f"![translation curves]({img_ref}/reproduce_translation.png)", ""]
    else:
        out += ["No finished runs yet: `scripts/reproduce.py translation`.", ""]
    out += ["### Sensitivity: Local SGD + SlowMo, beta x tau (one seed; best test top-1)", ""]
    if sweep:
        ref = cifar.get("localsgd_slowmo")
        noise = ref.best().sd if ref and ref.best() else None
        out += sweep_section(sweep, noise)
        out += ["", "The one-seed sweep's spread is that of Local SGD + SlowMo over seeds in the CIFAR-10 set "
                f"({'n/a' if noise is None else f'{noise:.2f}'}).", ""]
        plot_heatmap(sweep_grid(sweep), img_dir / "reproduce_sweep.png")
        out += [f"![beta x tau]({img_ref}/reproduce_sweep.png)", ""]
    else:
        out += ["No finished runs yet: `scripts/reproduce.py sweep`.", ""]
    out += diagnostics_section(translation, load_set("diagnostics", runs_dir))
    out += ["### Streamed vs exact SlowMo", "",
            "`" + " ".join(STREAMED) + "` against the exact runs of the CIFAR-10 set (same seeds); goal: within "
            "0.5 points of test top-1.", ""]
    out += streamed_section(cifar, streamed) if streamed else ["No finished runs yet: `scripts/reproduce.py streamed`."]
    out += ["", "One option at a time (Local SGD + SlowMo; best test top-1, difference to exact SlowMo):", ""]
    out += streamed_parts_section(cifar, streamed, load_set("streamed_parts", runs_dir))
    return "\n".join(out).rstrip() + "\n"


def replace_region(document: str, body: str) -> str:
    """Replace the text between the markers; append heading and markers when absent."""
    if BEGIN in document and END in document and document.index(BEGIN) < document.index(END):
        head, rest = document.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return f"{head}{BEGIN}\n{body}{END}{tail}"
    return f"{document.rstrip()}\n\n{HEADING}\n\n{BEGIN}\n{body}{END}\n"


def write_report(runs_dir: Path, results: Path, img_dir: Path) -> None:
    body = render(runs_dir, img_dir, os.path.relpath(img_dir, results.parent))
    text = results.read_text() if results.exists() else "# Results\n"
    results.write_text(replace_region(text, body))
    print(f"wrote {results} and {img_dir}/reproduce_*.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=[*SETS, "all", "report"], help="a set to train (then report), all, or report")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce"), help="default: runs/reproduce")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md")
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    args = ap.parse_args(argv)
    runs_dir = args.runs_dir if args.runs_dir.is_absolute() else (REPO / args.runs_dir)
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
