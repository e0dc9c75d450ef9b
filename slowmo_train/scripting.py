"""Helpers for code that drives slowmo-train from the outside: the scripts in scripts/, the tests and
``slowmo-train-report``. One implementation of each thing they all need:

    read_metrics(run_dir, event="train")    the records of a run's metrics.jsonl
    compose_config(["+exp=quickstart"])     the config slowmo-train composes from these overrides
    launch_env()                            os.environ for a child slowmo-train, without torchrun's variables
    markdown_table(header, rows)            a Markdown table, one row per line

Nothing here imports torch at module level, so the report tool starts fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: what torchrun (torch.distributed.elastic) sets for its workers, besides the TORCHELASTIC_* variables;
#: a slowmo-train started with them in its environment would take itself for one of those workers
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def metrics_file(run_dir: Path | str, rank: int = 0) -> Path:
    """Where rank ``rank`` of a run writes its records (slowmo_train/metrics.py)."""
    return Path(run_dir) / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")


def read_metrics(run: Path | str, event: str | None = None, rank: int = 0) -> list[dict[str, Any]]:
    """The records of a run's metrics file, in order: ``run`` is a run directory (rank ``rank``'s file
    in it) or a ``.jsonl`` file; ``event`` keeps only the records of that kind ("train", "eval", ...).

    Blank lines are skipped and a torn last line (a run killed, or still writing, mid-line) is dropped;
    any other line that is not JSON raises ValueError naming the file and the line."""
    path = Path(run)
    if path.suffix != ".jsonl":
        path = metrics_file(path, rank)
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise ValueError(f"{path}: line {n} is not JSON") from None
        if event is None or record.get("event") == event:
            records.append(record)
    return records


def compose_config(overrides: Iterable[str] = (), return_hydra_config: bool = False):
    """The Hydra config ``slowmo-train OVERRIDES...`` composes (a DictConfig, not yet validated:
    ``slowmo_train.config.to_job_config`` and ``config_checks.validate`` do that). Both ``+exp=NAME`` and ``exp=NAME``
    are accepted, as on the command line."""
    from hydra import compose, initialize_config_dir

    from slowmo_train.cli import config_dir, plain_group_overrides
    from slowmo_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(
            config_name="config",
            overrides=plain_group_overrides(list(overrides)),
            return_hydra_config=return_hydra_config,
        )


def launch_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child slowmo-train (or torchrun) that starts its own workers:
    without a surrounding torchrun's variables and without the keys in ``drop``, plus ``extra``."""
    gone = set(TORCHRUN_VARIABLES) | set(drop)
    env = {k: v for k, v in os.environ.items() if k not in gone and not k.startswith("TORCHELASTIC_")}
    env.update(extra)
    return env


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """``| a | b |``, the ``|---|---|`` rule, then ``| 1 | 2 |`` per row (cells as ``str``)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def merge_dicts(*dicts: dict) -> dict:
    """Nested dictionaries merged left to right (later values win): config overrides as dicts."""
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge_dicts(out.get(k, {}), v) if isinstance(v, dict) else v
    return out
