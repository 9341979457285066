"""The cubic proof: a certified lower bound on a max model's accuracy from its case split.

Inputs are split into cases ``(m, q, k, c)`` (:mod:`.cases`): ``d_vocab³ · n`` of them. The
model is right on an input when, for every wrong output ``o``, the attention-weighted sum

    F_o = Σ_i w_i (logit_i[o] - logit_i[m])

is negative, with ``w_i = exp(score_i)`` the unnormalised attention on position ``i`` and
``logit_i = EUPU[q] + EVOU[x_i] + PVOU[i]`` what attending only to ``i`` would give. Writing
``u_o = EUPU[q, o] - EUPU[q, m]``, ``g_o(x) = EVOU[x, o] - EVOU[x, m]``, ``h_o(i) = PVOU[i, o] -
PVOU[i, m]`` and ``H_o`` for the largest ``h_o(i)`` over the non-query positions, a case's
positions contribute, per unit of their positional weight ``exp(EQKP_i)``:

- the query: ``u_o + g_o(q) + h_o(n-1)``, times its own weight;
- a copy of ``m``: at most ``exp(EQKE[q, m]) (u_o + g_o(m) + H_o)``;
- another token: at most ``max_{y<=k} exp(EQKE[q, y]) (u_o + g_o(y) + H_o)`` (a token's
  attention and its harm are taken together: the heaviest token is rarely the most harmful);

and the positions are pessimised too: the other tokens on the positions with the largest
``EQKP`` and the copies of ``m`` on the smallest, or the other way round, whichever is worse.

Two passes. The first takes the worst output for each group of positions on its own (the
query, the copies of ``m``, the other tokens, with ``max_o u_o`` split off for the last): every
table costs ``O(d_vocab² · d_vocab_out)`` and each case O(1), so the pass is cubic. The cases it
leaves are checked again with the worst output taken jointly, the ``window`` tokens just below
``k`` exactly and those further below as in the first pass, at ``O(window · d_vocab_out)``
each (windows 2, 8, then every token). On a trained max model the re-checked cases are those
with ``k`` close to ``m``: ``O(d_vocab² · n)`` of them, so the total stays cubic in practice;
``flops`` counts the work done. A case is certified when its bound is below ``-margin``: every
comparison strict, in float64, with ``margin`` (``MARGIN_REL`` of the logits' scale, times the
attention's total weight) far above float64 rounding.

>>> import qkov
>>> from qkov.certify.tables import tables
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=5, n_ctx=4))
>>> proof = cubic(tables(model, length=4))
>>> int(proof.counts.sum() + proof.pure_counts.sum()) == 5 ** 4
True
>>> 0 <= proof.certified <= 5 ** 4
True
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .cases import CaseProof, case_counts
from .tables import Tables

MARGIN_REL = 1e-9            # a case passes when its bound is below -MARGIN_REL * the logit scale (per unit weight)
WINDOWS = (2, 8, None)       # re-check windows below k; None: every token <= k
RECHECK_BUDGET = 8.0         # re-checks may cost this many times the first pass (which keeps the proof cubic)
RECHECK_CHUNK = 1 << 21      # numbers held per re-check batch (cases x window x outputs)


def _max_not(x: Tensor, m: int) -> Tensor:
    """``max_{o != m} x[..., o]``."""
    return torch.cat([x[..., :m], x[..., m + 1:]], -1).amax(-1)


def positional_weights(t: Tables) -> dict[str, Tensor]:
    """Per query token: the non-query positions' weights ``exp(EQKP - max)`` summed over the
    ``j`` largest (``top``) and the ``j`` smallest (``bot``), ``j = 0..N``, and the shift."""
    N = t.length - 1
    p = t.EQKP[:, :N] / t.attn_scale                                          # [q, N]
    shift = p.amax(1) if N else p.new_zeros(t.d_vocab)                       # [q]
    E = (p - shift[:, None]).exp().sort(dim=1, descending=True).values        # [q, N], in (0, 1]
    zero = E.new_zeros(t.d_vocab, 1)
    return dict(top=torch.cat([zero, E.cumsum(1)], 1), bot=torch.cat([zero, E.flip(1).cumsum(1)], 1),
                shift=shift)                                                  # top, bot: [q, N+1]


def _groups(t: Tables, pos: dict[str, Tensor], m: int) -> dict[str, Tensor]:
    """What each group of positions contributes to ``F_o`` for the cases with max token ``m``
    (token weights relative to ``m``'s, positional weights relative to the largest)."""
    n, N = t.length, t.length - 1
    e = t.EQKE / t.attn_scale                                                 # [q, y]
    g = t.EVOU - t.EVOU[:, m:m + 1]                                           # [x, o]
    h = t.PVOU - t.PVOU[:, m:m + 1]                                           # [i, o]
    u = t.EUPU - t.EUPU[:, m:m + 1]                                           # [q, o]
    gH = g + h[:N].amax(0)                                                    # [x, o]: a token on the worst position
    tok = (e[:, :m] - e[:, m:m + 1]).exp()                                    # [q, y < m]; m's weight is 1
    q = torch.arange(t.d_vocab, device=e.device)
    w_q = (e[q, q] - e[:, m] + t.EQKP[:, n - 1] / t.attn_scale - pos["shift"]).exp()   # [q]
    split = (_max_not(u, m)[:, None] + _max_not(gH, m)[None, :m]) * tok      # [q, y]: first pass, per token
    ninf = split.new_full((t.d_vocab, 1), -torch.inf)
    heaviest = torch.maximum(tok.cummax(1).values, torch.ones_like(tok))      # [q, k]
    return dict(u=u, gH=gH, tok=tok, w_q=w_q, query=w_q[:, None] * (u + g + h[n - 1]),   # [q, o]
                copy=u + gH[m],                                               # [q, o]
                below=torch.cat([ninf, split.cummax(1).values], 1),           # [q, j]: max over y < j
                total=w_q[:, None] + heaviest * pos["top"][:, N:N + 1])       # [q, k]: bound on Σ w


def _combine(a: Tensor, b: Tensor, query: Tensor, q: Tensor, c: Tensor, N: int, pos: dict[str, Tensor]) -> Tensor:
    """``F``: the query's term plus the worse of the two position assignments, for other tokens
    contributing ``a`` and copies of ``m`` ``b`` per unit of positional weight (broadcast)."""
    top, bot = pos["top"], pos["bot"]
    T_r, B_r, T_c, B_c = top[q, N - c], bot[q, N - c], top[q, c], bot[q, c]
    return query + torch.maximum(a * T_r + b * B_c, a * B_r + b * T_c)


def _first_pass(G: dict[str, Tensor], pos: dict[str, Tensor], m: int, N: int, margin: float) -> Tensor:
    """``[q, k, c]``: how far each case's bound with the per-group worst outputs is from passing,
    per unit of attention weight (below 0: certified)."""
    V = G["w_q"].shape[0]
    q = torch.arange(V, device=G["w_q"].device)[:, None, None]
    c = torch.arange(N + 1, device=q.device)[None, None, :]
    a = G["below"][:, 1:m + 1, None]                                          # [q, k, 1]: max over y <= k
    b, query = _max_not(G["copy"], m)[:, None, None], _max_not(G["query"], m)[:, None, None]
    F = _combine(a, b, query, q, c, N, pos)                                   # [q, k, c]
    total = G["total"][:, :m, None]
    return (F + margin * total + 1e-290) / total


def _recheck(G: dict[str, Tensor], pos: dict[str, Tensor], m: int, N: int, cases: Tensor, window: int | None,
             margin: float) -> Tensor:
    """``[B]`` bool: the cases ``(q, k, c)`` rows of ``cases`` certified with the worst output
    taken jointly, the ``window`` tokens just below and at ``k`` exactly."""
    q, k, c = cases.unbind(1)                                                 # [B] each
    w = m if window is None else window
    ys = k[:, None] - torch.arange(w, device=k.device)                        # [B, w]
    ok = ys >= 0
    ys = ys.clamp(min=0)
    harm = G["tok"][q[:, None], ys][..., None] * (G["u"][q][:, None] + G["gH"][ys])   # [B, w, o]
    harm = harm.masked_fill(~ok[..., None], -torch.inf).amax(1)               # [B, o]
    a = torch.maximum(harm, G["below"][q, (k - w + 1).clamp(min=0)][:, None])
    F = _combine(a, G["copy"][q], G["query"][q], q[:, None], c[:, None], N, pos)   # [B, o]
    F[:, m] = -torch.inf
    return F.amax(1) < -(margin * G["total"][q, k] + 1e-290)


def _pure_passes(t: Tables, margin: float) -> Tensor:
    """``[m, q]``: whether the input ``[m]*(n-1) + [q]`` is right by more than ``margin`` (computed exactly)."""
    V, n = t.d_vocab, t.length
    m, q = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    toks = torch.cat([m.reshape(-1, 1).expand(-1, n - 1), q.reshape(-1, 1)], 1).to(t.EQKE.device)  # [V*V, n]
    logits = t.logits(toks)                                                   # [V*V, v]
    mx = toks.max(1).values
    right = logits.gather(1, mx[:, None])[:, 0]
    others = logits.scatter(1, mx[:, None], -torch.inf).amax(1)
    return (right - others > margin).reshape(V, V).cpu()


def cubic(t: Tables, windows: tuple[int | None, ...] = WINDOWS, budget: float = RECHECK_BUDGET) -> CaseProof:
    """Run the cubic proof on one length's tables. The re-checks spend at most ``budget`` times
    the first pass's FLOPs, on the cases closest to passing first (``windows=()``: none)."""
    start = time.perf_counter()
    V, N, O = t.d_vocab, t.length - 1, t.d_vocab_out
    margin = MARGIN_REL * max(t.logit_scale, 1e-300)
    counts, pure_counts = case_counts(V, t.length)
    excess = torch.full((V, V, V, N + 1), -torch.inf, dtype=t.EQKE.dtype)   # [m, q, k, c]; < 0: certified
    flops, rechecked = V * V * t.length * (3.0 * O + 10), 0
    if N >= 1:
        pos = positional_weights(t)
        for m in range(1, V):                     # with m = 0 every input is pure
            excess[m, :, :m] = _first_pass(_groups(t, pos, m), pos, m, N, margin).cpu()
            flops += 14.0 * V * O + 4.0 * V * m + 16.0 * V * m * (N + 1)
        excess[counts == 0] = -torch.inf
        left = budget * flops
        for window in windows:
            spent, n = _recheck_cases(t, pos, excess, window, left, margin)
            left, flops, rechecked = left - spent, flops + spent, rechecked + n
    pure = _pure_passes(t, margin) & (pure_counts > 0)
    passes = (excess < 0) & (counts > 0)
    return CaseProof(t.length, V, passes, counts, pure, pure_counts, flops, time.perf_counter() - start, rechecked)


def _recheck_cases(t: Tables, pos: dict[str, Tensor], excess: Tensor, window: int | None, budget: float,
                   margin: float) -> tuple[float, int]:
    """Re-check the failing cases of ``excess`` (set to -inf when they pass), those closest to
    passing first, until ``budget`` FLOPs are spent; returns (FLOPs spent, cases re-checked)."""
    N, O = t.length - 1, t.d_vocab_out
    todo = (excess >= 0).nonzero()                                            # [B, 4]: (m, q, k, c)
    todo = todo[excess[tuple(todo.T)].argsort()]
    w = todo[:, 0] if window is None else todo[:, 0].clamp(max=window)        # each case's window
    cost = O * (3.0 * w + 12)
    todo = todo[cost.cumsum(0) <= budget]
    for m in todo[:, 0].unique().tolist():
        mine = todo[todo[:, 0] == m, 1:]                                      # [b, 3]: (q, k, c)
        G, wm = _groups(t, pos, m), m if window is None else min(window, m)
        step = max(1, RECHECK_CHUNK // (wm * O))
        for i in range(0, len(mine), step):
            part = mine[i:i + step]
            ok = _recheck(G, pos, m, N, part.to(t.EQKE.device), window, margin).cpu()
            excess[m, part[ok, 0], part[ok, 1], part[ok, 2]] = -torch.inf
    return float(cost[: len(todo)].sum()), len(todo)
