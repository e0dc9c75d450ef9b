"""How long the real cluster would take: the analytic step-time model, from the compute time per
step, the bytes each algorithm must send and the link rate.

The model is the one ``scripts/bench_speed.py`` checks against measured runs on the emulated cluster
(within 0.85-1.15 of the measured time per step, docs/RESULTS.md). With C the compute ms per step,
R the payload rate of one node's link per direction, P the parameter bytes, B the BatchNorm buffer
bytes, n the workers and ring(X, n) = 2 (n - 1) / n X the bytes a ring all-reduce moves per rank:

    AR-SGD     max(C, C/3 + ring(P, n) / R)       backward overlapped with the bucketed all-reduce;
                                                 the forward (~C/3) cannot overlap
    Local SGD  C + ring(P + B, n) / R / H
    SGP        C + (P + 4) / R                     one model (+ push-sum weight) out and in per step
    OSGP       max(C, (P + 4) / R)
    + SlowMo   + (ring(P + 4, n) + ring(B, n)) / R / tau   (Local SGD: replaces its own average;
               SGP / OSGP: the gossip of the outer step is skipped, (P + 4) / R x (tau - 1) / tau)

Streamed SlowMo (fragments, overlap) is modelled as the blocking outer step (an upper bound), and
the model knows no stragglers and no contention between a node's processes.

A simulated run (``launcher.simulate=N`` with ``launcher.simulate_link_mbit=RATE``) measures C on rank
0's own clock (its compute alone: the ranks take turns) and writes the model's figures into
``summary.json`` under ``simulated_cluster``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("slowmo_train")

#: TCP payload per Ethernet frame on a 1500-byte MTU (the bytes a link's rate counts)
PAYLOAD_EFFICIENCY = 1448 / 1514


def ring(nbytes: float, n: int) -> float:
    """Bytes a ring all-reduce of ``nbytes`` moves per rank and direction."""
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def payload_rate(mbit: float) -> float:
    """Payload bytes per second of a link of ``mbit`` megabit/s."""
    return mbit * 1e6 / 8 * PAYLOAD_EFFICIENCY


def step_ms(
    algorithm: str, tau: int | None, workers: int, compute_ms: float, rate: float, p: float, b: float, period: int = 12
) -> float:
    """The analytic time per step (module docstring); ``tau`` None: SlowMo off; ``rate`` in payload
    bytes per second; ``period``: Local SGD's averaging period H."""
    n = workers
    to_ms = 1000.0 / rate
    outer = (ring(p + 4, n) + ring(b, n)) * to_ms / tau if tau else 0.0
    if algorithm == "allreduce":
        return max(compute_ms, compute_ms / 3 + ring(p, n) * to_ms) + outer
    if algorithm == "local_sgd":
        return compute_ms + (outer if tau else ring(p + b, n) * to_ms / period)
    gossip = (p + 4) * to_ms * ((tau - 1) / tau if tau else 1.0)
    if algorithm == "sgp":
        return compute_ms + gossip + outer
    if algorithm == "osgp":
        return max(compute_ms, gossip) + outer
    raise ValueError(f"no step-time model for algorithm {algorithm!r}")


def model_run(summary: dict, run_dir: Path, job: dict, workers: int, model_bytes: tuple[int, int]) -> dict:
    """Add the modelled real-cluster time of a finished simulated run to ``summary`` (and its
    summary.json) when ``launcher.simulate_link_mbit`` is set. C: rank 0's training seconds per step
    (``train_s``: a simulated rank's own compute, on its own clock)."""
    mbit = job["launcher"].get("simulate_link_mbit") or 0.0
    steps = summary.get("train_steps") or 0
    if mbit <= 0 or steps <= 0:
        return summary
    p, b = model_bytes
    compute_ms = 1000.0 * summary["train_s"] / steps
    slowmo = job["slowmo"]
    tau = slowmo["tau"] if slowmo["enabled"] else None
    algo = job["algorithm"]
    per_step = step_ms(algo["name"], tau, workers, compute_ms, payload_rate(mbit), p, b, algo["period"])
    modelled = {
        "workers": workers,
        "link_mbit": mbit,
        "compute_ms_per_step": round(compute_ms, 3),
        "modelled_ms_per_step": round(per_step, 3),
        "modelled_train_s": round(per_step * steps / 1000.0, 3),
        "model": "slowmo_train/simulated/cluster.py",
    }
    summary = {**summary, "simulated_cluster": modelled}
    path = run_dir / "summary.json"
    if path.exists():
        path.write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "a real cluster of %d workers on %g mbit/s links: ~%.1f ms per step (compute %.1f ms), ~%.0f s for %d steps",
        workers,
        mbit,
        per_step,
        compute_ms,
        per_step * steps / 1000.0,
        steps,
    )
    return summary
