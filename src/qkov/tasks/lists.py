"""Tasks on lists of small ints beyond ``max``: ``min`` (the seed's story mirrored)."""

from __future__ import annotations

import torch

from .arithmetic import MaxTask
from .base import AnswerRule, Batch, _fixed_targets


class MinTask(MaxTask):
    """Predict the minimum of a list of ints at its last position: ``max`` mirrored.

    The same data layout as :class:`~qkov.tasks.MaxTask` (one sequence of ``max_len`` tokens
    carries every length), the answer at position L-1 being the minimum of the first L tokens.

    >>> from qkov.tasks import get_task
    >>> task = get_task("min", vocab=10, min_len=2, max_len=4)
    >>> task.expected(task.parse("7 3 9")), task.answer_rule().reduce
    ([3], 'min')
    """

    name = "min"

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        tokens = torch.randint(0, self.vocab, (n, self.max_len), generator=generator)
        running_min = tokens.cummin(dim=1).values                              # [b, p]
        return _fixed_targets(tokens, self.scored_positions, running_min[:, self.min_len - 1:])

    def answer_rule(self) -> AnswerRule:
        """Every list's answer is its min, at every scored length."""
        return AnswerRule("min", tuple(range(self.min_len, self.max_len + 1)), self.vocab)

    def expected(self, tokens) -> list[int | None]:
        return [min(int(t) for t in tokens)]

    def checks(self, interventions, summary):
        """None yet: ``max``'s checks test attention to the maximum."""
        return []
