"""Compare runs: one table (printed and CSV) and loss / metric curves (PNG) from run directories.

    slowmo-train-report multirun/2026-11-22/04-10-00                 # every run below a sweep
    slowmo-train-report runs/a runs/b --out docs --name sweep_beta    # -> docs/sweep_beta.csv, .png

A run directory is one written by slowmo-train (``metrics.jsonl``, ``summary.json``, ``config.yaml``);
a directory that is not a run is searched for runs below it (a Hydra multirun folder). Per run the
table gives the configuration keys whose values differ between the runs (the sweep's overrides),
the final and best headline metric (``summary.json``), the time per training step (wall clock
between log lines, evaluation excluded), the total training wall time and the bytes sent per
step. The figure has loss and headline metric against step and against wall time, one curve per
run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slowmo_train.scripting import read_metrics

RUN_FILE = "metrics.jsonl"
#: differ between every run by construction; not what distinguishes the runs
IGNORED_KEYS = {"output_dir", "resume"}


class ReportError(ValueError):
    """Bad input; printed as one line."""


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    @property
    def metric(self) -> str | None:
        return self.summary.get("metric")


def find_runs(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise ReportError(
                f"{raw} is not a directory; pass run directories (holding {RUN_FILE}) or a folder above them"
            )
        if (path / RUN_FILE).exists():
            found.append(path)
            continue
        below = sorted((p.parent for p in path.rglob(RUN_FILE)), key=_natural_key)
        if not below:
            raise ReportError(f"{raw} holds no run: no {RUN_FILE} in it or below it")
        found.extend(below)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _natural_key(path: Path) -> list:
    """multirun/.../2 before multirun/.../10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def load_run(path: Path) -> Run:
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    try:
        events = read_metrics(path / RUN_FILE)  # a torn last line (a run killed mid-write) is dropped
    except ValueError as err:
        raise ReportError(str(err)) from None
    train = [e for e in events if e.get("event") == "train" and "loss" in e]
    evals = [e for e in events if e.get("event") == "eval"]
    if not summary.get("metric") and evals:
        summary["metric"] = "top1" if "top1" in evals[-1] else None
    return Run(path, config or {}, summary, train, evals)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differing_keys(runs: list[Run]) -> list[str]:
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k not in IGNORED_KEYS and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def step_seconds(run: Run) -> float | None:
    """Median wall-clock seconds per step between consecutive log lines with no evaluation between
    them (evaluation is not training time); falls back to all intervals if every one has one."""
    eval_times = [e["time"] for e in run.evals]
    clean, all_ = [], []
    for a, b in zip(run.train, run.train[1:]):
        steps = b["step"] - a["step"]
        if steps <= 0:
            continue
        per_step = (b["time"] - a["time"]) / steps
        all_.append(per_step)
        if not any(a["time"] < t <= b["time"] for t in eval_times):
            clean.append(per_step)
    chosen = clean or all_
    return statistics.median(chosen) if chosen else None


def wall_times(run: Run, events: list[dict]) -> list[float]:
    """Seconds since the run's first step, estimated as the first log line's time minus its steps."""
    if not run.train:
        return [0.0 for _ in events]
    per_step = step_seconds(run) or 0.0
    start = run.train[0]["time"] - run.train[0]["step"] * per_step
    return [e["time"] - start for e in events]


def rows_for(runs: list[Run], names: list[str]) -> tuple[list[str], list[dict]]:
    keys = differing_keys(runs)
    rows = []
    for run, name in zip(runs, names):
        flat = flatten(run.config)
        metric = run.metric
        final = run.summary.get("final_eval", {}) or {}
        secs = step_seconds(run)
        row = {
            "run": name,
            **{k: flat.get(k) for k in keys},
            "steps": run.summary.get("steps", run.train[-1]["step"] if run.train else 0),
            "metric": metric,
            "final": _round(final.get(metric)) if metric else None,
            "best": _round(run.summary.get("best")),
            "final_loss": _round(run.train[-1]["loss"]) if run.train else None,
            "ms_per_step": _round(1000 * secs, 1) if secs is not None else None,
            "train_wall_s": _round(wall_times(run, run.train[-1:])[0], 1) if run.train else None,
            "mb_sent_per_step": _round(run.summary.get("comm_bytes_sent_per_step", 0) / 1e6, 4)
            if "comm_bytes_sent_per_step" in run.summary
            else None,
        }
        rows.append(row)
    return keys, rows


def _round(value, digits: int = 4):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else round(value, digits)


def run_names(paths: list[Path]) -> list[str]:
    """Shortest distinguishing names: the paths relative to their common parent."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(*[parts[0] for parts in zip(*[p.parts for p in paths]) if len(set(parts)) == 1])
    return [str(p.relative_to(common)) or p.name for p in paths]


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells])


def plot(runs: list[Run], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((r.metric for r in runs if r.metric), None)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for run, label in zip(runs, labels):
        steps = [e["step"] for e in run.train]
        losses = [e["loss"] for e in run.train]
        axes[0, 0].plot(steps, losses, label=label)
        axes[0, 1].plot(wall_times(run, run.train), losses, label=label)
        if metric:
            evals = [e for e in run.evals if metric in e]
            axes[1, 0].plot([e["step"] for e in evals], [e[metric] for e in evals], marker="o", ms=3, label=label)
            axes[1, 1].plot(wall_times(run, evals), [e[metric] for e in evals], marker="o", ms=3, label=label)
    split = next((e.get("split") for r in runs for e in r.evals), "eval")
    for ax, (x, y) in zip(
        axes.flat,
        [
            ("step", "train loss"),
            ("wall time (s)", "train loss"),
            ("step", f"{split} {metric}"),
            ("wall time (s)", f"{split} {metric}"),
        ],
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def legend_labels(keys: list[str], rows: list[dict], names: list[str]) -> list[str]:
    if not keys:
        return names
    return [", ".join(f"{k}={row[k]}" for k in keys) for row in rows]


def report(paths: list[str], out: Path, name: str) -> tuple[str, Path, Path]:
    run_dirs = find_runs(paths)
    runs = [load_run(p) for p in run_dirs]
    names = run_names(run_dirs)
    keys, rows = rows_for(runs, names)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(runs, legend_labels(keys, rows, names), png_path)
    return format_table(rows), csv_path, png_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="slowmo-train-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders above them (a multirun)")
    ap.add_argument("--out", default="report", help="output folder (default: ./report)")
    ap.add_argument("--name", default="report", help="file stem of the CSV and PNG (default: report)")
    args = ap.parse_args(argv)
    try:
        table, csv_path, png_path = report(args.runs, Path(args.out), args.name)
    except (ReportError, OSError, yaml.YAMLError) as err:
        print(f"slowmo-train-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table)
    print(f"\nwrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
