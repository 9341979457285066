"""What a model does on inputs a person writes: its answer, the expected one, top logits, attention.

``show(model, task, "35 14 47 61 38 54")`` reads each input through the task (``task.parse``),
runs the model once and returns, per input, a :class:`Shown`: the model's answer as the task
writes it, the expected answer where the task can compute it, the top logits at each answer
position and every head's attention pattern. ``qkov show DIR INPUT ...`` prints the same, and
the report's ``--inputs`` draws these inputs' attention.

>>> import torch, qkov
>>> task = qkov.get_task("max")
>>> torch.manual_seed(0) and None
>>> model = qkov.Transformer(task.model_config())        # untrained: the numbers mean nothing
>>> shown = qkov.show(model, task, "52 59", "35 14 47 61 38 54")
>>> shown[1].tokens, shown[1].positions, shown[1].expected
([35, 14, 47, 61, 38, 54], [5], '61')
>>> sorted(shown[1].patterns), len(shown[1].patterns["0.0"][5])   # "layer.head" -> [query][key]
(['0.0'], 6)
>>> print(shown[0].table("0.0"))             # the answer position's row: where it looks
        (0) 52  (1) 59
(1) 59    0...    0...

Which positions hold the answer, what the answer should be and how it is written are the task's
(:class:`qkov.tasks.TaskText`); this module never asks which task it has. Where the task's answer
is a sequence the model writes after the input (``task.answer_is_generated``: ``sort``,
``reverse``), the answer is generated: the model reads the prompt (``5 3 9 1 |``), its top output
is appended and the model runs again, one output token at a time, so every prediction is made from
the model's own earlier outputs and never from the true answer; ``tokens`` and the attention are
then those of the generated sequence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .devices import model_device
from .errors import QkovError
from .tasks import Task, get_task

TOP_K = 5


@dataclass
class Shown:
    """One input and what the model does on it."""

    input: str                              # the input as it was given (token ids: as the task writes them)
    tokens: list[int]
    labels: list[str]                       # "(position) token" per position
    positions: list[int]                    # the answer positions (query positions read)
    predictions: list[int]                  # the model's output id at each answer position
    output: str                             # the predictions as the task writes an answer
    expected: str | None                    # the right answer, where the task can compute it
    expected_tokens: list[int | None]       # the right output id at each answer position (None: unknown)
    correct: bool | None                    # every known expected id predicted (None: none known)
    top: list[list[dict[str, Any]]]         # per answer position: [{token, label, logit, prob}], best first
    patterns: dict[str, list[list[float]]]  # "layer.head" -> [query_pos][key_pos]
    generated: bool = False                 # the answer was generated (each output fed back as the next token)
    causal: bool = True                     # the model's attention is causal (keys after a query are never read)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, head: str, digits: int = 2) -> str:
        """Head ``head``'s (``"layer.head"``) attention at the answer positions as a text table,
        rows ``(position) token`` of the queries, columns the keys (blank where a causal model's
        key comes after its query: never read)."""
        pattern = self.patterns[head]
        width = max(max(len(x) for x in self.labels), digits + 2)
        lead = max(len(self.labels[q]) for q in self.positions)
        lines = [" " * (lead + 2) + "  ".join(x.rjust(width) for x in self.labels)]
        for q in self.positions:
            cells = [f"{pattern[q][k]:.{digits}f}".rjust(width) if k <= q or not self.causal else " " * width
                     for k in range(len(self.labels))]
            lines.append(self.labels[q].ljust(lead + 2) + "  ".join(cells).rstrip())
        return "\n".join(lines)

    def to_text(self) -> str:
        """What ``qkov show`` prints for this input: answer, expected, top logits, attention."""
        verdict = "" if self.correct is None else ("  (correct)" if self.correct else "  (wrong)")
        if self.generated and self.correct is False:
            wrong = [str(i + 1) for i, (p, e) in enumerate(zip(self.predictions, self.expected_tokens))
                     if e is not None and p != e]
            verdict = (f"  (wrong: the generated answer differs from it at output{'s' * (len(wrong) > 1)} "
                       f"{', '.join(wrong)} of {len(self.predictions)})")
        how = "  (generated: each output token fed back)" if self.generated else ""
        lines = [f"input     {self.input}", f"answer    {self.output}{how}"]
        if self.expected is not None:
            lines.append(f"expected  {self.expected}{verdict}")
        lines.append("top logits:")
        for q, top in zip(self.positions, self.top):
            best = ", ".join(f"{t['label']} {t['logit']:.2f} ({t['prob']:.1%})" for t in top)
            lines.append(f"  at {self.labels[q]}: {best}")
        for head in self.patterns:
            lines.append(f"attention of head {head} at the answer positions (rows: query, columns: key):")
            lines.append("\n".join("  " + line for line in self.table(head).splitlines()))
        return "\n".join(lines)

    __str__ = to_text


class ShownList(list):
    """The :class:`Shown` of each input, in order; prints as ``qkov show`` does."""

    def to_json(self, indent: int | None = 2) -> str:
        """A JSON list, one object per input (``input``, ``tokens``, ``output``, ``expected``,
        ``correct``, ``patterns``, ...)."""
        return json.dumps([s.to_dict() for s in self], indent=indent)

    def __str__(self) -> str:
        return "\n\n".join(s.to_text() for s in self)


def read_input(model, task: Task, example: str | Sequence[int]) -> tuple[str, list[int]]:
    """One input (text as the task writes it, or token ids) as ``(text, token ids)`` the model
    can read; a one-line ``QkovError`` naming the input otherwise."""
    if isinstance(example, torch.Tensor):
        example = example.tolist()
    if not isinstance(example, str):
        if not isinstance(example, Sequence) or not all(isinstance(t, int) for t in example):
            raise QkovError(f"input {example!r} is neither text nor a list of token ids; "
                            f"pass text such as '{task.format(task.example_tokens(1)[0])}'")
        example = task.format(example)
    tokens = task.parse(example)
    n_ctx = model.cfg.n_ctx
    if len(tokens) > n_ctx:
        raise QkovError(f"input {example!r} has {len(tokens)} tokens, more than the model's n_ctx={n_ctx}")
    return example.strip(), tokens


@torch.no_grad()
def show(model, task: Task | str, *inputs: str | Sequence[int], top_k: int = TOP_K) -> ShownList:
    """What ``model`` does on each input: a :class:`ShownList` of :class:`Shown`, one per input.

    Each input is text written as ``task`` writes its examples (``"35 14 47 61 38 54"``) or a
    list of token ids. Every input is read before the model runs, so one bad input is one
    ``QkovError`` line and no work.
    """
    task = get_task(task) if isinstance(task, str) else task
    if not inputs:
        raise QkovError(f"show needs at least one input, e.g. '{task.format(task.example_tokens(1)[0])}'")
    task.check_model(model.cfg)
    read = [read_input(model, task, x) for x in inputs]
    was_training = model.training
    model.eval()
    try:
        return ShownList(_show_one(model, task, text, tokens, top_k) for text, tokens in read)
    finally:
        model.train(was_training)


def _show_one(model, task: Task, text: str, tokens: list[int], top_k: int) -> Shown:
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    positions = task.answer_positions(tokens)
    expected = task.expected(tokens)
    if task.answer_is_generated:
        tokens, scores, cache = _generate(model, task, names, tokens, positions)
    else:
        scores, cache = _forward(model, names, tokens, positions)
    predictions = scores.argmax(-1).tolist()
    known = [(p, e) for p, e in zip(predictions, expected) if e is not None]
    labels, outs = task.token_labels(), task.output_labels()
    probs = scores.softmax(-1)
    best = scores.topk(min(top_k, scores.shape[-1]), dim=-1).indices           # [answers, k]
    top = [[{"token": int(t), "label": outs[int(t)] if int(t) < len(outs) else str(int(t)),
             "logit": round(float(scores[i, t]), 4), "prob": round(float(probs[i, t]), 4)} for t in row]
           for i, row in enumerate(best.tolist())]
    patterns = {f"{l}.{h}": [[round(float(v), 4) for v in row] for row in cache[name][0, h].tolist()]
                for l, name in enumerate(names) for h in range(model.cfg.n_heads)}   # [q][k] each
    return Shown(
        input=text, tokens=list(tokens),
        labels=[f"({i}) {labels[t]}" for i, t in enumerate(tokens)],
        positions=list(positions), predictions=predictions, output=task.format_answer(predictions),
        expected=task.format_answer(expected) if known else None, expected_tokens=list(expected),
        correct=all(p == e for p, e in known) if known else None, top=top, patterns=patterns,
        generated=task.answer_is_generated,
        causal=getattr(getattr(model, "cfg", None), "attention_dir", "causal") != "bidirectional",   # qkov or TL
    )


def _forward(model, names: list[str], tokens: list[int], positions: list[int]):
    """The model on ``tokens`` once: logits at ``positions`` ``[answers, d_vocab_out]`` and the
    attention patterns' cache."""
    x = torch.tensor([tokens], device=model_device(model))                     # [1, pos]
    logits, cache = model.run_with_cache(x, names_filter=names)                    # [1, pos, d_vocab_out]
    return logits[0, positions].float(), cache


def _generate(model, task: Task, names: list[str], tokens: list[int], positions: list[int]):
    """Greedy decoding from ``task.prompt(tokens)``: at each answer position the model runs on the
    sequence so far and its top output is appended, so the next prediction reads the model's own
    output. Returns the generated sequence (as long as ``tokens``), the logits at ``positions``
    ``[answers, d_vocab_out]`` and the last run's cache (the whole generated sequence)."""
    sequence = task.prompt(tokens)                 # the input: nothing of the true answer
    if positions != list(range(len(sequence) - 1, len(sequence) - 1 + len(positions))):
        raise QkovError(f"task {task.name!r} generates its answer but its answer positions {positions} do not "
                        f"start at the prompt's last token ({len(sequence) - 1}) and follow one another")
    rows = []
    for i, p in enumerate(positions):
        scores, cache = _forward(model, names, sequence, [p])                  # [1, d_vocab_out]
        rows.append(scores[0])
        if i + 1 < len(positions):
            sequence.append(int(scores[0].argmax()))
    return sequence, torch.stack(rows), cache
