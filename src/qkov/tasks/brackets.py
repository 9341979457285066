"""``brackets``: is a string of parentheses balanced? ARENA's chapter 1.5.1 classifier.

Tokens as ARENA's: ``[start]`` 0, ``[pad]`` 1, ``[end]`` 2, ``(`` 3, ``)`` 4. A string of 1 to
``max_len`` brackets is written ``[start] s [end]`` and padded with ``[pad]`` to ``max_len + 2``;
the model (bidirectional, padding masked) classifies it at position 0, the ``[start]`` token:
class 1 balanced, 0 unbalanced (ARENA's convention: ``logits.argmax(-1).bool() == isbal``).

A string is balanced when its *elevation* (the number of ``(`` minus ``)`` so far) ends at 0 and
never goes negative. Random strings are almost never balanced, so the data is a mix of kinds
(:data:`KINDS`), each made from a ``torch.Generator``: ``random`` strings; ``balanced`` ones (a
random arrangement of equal counts whose negative excursions are mirrored up); the hard
unbalanced cases, ``equal_negative`` (equal counts, the elevation negative somewhere: a balanced
string with some of its top-level excursions mirrored down), ``one_flipped`` (a balanced string
with one bracket flipped: the elevation may never go negative, but it ends at +-2) and ``odd``
(a balanced string with one bracket deleted). Evaluation reads a fixed set of every kind from
the task's eval seed and reports each (``by_kind``), which ``target_accuracy`` reads too.

>>> from qkov.tasks import get_task
>>> task = get_task("brackets")
>>> task.parse("(()"), task.expected(task.parse("(()())")), task.format_answer([0])
([0, 3, 3, 4, 2], [1], 'unbalanced')
>>> is_balanced(torch.tensor([task.parse("(())()"), task.parse("())(()")])).tolist()   # equal counts, both
[True, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from .base import IGNORE, Batch, Task

START, PAD, END, OPEN, CLOSE = 0, 1, 2, 3, 4
LABELS = ["[start]", "[pad]", "[end]", "(", ")"]
CLASSES = ["unbalanced", "balanced"]
KINDS = ("random", "balanced", "equal_negative", "one_flipped", "odd")
# The training mix (each row's kind drawn from the generator). Balanced strings are a third, so
# the classes are 1:2; the rest are the unbalanced kinds, the hard ones weighted most.
TRAIN_MIX = {"random": 0.2, "balanced": 0.35, "equal_negative": 0.25, "one_flipped": 0.1, "odd": 0.1}


# ------------------------------------------------------------------ what a string is
def steps(tokens: Tensor) -> Tensor:
    """``[b, p]``: +1 at ``(``, -1 at ``)``, 0 at every other token."""
    return (tokens == OPEN).long() - (tokens == CLOSE).long()


def elevation(tokens: Tensor) -> Tensor:
    """``[b, p]``: the number of ``(`` minus ``)`` up to and including each position."""
    return steps(tokens).cumsum(-1)


def is_balanced(tokens: Tensor) -> Tensor:
    """``[b]`` bool: the elevation never goes negative and ends at 0."""
    h = elevation(tokens)
    return (h.min(-1).values >= 0) & (h[..., -1] == 0)


# ------------------------------------------------------------------ making strings: [b, L] steps, [b] lengths
def _inside(lengths: Tensor, L: int) -> Tensor:
    return torch.arange(L)[None] < lengths[:, None]                             # [b, L]


def _equal_counts(lengths: Tensor, L: int, g: torch.Generator) -> Tensor:
    """Steps ``[b, L]`` (+-1 inside, 0 after): a random arrangement of ``length/2`` of each."""
    inside = _inside(lengths, L)
    keys = torch.rand(len(lengths), L, generator=g).masked_fill(~inside, 2.0)   # positions past the end sort last
    rank = keys.argsort(-1).argsort(-1)                                         # [b, L]
    return torch.where(rank < (lengths // 2)[:, None], 1, -1) * inside


def _mirror(s: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip, -s, s)


def _excursions(s: Tensor) -> tuple[Tensor, Tensor]:
    """For steps ``s [b, L]``: whether each step lies below zero (``h_before + h_after < 0``: its
    excursion goes down) and the index of the excursion (between returns to zero) it belongs to."""
    after = s.cumsum(-1)
    before = after - s
    starts = (before == 0) & (s != 0)
    return before + after < 0, starts.long().cumsum(-1) - 1


def _balanced(n: int, L: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random balanced strings of even length 2..L: equal counts, every excursion below zero
    mirrored above it (so none is rare: a uniform arrangement is balanced 1 time in length/2 + 1)."""
    lengths = 2 * torch.randint(1, L // 2 + 1, (n,), generator=g)
    s = _equal_counts(lengths, L, g)
    below, _ = _excursions(s)
    return _mirror(s, below), lengths


def _pick_position(lengths: Tensor, g: torch.Generator) -> Tensor:
    """``[b]``: a position inside each string, uniformly."""
    return (torch.rand(len(lengths), generator=g) * lengths).long()


def _equal_negative(n: int, L: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Equal counts with the elevation below zero somewhere: balanced strings with one top-level
    excursion (half the rows: a single dip, often to -1 only) or several mirrored below zero."""
    s, lengths = _balanced(n, L, g)
    _, which = _excursions(s)
    rows = torch.arange(n)
    one = which[rows, _pick_position(lengths, g)]                               # [b]: the excursion surely mirrored
    many = torch.rand(n, L, generator=g) < 0.5                                  # [b, excursion]
    many &= (torch.rand(n, 1, generator=g) < 0.5)                               # half the rows: that one only
    chosen = many.gather(1, which.clamp(min=0)) | (which == one[:, None])       # [b, L]
    return _mirror(s, chosen & (s != 0)), lengths


def _one_flipped(n: int, L: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A balanced string with one bracket flipped: the counts differ by two."""
    s, lengths = _balanced(n, L, g)
    at = torch.arange(L)[None] == _pick_position(lengths, g)[:, None]
    return _mirror(s, at), lengths


def _odd(n: int, L: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A balanced string with one bracket deleted: odd length, one bracket short of balanced."""
    s, lengths = _balanced(n, L, g)
    cut = _pick_position(lengths, g)[:, None]
    pos = torch.arange(L)[None]
    shifted = s.gather(1, (pos + (pos >= cut)).clamp(max=L - 1))
    lengths = lengths - 1
    return shifted * _inside(lengths, L), lengths


def _random(n: int, L: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform lengths 1..L, each bracket ``(`` or ``)`` with even odds."""
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    s = torch.where(torch.rand(n, L, generator=g) < 0.5, 1, -1)
    return s * _inside(lengths, L), lengths


MAKERS = {"random": _random, "balanced": _balanced, "equal_negative": _equal_negative,
          "one_flipped": _one_flipped, "odd": _odd}


def to_tokens(s: Tensor, lengths: Tensor) -> Tensor:
    """Steps ``[b, L]`` and lengths ``[b]`` as ``[start] s [end] [pad]...``, ``[b, L + 2]``."""
    n, L = s.shape
    tokens = torch.full((n, L + 2), PAD)
    tokens[:, 0] = START
    tokens[:, 1:-1] = torch.where(s > 0, OPEN, torch.where(s < 0, CLOSE, PAD))
    tokens[torch.arange(n), lengths + 1] = END
    return tokens


class BracketsTask(Task):
    """Classify a string of up to ``max_len`` brackets as balanced (1) or not (0) at its
    ``[start]`` token. ``qkov show DIR "(()())"`` answers ``balanced``."""

    name = "brackets"
    defaults = {"max_len": 40}

    def _validate(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise QkovError(f"max_len={self.max_len!r} must be an integer >= 2 (a balanced string needs two brackets)")

    @property
    def seq_len(self) -> int:
        return self.max_len + 2

    @property
    def d_vocab(self) -> int:
        return len(LABELS)

    @property
    def d_vocab_out(self) -> int:
        return len(CLASSES)

    @property
    def scored_positions(self) -> list[int]:
        return [0]

    def token_labels(self) -> list[str]:
        return list(LABELS)

    def model_config(self) -> ModelConfig:
        # ARENA's: 3 layers, 2 heads, d_model 56, d_mlp 56, LayerNorm, bidirectional, padding masked.
        return ModelConfig(n_layers=3, n_heads=2, d_model=56, d_mlp=56, d_vocab=self.d_vocab,
                           d_vocab_out=self.d_vocab_out, n_ctx=self.seq_len, normalization="LN",
                           attention_dir="bidirectional", pad_token=PAD)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=3000, batch_size=256, lr=3e-3, lr_schedule="cosine", warmup_steps=100,
                           weight_decay=0.01, eval_every=250)

    # -- data -----------------------------------------------------------------------------
    def make(self, kind: str, n: int, generator: torch.Generator) -> Batch:
        """``n`` strings of one kind (:data:`KINDS`)."""
        if kind not in MAKERS:
            raise QkovError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        s, lengths = MAKERS[kind](n, self.max_len, generator)
        return self._batch(to_tokens(s, lengths))

    def _batch(self, tokens: Tensor) -> Batch:
        targets = torch.full_like(tokens, IGNORE)
        targets[:, 0] = is_balanced(tokens).long()
        return Batch(tokens, targets, targets != IGNORE)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` strings of the training mix (:data:`TRAIN_MIX`), each row's kind drawn from ``generator``."""
        weights = torch.tensor([TRAIN_MIX[k] for k in KINDS])
        kind = torch.multinomial(weights, n, replacement=True, generator=generator)   # [b]
        tokens = torch.empty(n, self.seq_len, dtype=torch.long)
        for i, k in enumerate(KINDS):
            rows = (kind == i).nonzero()[:, 0]
            if len(rows):
                tokens[rows] = self.make(k, len(rows), generator).tokens
        return self._batch(tokens)

    def eval_batch(self) -> Batch:
        """:meth:`eval_rows` strings of each kind, in the order of :data:`KINDS`, from the eval seed."""
        if "eval" not in self._data:
            g = torch.Generator().manual_seed(self.eval_seed)
            parts = [self.make(k, self.eval_rows, g) for k in KINDS]
            self._data["eval"] = Batch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "targets",
                                                                                            "scored")))
            self._kinds = torch.arange(len(KINDS)).repeat_interleave(self.eval_rows)
        return self._data["eval"]

    eval_rows = 1024

    def kinds(self) -> Tensor:
        """``[eval rows]``: the index in :data:`KINDS` of each row of :meth:`eval_batch`."""
        self.eval_batch()
        return self._kinds

    @torch.no_grad()
    def evaluate(self, model, batch: Batch | None = None) -> dict[str, Any]:
        """Accuracy and loss at ``[start]``, and ``by_kind`` on the fixed evaluation set: what
        ``target_accuracy`` reads, so a target asks for it on every kind."""
        if batch is not None and batch is not self.eval_batch():
            return super().evaluate(model, batch)
        batch = self.eval_batch()
        kinds = self.kinds()
        masks = [batch.scored] + [batch.scored & (kinds == i)[:, None] for i in range(len(KINDS))]
        out, *each = self._measure(model, batch, masks)
        out["by_kind"] = dict(zip(KINDS, each))
        return out

    # -- text -----------------------------------------------------------------------------
    @property
    def input_help(self) -> str:
        return f"1 to {self.max_len} brackets '(' and ')', e.g. '(()())'"

    def parse(self, text: str) -> list[int]:
        """``"(()"`` -> ``[start] ( ( ) [end]`` (spaces are ignored)."""
        if not isinstance(text, str):
            raise QkovError(f"input {text!r} is {type(text).__name__}, not text; pass brackets such as '(()())'")
        chars = "".join(text.split())
        bad = sorted(set(chars) - {"(", ")"})
        if bad:
            raise QkovError(f"input {text!r}: {bad[0]!r} is not a bracket; {self.name} reads {self.input_help}")
        n = len(chars)
        if not 1 <= n <= self.max_len:
            raise QkovError(f"input {text!r} has {n} bracket{'s' * (n != 1)}; {self.name} reads {self.input_help}")
        return [START] + [OPEN if c == "(" else CLOSE for c in chars] + [END]

    def format(self, tokens: Sequence[int]) -> str:
        """The brackets of ``tokens`` (``[start]``, ``[end]`` and padding left out)."""
        return "".join("(" if int(t) == OPEN else ")" for t in tokens if int(t) in (OPEN, CLOSE))

    def format_answer(self, outputs: Sequence[int | None]) -> str:
        return " ".join("?" if t is None else CLASSES[int(t)] if 0 <= int(t) < len(CLASSES) else str(int(t))
                        for t in outputs)

    def answer_positions(self, tokens: Sequence[int]) -> list[int]:
        return [0]

    def expected(self, tokens: Sequence[int]) -> list[int | None]:
        return [int(is_balanced(torch.tensor([list(tokens)]))[0])]

    def example_tokens(self, n: int) -> list[list[int]]:
        """``n`` strings of the eval set, the kinds in turn, without their padding."""
        batch, kinds = self.eval_batch(), self.kinds()
        out = []
        for i in range(n):
            rows = (kinds == i % len(KINDS)).nonzero()[:, 0]
            t = batch.tokens[rows[(i // len(KINDS)) % len(rows)]].tolist()
            out.append(t[: t.index(END) + 1])
        return out
