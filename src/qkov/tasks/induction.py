"""``induction``: random tokens in which a segment recurs at an offset that varies by sequence."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from .base import IGNORE, Batch, Task
from .checks import induction_checks


class InductionTask(Task):
    """Random tokens in which a segment recurs at an offset that varies between sequences.

    Layout of each sequence of ``n_ctx`` tokens: a random-length prefix of random tokens, a
    segment of ``min_seg..max_seg`` random tokens, the same segment again, then random tokens.
    The loss is next-token prediction at every position; accuracy and the headline loss are
    measured on the repeated part (from the repeat's first token, predicting its second, on).

    Why the reference defaults (measured with seed 0; see ``tests/test_heads.py``):
    ``max_seg = n_ctx // 2`` puts the standard ``[x, x]`` test inside the training distribution
    (with ``max_seg=12`` the model never saw a 16-token repeat and its ``[x, x]`` loss stayed at
    3.3 nats); ``vocab=256`` makes accidental repeats in the random text rare (with 64 tokens a
    query's token has often occurred by chance, which kept the repeated-part loss near 0.6
    nats); 2 heads a layer give one clean previous-token head in layer 0; lr 1e-2 with batches
    of 64 brings the induction phase change near step 1,000 (batch 32 or ``d_model=32`` delay it
    past 1,500; lr 2e-2 stalls before 2,000).
    """

    name = "induction"
    defaults = {"vocab": 256, "n_ctx": 32, "min_seg": 4, "max_seg": 16}

    def _validate(self) -> None:
        if not 2 <= self.min_seg <= self.max_seg:
            raise QkovError(f"need 2 <= min_seg <= max_seg; got {self.min_seg}, {self.max_seg}")
        if 2 * self.max_seg > self.n_ctx:
            raise QkovError(f"2 * max_seg = {2 * self.max_seg} does not fit in n_ctx={self.n_ctx}")
        if self.vocab < 2:
            raise QkovError(f"vocab={self.vocab} must be at least 2")

    @property
    def seq_len(self) -> int:
        return self.n_ctx

    @property
    def d_vocab(self) -> int:
        return self.vocab

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        T = self.n_ctx
        tokens = torch.randint(0, self.vocab, (n, T), generator=generator)
        seg = torch.randint(self.min_seg, self.max_seg + 1, (n,), generator=generator)
        start = (torch.rand(n, generator=generator) * (T - 2 * seg + 1)).long()   # in [0, T - 2 seg]
        pos = torch.arange(T)[None]                                             # [1, T]
        second = (pos >= (start + seg)[:, None]) & (pos < (start + 2 * seg)[:, None])
        src = (pos - seg[:, None]).clamp(min=0)
        tokens = torch.where(second, tokens.gather(1, src), tokens)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        # Predictable: inside the second copy, predicting a token that is also in it.
        scored = second.clone()
        scored[:, :-1] &= second[:, 1:]
        scored[:, -1] = False
        return Batch(tokens, targets, scored)

    def repeated_tokens(self, n: int, generator: torch.Generator, half: int | None = None) -> Batch:
        """The standard induction test: random tokens repeated twice, ``[x, x]``."""
        half = self.n_ctx // 2 if half is None else half
        x = torch.randint(0, self.vocab, (n, half), generator=generator)
        tokens = torch.cat([x, x], dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, half:-1] = True
        return Batch(tokens, targets, scored)

    # -- text: any tokens; the answer is the prediction wherever a token has occurred before ------
    @property
    def input_help(self) -> str:
        example = "7 3 9 1 7 3 9" if self.vocab > 9 else "0 1 0"
        return (f"1 to {self.n_ctx} numbers 0..{self.vocab - 1} separated by spaces, with a stretch that "
                f"repeats, e.g. '{example}'")

    def answer_positions(self, tokens) -> list[int]:
        """Positions whose token occurred earlier (where an induction head predicts what followed
        it then); the last position when no token repeats."""
        tokens = [int(t) for t in tokens]
        return [i for i, t in enumerate(tokens) if t in tokens[:i]] or [len(tokens) - 1]

    def expected(self, tokens) -> list[int | None]:
        """The token that followed the latest earlier occurrence of each answer position's token."""
        tokens = [int(t) for t in tokens]
        out: list[int | None] = []
        for i in self.answer_positions(tokens):
            earlier = [j for j in range(i) if tokens[j] == tokens[i]]
            out.append(tokens[earlier[-1] + 1] if earlier else None)
        return out

    @torch.no_grad()
    def evaluate(self, model, batch: Batch | None = None) -> dict[str, Any]:
        """Accuracy and loss on the repeated part, the loss on the rest, and the ``[x, x]`` test."""
        batch = self.eval_batch() if batch is None else batch
        rest = (~batch.scored) & (batch.targets != IGNORE)
        out, rest = self._measure(model, batch, [batch.scored, rest])
        out["loss_rest"] = rest["loss"]
        rep = self.repeated_tokens(1024, torch.Generator().manual_seed(self.eval_seed + 1))
        r, first = self._measure(model, rep, [rep.scored, (~rep.scored) & (rep.targets != IGNORE)])
        out["repeated"] = {"accuracy": r["accuracy"], "loss": r["loss"], "loss_first_half": first["loss"]}
        return out

    def checks(self, interventions, summary):
        """The previous-token head, its path into the induction heads' keys, and the induction heads are needed."""
        return induction_checks(interventions, summary)

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=2, n_heads=2, d_model=64, d_mlp=None, d_vocab=self.vocab, n_ctx=self.n_ctx)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=2000, batch_size=64, lr=1e-2, weight_decay=0.01, warmup_steps=100, eval_every=500)
