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
from contextlib import contextmanager
from pathlib import Path

import torch

from slowmo_train import control
from slowmo_train.simulated import world as simulated

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


class TrainLog:
    """The training side of the metrics: what accumulates between two log lines and when a line is
    due (every ``every`` steps and at the last step).

    Between lines: the loss (summed on the device: reading it every step would synchronise with
    the GPU), the units processed, this rank's communication counters, and the algorithm's extra
    per-rank metrics (device scalars such as the consensus distance). At a line, one control-plane
    reduction gives the mean loss and the total throughput over ranks, and one more the means of
    the extra metrics, each written at the step that measured it. Time spent in :meth:`paused`
    regions (evaluation, checkpoints) is not training time and does not count in the rate."""

    def __init__(
        self,
        writer: MetricsWriter,
        progress: Progress,
        every: int,
        steps_per_epoch: int,
        unit: str,
        device: torch.device,
    ):
        self.writer, self.progress, self.every = writer, progress, every
        self.steps_per_epoch, self.unit, self.device = steps_per_epoch, unit, device
        self.loss_sum = torch.zeros((), device=device)
        self.loss_steps = 0
        self._pending: list[tuple[int, dict]] = []
        #: training seconds of this rank so far (evaluation and checkpoints excluded; a simulated
        #: rank's own compute)
        self.train_seconds = 0.0
        self._new_interval()

    def _new_interval(self) -> None:
        self.units, self.comm = 0, {}
        self._start = self._clock()

    def add_step(self, step: int, loss: torch.Tensor, units: int, applied: bool, comm: dict, extra: dict) -> None:
        if applied:  # a skipped step (train.nonfinite=skip) leaves the loss mean alone
            self.loss_sum += loss.float()
            self.loss_steps += 1
        self.units += units
        for key, value in comm.items():
            self.comm.setdefault(key, MeanMeter()).add(value)
        if extra:
            self._pending.append((step, extra))

    def should_log(self, step: int, done: bool) -> bool:
        return step % self.every == 0 or done

    def write(self, step: int, lr: float, fields: dict | None = None) -> dict:
        """The ``train`` record of ``step`` (collective): mean loss over ranks, throughput, mean
        communication per step, this step's extra metrics and ``fields``."""
        elapsed = self._clock() - self._start
        self.train_seconds += elapsed
        n = control.world_size()
        loss, units, seconds = control.all_reduce([self.loss_sum.item() / max(1, self.loss_steps), self.units, elapsed])
        loss, units = loss / n, units / n
        # a simulated cluster's ranks take turns: its rate is all their units over all their seconds
        rate = units * n / max(seconds if simulated.world() is not None else elapsed, 1e-9)
        record = {
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            f"{self.unit}_per_s": rate,
            **{f"comm_{key}_per_step": m.mean() for key, m in self.comm.items()},
            **self.write_pending(merge_step=step),
            **(fields or {}),
        }
        self.writer.write("train", step, **record)
        self.progress.update(step, f"loss {loss:.3f} lr {lr:.3g} {rate:.0f} {self.unit}/s", force_line=True)
        if step % self.every == 0:
            # a line only because train.max_steps ends the run here keeps the loss interval open, so
            # a run resumed past the cap logs the same means as one that never stopped
            self.loss_sum, self.loss_steps = torch.zeros((), device=self.device), 0
        self._new_interval()
        return record

    def write_pending(self, merge_step: int | None = None) -> dict[str, float]:
        """Write the buffered extra metrics as their means over ranks (collective: one host read
        and one control all-reduce for all of them). The values of ``merge_step`` are returned, to
        join that step's record, instead of being written."""
        pending, self._pending = self._pending, []
        if not pending:
            return {}
        values = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for _, extra in pending for v in extra.values()]
        means = iter(control.mean(torch.stack([v.to(values[0].device) for v in values]).cpu()))
        merged: dict[str, float] = {}
        for step, extra in pending:
            record = {key: next(means) for key in extra}
            if step == merge_step:
                merged.update(record)
            else:
                self.writer.write("train", step, **record)
        return merged

    @contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, checkpoints)."""
        start = self._clock()
        try:
            yield
        finally:
            self._start += self._clock() - start

    @staticmethod
    def _clock() -> float:
        """The host clock; a simulated rank's own (slowmo_train/simulated/world.py), which stands
        still while its peers compute."""
        world = simulated.world()
        return world.clock() if world is not None else time.perf_counter()

    def state_dict(self) -> dict:
        """The loss since the last line: a resumed run then logs the same means."""
        return {"loss_sum": self.loss_sum.detach().cpu(), "loss_steps": self.loss_steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.loss_steps = int(state["loss_steps"])


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
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                refresh_per_second=4,
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
    rank's warnings). A simulated cluster logs all its ranks into rank 0's file."""
    if simulated.world() is not None:  # one process plays every rank: rank 0 sets it up
        if rank != 0:
            return
        who = "rank %(rank)s"
    else:
        who = f"rank {rank}"
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [{who}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if simulated.world() is not None:
        console.addFilter(_simulated_rank)
        console.addFilter(lambda r: r.levelno >= logging.WARNING or r.rank in (0, "-"))
    root.addHandler(console)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
        fh.setFormatter(fmt)
        if simulated.world() is not None:
            fh.addFilter(_simulated_rank)
        root.addHandler(fh)


def _simulated_rank(record: logging.LogRecord) -> bool:
    """Name the simulated rank that logged ``record`` ("-": the launcher, a writer thread)."""
    rank = simulated.current_rank()
    record.rank = "-" if rank is None else rank
    return True
