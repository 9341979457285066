"""Arithmetic on small integers: ``max`` of a list, ``add``, ``fib`` and ``modadd`` (grokking)."""

from __future__ import annotations

import torch

from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from .base import AnswerRule, Batch, FiniteTask, Task, _fixed_targets
from .checks import frequency_checks, max_checks, modadd_checks


class MaxTask(Task):
    """Predict the maximum of a list of ints at its last position.

    Attention is causal, so a length-L list is the length-L prefix of a longer one: one sequence
    of ``max_len`` tokens carries every length at once, the answer for length L sitting at
    position L-1. ``min_len == max_len`` gives the fixed-length variant (e.g. 4).
    """

    name = "max"
    defaults = {"vocab": 64, "min_len": 2, "max_len": 6}

    def _validate(self) -> None:
        if self.vocab < 2:
            raise QkovError(f"vocab={self.vocab} must be at least 2")
        if not 1 <= self.min_len <= self.max_len:
            raise QkovError(f"need 1 <= min_len <= max_len; got min_len={self.min_len}, max_len={self.max_len}")

    @property
    def seq_len(self) -> int:
        return self.max_len

    @property
    def d_vocab(self) -> int:
        return self.vocab

    @property
    def scored_positions(self) -> list[int]:
        return list(range(self.min_len - 1, self.max_len))

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        tokens = torch.randint(0, self.vocab, (n, self.max_len), generator=generator)
        running_max = tokens.cummax(dim=1).values                              # [b, p]
        return _fixed_targets(tokens, self.scored_positions, running_max[:, self.min_len - 1:])

    def _eval_samples(self) -> int:
        return 10_000  # per length: each sequence scores every length at once

    def group_name(self) -> str:
        return "length"

    def group_of_position(self, pos: int) -> int:
        return pos + 1

    def answer_rule(self) -> AnswerRule:
        """Every list's answer is its max, at every scored length."""
        return AnswerRule("max", tuple(range(self.min_len, self.max_len + 1)), self.vocab)

    # -- text: a list of numbers; the answer is its max, read at the last position ------------
    @property
    def input_help(self) -> str:
        return (f"{self.min_len} to {self.max_len} numbers 0..{self.vocab - 1} separated by spaces, "
                f"e.g. '{self._example_text()}'")

    def check_input(self, text: str, tokens: list[int]) -> None:
        self._check_length(text, tokens, self.min_len, self.max_len)

    def answer_positions(self, tokens) -> list[int]:
        return [len(tokens) - 1]

    def expected(self, tokens) -> list[int | None]:
        return [max(int(t) for t in tokens)]

    def example_tokens(self, n: int) -> list[list[int]]:
        """Eval lists cut to lengths spread from ``min_len`` to ``max_len`` (a list of length L
        is answered at position L-1, so every length is worth seeing)."""
        lo, hi = self.min_len, self.max_len
        lengths = [hi] if n == 1 else [lo + round(i * (hi - lo) / (n - 1)) for i in range(n)]
        return [t[:L].tolist() for t, L in zip(self.eval_batch().tokens, lengths)]

    def findings(self, summary):
        """The story: the last position attends to the maximal token (QK), whose OV copies it.
        Read from ``summary["attention"]`` (one-head models; none otherwise).

        >>> get = lambda k: {"top_key_is_max": 1.0, "key_rank_correlation": {"q_pos": 5,
        ...     "by_q_pos": {"5": 0.99}, "no_positions": 0.98}}
        >>> s = {"attention": get(0), "heads": [{"copying_score": 0.9, "ov_self_top1": 1.0}]}
        >>> [f["id"] for f in MaxTask().findings(s)]
        ['top_key_is_max', 'key_rank_correlation', 'copying_score']
        """
        reduce = self.answer_rule().reduce
        a, heads = summary.get("attention") or {}, summary.get("heads") or []
        if f"top_key_is_{reduce}" not in a or not heads:
            return []
        pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
        top, head = a[f"top_key_is_{reduce}"], heads[0]
        rank = a["key_rank_correlation"]
        rho = rank["by_q_pos"][str(rank["q_pos"])]
        order = "by value" if reduce == "max" else "against value (the smallest first)"
        word = "maximal" if reduce == "max" else "minimal"
        return [
            {"id": f"top_key_is_{reduce}", "value": top,
             "text": f"The last position attends most to a {word} token on {pct(top)} of inputs."},
            {"id": "key_rank_correlation", "value": rho,
             "text": f"With positions added, the QK circuit ranks keys {order}: rank correlation {rho:.3f} at the "
                     f"last position ({rank['no_positions']:.3f} without positions)."},
            {"id": "copying_score", "value": head["copying_score"],
             "text": f"The OV circuit copies: copying score {head['copying_score']:.3f}; "
                     f"{pct(head['ov_self_top1'])} of tokens raise their own logit most."},
        ]

    def checks(self, interventions, summary):
        """Attending to the maximum is enough (QK), the head is needed, keys need no position, the OV copies."""
        return max_checks(interventions, summary)

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=1, n_heads=1, d_model=32, d_mlp=None, d_vocab=self.vocab, n_ctx=self.max_len)

    def train_config(self) -> TrainConfig:
        # lr 1e-2 decayed to 0 by a cosine: >= 99.9% at every length by step ~150 (seeds 0-3),
        # then 100% on the eval set with a loss near 1e-4 at the end; a constant 3e-3 needs ~450
        # steps and its accuracy still dips mid-run.
        return TrainConfig(steps=1500, batch_size=512, lr=1e-2, lr_schedule="cosine", weight_decay=0.01, eval_every=100)


class AddTask(FiniteTask):
    """``[a, b] -> a + b`` for all pairs with ``a + b <= max_sum``, answered at position 1."""

    name = "add"
    defaults = {"max_sum": 127, "train_frac": 1.0, "split_seed": 0}

    @property
    def seq_len(self) -> int:
        return 2

    @property
    def d_vocab(self) -> int:
        return self.max_sum + 1

    @property
    def scored_positions(self) -> list[int]:
        return [1]

    def n_examples(self) -> int:
        return (self.max_sum + 1) * (self.max_sum + 2) // 2          # pairs with a + b <= max_sum

    def _all(self) -> Batch:
        a, b = torch.meshgrid(torch.arange(self.max_sum + 1), torch.arange(self.max_sum + 1), indexing="ij")
        keep = (a + b) <= self.max_sum
        tokens = torch.stack([a[keep], b[keep]], dim=1)
        return _fixed_targets(tokens, [1], tokens.sum(1)[:, None])

    # -- text: "a b", answered with a + b -------------------------------------------------------
    @property
    def input_help(self) -> str:
        return (f"two numbers with a sum of at most {self.max_sum}, e.g. "
                f"'{self.max_sum * 2 // 5} {self.max_sum * 7 // 15}'")

    def check_input(self, text: str, tokens: list[int]) -> None:
        self._check_length(text, tokens, 2, 2)
        if sum(tokens) > self.max_sum:
            raise QkovError(f"input {text!r}: {tokens[0]} + {tokens[1]} = {sum(tokens)} is above max_sum="
                            f"{self.max_sum}, the largest sum add answers; give two numbers with a sum of at "
                            f"most {self.max_sum}")

    def expected(self, tokens) -> list[int | None]:
        return [int(tokens[0]) + int(tokens[1])]

    def checks(self, interventions, summary):
        """The neuron inputs' dominant frequencies suffice, and are needed."""
        return frequency_checks(interventions, summary)

    def model_config(self) -> ModelConfig:
        v = self.d_vocab
        return ModelConfig(n_layers=1, n_heads=1, d_model=128, d_mlp=128, d_vocab=v, n_ctx=2)

    def train_config(self) -> TrainConfig:
        # Full batch (all 8,256 pairs), lr 2e-2 with a 50-step warmup and a cosine decay: 100% of
        # pairs by step 600-700 on seeds 0-2, then the decay settles it (final loss 0.03-0.07). A
        # constant 3e-3 spikes (Adam) and ends at 99.8%; batches of 2,048 at 2e-2 end at 99.9%.
        return TrainConfig(
            steps=1000, batch_size=None, lr=2e-2, lr_schedule="cosine", warmup_steps=50,
            weight_decay=0.01, eval_every=100,
        )


class FibTask(FiniteTask):
    """Fibonacci-like sequences ``x1..x5`` (every term <= ``max_value``): predict each next term.

    Position i (1 <= i <= length-2) sees ``x1..x(i+1)`` and predicts ``x(i+2)``.
    """

    name = "fib"
    defaults = {"max_value": 127, "length": 5, "train_frac": 1.0, "split_seed": 0}

    def _validate(self) -> None:
        super()._validate()
        if self.length < 3:
            raise QkovError(f"length={self.length} must be at least 3 (two seeds and one term to predict)")

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def d_vocab(self) -> int:
        return self.max_value + 1

    @property
    def scored_positions(self) -> list[int]:
        return list(range(1, self.length - 1))

    def n_examples(self) -> int:
        """Pairs ``(x1, x2)`` whose last term ``F(L-2) x1 + F(L-1) x2`` is at most ``max_value``
        (the terms grow, so the last is the largest), counted over ``x1`` without building them."""
        a, b = 0, 1                          # x_k = a x1 + b x2, for k = 2 (then stepped to k = length)
        for _ in range(self.length - 2):
            a, b = b, a + b
        m = self.max_value
        return sum((m - a * x1) // b + 1 for x1 in range(m // a + 1)) if a else (m // b + 1) * (m + 1)

    def _all(self) -> Batch:
        seqs = []
        for x1 in range(self.max_value + 1):
            for x2 in range(self.max_value + 1):
                s = [x1, x2]
                while len(s) < self.length:
                    s.append(s[-1] + s[-2])
                if s[-1] <= self.max_value:
                    seqs.append(s)
        tokens = torch.tensor(seqs)
        pos = self.scored_positions
        return _fixed_targets(tokens, pos, tokens[:, [p + 1 for p in pos]])

    # -- text: the first terms; each answer is the sum of the two terms before it ----------------
    @property
    def input_help(self) -> str:
        start = [1, 2]
        while len(start) < self.length and start[-1] + start[-2] <= self.max_value:
            start.append(start[-1] + start[-2])
        return (f"2 to {self.length} numbers 0..{self.max_value} separated by spaces, the first terms of a "
                f"sequence in which each term is the sum of the two before, e.g. '{self.format(start)}'")

    def check_input(self, text: str, tokens: list[int]) -> None:
        self._check_length(text, tokens, 2, self.length)
        for p, term in zip(self.answer_positions(tokens), self.expected(tokens)):
            if term > self.max_value:
                raise QkovError(f"input {text!r}: the next term {tokens[p - 1]} + {tokens[p]} = {term} is above "
                                f"max_value={self.max_value}, the largest term fib answers; start with smaller numbers")

    def expected(self, tokens) -> list[int | None]:
        return [int(tokens[p - 1]) + int(tokens[p]) for p in self.answer_positions(tokens)]

    def group_name(self) -> str:
        return "position"

    def checks(self, interventions, summary):
        """The neuron inputs' dominant frequencies suffice, and are needed."""
        return frequency_checks(interventions, summary)

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=1, n_heads=1, d_model=128, d_mlp=128, d_vocab=self.d_vocab, n_ctx=self.length)

    def train_config(self) -> TrainConfig:
        # Batches of 512 of the 1,408 sequences, lr 1e-2 with a 50-step warmup and a cosine
        # decay: 100% at every position by step 600 on seeds 0-2 (final loss 2-3e-3), at half
        # the CPU time of full-batch steps.
        return TrainConfig(
            steps=1000, batch_size=512, lr=1e-2, lr_schedule="cosine", warmup_steps=50,
            weight_decay=0.01, eval_every=100,
        )


class ModAddTask(FiniteTask):
    """``[a, b, =] -> (a + b) mod p``; ``=`` is the token ``p`` (Nanda et al., 2023)."""

    name = "modadd"
    defaults = {"p": 113, "train_frac": 0.3, "split_seed": 0}

    def _validate(self) -> None:
        super()._validate()
        if self.p < 2:
            raise QkovError(f"p={self.p} must be at least 2")

    @property
    def seq_len(self) -> int:
        return 3

    @property
    def d_vocab(self) -> int:
        return self.p + 1

    @property
    def d_vocab_out(self) -> int:
        return self.p

    @property
    def scored_positions(self) -> list[int]:
        return [2]

    def n_examples(self) -> int:
        return self.p * self.p

    @property
    def residue_modulus(self) -> int:
        return self.p

    def _all(self) -> Batch:
        a, b = torch.meshgrid(torch.arange(self.p), torch.arange(self.p), indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        tokens = torch.stack([a, b, torch.full_like(a, self.p)], dim=1)
        return _fixed_targets(tokens, [2], ((a + b) % self.p)[:, None])

    def token_labels(self) -> list[str]:
        return [str(i) for i in range(self.p)] + ["="]

    # -- text: "a b" or "a b =", answered with (a + b) mod p ---------------------------------------
    @property
    def input_help(self) -> str:
        return f"two numbers 0..{self.p - 1} and '=' (which may be left out), e.g. '{self.p // 3} {self.p // 2} ='"

    def parse(self, text: str) -> list[int]:
        """``"a b ="`` (or ``"a b"``, ``=`` added) as ``[a, b, p]``."""
        tokens = super().parse(text)
        return tokens + [self.p] if len(tokens) == 2 else tokens

    def check_input(self, text: str, tokens: list[int]) -> None:
        self._check_length(text, tokens, 2, 3)
        if self.p in tokens[:2] or (len(tokens) == 3 and tokens[2] != self.p):
            raise QkovError(f"input {text!r}: '=' comes last, after two numbers; modadd reads {self.input_help}")

    def expected(self, tokens) -> list[int | None]:
        return [(int(tokens[0]) + int(tokens[1])) % self.p]

    def checks(self, interventions, summary):
        """The restricted loss stays low and the excluded loss is high (Nanda et al.)."""
        return modadd_checks(summary, self.p)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            n_layers=1, n_heads=4, d_model=128, d_head=32, d_mlp=512, act_fn="relu", normalization=None,
            d_vocab=self.p + 1, d_vocab_out=self.p, n_ctx=3, use_bias=False,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=25_000, batch_size=None, lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98),
            warmup_steps=10, eval_every=100, checkpoint_every=1000,
        )
