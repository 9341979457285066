"""Torch's intra-op thread count while a run trains (the rule the trainer has used so far:
one thread for steps too small to share, torch's setting otherwise; a fixed ``threads`` wins)."""

from __future__ import annotations

import torch

_THREADED_WORK = 5e7


def work_per_step(rc) -> float:
    m, task = rc.model, rc.task
    rows = rc.train.batch_size
    if rows is None:
        rows = len(task.dataset("train")) if task.finite else 1
    return rows * task.seq_len * m.d_model * (4 * m.d_model + 2 * (m.d_mlp or 0) + m.vocab_out)


class ThreadPolicy:
    def __init__(self, threads: int):
        self.threads = threads

    @classmethod
    def for_run(cls, rc) -> ThreadPolicy:
        if rc.train.threads:
            return cls(rc.train.threads)
        return cls(torch.get_num_threads() if work_per_step(rc) >= _THREADED_WORK else 1)

    def __enter__(self):
        self._old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self._old)

    def step_done(self, seconds: float) -> None:
        pass
