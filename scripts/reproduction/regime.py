"""The report of SlowMo's own regime: the sets ``regime``, ``regime_follow``, ``regime_long``,
``beta_workers`` and ``translation_forms`` of plan.py in the Markdown region of docs/RESULTS.md between
``BEGIN`` and ``END`` with the plots ``docs/img/regime_*.png``; and ``beta_workers_few``,
``regime_buffers`` and ``translation_regime``, each in a region of its own (``SMALL_REGIONS``).

It answers, from the finished runs: the eight methods of Table 1 at 32 workers and the paper's
batch, lr rule and schedule shape; the inner lr held for an outer iteration (Alg. 1) or following
the schedule; the best slow momentum beta by the number of workers, against ``slowmo.beta=auto``;
SlowMo on Multi30k at the guided beta with Adam's buffers kept, reset or averaged, or decoupled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slowmo_train.algorithms.outer_optimizer import auto_beta
from slowmo_train.scripting import markdown_table

from .plan import (
    BETA_FEW_COUNTS,
    BETA_WORKERS_BETAS,
    BETA_WORKERS_COUNTS,
    REGIME_BATCH,
    REGIME_WORKERS,
    SETS,
    plan,
    portable,
)
from .plots import plot_curves
from .verdicts import MethodRuns, Stat, best_grid, claims_table, load_set, loss_claim, verdict

BEGIN, END = "<!-- regime:begin -->", "<!-- regime:end -->"
HEADING = "## SlowMo in its own regime: 32 workers, the paper's batch rule and schedule"
REGIME_SETS = ("regime", "regime_follow", "regime_long", "beta_workers", "translation_forms")
BETA_BASES = (("localsgd_slowmo", "Local SGD + SlowMo"), ("sgp_slowmo", "SGP + SlowMo"))


def _cell(s: Stat | None, digits: int = 2) -> str:
    return s.fmt(digits) if s is not None else "–"


def main_table(groups: dict[str, MethodRuns], paper: dict[str, str]) -> str:
    rows = [
        [g.label, len(g.runs), _cell(g.best()), _cell(g.final_metric()), _cell(g.final_loss(), 3), paper.get(k, "–")]
        for k, g in groups.items()
    ]
    head = ["method", "seeds", "best test top-1", "final test top-1", "final training loss", "paper (top-1)"]
    return markdown_table(head, rows)


def forms_table(hold: dict[str, MethodRuns], follow: dict[str, MethodRuns], pairs, score: str) -> str:
    """Each (label, hold key, follow key): the score with the inner lr held vs following, and the verdict
    of "follow is better"."""
    rows = []
    for label, hkey, fkey in pairs:
        h, f = hold.get(hkey), follow.get(fkey)
        hs, fs = (h.score(score) if h else None), (f.score(score) if f else None)
        v, diff = verdict(hs, fs)
        rows.append([label, _cell(hs), _cell(fs), diff, v.replace("reproduces", "follow better")])
    name = "test BLEU" if score == "bleu" else "best test top-1"
    return markdown_table(["case", f"hold (Alg. 1), {name}", f"follow, {name}", "follow - hold", "verdict"], rows)


def length_table(short: dict[str, MethodRuns], long: dict[str, MethodRuns]) -> str:
    """The long runs against the same methods' 16-epoch runs of the same seed."""
    rows = []
    for key, g in long.items():
        seeds = {r.config.get("seed") for r in g.runs}
        same = (
            MethodRuns(g.label, [r for r in short[key].runs if r.config.get("seed") in seeds]) if key in short else None
        )
        rows.append(
            [
                g.label,
                ", ".join(map(str, sorted(seeds))),
                _cell(same.best() if same else None),
                _cell(g.best()),
                _cell(same.final_loss() if same else None, 3),
                _cell(g.final_loss(), 3),
            ]
        )
    head = ["method", "seed", "16 epochs: best top-1", "48 epochs: best top-1", "16: final loss", "48: final loss"]
    return markdown_table(head, rows)


def versus_table(groups: dict[str, MethodRuns], base: str, score: str) -> str:
    """Each method's score (``bleu``: final test BLEU; ``best``: best test top-1) and final training
    loss, and its score against the base method's (the verdict of "better than the base", by the
    document's rule)."""
    rows = []
    b = groups.get(base)
    name = "test BLEU" if score == "bleu" else "best test top-1"
    for key, g in groups.items():
        v, diff = verdict(b.score(score) if b else None, g.score(score)) if key != base else ("", "")
        rows.append([g.label, len(g.runs), _cell(g.score(score)), _cell(g.final_loss(), 3), diff, v])
    label = b.label if b else base
    head = ["method", "seeds", name, "final training loss", f"vs {label}", f"verdict (better than {label})"]
    return markdown_table(head, rows)


def beta_grid(groups: dict[str, MethodRuns], base: str, counts=BETA_WORKERS_COUNTS) -> list[list[float | None]]:
    """Best test top-1 by workers (rows) and beta (columns) for one base."""
    keys = [[f"{base}_n{n}_beta{beta:g}" for beta in BETA_WORKERS_BETAS] for n in counts]
    return best_grid(groups, keys)


def best_betas(groups: dict[str, MethodRuns], counts=BETA_WORKERS_COUNTS) -> dict[int, float | None]:
    """For each worker count, the beta with the highest mean (over both bases) best test top-1."""
    grids = [beta_grid(groups, base, counts) for base, _ in BETA_BASES]
    out: dict[int, float | None] = {}
    for i, n in enumerate(counts):
        means = []
        for j, beta in enumerate(BETA_WORKERS_BETAS):
            cells = [g[i][j] for g in grids]
            means.append((sum(cells) / len(cells), beta) if all(c is not None for c in cells) else None)
        done = [m for m in means if m is not None]
        out[n] = max(done)[1] if len(done) == len(means) else None
    return out


def beta_section(groups: dict[str, MethodRuns], img_dir: Path | None, img_ref: str, counts=BETA_WORKERS_COUNTS):
    """The best-beta tables by workers and base, the best beta against ``auto`` and (with an
    ``img_dir``) the plot."""
    n = max((len(g.runs) for g in groups.values()), default=1)
    seeds = "one seed" if n == 1 else f"mean of {n} seeds"
    out = []
    for base, label in BETA_BASES:
        grid = beta_grid(groups, base, counts)
        rows = [[n, *("–" if v is None else f"{v:.2f}" for v in row)] for n, row in zip(counts, grid)]
        out += [f"{label}, best test top-1 ({seeds}):", ""]
        out += [markdown_table(["workers", *(f"beta {b:g}" for b in BETA_WORKERS_BETAS)], rows), ""]
    best = best_betas(groups, counts)
    rows = [[n, "–" if b is None else f"{b:g}", f"{auto_beta(n):g}"] for n, b in best.items()]
    out += ["The best beta by workers (highest mean of the two bases) against `slowmo.beta=auto`:", ""]
    out += [markdown_table(["workers", "measured best beta", "slowmo.beta=auto"], rows), ""]
    if img_dir is None:
        return out
    plot_beta_workers(groups, img_dir / "regime_beta_workers.png")
    out += [f"![beta x workers]({img_ref}/regime_beta_workers.png)", ""]
    return out


def plot_beta_workers(groups: dict[str, MethodRuns], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BETA_BASES), figsize=(8, 3.2), sharey=True)
    for ax, (base, label) in zip(axes, BETA_BASES):
        for n, row in zip(BETA_WORKERS_COUNTS, beta_grid(groups, base)):
            ax.plot(BETA_WORKERS_BETAS, [math.nan if v is None else v for v in row], marker="o", label=f"{n} workers")
        ax.set(title=label, xlabel="slow momentum beta")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best test top-1 (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _command(set_name: str, shown: Path) -> list[str]:
    return ["```", portable(" ".join(plan(set_name)[0].command(shown))), "```", ""]


def render(runs_dir: Path, img_dir: Path, shown: Path, img_ref: str, paper: dict, claim_list) -> str:
    """The Markdown of the regime region; writes the plots to img_dir."""
    regime, follow = load_set("regime", runs_dir), load_set("regime_follow", runs_dir)
    out = [
        f"_Generated by `scripts/reproduce.py report` from the run directories in `{shown}`; do not edit by hand._",
        "",
        f"{SETS['regime'].description}: {REGIME_WORKERS} workers played by the simulated cluster "
        f"(`launcher.simulate={REGIME_WORKERS}`, equal to real processes), a total batch of {REGIME_BATCH} on a "
        "5,120-image subset (a tenth of the data per step, as the paper's 4096 of 50k), the paper's lr rule "
        "(0.1 per 256 images) and schedule shape (warm-up 5/200 of the run, lr / 10 at 1/2, 3/4 and 7/8). "
        "SlowMo at the paper's alpha 1, beta 0.7, tau 12 and Algorithm 1's held lr (`slowmo.inner_lr=hold`); "
        "nothing tuned for any method. Every run of the "
        "set is this command with its own `+exp=`, `seed=`, `output_dir=`:",
        "",
        *_command("regime", shown),
        "Train them: `.venv/bin/python scripts/reproduce.py regime` (likewise `regime_follow`, `regime_long`, "
        "`beta_workers`, `translation_forms`).",
        "",
        "### The eight methods of Table 1 at 32 workers",
        "",
    ]
    if regime:
        out += [main_table(regime, paper), "", claims_table(regime, claim_list, more=[loss_claim(regime)])[0], ""]
        plot_curves(regime, img_dir / "regime_cifar.png", "top1", "test top-1 (%)")
        out += [f"![32-worker curves]({img_ref}/regime_cifar.png)", ""]
    else:
        out += ["No finished runs yet.", ""]
    long = load_set("regime_long", runs_dir)
    if long:
        out += ["### Three times longer (48 epochs, 480 steps, 40 outer iterations)", ""]
        out += [length_table(regime, long), ""]
        out += [claims_table(long, claim_list[:1], more=[loss_claim(long)])[0], ""]
        out += ["Runs: the regime command with `train.epochs=48` and the schedule scaled to it:", ""]
        out += _command("regime_long", shown)
    out += ["### The inner lr: held for tau steps (Alg. 1) or following the schedule", ""]
    pairs = [(f"CIFAR-10 {g.label}", k, f"{k}_follow") for k, g in regime.items() if f"{k}_follow" in follow]
    translation_forms = load_set("translation_forms", runs_dir)
    if pairs:
        out += [forms_table(regime, follow, pairs, "best"), ""]
    if translation_forms:
        out += [
            forms_table(
                translation_forms,
                translation_forms,
                [("Multi30k SGP + SlowMo (4 workers)", "sgp_slowmo_hold", "sgp_slowmo_follow")],
                "bleu",
            ),
            "",
            "Multi30k runs (the translation set's protocol, 4 simulated workers):",
            "",
            *_command("translation_forms", shown),
        ]
    out += ["### Beta against the number of workers (same total batch, lr, schedule and steps)", ""]
    beta_workers = load_set("beta_workers", runs_dir)
    out += beta_section(beta_workers, img_dir, img_ref) if beta_workers else ["No finished runs yet.", ""]
    return "\n".join(out).rstrip() + "\n"


@dataclass(frozen=True)
class SmallRegion:
    """A set reported in a region of its own, written when the set has runs here: its markers and
    heading, the text before its command, and its tables from the set's runs."""

    markers: tuple[str, str, str]
    intro: str
    body: Callable[[dict[str, MethodRuns]], list[str]]


FEW_SET, TRANSLATION_SET, BUFFERS_SET = "beta_workers_few", "translation_regime", "regime_buffers"
SMALL_REGIONS = {
    FEW_SET: SmallRegion(
        ("<!-- regime-few-workers:begin -->", "<!-- regime-few-workers:end -->", "### Beta with 2 workers"),
        f"{SETS[FEW_SET].description}: the protocol of the sweep above (total batch {REGIME_BATCH}, Alg. 1's "
        f"held lr) with {', '.join(map(str, BETA_FEW_COUNTS))} simulated workers. Each run is this command with "
        "its own beta, `+exp=` and `seed=`:",
        lambda groups: beta_section(groups, None, "", BETA_FEW_COUNTS),
    ),
    BUFFERS_SET: SmallRegion(
        (
            "<!-- regime-buffers:begin -->",
            "<!-- regime-buffers:end -->",
            "### SGD's momentum buffers at the outer step",
        ),
        f"{SETS[BUFFERS_SET].description}: the regime protocol, SlowMo at alpha 1, beta 0.7, tau 12 with the "
        "base optimizer's momentum buffers kept or averaged at each outer step instead of reset (Alg. 1, the "
        "main table's runs). Each run is this command with its own `+exp=`, `seed=` and buffers:",
        lambda groups: [versus_table(groups, "localsgd", "best"), ""],
    ),
    TRANSLATION_SET: SmallRegion(
        (
            "<!-- regime-translation:begin -->",
            "<!-- regime-translation:end -->",
            "### Multi30k again: the guided beta, Adam's buffers, the decoupled update (4 workers)",
        ),
        f"{SETS[TRANSLATION_SET].description}. The translation set's protocol (2 epochs, Adam at 2e-3) with the "
        "inner lr following the schedule (the better form above); SlowMo at alpha 1, tau 48, and beta 0.2 (the "
        "authors' guidance for 4 nodes) or 0.6 (what the CIFAR-10 sweep chose for 4 workers). Every run is this "
        "command with its own `+exp=`, `seed=`, `output_dir=` and the row's SlowMo options:",
        lambda groups: [versus_table(groups, "sgp", "bleu"), ""],
    ),
}


def render_small(set_name: str, runs_dir: Path, shown: Path) -> str:
    """The Markdown of a set's own region (:data:`SMALL_REGIONS`)."""
    region = SMALL_REGIONS[set_name]
    out = [
        f"_Generated by `scripts/reproduce.py report` from the run directories in `{shown}`; do not edit by hand._",
        "",
        region.intro,
        "",
        *_command(set_name, shown),
    ]
    groups = load_set(set_name, runs_dir)
    out += region.body(groups) if groups else ["No finished runs yet.", ""]
    return "\n".join(out).rstrip() + "\n"
