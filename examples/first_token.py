"""A complete task of your own: at every position, predict the first token of the sequence.

Train, inspect and reload it without touching qkov's source:

    qkov train examples/first_token.py:FirstToken --out runs/first
    qkov analyze runs/first        # findings include this task's own: attention to position 0
    qkov show runs/first "3 9 4 1"  # -> 3 3 3 (the answer at positions 1, 2 and 3)
    qkov report runs/first

``config.json`` records ``examples/first_token.py:FirstToken`` as an absolute path, so the run
loads in a new process (``qkov.load("runs/first")``) as long as this file stays where it is. In
an installed package, register it instead under ``[project.entry-points."qkov.tasks"]``
(``first = "mypkg.tasks:FirstToken"``) and train it as ``qkov train first``.
"""

from __future__ import annotations

import torch

from qkov import ModelConfig, Task, TrainConfig
from qkov.tasks import IGNORE, Batch


class FirstToken(Task):
    """Random tokens ``0..vocab-1``; the answer at every position after the first is token 0."""

    name = "first"                                    # shown in messages; runs/first by default
    defaults = {"vocab": 16, "length": 8}             # every parameter, with its default (--set vocab=32)

    # -- the data: sampled from the trainer's generator (a finite task overrides dataset(split))
    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def d_vocab(self) -> int:
        return self.vocab

    @property
    def scored_positions(self) -> list[int]:
        return list(range(1, self.length))            # the positions the loss and accuracy read

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        tokens = torch.randint(0, self.vocab, (n, self.length), generator=generator)   # [b, pos]
        targets = torch.full_like(tokens, IGNORE)                                         # [b, pos]
        targets[:, 1:] = tokens[:, :1]
        return Batch(tokens, targets, targets != IGNORE)

    # -- evaluation: accuracy overall and by position ---------------------------------------------
    def group_name(self) -> str:
        return "position"

    # -- text: what `qkov show DIR "3 9 4 1"` reads and answers -----------------------------------
    def answer_positions(self, tokens) -> list[int]:
        return list(range(1, len(tokens)))

    def expected(self, tokens) -> list[int | None]:
        return [int(tokens[0])] * (len(tokens) - 1)

    def check_input(self, text: str, tokens: list[int]) -> None:
        self._check_length(text, tokens, 2, self.length)

    # -- the reference setup ------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=1, n_heads=1, d_model=32, d_mlp=None, d_vocab=self.vocab, n_ctx=self.length)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=300, batch_size=256, lr=1e-2, lr_schedule="cosine", eval_every=50)

    # -- what it claims about its circuit ---------------------------------------------------------
    @torch.no_grad()
    def facts(self, model) -> dict:
        """The attention weight that scored positions put on position 0 (head 0.0)."""
        tokens = self.eval_batch().tokens[:512]
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
        pattern = cache["blocks.0.attn.hook_pattern"]                                     # [b, h, q, k]
        return {"weight_on_first": round(float(pattern[:, 0, 1:, 0].mean()), 4)}

    def findings(self, summary: dict) -> list[dict]:
        w = summary["attention"]["weight_on_first"]
        return [{"id": "weight_on_first", "value": w,
                 "text": f"Every position attends to the first token: mean weight {w:.3f}."}]
