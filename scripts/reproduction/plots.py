"""The plots of the reproduction's report (scripts/reproduction/report.py draws them into
``docs/img/reproduce_*.png``): ``plot_curves``, the training loss and the evaluation metric against
the step for every run of a set, one colour per base algorithm and dashed with SlowMo; and
``plot_heatmap``, the sweep's best test top-1 over slow momentum beta (rows) and tau (columns), from
the grid that ``report.sweep_grid`` builds. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from .plan import SWEEP_BETAS, SWEEP_TAUS
from .verdicts import MethodRuns


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
            ax_loss.plot(
                [e["step"] for e in run.train],
                [e["loss"] for e in run.train],
                style,
                color=colors(i % 10),
                lw=0.8,
                alpha=0.8,
                label=label,
            )
            evals = [e for e in run.evals if metric in e]
            ax_metric.plot(
                [e["step"] for e in evals],
                [e[metric] for e in evals],
                style,
                marker="o",
                ms=2.5,
                color=colors(i % 10),
                lw=0.8,
                alpha=0.8,
                label=label,
            )
    ax_loss.set(xlabel="step", ylabel="training loss")
    ax_metric.set(xlabel="step", ylabel=ylabel)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    ax_metric.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
