"""Brute force: the exact accuracy of a max model over all ``d_vocab ** n`` inputs of a length.

An input counts as right when the logit of its max token is strictly larger than every other
logit (the strict rule every proof here uses; the plain forward's first-argmax rule differs
only on exact ties). Everything is computed from the length's :class:`~.tables.Tables`, never
by running the model, in two passes per query token ``q``:

1. A lower bound on each input's logit gap that is a sum over positions,
   ``Σ_i a_i (d_i(x_i)[m] - max_{o≠m} d_i(x_i)[o])`` with ``d_i(x) = EVOU[x] + PVOU[i] + EUPU[q]``
   and ``m`` the input's max (the max of a sum is at most the sum of the maxes). Inputs whose
   bound is clearly positive are right; this is a few gathers per input, over a grid of the
   last (at most three) non-query positions at a time, so memory stays bounded.
2. The inputs left over (few, for a trained model) get their logits in full, times the softmax's
   denominator, from per-position rows of the tables, and are checked exactly.

On one thread, 64^4 inputs take about 1 s for a trained max-of-4 model (5 s of CPU for an
untrained one, whose inputs nearly all reach stage 2) and 64^5 about 30 s.

>>> import qkov
>>> from qkov.certify.tables import tables
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=4, n_ctx=3), seed=1)
>>> t = tables(model, length=3)
>>> exact = brute_force(t)
>>> exact.total, exact.correct == int(right(t, all_inputs(4, 3)).sum())
(64, True)
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .tables import Tables

GRID_POSITIONS = 3   # non-query positions enumerated as one grid (64**3 inputs per step at vocab 64)
STAGE1_TOL = 1e-9    # stage 1 calls an input right only when its bound beats rounding by this much (relative)
MAX_WRONG_KEPT = 1 << 20   # the wrong inputs themselves are kept up to this many
FULL_CHUNK = 1 << 14       # inputs whose logits stage 2 computes at a time (bounded memory)


@dataclass
class Exact:
    """The exact accuracy of one length and where the model is wrong."""

    correct: int
    total: int
    wrong: Tensor          # [d_vocab (max token), d_vocab (query token)] int64: wrong inputs by (max, query)
    checked_in_full: int   # inputs whose logits stage 2 computed
    flops: float
    seconds: float
    wrong_inputs: Tensor | None = None   # [w, n]: every input the model gets wrong (None past MAX_WRONG_KEPT)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def all_inputs(d_vocab: int, length: int) -> Tensor:
    """Every input of ``length`` tokens in ``0..d_vocab-1``, in lexicographic order: ``[d_vocab**length, length]``."""
    if length == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    grids = torch.meshgrid(*[torch.arange(d_vocab)] * length, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def right(t: Tables, tokens: Tensor) -> Tensor:
    """Whether the model gets each input right: its max token's logit strictly beats every other, ``[b]`` bool."""
    tokens = torch.as_tensor(tokens, device=t.EQKE.device).long()
    logits = t.logits(tokens)                                                  # [b, d_vocab_out]
    m = tokens.max(1).values                                                   # [b]
    top = logits.gather(1, m[:, None])                                         # [b, 1]
    others = logits.scatter(1, m[:, None], -torch.inf)
    return others.amax(1) < top[:, 0]


def _gap_tables(t: Tables, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """For query ``q``: the unnormalised attention ``w [n, V]`` on a key (position, token);
    ``wg [n, V*V]``, ``w`` times the per-position gap bound ``d_i(x)[m] - max_{o≠m} d_i(x)[o]``
    at ``[i, x * V + m]``; and ``wd [n, V, v]``, ``w`` times ``d_i(x)``: summed over an input's
    positions, its logits times the softmax's denominator."""
    V = t.d_vocab
    s = t.scores(q)                                                            # [n, V]
    w = (s - s.max()).exp()                                                    # [n, V]
    d = t.EVOU[None] + t.PVOU[:, None] + t.EUPU[q]                             # [n, V, v]
    top = d.topk(2, dim=-1)                                                    # [n, V, 2]
    m = torch.arange(V, device=d.device)
    best_other = torch.where(top.indices[..., :1] == m, top.values[..., 1:2], top.values[..., :1])  # [n, V, m]
    gap = d[..., :V] - best_other                                              # [n, V(x), V(m)]
    return w, (w[..., None] * gap).reshape(t.length, V * V), w[..., None] * d


def brute_force(t: Tables) -> Exact:
    """The exact accuracy over all ``t.inputs`` inputs (see the module docstring)."""
    start = time.perf_counter()
    V, n, dev = t.d_vocab, t.length, t.EQKE.device
    N = n - 1                                       # non-query positions 0..N-1
    g = min(N, GRID_POSITIONS)                      # the last g of them form the grid
    grid = all_inputs(V, g).to(dev)                 # [V**g, g]
    grid_max = (grid.max(1).values if g else torch.zeros(1, dtype=torch.long, device=dev)).int()   # [V**g]
    cols = [grid[:, j].int().contiguous() for j in range(g)]        # each grid position's tokens
    rows = [c * V for c in cols]                                     # and their rows' offsets in wg
    wrong = torch.zeros(V, V, dtype=torch.long, device=dev)
    tol = STAGE1_TOL * 2 * max(t.logit_scale, 1e-300)   # |gap bound| <= 2 logit_scale per unit of attention
    correct = full = 0
    bad_inputs: list[Tensor] = []
    for q in range(V):
        w, wg, wd = _gap_tables(t, q)
        grid_w = sum((w[N - g + j].index_select(0, cols[j]) for j in range(g)), w.new_zeros(len(grid)))  # [V**g]
        for prefix in itertools.product(range(V), repeat=N - g):
            m = grid_max.clamp(min=max(prefix + (q,)))                        # [V**g]: each input's max
            const = wg[n - 1, q * V: (q + 1) * V] + sum(wg[i, x * V: (x + 1) * V] for i, x in enumerate(prefix))
            bound = const.index_select(0, m)                                   # [V**g]
            for j in range(g):
                bound += wg[N - g + j].index_select(0, rows[j] + m)
            total_w = grid_w + (w[n - 1, q] + sum(w[i, x] for i, x in enumerate(prefix)))
            unsure = (bound <= tol * total_w).nonzero()[:, 0]                  # [u]
            correct += len(grid) - len(unsure)
            if len(unsure):
                full += len(unsure)
                ok = _check_in_full(wd, prefix, q, cols, unsure, m[unsure])
                correct += int(ok.sum())
                bad = unsure[~ok]
                wrong[:, q] += torch.bincount(m[bad].long(), minlength=V)
                if len(bad) and sum(map(len, bad_inputs)) + len(bad) <= MAX_WRONG_KEPT:
                    u = len(bad)
                    bad_inputs.append(torch.cat([torch.tensor(prefix, dtype=torch.long).expand(u, -1), grid[bad].cpu(),
                                                 torch.full((u, 1), q, dtype=torch.long)], dim=1))
    O = t.d_vocab_out
    flops = V * n * V * O * 6.0 + t.inputs * (2.0 * n + 2) + full * (g + 3.0) * O
    kept = torch.cat(bad_inputs) if bad_inputs else torch.zeros(0, n, dtype=torch.long)
    whole = len(kept) == t.inputs - correct
    return Exact(correct, t.inputs, wrong.cpu(), full, flops, time.perf_counter() - start, kept if whole else None)


def _check_in_full(wd: Tensor, prefix: tuple[int, ...], q: int, cols: list[Tensor], unsure: Tensor,
                   m: Tensor) -> Tensor:
    """Stage 2: ``[u]`` bool, whether each input ``prefix + grid[unsure] + (q,)`` is right, from
    its logits times the softmax's denominator (the same comparisons; the denominator is > 0)."""
    n, g = wd.shape[0], len(cols)
    const = wd[n - 1, q] + sum(wd[i, x] for i, x in enumerate(prefix))        # [v]: the query and the prefix
    out = []
    for s in range(0, len(unsure), FULL_CHUNK):
        part = unsure[s:s + FULL_CHUNK]
        num = const.expand(len(part), -1).clone()                              # [u, v]
        for j in range(g):
            num += wd[n - 1 - g + j].index_select(0, cols[j][part])
        mm = m[s:s + FULL_CHUNK].long()[:, None]
        top = num.gather(1, mm)[:, 0]
        out.append(num.scatter_(1, mm, -torch.inf).amax(1) < top)
    return torch.cat(out)
