"""The report of scripts/bench_allreduce.py, once every A/B round has run: the table of the rounds
(their order, slowmo-train's and the baseline's samples/s over all ranks, the ratio, and
slowmo-train's own figure that leaves its logging out), the medians and the best runs, the ratio
median(slowmo) / median(baseline) against the target, and the exit code that ``--min-ratio`` asks
for (1 when the ratio is below it, else 0).
"""

from __future__ import annotations

import argparse
import statistics


def print_report(args: argparse.Namespace, orders: list[tuple[str, str]], results: dict[str, list[dict]]) -> int:
    """Print the rounds' table and the verdict; the exit code (1: below ``--min-ratio``)."""
    slowmo = [x["samples_per_s"] for x in results["slowmo"]]
    base = [x["samples_per_s"] for x in results["baseline"]]
    trainer = [x["trainer_samples_per_s"] for x in results["slowmo"]]
    print()
    print(
        f"{'round':>5}  {'order':<17} {'slowmo':>10} {'baseline':>10} {'ratio':>7}   "
        f"{'slowmo (own figure, no logging)':>31}"
    )
    for r in range(args.rounds):
        order = "A B" if orders[r][0] == "slowmo" else "B A"
        print(
            f"{r + 1:>5}  {order + ' (A = slowmo)':<17} {slowmo[r]:10.1f} {base[r]:10.1f} "
            f"{slowmo[r] / base[r]:7.3f}   {trainer[r]:31.1f}"
        )
    med_s, med_b = statistics.median(slowmo), statistics.median(base)
    ratio = med_s / med_b
    per_round = statistics.median(s / b for s, b in zip(slowmo, base))
    print(f"{'median':>5}  {'':<17} {med_s:10.1f} {med_b:10.1f} {ratio:7.3f}   {statistics.median(trainer):31.1f}")
    # other load on the machine only ever slows a run down, so the best run is the least disturbed one
    print(
        f"{'best':>5}  {'':<17} {max(slowmo):10.1f} {max(base):10.1f} {max(slowmo) / max(base):7.3f}   "
        f"{max(trainer):31.1f}"
    )
    print()
    print(f"samples/s (all ranks): slowmo-train median {med_s:.1f}, baseline median {med_b:.1f}")
    print(
        f"ratio slowmo/baseline = {ratio:.3f} (median of per-round ratios {per_round:.3f}, "
        f"best/best {max(slowmo) / max(base):.3f}; target >= 0.95)"
    )
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"FAIL: ratio {ratio:.3f} < --min-ratio {args.min_ratio}", flush=True)
        return 1
    return 0
