"""A subcubic proof: EQKE as "query direction × size direction" plus a bounded remainder.

A max model's EQKE is close to rank one, ``EQKE ≈ σ₁ a bᵀ``: ``b`` (the size direction) orders
the key tokens by value and ``a`` (the query direction) scales each query's row. The proof never
forms EQKE: from its factors (``EQKE = A Bᵀ``, ``A, B [d_vocab, d_head]``) a thin SVD gives
``σ₁ a bᵀ`` and the remainder ``R``, and what attention needs of ``R`` is bounded per query row,
``ε_q >= max_{x,y} R[q, x] - R[q, y]``, by the smaller of ``√2 σ₂`` and the max-difference bound
``Σ_j |L[q, j]| (max_x R_j[x] - min_x R_j[x])`` over the remainder's factors. Inside a row the
score of any token relative to the max token's is then within ``ε_q`` of
``a'_q (b_x - b_m)``; taking ``a'_q`` over its range makes the token weights query-independent.

Cases are ``(m, q, c)`` (max token, query token, copies of ``m`` among the other positions), and
for each the proof finds, by bisection, the largest ``k*`` such that every input whose other
tokens are all ``<= k*`` is certified. The logit gap is bounded per group of positions with the
worst output of each taken on its own and the direct path and OV terms split, so every table is
``O(d_vocab · d_vocab_out · n)`` or ``O(d_vocab²)`` and the cases cost
``O(d_vocab² · n · log d_vocab)``: no step is cubic in ``d_vocab``. The price is the bound:
inputs whose largest non-max token is close to ``m`` are given up. Comparisons are strict, in
float64, with the cubic proof's margin.

>>> import qkov
>>> from qkov.certify.tables import tables
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=5, n_ctx=4))
>>> proof = subcubic(tables(model, length=4))
>>> 0 <= proof.certified <= 5 ** 4
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import QkovError
from .cases import case_of
from .cubic import MARGIN_REL
from .tables import Tables


@dataclass
class SubcubicProof:
    """For each case ``(m, q, c)``, the largest non-max token ``k*`` up to which it is certified."""

    length: int
    d_vocab: int
    k_star: Tensor        # [m, q, c] int64: -1 where no input with a non-max token is certified
    pure_passes: Tensor   # [m, q] bool: the input [m]*(n-1) + [q]
    eps: Tensor           # [q]: the bound on the remainder's spread in each EQKE row (after attn_scale)
    flops: float
    seconds: float

    def _counts(self) -> tuple[Tensor, Tensor]:
        """``(certified, inputs)``, each ``[m, q]`` int64."""
        V, N = self.d_vocab, self.length - 1
        m = torch.arange(V)[:, None, None]
        q = torch.arange(V)[None, :, None]
        c = torch.arange(N + 1)[None, None, :]
        r = N - c
        per = torch.tensor([math.comb(N, i) for i in range(N + 1)])[None, None, :]
        valid = (q <= m) & (r >= 1) & ((q == m) | (c >= 1))
        cert = (per * (self.k_star + 1) ** r * valid).sum(2)
        inputs = (per * (m ** r) * valid).sum(2)                                # non-max tokens < m
        pure = (torch.arange(V)[None, :] <= torch.arange(V)[:, None]) if N else torch.eye(V, dtype=torch.bool)
        return cert + self.pure_passes.long() * pure, inputs + pure.long()

    @property
    def certified(self) -> int:
        return int(self._counts()[0].sum())

    @property
    def bound(self) -> float:
        return self.certified / self.d_vocab ** self.length

    def uncertified(self) -> Tensor:
        """``[m, q]`` int64: inputs with max ``m`` and query ``q`` left uncertified."""
        cert, inputs = self._counts()
        return inputs - cert

    def certifies(self, tokens: Tensor) -> Tensor:
        """``[b]`` bool: whether the proof certifies each input ``[b, length]``."""
        m, q, k, c = case_of(torch.as_tensor(tokens).cpu())
        return torch.where(k < 0, self.pure_passes[m, q], k <= self.k_star[m, q, c.clamp(max=self.length - 1)])


def rank_one(t: Tables) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(a', b, eps, flops)``: EQKE/attn_scale = ``a'[q] b[x]`` + a remainder whose spread in row
    ``q`` is at most ``eps[q]``; ``b`` is signed so that it grows with the token on average."""
    if t.EQKE_factors is None:
        raise QkovError("the subcubic proof needs EQKE's factors (Tables.EQKE_factors); build the tables with "
                        "qkov.certify.tables(model, length)")
    A, B = t.EQKE_factors                                                     # [V, e] each
    QA, RA = torch.linalg.qr(A)
    QB, RB = torch.linalg.qr(B)
    U, S, Wh = torch.linalg.svd(RA @ RB.T)                                    # core [e, e]
    left, right = QA @ U, QB @ Wh.T                                           # [V, e]: EQKE = left S rightᵀ
    centred = torch.arange(t.d_vocab, dtype=B.dtype, device=B.device) - (t.d_vocab - 1) / 2
    sign = 1.0 if float(right[:, 0] @ centred) >= 0 else -1.0             # b grows with the token
    a, b = sign * S[0] * left[:, 0] / t.attn_scale, sign * right[:, 0]       # [V], [V]
    L, R = left[:, 1:] * S[1:] / t.attn_scale, right[:, 1:]                   # the remainder's factors
    spread = R.amax(0) - R.amin(0)                                            # [e-1]
    max_diff = (L.abs() * spread).sum(1)                                      # [V]
    sigma = math.sqrt(2) * float(S[1]) / t.attn_scale if len(S) > 1 else 0.0
    # SVD and QR round at ~1e-16 of |A_q| |B_x|: the allowance covers it many times over
    rounding = 2e-9 * float(A.norm(dim=1).max() * B.norm(dim=1).max()) / t.attn_scale
    eps = torch.clamp(max_diff, max=sigma) + rounding
    V, e = A.shape
    flops = 4.0 * V * e * e * 2 + 10.0 * e ** 3 + 4.0 * V * e
    return a, b, eps, flops


def _top2(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(best, where, second)`` of each row of ``x [r, o]``."""
    top = x.topk(2, dim=-1)
    return top.values[:, 0], top.indices[:, 0], top.values[:, 1]


def _max_not(best: Tensor, where: Tensor, second: Tensor, m: Tensor) -> Tensor:
    """``max_{o != m} x[r, o]`` from the rows' top two, for each row ``r`` against each ``m`` (broadcast)."""
    return torch.where(where == m, second, best)


def _tables(t: Tables) -> dict[str, Tensor]:
    """Every table the cases read, none larger than ``d_vocab x d_vocab`` or ``d_vocab x d_vocab_out``:
    indexed ``[m, q]`` (or ``[m, y]``, ``[q]``, ``[m]``)."""
    V, n, N = t.d_vocab, t.length, t.length - 1
    dev = t.EVOU.device
    ms = torch.arange(V, device=dev)
    direct = _top2(t.EUPU)                                                    # over o, per query token
    Umax = _max_not(*(x[None, :] for x in direct), ms[:, None]) - t.EUPU[:, :V].T   # [m, q]
    Xq = t.EUPU + t.EVOU + t.PVOU[n - 1]                                      # [q, o]: attending to the query
    query = _max_not(*(x[None, :] for x in _top2(Xq)), ms[:, None]) - Xq[:, :V].T  # [m, q]
    H = (t.PVOU[:N, None, :] - t.PVOU[:N, :V, None]).amax(0) if N else t.PVOU.new_zeros(V, t.d_vocab_out)  # [m, o]
    own = t.EVOU[:V] + H                                                      # [m, o]: a copy of m, worst position
    copy = _max_not(*_top2(own), ms) - t.EVOU[ms, ms]                         # [m]
    harm = t.EVOU.amax(1)[None, :] + H.amax(1)[:, None] - t.EVOU[:, :V].T     # [m, y]: a token y, worst output
    return dict(Umax=Umax, query=query, copy=copy, harm=harm)


def _case_passes(t: Tables, T: dict[str, Tensor], ab: tuple[Tensor, Tensor, Tensor], pos: dict[str, Tensor],
                 m: Tensor, q: Tensor, c: Tensor, k: Tensor, margin: float) -> Tensor:
    """Whether the cases ``(m, q, c)`` with every other token ``<= k`` are certified (elementwise;
    ``k = -1``: the pure input, no other token)."""
    a, b, eps = ab
    N = t.length - 1
    e_q = eps[q]
    # the query's score relative to m's, within eps of the rank-one part (exactly 0 when q = m)
    rel = torch.where(q == m, 0.0, a[q] * (b[q] - b[m]))
    spread = torch.where(q == m, 0.0, e_q)
    base = t.EQKP[q, t.length - 1] / t.attn_scale - pos["shift"][q]
    w_hi, w_lo = (rel + spread + base).exp(), (rel - spread + base).exp()
    qv = T["query"][m, q]
    query = qv * torch.where(qv > 0, w_hi, w_lo)
    kk = k.clamp(min=0)
    none = k < 0
    tau_max = torch.where(none, 0.0, T["tau_max"][m, kk])
    rest = e_q.exp() * (torch.where(none, 0.0, T["rho"][m, kk]) + T["Umax"][m, q].clamp(min=0) * tau_max)
    copy = T["Umax"][m, q] + T["copy"][m]
    top, bot = pos["top"], pos["bot"]
    F = query + torch.maximum(rest * top[q, N - c] + copy * bot[q, c], rest * bot[q, N - c] + copy * top[q, c])
    total = w_hi + torch.maximum(torch.ones_like(tau_max), e_q.exp() * tau_max) * top[q, N]
    return F < -(margin * total + 1e-290)


def _token_weights(t: Tables, T: dict[str, Tensor], a: Tensor, b: Tensor) -> None:
    """Add to ``T`` the query-independent bounds ``tau [m, y]`` on a token's weight relative to
    ``m``'s (times ``exp(eps_q)``), their running max ``tau_max [m, k]`` and
    ``rho [m, k] = max(0, max_{y<=k} tau harm)``."""
    d = b[None, :] - b[:, None]                                               # [m, y]: b_y - b_m
    tau = torch.maximum(a.min() * d, a.max() * d).exp()                       # [m, y]
    T["tau_max"] = tau.cummax(1).values
    T["rho"] = (tau * T["harm"]).cummax(1).values.clamp(min=0)


def subcubic(t: Tables) -> SubcubicProof:
    """Run the subcubic proof on one length's tables."""
    from .cubic import positional_weights

    start = time.perf_counter()
    V, N, O = t.d_vocab, t.length - 1, t.d_vocab_out
    margin = MARGIN_REL * max(t.logit_scale, 1e-300)
    a, b, eps, flops = rank_one(t)
    T = _tables(t)
    _token_weights(t, T, a, b)
    pos = positional_weights(t)
    dev = t.EVOU.device
    m, q, c = (x.reshape(-1) for x in torch.meshgrid(
        torch.arange(V, device=dev), torch.arange(V, device=dev), torch.arange(N + 1, device=dev), indexing="ij"))
    valid = (q <= m) & (c < N) & ((q == m) | (c >= 1)) & (m >= 1)
    lo, hi = torch.full_like(m, -1), torch.where(valid, m - 1, -1)
    steps = 0
    while bool((lo < hi).any()):                                              # bisection for the largest k
        mid = (lo + hi + 1) // 2
        ok = _case_passes(t, T, (a, b, eps), pos, m, q, c, mid, margin)
        lo, hi = torch.where((lo < hi) & ok, mid, lo), torch.where((lo < hi) & ~ok, mid - 1, hi)
        steps += 1
    mm, qq = (x.reshape(-1) for x in torch.meshgrid(torch.arange(V, device=dev), torch.arange(V, device=dev),
                                                     indexing="ij"))
    full = torch.full_like(mm, N)
    pure = _case_passes(t, T, (a, b, eps), pos, mm, qq, full, torch.full_like(mm, -1), margin)
    pure &= (qq <= mm) if N else qq == mm
    flops += 12.0 * V * O + 2.0 * N * V * O + 6.0 * V * V + 40.0 * V * V * (N + 1) * (steps + 1)
    return SubcubicProof(t.length, V, lo.reshape(V, V, N + 1).cpu(), pure.reshape(V, V).cpu(), eps.cpu(), flops,
                         time.perf_counter() - start)
