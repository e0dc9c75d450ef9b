"""Where numbers go: ``metrics.jsonl`` (one JSON object per event), TensorBoard (rank 0) and the
console (a progress bar on a terminal, plain log lines otherwise).

Rank 0 writes ``metrics.jsonl``; every other rank writes ``metrics.rank<R>.jsonl`` with its own
communication figures, which differ between ranks for gossip algorithms.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("slowmo_train")


class MeanMeter:
    """Running sum of floats, averaged when read."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    def mean(self) -> float:
        return self.total / max(1, self.count)


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` with ``step > last_step`` (and a torn last line) in place,
    atomically; returns how many records were dropped. A resumed run calls it with the step of its
    checkpoint, so the records it writes again do not appear twice."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by a crash
            continue
        if isinstance(record, dict) and record.get("step", 0) > last_step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    return dropped


class MetricsWriter:
    """``resume_step``: continue a run from its checkpoint at that step: records after it are
    dropped from the JSONL file, and TensorBoard discards its events after it (``purge_step``)."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool = True, resume_step: int | None = None):
        self.rank = rank
        name = "metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"
        if resume_step is not None:
            dropped = truncate_jsonl(run_dir / name, resume_step)
            if dropped and rank == 0:
                log.info("resuming at step %d: dropped %d metric records written after it", resume_step, dropped)
        self._file = open(run_dir / name, "a", buffering=1)
        self._tb = None
        if rank == 0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, event: str, step: int, **values) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = values.get("split", event)
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "split"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class Progress:
    """A rich progress bar on rank 0 when stdout is a terminal; plain log lines otherwise."""

    def __init__(self, mode: str, total_steps: int, rank: int):
        if rank != 0 or mode == "none":
            self.mode = "none"
        elif mode == "auto":
            self.mode = "bar" if sys.stdout.isatty() else "log"
        else:
            self.mode = mode
        self.total = total_steps
        self._bar = None
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), refresh_per_second=4,
            )
            self._task = self._bar.add_task("train", total=total_steps, status="")
            self._bar.start()

    def update(self, step: int, status: str, force_line: bool = False) -> None:
        """``step`` optimizer steps are done; ``status`` is shown next to the bar or logged."""
        if self.mode == "bar":
            self._bar.update(self._task, completed=step, status=status)
        elif self.mode == "log" and force_line:
            log.info("step %d/%d %s", step, self.total, status)

    def message(self, text: str) -> None:
        if self.mode == "bar":
            self._bar.console.print(text)
        elif self.mode == "log":
            log.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Per-rank log files in ``run_dir/logs``; the console gets rank 0's messages (and every
    rank's warnings)."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
