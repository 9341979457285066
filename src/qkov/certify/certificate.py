"""``certify(model, task)``: the exact accuracy and every proof's bound, per input length.

>>> import qkov
>>> task = qkov.get_task("max", vocab=6, min_len=3, max_len=3)
>>> model = qkov.Transformer(task.model_config(), seed=0)
>>> cert = certify(model, task)
>>> sorted(cert.to_dict()["lengths"]["3"])
['bounds', 'certified', 'exact', 'failing_cases', 'flops', 'inputs', 'seconds']
>>> all(b <= cert[3].exact for b in cert[3].bounds.values())    # a bound never beats the truth
True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import circuits
from ..errors import QkovError
from ..tasks.base import AnswerRule
from ..threads import ThreadPolicy
from .brute import brute_force
from .cubic import cubic
from .subcubic import subcubic
from .tables import check_model, tables

EXACT_LIMIT = 64 ** 4       # brute force runs where d_vocab ** length is at most this (64**5 takes ~45 s)
PROOFS = ("cubic", "subcubic")
_PROVE = {"cubic": cubic, "subcubic": subcubic}


@dataclass
class LengthCertificate:
    """One input length: the exact accuracy (when brute force ran) and each proof's lower bound."""

    length: int
    inputs: int                          # d_vocab ** length
    exact: float | None                  # None where brute force was skipped (over exact_limit)
    bounds: dict[str, float]             # proof -> certified lower bound on the accuracy
    certified: dict[str, int]            # proof -> inputs certified ("exact": inputs right)
    flops: dict[str, float]              # "tables", "brute_force" and each proof
    seconds: dict[str, float]
    uncertified: Tensor                  # [m, q] int64: inputs the cubic proof leaves, by (max, query)
    inputs_by_case: Tensor               # [m, q] int64: inputs with each (max, query)
    wrong: Tensor | None = None          # [m, q] int64: inputs the model gets wrong (brute force)

    def failing_cases(self) -> list[dict[str, int]]:
        """The (max, query) cases where the cubic proof loses inputs, most first:
        ``{max, query, uncertified, inputs[, wrong]}``."""
        lost = self.uncertified
        rows = []
        for m, q in lost.nonzero().tolist():
            row = {"max": m, "query": q, "uncertified": int(lost[m, q]), "inputs": int(self.inputs_by_case[m, q])}
            if self.wrong is not None:
                row["wrong"] = int(self.wrong[m, q])
            rows.append(row)
        return sorted(rows, key=lambda r: (-r["uncertified"], r["max"], r["query"]))

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "exact": self.exact, "bounds": dict(self.bounds),
                "certified": dict(self.certified), "flops": dict(self.flops), "seconds": dict(self.seconds),
                "failing_cases": self.failing_cases()}


@dataclass
class Certificate:
    """Every length's :class:`LengthCertificate` for one model and task; ``cert[4]`` is length 4's."""

    task: dict[str, Any]
    lengths: dict[int, LengthCertificate] = field(default_factory=dict)

    def __getitem__(self, length: int) -> LengthCertificate:
        return self.lengths[length]

    def format(self, worst: int = 5) -> str:
        """The certificate as text: per length the exact accuracy, each bound with its FLOPs and
        seconds, and the ``worst`` (max, query) cases where the cubic proof loses inputs."""
        desc = ", ".join(f"{k}={v}" for k, v in self.task.items() if k != "name")
        lines = [f"{self.task.get('name', 'model')}" + (f" ({desc})" if desc else "")]
        for n, c in self.lengths.items():
            lines.append(f"length {n}: {c.inputs:,} inputs")
            rows = [("exact (brute force)", c.exact, "brute_force")] if c.exact is not None else []
            rows += [(f"{name} proof, at least", b, name) for name, b in c.bounds.items()]
            for label, value, key in rows:
                missed = c.inputs - c.certified["exact" if key == "brute_force" else key]
                what = "wrong" if key == "brute_force" else "uncertified"
                lines.append(f"  {label:<24} {value:9.4%}  {c.flops[key]:8.2g} FLOPs  {c.seconds[key]:7.3f} s"
                             f"  ({missed:,} {what})")
            if c.exact is None:
                lines.append("  exact: not computed (over exact_limit; qkov certify --exact-limit N)")
            cases = c.failing_cases()
            if cases:
                lost = sum(r["uncertified"] for r in cases)
                top = ", ".join(f"({r['max']}, {r['query']}) {r['uncertified']:,} of {r['inputs']:,}"
                                for r in cases[:worst])
                lines.append(f"  the cubic proof leaves {lost:,} inputs in {len(cases)} (max, query) cases; "
                             f"most: {top}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """``{"task": ..., "lengths": {"4": {"exact", "bounds", "flops", "seconds", "failing_cases", ...}}}``."""
        return {"task": dict(self.task), "lengths": {str(n): c.to_dict() for n, c in self.lengths.items()}}


def _rule(model, task) -> tuple[AnswerRule, dict[str, Any]]:
    """The answer rule to prove against and the task's description."""
    if task is None:        # a bare model: the answer is the max of the sequence, any length
        w = circuits.weights(model)
        return AnswerRule("max", tuple(range(1, w.n_ctx + 1)), w.d_vocab), {"answer": "max"}
    rule = task.answer_rule()
    if rule is None:
        raise QkovError(
            f"task '{task.name}' cannot be certified: qkov's proofs need a task whose answer is a known rule of "
            f"the whole sequence (answer_rule(), e.g. max: the largest token); '{task.name}' declares none")
    if rule.reduce not in ("max",):
        raise QkovError(f"task '{task.name}' answers with the rule {rule.reduce!r}; qkov certify proves 'max' only")
    return rule, task.to_dict()


def certify(model, task=None, *, length: int | None = None, exact_limit: int = EXACT_LIMIT,
            proofs: tuple[str, ...] = PROOFS, threads: int = 1) -> Certificate:
    """Certify ``model`` (a 1-layer attention-only model, or a ``qkov.Run``) on ``task``.

    For every length the task scores (or just ``length``): the exact accuracy over all
    ``d_vocab ** length`` inputs by brute force where that count is at most ``exact_limit``, and
    each proof's certified lower bound (``proofs``: "cubic", "subcubic"), with FLOPs and seconds.
    A bare model with no task is taken to answer the max of its inputs at every length.
    ``threads``: torch's intra-op threads meanwhile (one: the proofs' many mid-sized steps ran
    up to 20x slower on two threads of a shared 2-core machine, and no faster on a quiet one).
    """
    if task is None and hasattr(model, "model") and hasattr(model, "task"):
        model, task = model.model, model.task
    rule, desc = _rule(model, task)
    check_model(circuits.weights(model))
    bad = [p for p in proofs if p not in _PROVE]
    if bad:
        raise QkovError(f"unknown proof(s) {', '.join(map(repr, bad))}; known: {', '.join(_PROVE)}")
    lengths = rule.lengths
    if length is not None:
        if length not in lengths:
            raise QkovError(f"length={length!r} is not one the task scores; pass one of {', '.join(map(str, lengths))}")
        lengths = (length,)
    cert = Certificate(desc)
    with torch.no_grad(), ThreadPolicy(threads):
        for n in lengths:
            cert.lengths[n] = _one_length(model, rule, n, exact_limit, proofs)
    return cert


def _one_length(model, rule: AnswerRule, n: int, exact_limit: int, proofs: tuple[str, ...]) -> LengthCertificate:
    start = time.perf_counter()
    t = tables(model, n, d_vocab=rule.d_vocab)
    if t.d_vocab_out < t.d_vocab:
        raise QkovError(f"the model has {t.d_vocab_out} outputs but answers up to {t.d_vocab - 1}; it cannot be max")
    flops, seconds = {"tables": t.flops}, {"tables": time.perf_counter() - start}
    bounds, certified = {}, {}
    exact = wrong = None
    if t.inputs <= exact_limit:
        e = brute_force(t)
        exact, wrong = e.accuracy, e.wrong
        certified["exact"], flops["brute_force"], seconds["brute_force"] = e.correct, e.flops, e.seconds
    results = {name: _PROVE[name](t) for name in proofs}
    for name, r in results.items():
        bounds[name], certified[name], flops[name], seconds[name] = r.bound, r.certified, r.flops, r.seconds
    main = results.get("cubic") or cubic(t)
    by_case = main.inputs_by_case()
    return LengthCertificate(n, t.inputs, exact, bounds, certified, flops, seconds, main.uncertified(), by_case, wrong)
