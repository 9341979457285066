"""The tables of a one-layer attention-only model, built from token and position factors, and
their backward written out by hand: the torch half of the C kernel's training step.

The C kernel (``native.py``) reads three tables and runs everything per example (attention,
mixing, cross-entropy and their backward); what it needs from the weights and gives back to
them is here. :func:`build_tables` makes the tables from the parameters, and
:func:`tables_backward` takes the tables' gradients back to the parameters. For ``max``,
autograd's recording and replay of these ~70 small operations cost as much as the arithmetic,
so the chain rule is written out.

Parameters are passed in the order ``W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..model import heads_matrix

# Work tensors kept from one step to the next (glibc hands blocks of a few hundred KB back to the
# system, so fresh ones came back page-faulted: ~200 faults a step at ~2.5 µs each here). Larger
# ones are allocated afresh: there the arithmetic dwarfs the faults. At most _BUFFER_BUDGET bytes
# are kept: a caller cycling through many batch sizes empties the cache rather than grows it.
_BUFFER_MAX_BYTES = 16 << 20
_BUFFER_BUDGET = 64 << 20


class Buffers:
    """Work tensors by ``(key, shape, dtype)``, reused across calls. A buffer is valid until the
    next call that asks for the same key: only tensors that never leave one call come from here."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, Tensor] = {}
        self.nbytes = 0

    def empty(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        k = (key, tuple(shape), like.dtype)
        buf = self.bufs.get(k)
        if buf is None:
            buf = like.new_empty(shape)
            size = buf.numel() * buf.element_size()
            if size <= _BUFFER_MAX_BYTES:
                if self.nbytes + size > _BUFFER_BUDGET:   # tensors handed out stay valid
                    self.bufs.clear()
                    self.nbytes = 0
                self.bufs[k] = buf
                self.nbytes += size
        return buf


class Tables(NamedTuple):
    """What the C kernel reads (layouts as in ``_native.c``)."""
    scores: Tensor      # [h, k*V, V+p]: key row (j, t') against the V token and p position query factors
    ov: Tensor          # [k*V, h*v_out]: the value of (key position j, token t) through W_O W_U, per head
    skip: Tensor        # [p*V, v_out]: the query's own residual stream through W_U, biases folded in


class Factors(NamedTuple):
    """What :func:`build_tables` keeps for :func:`tables_backward`: the factors the tables were
    built from, and the sizes."""
    W_qkv: Tensor           # [d, 3he]: W_Q | W_K | W_V, heads side by side
    q_factors: Tensor       # [h, e, V+p]: queries of the V tokens and p positions, scaled
    keys: Tensor            # [h, k*V, e]: keys of every (key position, token)
    v_factors: Tensor       # [h, V+k, e]: values of the V tokens and k positions
    W_OU: Tensor            # [h, e, v_out]
    skip_factors: Tensor    # [V+p, d]: W_E rows and the scored positions' W_pos rows
    scale: float
    V: int
    d: int
    h: int
    e: int
    w: int
    P: int
    nk: int


def build_tables(path, params: tuple[Tensor, ...], buffers: Buffers) -> tuple[Tables, Factors]:
    """The three tables the C kernel reads, and what :func:`tables_backward` needs. ``path`` is
    the model's ``TablePath`` (its positions and row layout).

    The residual stream a key, value, query or the skip path reads is ``W_E[t] + W_pos[j]``, and
    all of them are linear in it. So every projection is taken of the V token rows and of the
    few position rows apart (factors), and a (position, token) table is a broadcast sum of two
    factors: the matmuls run on V + k rows instead of k*V (4-6x smaller for max). Scores are the
    exception: a key factor times a query factor, both sums, so they come from the table of
    (key position, key token) rows against the V + p query factors, read twice per score.
    """
    W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U = params
    V, d = W_E.shape
    h, _, e = W_Q.shape
    w = W_U.shape[1]
    P, nk, he = len(path.positions), path.n_keys, h * e
    W_qkv = torch.cat([heads_matrix(W_Q), heads_matrix(W_K), heads_matrix(W_V)], dim=1)    # [d, 3he]
    b_qkv = torch.cat([b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1)])
    tok = W_E @ W_qkv                                                           # [V, 3he] token factors
    pos = torch.addmm(b_qkv, W_pos[:nk], W_qkv)                                 # [k, 3he] position factors
    scale = e**-0.5
    q_f = torch.cat([tok[:, :he], pos[path.pos_cols, :he]]).mul_(scale)        # [V+p, he]
    q_factors = q_f.view(V + P, h, e).permute(1, 2, 0)                          # [h, e, V+p]
    keys = (tok[None, :, he:2 * he] + pos[:, None, he:2 * he]).view(nk * V, h, e).transpose(0, 1)   # [h, k*V, e]
    scores = torch.bmm(keys, q_factors, out=buffers.empty("scores", (h, nk * V, V + P), keys))
    W_OU = (W_O.reshape(he, d) @ W_U).view(h, e, w)                             # [h, e, v_out]
    v_factors = torch.cat([tok[:, 2 * he:], pos[:, 2 * he:]]).view(V + nk, h, e).transpose(0, 1)   # [h, V+k, e]
    ov_f = torch.bmm(v_factors, W_OU).transpose(0, 1).reshape(V + nk, h * w)    # [V+k, h*v_out]
    ov = (ov_f[None, :V] + ov_f[V:, None]).view(nk * V, h * w)                  # row j*V + t
    skip_factors = torch.cat([W_E, W_pos[path.pos_cols]])                       # [V+p, d]
    u_f = torch.mm(skip_factors, W_U)                                           # [V+p, v_out]
    skip = (u_f[None, :V] + (u_f[V:] + (b_O @ W_U + b_U))[:, None]).view(P * V, w)
    factors = Factors(W_qkv, q_factors, keys, v_factors, W_OU, skip_factors, scale, V, d, h, e, w, P, nk)
    return Tables(scores, ov, skip), factors


def tables_backward(path, factors: Factors, params: tuple[Tensor, ...], g_scores: Tensor, g_ov: Tensor,
                    g_skip: Tensor) -> tuple[Tensor, ...]:
    """Gradients of the 12 parameters from the tables' (shaped as :class:`Tables`): from the
    tables to their factors (a sum over the other index of the broadcast), and from the factors
    to the weights. New tensors, never buffers."""
    W_qkv, q_factors, keys, v_factors, W_OU, skip_factors, scale, V, d, h, e, w, P, nk = factors
    W_E, W_pos, W_O, b_O, W_U = params[0], params[1], params[8], params[9], params[10]
    he = h * e
    g_scores = g_scores.view(h, nk * V, V + P)
    g_k = torch.bmm(g_scores, q_factors.transpose(1, 2)).transpose(0, 1).reshape(nk, V, he)
    g_q = torch.bmm(keys.transpose(1, 2), g_scores).permute(2, 0, 1).reshape(V + P, he).mul_(scale)
    g_ov = g_ov.view(nk, V, h * w)
    g_ovf = torch.cat([g_ov.sum(0), g_ov.sum(1)]).view(V + nk, h, w).transpose(0, 1)   # [h, V+k, v_out]
    g_v = torch.bmm(g_ovf, W_OU.transpose(1, 2)).transpose(0, 1).reshape(V + nk, he)
    g_WOU = torch.bmm(v_factors.transpose(1, 2), g_ovf).reshape(he, w)          # [h*e, v_out]
    g_skip = g_skip.view(P, V, w)
    g_uf = torch.cat([g_skip.sum(0), g_skip.sum(1)])                            # [V+p, v_out]
    g_bias = g_uf[V:].sum(0)                    # of b_O W_U + b_U, which every skip row holds
    # The factors' gradients, laid out as W_qkv's columns: [query | key | value].
    g_pos_q = g_q.new_zeros(nk, he).index_copy_(0, path.pos_idx, g_q[V:])
    g_tok = torch.cat([g_q[:V], g_k.sum(0), g_v[:V]], dim=1)                    # [V, 3he]
    g_pos = torch.cat([g_pos_q, g_k.sum(1), g_v[V:]], dim=1)                    # [k, 3he]
    g_W_qkv = torch.addmm(W_E.T @ g_tok, W_pos[:nk].T, g_pos)                   # [d, 3he]
    g_b_qkv = g_pos.sum(0)
    g_skip_factors = g_uf @ W_U.T                                               # [V+p, d]
    g_W_pos = torch.zeros_like(W_pos)
    g_W_pos[:nk] = g_pos @ W_qkv.T
    g_W_pos[path.pos_cols] += g_skip_factors[V:]
    g_W_U = torch.addmm(skip_factors.T @ g_uf, W_O.reshape(he, d).T, g_WOU).add_(torch.outer(b_O, g_bias))

    def per_head(i: int) -> Tensor:                                             # [h, d, e]
        return g_W_qkv[:, i * he:(i + 1) * he].reshape(d, h, e).permute(1, 0, 2).contiguous()

    return (torch.addmm(g_skip_factors[:V], g_tok, W_qkv.T), g_W_pos,
            per_head(0), g_b_qkv[:he].view(h, e), per_head(1), g_b_qkv[he:2 * he].view(h, e),
            per_head(2), g_b_qkv[2 * he:].view(h, e), (g_WOU @ W_U.T).view(h, e, d), W_U @ g_bias,
            g_W_U, g_bias)
