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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from .base import IGNORE, Batch, Task
from .checks import check

START, PAD, END, OPEN, CLOSE = 0, 1, 2, 3, 4
LABELS = ["[start]", "[pad]", "[end]", "(", ")"]
CLASSES = ["unbalanced", "balanced"]
KINDS = ("random", "balanced", "equal_negative", "one_flipped", "odd")
# The training mix (each row's kind drawn from the generator). Balanced strings are a third, so
# the classes are 1:2; the rest are the unbalanced kinds, the hard ones weighted most.
TRAIN_MIX = {"random": 0.1, "balanced": 0.35, "equal_negative": 0.3, "one_flipped": 0.15, "odd": 0.1}


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


# ------------------------------------------------------------------ what a model does at [start]
def decoded_r2(y: Tensor, x: Tensor) -> float:
    """The share of the variance of ``x [n]`` that a linear read-out (with an intercept) of
    ``y [n, d]`` explains: 1 when ``x`` is a straight line along some direction of ``y``."""
    yc, xc = y - y.mean(0), x - x.mean()
    coef = torch.linalg.lstsq(yc, xc[:, None]).solution                        # [d, 1]
    left = xc - (yc @ coef)[:, 0]
    return float(1 - left.pow(2).sum() / xc.pow(2).sum())


@torch.no_grad()
def head_facts(model, data: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """:meth:`BracketsTask.facts` on ``(tokens [n, p], kinds [n])``."""
    tokens, kinds = data
    tokens = tokens.to(next(model.parameters()).device)
    kinds = kinds.to(tokens.device)
    L, P = model.cfg.n_layers, tokens.shape[1]
    names = [f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in ("pattern", "z")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    brackets = (tokens == OPEN) | (tokens == CLOSE)                            # [n, p]
    n = brackets.sum(-1)                                                       # [n]
    open_fraction = (tokens == OPEN).sum(-1) / n                               # [n]
    below, _ = _excursions(steps(tokens))                                      # [n, p]: in a stretch below zero
    neg = kinds == KINDS.index("equal_negative")
    share_below = (below[neg].sum(-1) / n[neg])                                # [m]
    pos = torch.arange(P, device=tokens.device)
    later = brackets[:, None, :] & (pos[None, :] > pos[:, None])[None]         # [n, q, k]: brackets after q
    later_share = (later.sum(-1) / n[:, None])[brackets]                       # uniform's weight on them
    heads: dict[str, dict[str, float]] = {}
    for l in range(L):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]                       # [n, h, q, k]
        z = cache[f"blocks.{l}.attn.hook_z"][:, 0]                             # [n, h, e]: at [start]
        for h in range(model.cfg.n_heads):
            p = pattern[:, h, 0]                                               # [n, k]: from [start]
            on = (p * brackets).sum(-1)                                        # [n]
            within = p * brackets / on[:, None].clamp(min=1e-12)
            uniform = brackets / n[:, None]
            out = z[:, h] @ model.W_O[l, h]                                    # [n, d_model]
            on_below = (p[neg] * below[neg]).sum(-1) / on[neg].clamp(min=1e-12)
            at_brackets = (pattern[:, h] * later).sum(-1)[brackets] / (pattern[:, h] * brackets[:, None]).sum(-1)[
                brackets].clamp(min=1e-12)                                     # from each bracket, on later ones
            heads[f"{l}.{h}"] = {
                "on_brackets": round(float(on.mean()), 4),
                "from_uniform": round(float(0.5 * (within - uniform).abs().sum(-1).mean()), 4),
                "open_fraction_r2": round(decoded_r2(out.double(), open_fraction.double()), 4),
                "on_negative_ratio": round(float(on_below.mean() / share_below.mean()), 4),
                "on_close": round(float(((p * (tokens == CLOSE)).sum(-1) / on.clamp(min=1e-12)).mean()), 4),
                "later_brackets": round(float(at_brackets.mean()), 4),
            }
    # The proportion head: of the heads that look mostly at the brackets, the one closest to uniform.
    looking = [k for k in heads if heads[k]["on_brackets"] >= 0.5] or list(heads)
    return {"heads_at_start": heads, "later_brackets_uniform": round(float(later_share.mean()), 4),
            "close_share": round(float(((tokens == CLOSE).sum(-1) / n).mean()), 4),
            "proportion_head": min(looking, key=lambda k: heads[k]["from_uniform"]),
            "negative_head": max(heads, key=lambda k: heads[k]["on_negative_ratio"])}


# ------------------------------------------------------------------ causal checks
# The kinds that only one half of the rule tells apart from balanced strings: the count
# (one_flipped: about half never go below zero) or the elevation (equal_negative: equal counts).
PAIRS = {"count": ("balanced", "one_flipped"), "elevation": ("balanced", "equal_negative")}


def _kind_accuracy(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: g["accuracy"] for k, g in metrics["by_kind"].items()}


def _pair_accuracy(acc: dict[str, float], pair: str) -> float:
    """Mean accuracy over a pair of kinds of opposite classes: 50% when the model cannot tell them apart."""
    a, b = PAIRS[pair]
    return (acc[a] + acc[b]) / 2


def _pcts(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * a:.1f}%" for k, a in acc.items())


@dataclass(frozen=True)
class _Edit:
    """An intervention as ``Interventions.evaluate`` runs one: ``text`` and ``fwd_hooks(tokens)``."""

    text: str
    make: Callable[[Tensor], list]

    def fwd_hooks(self, tokens: Tensor) -> list:
        return self.make(tokens)


def uniform_within_brackets(layer: int, head: int) -> _Edit:
    """Head ``layer.head``'s attention from ``[start]`` spread evenly over the brackets, keeping the
    weight it puts on them in total (and on every other token as it is)."""
    def make(tokens: Tensor) -> list:
        brackets = (tokens == OPEN) | (tokens == CLOSE)                       # [b, k]

        def hook(pattern: Tensor, hook) -> Tensor:                            # [b, h, q, k]
            row = pattern[:, head, 0]
            on = (row * brackets).sum(-1, keepdim=True)
            pattern = pattern.clone()
            pattern[:, head, 0] = torch.where(brackets, on / brackets.sum(-1, keepdim=True), row)
            return pattern
        return [(f"blocks.{layer}.attn.hook_pattern", hook)]
    return _Edit(f"head {layer}.{head}'s attention from [start] spread evenly over the brackets (its total on them "
                 f"kept)", make)


def bracket_checks(iv, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """What each part the facts name is needed for, read as the mean accuracy over a pair of kinds
    (:data:`PAIRS`; 50% is chance): the proportion head, mean-ablated, for the count; the negative
    head and MLPs 0 and 1 (ARENA's) for the elevation (each holds when that accuracy falls by 10 points or
    more); and the proportion head's attention from ``[start]`` made exactly uniform over the
    brackets (holds when no kind falls by more than a point)."""
    a = summary.get("attention") or {}
    if "heads_at_start" not in a or "by_kind" not in summary.get("eval", {}):
        return []
    before = _kind_accuracy(summary["eval"])
    out = []

    def needed(id: str, x, pair: str) -> None:
        after = _kind_accuracy(iv.evaluate(x))
        was, now = _pair_accuracy(before, pair), _pair_accuracy(after, pair)
        ok = now <= was - 0.10
        kinds = " and ".join(PAIRS[pair])
        verdict = f"the {pair} goes through it" if ok else f"the model tells them apart by the {pair} without it"
        out.append(check(id, f"With {x.text}, the mean accuracy on {kinds} strings is {100 * now:.1f}% "
                         f"({100 * was:.1f}% before; 50% is chance; every kind: {_pcts(after)}): {verdict} "
                         f"(holds at a fall of 10 points or more).", x.text, f"mean accuracy on {kinds}",
                         was, now, ok))
    p, n = (tuple(int(i) for i in a[k].split(".")) for k in ("proportion_head", "negative_head"))
    needed("proportion_head_needed", iv.ablate_heads([p], "mean"), "count")
    if n != p:
        needed("negative_head_needed", iv.ablate_heads([n], "mean"), "elevation")
    if iv.model.cfg.d_mlp is not None:
        for l in range(min(2, iv.n_layers)):                # ARENA's model finds the dips with MLPs 0 and 1
            x = iv.ablate_neurons({l: list(range(iv.model.cfg.d_mlp))}, "mean")
            needed(f"mlp{l}_needed", _Edit(f"MLP {l} mean-ablated", x.fwd_hooks), "elevation")
    x = uniform_within_brackets(*p)
    after = _kind_accuracy(iv.evaluate(x))
    worst = max(before, key=lambda k: before[k] - after[k])
    drop = before[worst] - after[worst]
    ok = drop <= 0.01
    verdict = "evenly spread attention is what it does" if ok else "where it looks among the brackets matters"
    out.append(check("proportion_head_uniform", f"With {x.text}, accuracy by kind is {_pcts(after)} (it fell most on "
                     f"{worst}, by {100 * drop:.1f} points): {verdict} (holds within 1 point on every kind).", x.text,
                     f"accuracy on {worst}", before[worst], after[worst], ok))
    return out


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

    def output_labels(self) -> list[str]:
        return list(CLASSES)

    def model_config(self) -> ModelConfig:
        # ARENA's: 3 layers, 2 heads, d_model 56, d_mlp 56, LayerNorm, bidirectional, padding masked.
        return ModelConfig(n_layers=3, n_heads=2, d_model=56, d_mlp=56, d_vocab=self.d_vocab,
                           d_vocab_out=self.d_vocab_out, n_ctx=self.seq_len, normalization="LN",
                           attention_dir="bidirectional", pad_token=PAD)

    def train_config(self) -> TrainConfig:
        # Seed 0: 99% on every kind first at step 1,200 (169 s, one thread, load average 2.7-3 on
        # the shared 2 cores), where the target stops it; lr 1e-2 stalled near 77%, and lr 3e-3 over
        # a 1,500-step cosine ended at 97.9% on equal_negative.
        return TrainConfig(steps=3000, batch_size=256, lr=3e-3, lr_schedule="cosine", warmup_steps=100,
                           weight_decay=0.01, eval_every=100, target_accuracy=0.99)

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

    # -- what it claims -------------------------------------------------------------------
    facts_rows = 256            # rows of each kind that the facts read

    @torch.no_grad()
    def facts(self, model) -> dict[str, Any]:
        """What each head does, on :attr:`facts_rows` eval strings of each kind. From ``[start]``:
        its attention on the brackets (``on_brackets``), how far it is from uniform over them
        (``from_uniform``, total variation), the share of it on ``)`` (``on_close``; ``close_share``
        is their share of the brackets), how much of the fraction of ``(`` a linear read-out of its
        output recovers (``open_fraction_r2``, R²) and, on the ``equal_negative`` strings, its
        attention on the brackets in a stretch below zero over their share of the string
        (``on_negative_ratio``: 1 ignores the elevation). From every bracket: its weight on the
        brackets after it, of its weight on brackets (``later_brackets``; uniform attention gives
        ``later_brackets_uniform``): far from it, a head would be summing a prefix or a suffix,
        the elevation. ``proportion_head``: of the heads with half their weight or more on the
        brackets, the one closest to uniform; ``negative_head``: the largest ratio."""
        return head_facts(model, self._facts_batch())

    def _facts_batch(self) -> tuple[Tensor, Tensor]:
        batch, kinds = self.eval_batch(), self.kinds()
        rows = torch.cat([(kinds == i).nonzero()[: self.facts_rows, 0] for i in range(len(KINDS))])
        return batch.tokens[rows], kinds[rows]

    def findings(self, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """The accuracy on each kind, the head that reads the proportion of ``(`` at ``[start]``
        and the head that looks where the elevation is below zero, with their numbers."""
        out = []
        by = (summary.get("eval") or {}).get("by_kind")
        if by:
            worst = min(by, key=lambda k: by[k]["accuracy"])
            each = ", ".join(f"{k} {100 * g['accuracy']:.2f}%" for k, g in by.items())
            out.append({"id": "accuracy_by_kind", "value": by[worst]["accuracy"],
                        "text": f"Accuracy by kind of string: {each} (lowest: {worst})."})
        a = summary.get("attention") or {}
        if "heads_at_start" not in a:
            return out
        heads, p, n = a["heads_at_start"], a["proportion_head"], a["negative_head"]
        hp, hn = heads[p], heads[n]
        out.append({"id": "proportion_head", "value": hp["from_uniform"],
                    "text": f"Head {p} attends from [start] to the brackets almost uniformly (weight "
                            f"{hp['on_brackets']:.3f} on them, {hp['from_uniform']:.3f} from uniform over them in "
                            f"total variation, the least of any head): it reads the proportion of open brackets "
                            f"(a linear read-out of its output there recovers {100 * hp['open_fraction_r2']:.1f}% "
                            f"of the variance of the fraction of '(')."})
        out.append({"id": "negative_head", "value": hn["on_negative_ratio"],
                    "text": f"Head {n} looks from [start] at closing brackets ({100 * hn['on_close']:.1f}% of its "
                            f"weight on the brackets is on ')', {100 * a['close_share']:.1f}% of them), at those in a "
                            f"stretch below zero {hn['on_negative_ratio']:.2f} times their share of the string "
                            f"(equal counts, unbalanced strings; 1 would ignore the elevation)."})
        layer0 = {k: v for k, v in heads.items() if k.startswith("0.")}
        far = max(layer0, key=lambda k: abs(layer0[k]["later_brackets"] - a["later_brackets_uniform"]))
        out.append({"id": "no_prefix_sums", "value": layer0[far]["later_brackets"],
                    "text": f"No layer-0 head sums a prefix or a suffix at the brackets: from each bracket, head "
                            f"{far} puts {100 * layer0[far]['later_brackets']:.1f}% of its weight on brackets on the "
                            f"ones after it (uniform attention: {100 * a['later_brackets_uniform']:.1f}%), the "
                            f"farthest from uniform of layer 0's heads."})
        return out

    def checks(self, interventions, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """Ablations of the heads the facts name and of each MLP (see :func:`bracket_checks`)."""
        return bracket_checks(interventions, summary)
