"""Evaluation on its own cadence, and the best headline metric so far: one place for the synchronous
trainer and the asynchronous runners.

    evaluator = Evaluator(metric, every=plan.eval_every_steps, steps_per_epoch=..., writer=metrics)
    if evaluator.should_evaluate(step, done):
        record = evaluator.record(step, task.evaluate(model, final=done), progress)

A record is what ``metrics.jsonl`` gets as an ``eval`` event: the task's numbers, the split of its
headline metric, and the best value of that metric so far (``best_<metric>``), which the report
command and ``summary.json`` read.
"""

from __future__ import annotations

from slowmo_train.metrics import MetricsWriter, Progress
from slowmo_train.tasks.base import HeadlineMetric


class Evaluator:
    """When to evaluate (every ``every`` steps and at the last) and what the best result was."""

    def __init__(
        self,
        metric: HeadlineMetric,
        every: int,
        steps_per_epoch: int,
        writer: MetricsWriter | None,
        step_word: str = "step",
    ):
        self.metric, self.every, self.steps_per_epoch = metric, every, steps_per_epoch
        self.writer, self.step_word = writer, step_word
        self.evals_done = 0
        self.best: float | None = None
        self.best_step: int | None = None

    def should_evaluate(self, step: int, done: bool) -> bool:
        return step % self.every == 0 or done

    def record(self, step: int, result: dict[str, float], progress: Progress | None = None) -> dict:
        """Track the best, write the ``eval`` event and a progress line; returns the record."""
        metric = self.metric
        self.evals_done += 1
        value = result[metric.name]
        if metric.better(value, self.best):
            self.best, self.best_step = value, step
        record = {"split": metric.split, **result, f"best_{metric.name}": self.best}
        epoch = step / self.steps_per_epoch
        if self.writer is not None:
            self.writer.write("eval", step, epoch=round(epoch, 4), **record)
        if progress is not None:
            shown = " ".join(f"{k} {v:.4g}" for k, v in result.items() if k != metric.name)
            progress.message(
                f"epoch {epoch:.2f} {self.step_word} {step}: {metric.split} {metric.name} {value:.2f}"
                + (f" ({shown})" if shown else "")
            )
        return record

    def state_dict(self) -> dict:
        return {"evals_done": self.evals_done, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.evals_done, self.best, self.best_step = int(state["evals_done"]), state["best"], state["best_step"]
