"""The case split of the cubic proof: which inputs each case ``(m, q, k, c)`` holds.

Inputs of length ``n`` (query at position ``n-1``, ``N = n-1`` other positions) are split into
cases ``(m, q, k, c)``: max token ``m``, query token ``q <= m``, ``c`` copies of ``m`` among the
other positions and, on the remaining ``r = N - c >= 1`` positions, tokens ``<= k < m`` with at
least one equal to ``k`` (``k`` is the largest non-max token other than the query). A case holds
``C(N, c) · ((k+1)^r - k^r)`` inputs. The inputs whose other positions all hold ``m`` (``r = 0``)
are one per ``(m, q)``: the "pure" cases. Every input lies in exactly one case.

>>> counts, pure = case_counts(d_vocab=3, length=2)
>>> int(counts.sum() + pure.sum()) == 3 ** 2
True
>>> case_of(torch.tensor([[0, 2, 1], [2, 2, 2]]))       # (m, q, k, c) per input; k = -1: pure
(tensor([2, 2]), tensor([1, 2]), tensor([ 0, -1]), tensor([1, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def case_counts(d_vocab: int, length: int) -> tuple[Tensor, Tensor]:
    """``(counts [m, q, k, c], pure [m, q])`` int64: how many inputs each case holds."""
    V, N = d_vocab, length - 1
    m = torch.arange(V)[:, None, None, None]
    q = torch.arange(V)[None, :, None, None]
    k = torch.arange(V)[None, None, :, None]
    c = torch.arange(N + 1)[None, None, None, :]
    r = N - c
    per = torch.tensor([math.comb(N, i) for i in range(N + 1)])[None, None, None, :]
    valid = (q <= m) & (k < m) & (r >= 1) & ((q == m) | (c >= 1))           # q < m: m is among the others
    counts = per * ((k + 1) ** r - k ** r) * valid                            # [m, q, k, c]
    mq = torch.arange(V)[:, None], torch.arange(V)[None, :]
    pure = mq[1] <= mq[0] if N >= 1 else mq[1] == mq[0]                      # [m, q]; n = 1: the query is the max
    return counts.long(), pure.long()


def case_of(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m, q, k, c)`` of each input ``[b, n]``; ``k = -1`` marks a pure case (``c = n-1``)."""
    tokens = torch.as_tensor(tokens).long()
    m, q = tokens.max(1).values, tokens[:, -1]
    others = tokens[:, :-1]
    is_max = others == m[:, None]
    c = is_max.sum(1)
    k = torch.where(is_max, -1, others).amax(1) if others.shape[1] else torch.full_like(m, -1)
    return m, q, k, c


@dataclass
class CaseProof:
    """Which cases a proof certifies, and how many inputs each holds."""

    length: int
    d_vocab: int
    passes: Tensor        # [m, q, k, c] bool: the case is certified
    counts: Tensor        # [m, q, k, c] int64: inputs in the case (0 where the case is empty)
    pure_passes: Tensor   # [m, q] bool
    pure_counts: Tensor   # [m, q] int64
    flops: float
    seconds: float
    rechecked: int = 0    # cases checked a second time, with the worst output taken jointly

    @property
    def certified(self) -> int:
        """Inputs the proof certifies the model gets right."""
        return int((self.counts * self.passes).sum() + (self.pure_counts * self.pure_passes).sum())

    @property
    def bound(self) -> float:
        """The certified lower bound on the accuracy over all ``d_vocab ** length`` inputs."""
        return self.certified / self.d_vocab ** self.length

    def uncertified(self) -> Tensor:
        """``[m, q]`` int64: inputs with max ``m`` and query ``q`` that the proof leaves uncertified."""
        return (self.counts * ~self.passes).sum((2, 3)) + self.pure_counts * ~self.pure_passes

    def inputs_by_case(self) -> Tensor:
        """``[m, q]`` int64: how many inputs have max ``m`` and query ``q``."""
        return self.counts.sum((2, 3)) + self.pure_counts

    def certifies(self, tokens: Tensor) -> Tensor:
        """``[b]`` bool: whether the proof certifies each input ``[b, length]``."""
        m, q, k, c = case_of(torch.as_tensor(tokens).cpu())
        out = self.pure_passes[m, q].clone()
        rest = k >= 0
        out[rest] = self.passes[m[rest], q[rest], k[rest], c[rest]]
        return out
