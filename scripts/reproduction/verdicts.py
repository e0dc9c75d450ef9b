"""The numbers of a set: its finished runs grouped by method (``load_set``), statistics over seeds
(``Stat``) and the rule that decides whether a claim of the paper reproduces (``verdict``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from slowmo_train.report import Run, load_run, step_seconds
from slowmo_train.scripting import markdown_table

from .plan import plan, run_state


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float | None  # sample standard deviation over seeds; None with one seed
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
    what: str  # e.g. "Local SGD -> Local SGD + SlowMo, best test top-1"
    low: str  # the method the paper finds worse (or, for "no_gain", the base)
    high: str
    paper: str  # the paper's numbers, as text
    kind: str = "higher"  # higher: mean(high) > mean(low); no_gain: high is not better than low
    score: str = "best"  # best (top-1) | bleu (final test BLEU)


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


def best_grid(groups: dict[str, MethodRuns], keys: list[list[str]]) -> list[list[float | None]]:
    """The mean best score of each method key of a grid of keys (None where it has no runs)."""
    grid = []
    for row in keys:
        stats = [groups[k].best() if k in groups else None for k in row]
        grid.append([s.mean if s else None for s in stats])
    return grid


CLAIM_HEADER = ("paper's claim", "paper", "measured difference", "verdict")


def claims_table(
    groups: dict[str, MethodRuns], claims: tuple[Claim, ...], more: list[list[str]] = ()
) -> tuple[str, list[str]]:
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
