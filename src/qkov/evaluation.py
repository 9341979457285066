"""Evaluation during training: the task's metrics through the run's plan, one row per eval.

An :class:`Evaluator` measures the model with ``task.evaluate`` on the run's
``qkov.fastpath`` plan (the same plan that trains it, so the C kernel or the table path scores
the eval set too), appends one row to the run's metrics and, for a run with a directory,
rewrites ``metrics.jsonl`` through ``store``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import store
from .fastpath import Plan
from .tasks import Task, breakdowns
from .trainstate import TrainingState


class Evaluator:
    """``evaluator(state, train_loss, lr, elapsed_s)`` -> the row it appended to ``state.metrics``."""

    def __init__(self, task: Task, plan: Plan, out: Path | None):
        self.task, self.plan, self.out = task, plan, out

    def __call__(self, state: TrainingState, train_loss: float | None, lr: float, elapsed_s: float) -> dict[str, Any]:
        state.model.eval()
        try:
            measured = self.task.evaluate(self.plan)
        finally:
            state.model.train()
        row = {"step": state.step, "train_loss": train_loss, "lr": lr, **measured, "elapsed_s": round(elapsed_s, 3)}
        state.metrics.append(row)
        if self.out is not None:
            store.write_metrics(self.out, state.metrics)
        return row


def target_reached(metrics: dict[str, Any], target: float | None) -> bool:
    """Overall accuracy and every group's accuracy (by length, position or kind) reach ``target``."""
    if target is None:
        return False
    accs = [metrics["accuracy"]] + [g["accuracy"] for _, groups in breakdowns(metrics) for g in groups.values()]
    return min(accs) >= target
