"""How a task reads and writes examples as text: the defaults every :class:`~qkov.tasks.Task` has.

A person writes one example the way the task's data reads (``"35 14 47 61 38 54"`` for
``max``); :meth:`TaskText.parse` turns it into token ids and :meth:`TaskText.format` writes ids
back. :meth:`TaskText.answer_positions` says which query positions hold the model's answer to
that input, :meth:`TaskText.expected` the right answer there (where the task can compute it)
and :meth:`TaskText.format_answer` writes an answer as the task would. ``qkov show`` and the
report's ``--inputs`` read examples through these methods only, so a task whose text is not
numbers (a bracket classifier reading ``"(()())"``) overrides ``parse`` and ``format`` and
nothing else changes.

How the answer is produced is the task's too: :attr:`TaskText.answer_is_generated` says whether
the model writes it after the input one token at a time (``sort``: ``5 3 9 1 |`` then ``1 3 5
9``), so that ``qkov show`` generates it, each output fed back, instead of reading predictions
on a given sequence (``max``, ``fib``, ``histogram``: every token the model reads is input).

The defaults read words separated by spaces, each a token label (``task.token_labels()``):

>>> from qkov.tasks import get_task
>>> task = get_task("max")
>>> task.parse("35 14 47 61 38 54")
[35, 14, 47, 61, 38, 54]
>>> task.format([52, 59])
'52 59'
>>> task.parse("35 x")
Traceback (most recent call last):
...
qkov.errors.QkovError: input '35 x': 'x' is not a number; max reads 2 to 6 numbers 0..63 separated by spaces, ...
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import QkovError


class TaskText:
    """Text in and out of a task: parse, format, where the answer is read and what it should be.

    Mixed into :class:`~qkov.tasks.Task`; a task overrides what its text needs (``input_help``
    and ``check_input`` for its lengths, ``expected`` for its rule).
    """

    # -- reading ------------------------------------------------------------------------
    @property
    def input_help(self) -> str:
        """How one input is written, for error messages: how many tokens, which, an example."""
        return f"1 to {self.seq_len} {self._vocab_words()} separated by spaces, e.g. '{self._example_text()}'"

    def parse(self, text: str) -> list[int]:
        """The token ids of one input written as text; a one-line ``QkovError`` naming the input
        when a word is not a token, or the input does not fit the task."""
        if not isinstance(text, str):
            raise QkovError(f"input {text!r} is {type(text).__name__}, not text; pass text such as "
                            f"'{self._example_text()}'")
        ids = {label: i for i, label in enumerate(self.token_labels())}
        tokens = [self._token_id(text, word, ids) for word in text.split()]
        self.check_input(text, tokens)
        return tokens

    def _token_id(self, text: str, word: str, ids: dict[str, int]) -> int:
        if word in ids:
            return ids[word]
        try:
            number = int(word)
        except ValueError:
            raise QkovError(f"input {text!r}: {word!r} is not a number; {self.name} reads {self.input_help}") from None
        if str(number) in ids:                     # "035" or "+35": the same number, written otherwise
            return ids[str(number)]
        raise QkovError(f"input {text!r}: {word} is outside the vocabulary ({self._vocab_words()}); "
                        f"{self.name} reads {self.input_help}")

    def check_input(self, text: str, tokens: list[int]) -> None:
        """Raise a one-line ``QkovError`` when ``tokens`` (parsed from ``text``) is not an input of
        this task. The default: 1 to ``seq_len`` tokens."""
        self._check_length(text, tokens, 1, self.seq_len)

    def _check_length(self, text: str, tokens: Sequence[int], lo: int, hi: int) -> None:
        n = len(tokens)
        if not lo <= n <= hi:
            raise QkovError(f"input {text!r} has {n} token{'s' * (n != 1)}; {self.name} reads {self.input_help}")

    # -- writing ------------------------------------------------------------------------
    def format(self, tokens: Sequence[int]) -> str:
        """``tokens`` written as text, the inverse of :meth:`parse`."""
        labels = self.token_labels()
        return " ".join(labels[int(t)] if 0 <= int(t) < len(labels) else str(int(t)) for t in tokens)

    def format_answer(self, outputs: Sequence[int | None]) -> str:
        """Output ids (one per answer position; None where there is none) written as the task
        writes an answer."""
        return " ".join("?" if t is None else self.format([t]) for t in outputs)

    # -- answers ------------------------------------------------------------------------
    #: True when the answer is a sequence the model writes after the input: the answer positions
    #: are consecutive and the prediction at each one but the last is the token at the next
    #: position (as in training, where that token is the right output). ``qkov show`` then gives the
    #: model the tokens up to the first answer position (:meth:`prompt`) and decodes greedily,
    #: appending each output and running the model again, so no prediction sees the true answer.
    answer_is_generated: bool = False

    def prompt(self, tokens: Sequence[int]) -> list[int]:
        """What the model reads before it writes a generated answer: ``tokens`` up to and
        including the first of :meth:`answer_positions` (``5 3 9 1 |`` for ``sort``)."""
        return list(tokens[: self.answer_positions(tokens)[0] + 1])

    def answer_positions(self, tokens: Sequence[int]) -> list[int]:
        """The query positions whose predictions are the model's answer to ``tokens``: the
        task's scored positions inside the input, or the last position."""
        fixed = self.scored_positions
        inside = [p for p in fixed if p < len(tokens)] if fixed is not None else []
        return inside or [len(tokens) - 1]

    def expected(self, tokens: Sequence[int]) -> list[int | None]:
        """The right output id at each of :meth:`answer_positions` (None where the task cannot
        compute it; the default knows no rule)."""
        return [None for _ in self.answer_positions(tokens)]

    def example_tokens(self, n: int) -> list[list[int]]:
        """``n`` inputs that show the task well (the report draws their attention): ``n`` of the
        fixed evaluation set, evenly spread over it (an enumerated set is in order: its first
        inputs are all alike)."""
        tokens = self.eval_batch().tokens
        return [tokens[(2 * i + 1) * len(tokens) // (2 * n)].tolist() for i in range(n)]

    # -- helpers --------------------------------------------------------------------------
    def _vocab_words(self) -> str:
        labels = self.token_labels()
        numbers = [x for x in labels if x.isdigit()]
        if numbers == [str(i) for i in range(len(numbers))] and numbers:
            extra = labels[len(numbers):]
            return f"numbers 0..{len(numbers) - 1}" + "".join(f" and '{x}'" for x in extra)
        return "tokens " + ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")

    def _example_text(self) -> str:
        return self.format(self.example_tokens(1)[0])

